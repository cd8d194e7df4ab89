"""Hugging Face Mistral and Qwen2 folders (q/k/v biases, sharded safetensors) come into geb with
transformers' FP32 logits and greedy tokens, and Qwen2's biases survive geb's own HF export."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from geb.errors import GebError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
}


def _hf_model(tmp_path, tokenizer, family, *, tied=False, shard=None, name="hf"):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(5)
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, **extra)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or swapped one would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.5)
    folder = tmp_path / name
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save(folder)
    return model, folder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _greedy(step, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(step(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("family,tied,shard", [("mistral", False, None), ("qwen2", True, None),
                                               ("qwen2", False, "40KB")])
def test_family_matches_transformers(tmp_path, tokenizer, family, tied, shard):
    from geb.checkpoint import load_model
    from geb.interop.hf import import_hf

    hf, folder = _hf_model(tmp_path, tokenizer, family, tied=tied, shard=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
    import_hf(folder, tmp_path / "geb")
    model, tok, _ = load_model(tmp_path / "geb")
    assert model.cfg.qkv_bias == (family == "qwen2") and model.cfg.tie_embeddings == tied
    ids = torch.tensor([tok.encode("Hello 北京 2024 😀, the model imports.")])
    with torch.no_grad():
        assert _rel(model(ids), hf(ids).logits) <= 1e-4
        prompt = ids[0].tolist()
        ours = _greedy(lambda x: model(x), prompt, 16)
        theirs = hf.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0].tolist()
    assert ours == theirs


def test_qwen2_biases_survive_hf_export(tmp_path, tokenizer):
    from geb.checkpoint import load_model
    from geb.interop.hf import export_hf, import_hf

    hf, folder = _hf_model(tmp_path, tokenizer, "qwen2")
    import_hf(folder, tmp_path / "geb")
    export_hf(tmp_path / "geb", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    model, _, _ = load_model(tmp_path / "geb")
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert _rel(back(ids).logits, hf(ids).logits) <= 1e-5
        assert _rel(model(ids), hf(ids).logits) <= 1e-4


def test_unsupported_architecture_and_o_proj_bias_are_named(tmp_path, tokenizer):
    from geb.interop.hf import import_hf

    _, folder = _hf_model(tmp_path, tokenizer, "llama")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(GebError, match=r"config\.json: field 'model_type' = 'gemma'.*no 'gemma' blocks"):
        import_hf(folder, tmp_path / "out")
    (folder / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(GebError, match=r"config\.json: field 'attention_bias' is true.*o_proj"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
