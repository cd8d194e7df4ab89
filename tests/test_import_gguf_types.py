"""Every GGUF type llama.cpp writes for a Llama-family model imports: llama.cpp's own quantizer (through
llama-cpp-python) turns geb's F32 export into F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 and the K-quants, with its
fallbacks where a row is not a multiple of 256; geb's dequantized weights are checked against the F32
originals and its logits against llama.cpp running the same file. Qwen2-style q/k/v biases round-trip
through GGUF and run in llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "GEB-1.3B was trained on 550B tokens. 北京是中国的首都。 def f(x): return x**2"

# ftype → (tensor type of a 256-multiple matrix, RMS error of the weights relative to their RMS, at most)
# (seeded weights: measured 2e-4, 1.7e-3, 5.4e-3, 0.087, 0.079, 0.043, 0.038, 0.30, 0.15, 0.072, 0.036, 0.018)
K_TYPES = {
    "F16": ("F16", 3e-4), "BF16": ("BF16", 2.5e-3), "Q8_0": ("Q8_0", 8e-3), "Q4_0": ("Q4_0", 0.11),
    "Q4_1": ("Q4_1", 0.1), "Q5_0": ("Q5_0", 0.055), "Q5_1": ("Q5_1", 0.05), "Q2_K": ("Q2_K", 0.38),
    "Q3_K_M": ("Q3_K", 0.2), "Q4_K_M": ("Q4_K", 0.095), "Q5_K_M": ("Q5_K", 0.048), "Q6_K": ("Q6_K", 0.024),
}


def _model(folder, tokenizer, tiny_cfg, d, bias=False, seed=3):
    from geb.checkpoint import save_checkpoint
    from geb.model import GEB

    cfg = tiny_cfg.replace(d_model=d, n_head=4, n_kv_head=2, head_dim=d // 4, ffn_hidden=2 * d, n_layer=2,
                           qkv_bias=bias, tie_embeddings=False)
    model = GEB(cfg)
    model.init_weights(seed=seed)
    with torch.no_grad():  # larger weights give peaked logits; biases large enough to matter
        for n, p in model.named_parameters():
            if not n.endswith("norm.weight"):
                p.mul_(3.0 if n.endswith("weight") else 25.0)
    save_checkpoint(folder, model, tokenizer, {"stage": "random", "parent": None})
    return model


def _quantize(src, out, ftype: str):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) == 0


def _llama_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, n_batch=64, logits_all=True,
                          verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tokenizer, tiny_cfg):
    from geb.interop.gguf import export_gguf

    tmp = tmp_path_factory.mktemp("gguf")
    model = _model(tmp / "m", tokenizer, tiny_cfg, 256)
    export_gguf(tmp / "m", tmp / "m.gguf", "f32")
    return model, tmp / "m.gguf"


@pytest.mark.parametrize("ftype", list(K_TYPES))
def test_llama_cpp_types_import(tmp_path, tokenizer, f32_gguf, ftype):
    from geb.checkpoint import load_model
    from geb.interop.gguf import import_gguf

    ref, src = f32_gguf
    want, bound = K_TYPES[ftype]
    _quantize(src, tmp_path / "q.gguf", ftype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert types["blk.0.ffn_gate.weight"] == want
    import_gguf(tmp_path / "q.gguf", tmp_path / "geb")
    model, tok, _ = load_model(tmp_path / "geb")
    got, orig = model.state_dict(), ref.state_dict()
    for name, w in orig.items():  # every tensor in its place (a wrong permutation or shape is ~1.4)
        err = ((got[name] - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
        assert err <= (bound if w.dim() == 2 else 1e-6), (name, err)
    ids = tok.encode(TEXT)[:40]
    with torch.no_grad():
        ours, f32 = model(torch.tensor([ids]))[0], ref(torch.tensor([ids]))[0]
    theirs = _llama_logits(tmp_path / "q.gguf", ids)
    # llama.cpp multiplies quantized weights by 8-bit-quantized (F16 for F16 weights) activations; geb
    # uses the FP32 dequantized weights, so the two agree to that rounding, not to FP32 precision
    # (measured: F16 8e-4, BF16 6e-3, the block types 0.017-0.036).
    assert _rel(ours, theirs) <= {"F16": 2e-3, "BF16": 1e-2}.get(ftype, 0.05)
    if bound >= 0.07:  # coarse grids: geb's dequantized model is nearer llama.cpp's than the original is
        assert _rel(ours, theirs) < _rel(f32, theirs)


@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_k_quant_fallbacks_for_rows_not_a_multiple_of_256(tmp_path, tokenizer, tiny_cfg, ftype):
    from geb.checkpoint import load_model
    from geb.interop.gguf import export_gguf, import_gguf

    ref = _model(tmp_path / "m", tokenizer, tiny_cfg, 96)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    _quantize(tmp_path / "m.gguf", tmp_path / "q.gguf", ftype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    # llama-cpp-python 0.3.36 falls back Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0 (older
    # llama.cpp used IQ4_NL for Q2_K/Q3_K):
    # whatever it is, it is a 32-value block type, and it imports.
    fallback = types["blk.0.ffn_gate.weight"]
    assert fallback in ("IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
    import_gguf(tmp_path / "q.gguf", tmp_path / "geb")
    model, _, _ = load_model(tmp_path / "geb")
    w, g = ref.state_dict()["layers.0.ffn.w_gate.weight"], model.state_dict()["layers.0.ffn.w_gate.weight"]
    assert ((g - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item() <= 0.12


def test_qkv_biases_round_trip_through_gguf_and_run_in_llama_cpp(tmp_path, tokenizer, tiny_cfg):
    from geb.checkpoint import load_model
    from geb.interop.gguf import export_gguf, import_gguf

    ref = _model(tmp_path / "m", tokenizer, tiny_cfg, 64, bias=True)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= names
    ids = tokenizer.encode(TEXT)[:40]
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0]
        no_bias = ref.cfg.replace(qkv_bias=False)
        from geb.model import GEB

        plain = GEB(no_bias)
        plain.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.endswith("bias")}, strict=False)
        assert _rel(plain(torch.tensor([ids]))[0], want) > 0.05  # the biases matter to these logits
    assert _rel(_llama_logits(tmp_path / "m.gguf", ids), want) <= 1e-4
    import_gguf(tmp_path / "m.gguf", tmp_path / "geb")
    model, _, _ = load_model(tmp_path / "geb")
    assert model.cfg.qkv_bias
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
