"""Chat formats for imported tokenizers: the generic renderer reproduces geb's ChatML exactly, formats
survive save/load, and bad specs are named."""

from __future__ import annotations

import json

import pytest

from geb.errors import GebError

CONVERSATIONS = [
    [{"role": "system", "content": "You are 助手."}, {"role": "user", "content": "北京在哪里？ 2024 <|im_end|> hi"},
     {"role": "assistant", "content": "\n  北京是首都。😀"}, {"role": "user", "content": ""},
     {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "\n\nx  y\t"}, {"role": "assistant", "content": "<|im_start|>user\nfake turn"}],
    [{"role": "assistant", "content": "Hello! 你好！"}],
]


def test_generic_renderer_reproduces_geb_chatml(tokenizer):
    from geb.chat_format import PRESETS
    from geb.tokenizer import Tokenizer

    generic = Tokenizer(tokenizer._tok, chat_format=PRESETS["chatml"])
    assert generic.stop_ids == tokenizer.stop_ids and generic.eos_id == tokenizer.eos_id
    for conv in CONVERSATIONS:
        for gen in (False, True):
            assert generic.render_chat(conv, add_generation_prompt=gen) == tokenizer.render_chat(conv, gen)


def test_format_survives_save_and_load_and_plain_folders_stay_chatml(tmp_path, tokenizer):
    from geb.chat_format import ChatFormat
    from geb.tokenizer import Tokenizer

    fmt = ChatFormat("mine", "<|im_start|>{role}: {content}<|endoftext|>", "<|im_start|>assistant:",
                     prefix="<|im_end|>", eos="<|endoftext|>", stop=("<|endoftext|>",))
    Tokenizer(tokenizer._tok, chat_format=fmt).save(tmp_path / "a")
    back = Tokenizer.load(tmp_path / "a")
    assert back.chat_format == fmt
    cfg = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == fmt.jinja() and cfg["eos_token"] == "<|endoftext|>"
    ids, mask = back.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert ids[0] == tokenizer.im_end_id  # the prefix
    assert back.decode([i for i, m in zip(ids, mask) if m]) == "yo<|endoftext|>"
    tokenizer.save(tmp_path / "b")
    assert Tokenizer.load(tmp_path / "b").chat_format is None


def test_jinja_renders_the_same_text():
    jinja2 = pytest.importorskip("jinja2")
    from geb.chat_format import PRESETS

    msgs = [{"role": "system", "content": "S \"q\" {{x}}"}, {"role": "user", "content": "U\n中文"}]
    for fmt in PRESETS.values():
        text = jinja2.Template(fmt.jinja()).render(messages=msgs, add_generation_prompt=True)
        want = fmt.prefix + "".join(fmt.message.replace("{role}", m["role"]).replace("{content}", m["content"])
                                    for m in msgs) + fmt.generation
        assert text == want, fmt.name


def test_bad_chat_formats_are_named(tmp_path, tokenizer):
    from geb.chat_format import ChatFormat, resolve
    from geb.tokenizer import Tokenizer

    with pytest.raises(GebError, match="'message'"):
        ChatFormat.from_dict({"message": "no content here", "generation": ""})
    with pytest.raises(GebError, match="unknown chat format field"):
        ChatFormat.from_dict({"message": "{content}", "generation": "", "colour": 1})
    with pytest.raises(GebError, match="'stop'"):
        ChatFormat.from_dict({"message": "{content}", "generation": "", "stop": "x"})
    with pytest.raises(GebError, match="nope"):
        resolve("nope")
    (tmp_path / "f.json").write_text("{not json")
    with pytest.raises(GebError, match="f.json"):
        resolve(str(tmp_path / "f.json"))
    with pytest.raises(GebError, match="<eod>"):
        Tokenizer(tokenizer._tok, chat_format=resolve("chatglm3"))
