"""Bad model files are refused with a GebError naming the file and the tensor or field, and leave
nothing behind: another architecture, an unsupported tensor type, a truncated GGUF, a Hugging Face
folder whose config and weights disagree, a tokenizer larger than the embedding."""

from __future__ import annotations

import json
import re

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from geb.errors import GebError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _refused(fn, src, out, *patterns):
    with pytest.raises(GebError) as e:
        fn(src, out)
    msg = str(e.value)
    assert str(src) in msg, msg
    for p in patterns:
        assert re.search(p, msg), (p, msg)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory, tiny_model_dir):
    from geb.interop.gguf import export_gguf

    path = tmp_path_factory.mktemp("bad") / "m.gguf"
    export_gguf(tiny_model_dir, path, "q8_0")
    return path


def test_gguf_of_another_architecture(tmp_path, q8_gguf):
    from geb.interop.gguf import import_gguf

    data = q8_gguf.read_bytes()
    key = b"general.architecture"
    i = data.index(key) + len(key) + 4 + 8  # value type (u32), string length (u64), then the text
    assert data[i : i + 5] == b"llama"
    (tmp_path / "phi.gguf").write_bytes(data[:i] + b"phi_3" + data[i + 5 :])
    _refused(import_gguf, tmp_path / "phi.gguf", tmp_path / "out", r"'general\.architecture' = 'phi_3'",
             r"no 'phi_3' blocks")


def test_gguf_with_an_unsupported_tensor_type(tmp_path, q8_gguf):
    from geb.interop.gguf import import_gguf

    path = tmp_path / "q81.gguf"
    path.write_bytes(q8_gguf.read_bytes())
    reader = gguf.GGUFReader(str(path), "r+")
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    t.field.parts[-2][0] = gguf.GGMLQuantizationType.Q8_1  # the tensor info's type (a memory-mapped write)
    del reader
    _refused(import_gguf, path, tmp_path / "out", r"tensor 'blk\.0\.attn_q\.weight' has type Q8_1")


def test_truncated_gguf(tmp_path, q8_gguf):
    from geb.interop.gguf import import_gguf

    data = q8_gguf.read_bytes()
    for cut in (len(data) - 64, len(data) // 2, 100):  # inside the last tensor, in the middle, in the header
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        _refused(import_gguf, tmp_path / "t.gguf", tmp_path / "out", r"truncated")


def _hf(tmp_path, tokenizer, vocab=512):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path / "hf"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def test_hf_config_and_weights_disagree(tmp_path, tokenizer):
    from geb.interop.hf import import_hf

    folder = _hf(tmp_path, tokenizer)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    _refused(import_hf, folder, tmp_path / "out", r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' "
             r"has shape \(32, 64\), but config\.json implies \(32, 48\)")
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    _refused(import_hf, folder, tmp_path / "out", r"'model\.layers\.2\.\S+' is missing .*num_hidden_layers = 3")
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))  # Qwen2 biases, Llama config
    _refused(import_hf, folder, tmp_path / "out", r"unexpected tensor 'model\.layers\.0\.self_attn\.[qkv]_proj\.bias'.*'llama' has no biases")


def test_tokenizer_larger_than_the_embedding(tmp_path, tokenizer):
    from geb.interop.hf import import_hf

    assert tokenizer.vocab_size > 256
    folder = _hf(tmp_path, tokenizer, vocab=256)
    _refused(import_hf, folder, tmp_path / "out", r"tokenizer\.json: the tokenizer has \d+ tokens but config\.json "
             r"field 'vocab_size' .* is 256")
