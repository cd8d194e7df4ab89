"""Tokenizer: exact round-trip on adversarial Unicode, digit splitting, chat rendering and its mask."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geb.errors import GebError
from geb.tokenizer import IM_END, IM_START, Tokenizer


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_roundtrip_any_unicode(tokenizer, s):
    assert tokenizer.decode(tokenizer.encode(s)) == s


@pytest.mark.parametrize("s", [
    "", " ", "\n\n\t ", "北京是中国的首都。", "𠀀𪚥𰻞", "👩‍👩‍👧‍👦🏳️‍🌈", "\x00\x01\x7f", "\ufeffBOM", "é vs é",
    "Ｆｕｌｌ－ｗｉｄｔｈ　１２３", "\ufffd\ufffd", "<|im_start|> literal", "a" * 5000, "مرحبا", "ĊĠ",
])
def test_roundtrip_edge_cases(tokenizer, s):
    assert tokenizer.decode(tokenizer.encode(s)) == s


def test_digits_are_split(tokenizer):
    ids = tokenizer.encode("2024")
    assert len(ids) == 4
    assert [tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_lone_surrogate_is_a_clear_error(tokenizer):
    with pytest.raises(GebError, match="surrogate"):
        tokenizer.encode("a\ud800b")


def test_save_load_same_ids(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    t2 = Tokenizer.load(tmp_path)
    text = "Paris 巴黎 2024 😀"
    assert t2.encode(text) == tokenizer.encode(text)
    assert t2.hash() == tokenizer.hash()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(GebError, match="not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GebError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_chinese_is_compressed(tokenizer):
    # a trained BPE merges frequent CJK bytes: fewer tokens than UTF-8 bytes
    text = "北京是中国的首都。"
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2


def test_chat_render_and_mask(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "首都？"},
        {"role": "assistant", "content": "北京。"},
        {"role": "user", "content": "And France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ids, mask = tokenizer.render_chat(msgs)
    assert len(ids) == len(mask)
    text = tokenizer.decode(ids)
    assert text == "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in msgs)
    trained = tokenizer.decode([i for i, k in zip(ids, mask) if k])
    assert trained == f"北京。{IM_END}Paris.{IM_END}"
    gp, gmask = tokenizer.render_chat(msgs[:2], add_generation_prompt=True)
    assert tokenizer.decode(gp).endswith(f"{IM_START}assistant\n") and not any(gmask)


def test_chat_render_matches_transformers_template(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "你好 2024"}, {"role": "assistant", "content": "Hi! 😀"}]
    ours, _ = tokenizer.render_chat(msgs, add_generation_prompt=False)
    theirs = hf.apply_chat_template(msgs, tokenize=True)
    if isinstance(theirs, dict) or hasattr(theirs, "input_ids"):
        theirs = theirs["input_ids"]
    assert list(theirs) == ours
    assert hf("巴黎 Paris 123")["input_ids"] == tokenizer.encode("巴黎 Paris 123")


def test_chat_rejects_bad_messages(tokenizer):
    with pytest.raises(GebError, match="unknown role"):
        tokenizer.render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(GebError, match="message 0"):
        tokenizer.render_chat([{"content": "x"}])


def test_message_text_cannot_inject_special_tokens(tokenizer):
    ids, _ = tokenizer.render_chat([{"role": "user", "content": f"hi{IM_END}"}])
    assert ids.count(tokenizer.im_end_id) == 1


def test_train_on_empty_data_is_an_error():
    with pytest.raises(GebError, match="empty"):
        Tokenizer.train([], vocab_size=400)
