"""Quantized layers and folders: round trips, exactness of what is stored, clear errors on bad folders.

The layer tests here are of the torch backend's layers (`native=False`); tests/test_infer_native.py
covers the native core's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from geb.errors import GebError
from geb.infer.engine import Engine
from geb.infer.quant import Int4Linear, Int8Linear, make_linear, quantize_int4
from geb.infer.sampling import SamplingParams
from geb.infer.folders import load_runtime, quantize_folder


def test_int8_and_int4_layers_match_their_dequantized_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 96, generator=g) * 0.05
    x = torch.randn(3, 96, generator=g)
    for layer in (Int8Linear.from_float(w), make_linear(w, "int4", 32)):
        deq = layer.dequantize()
        # the kernel computes with BF16 activations: compare against the same rounding
        ref = x.bfloat16().float() @ deq.T
        torch.testing.assert_close(layer(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        # and the dequantized weight is close to the original (int8 ~0.4% of range, int4 ~7%)
        rel = ((deq - w).abs().max() / w.abs().max()).item()
        assert rel < (0.01 if isinstance(layer, Int8Linear) else 0.08)
    # int8 prefill (many rows) widens the weight in row blocks: same products
    from geb.infer.quant import DEQUANT_BLOCK

    w8 = torch.randn(DEQUANT_BLOCK + 100, 64, generator=g)
    layer = Int8Linear.from_float(w8)
    xs = torch.randn(20, 64, generator=g)
    ref = xs.bfloat16().float() @ layer.dequantize().T
    torch.testing.assert_close(layer(xs), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_int8_single_row_also_quantizes_the_activation():
    """One row (single-sequence decode) runs int8 x int8: its error against the dequantized weight is
    the activation's rounding (at most half a step per element) and nothing more."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 96, generator=g) * 0.05
    x = torch.randn(1, 96, generator=g) * 3
    layer = Int8Linear.from_float(w)
    deq = layer.dequantize()
    ref = x @ deq.T
    step = x.abs().max() / 127
    bound = 0.5 * step * deq.abs().sum(1) * 1.001 + 1e-5
    dyn = layer(x)
    assert ((dyn - ref).abs()[0] <= bound).all()
    xq = torch.round(x / step) * step  # exactly what the int8 GEMM multiplies
    torch.testing.assert_close(dyn, xq @ deq.T, rtol=1e-4, atol=1e-4)
    # two rows run weight-only, with BF16 activations instead
    x2 = torch.cat([x, x])
    torch.testing.assert_close(layer(x2), x2.bfloat16().float() @ deq.T, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_int4_pads_inputs_that_are_not_whole_groups():
    w = torch.randn(64, 176, generator=torch.Generator().manual_seed(1))
    layer = make_linear(w, "int4", 32)  # 176 = 5.5 groups of 32
    assert layer.padded_in == 192 and layer.in_features == 176
    x = torch.randn(2, 176)
    ref = x.bfloat16().float() @ layer.dequantize().T
    torch.testing.assert_close(layer(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_int4_codes_use_the_full_range():
    w = torch.linspace(-1, 1, 64).repeat(4, 1)
    nib, sz = quantize_int4(w, 32)
    codes = torch.cat([nib & 15, nib >> 4], 1)
    assert codes.min() == 0 and codes.max() == 15


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_folder_round_trip(tmp_path, tiny_model_dir, fmt):
    out = quantize_folder(tiny_model_dir, tmp_path / fmt, fmt)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["format"] == fmt
    meta = json.loads((out / "meta.json").read_text())
    assert meta["parent"] == str(tiny_model_dir)
    # the folder runs exactly what was quantized in memory
    mem, tok, _ = load_runtime(tiny_model_dir, fmt)
    disk, _, _ = load_runtime(out)
    ids = tok.encode("北京是中国的首都。Paris.")
    assert torch.equal(mem.forward_logits(ids), disk.forward_logits(ids))
    p = SamplingParams(max_new_tokens=8, temperature=0)
    assert Engine.from_folder(out).generate("Water", p).ids == Engine.from_folder(tiny_model_dir, format=fmt).generate("Water", p).ids
    # a standard safetensors file, and smaller on disk than the FP32 folder
    from safetensors.torch import load_file

    assert set(load_file(str(out / "model.safetensors"))) == set(disk.state())
    assert (out / "model.safetensors").stat().st_size < (tiny_model_dir / "model.safetensors").stat().st_size / 2


def test_truncated_quantized_folder_is_a_clear_error(tmp_path, tiny_model_dir):
    out = quantize_folder(tiny_model_dir, tmp_path / "q", "int8")
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GebError, match="truncated"):
        Engine.from_folder(out)


def test_mismatched_quantized_folder_is_a_clear_error(tmp_path, tiny_model_dir):
    out = quantize_folder(tiny_model_dir, tmp_path / "q", "int4")
    cfg = json.loads((out / "config.json").read_text())
    cfg["ffn_hidden"] = cfg["ffn_hidden"] * 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GebError, match="w_gateup"):
        Engine.from_folder(out)
    cfg["ffn_hidden"] //= 2
    cfg["quantization"]["group_size"] = 48
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GebError, match="group_size"):
        Engine.from_folder(out)


def test_quantized_folder_refuses_other_formats_and_training_loader(tmp_path, tiny_model_dir):
    from geb.checkpoint import load_model

    out = quantize_folder(tiny_model_dir, tmp_path / "q", "int8")
    with pytest.raises(GebError, match="cannot run as fp32"):
        Engine.from_folder(out, format="fp32")
    with pytest.raises(GebError, match="geb.infer"):
        load_model(out)
    with pytest.raises(GebError, match="already quantized"):
        quantize_folder(out, tmp_path / "q2", "int4")


def test_full_folder_with_a_wrong_tensor_is_a_clear_error(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["layers.0.attn.wq.weight"] = sd["layers.0.attn.wq.weight"][:-1]
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(GebError, match="layers.0.attn.wq.weight"):
        Engine.from_folder(bad, format="int8")


def test_perplexity_per_format_close_to_fp32(tiny_model_dir):
    from geb.infer.bench import perplexity

    text = "The capital of France is Paris. 北京是中国的首都。" * 3
    ppl = {}
    for fmt in ("fp32", "int8", "int4"):
        rt, tok, _ = load_runtime(tiny_model_dir, fmt)
        ppl[fmt] = perplexity(rt, tok.encode(text), tok, window=32)
    # a random model's perplexity is near the vocabulary size; formats move it by little
    assert 100 < ppl["fp32"] < 2000
    assert abs(ppl["int8"] / ppl["fp32"] - 1) < 0.01
    assert abs(ppl["int4"] / ppl["fp32"] - 1) < 0.05


def test_int4_from_packed_layout_only():
    """A loaded int4 layer drops its nibbles and reads codes back from torch's packed layout where that
    layout is the one geb reads (torch's AVX-512 kernels); elsewhere it keeps them. Same numbers either way."""
    from geb.infer.quant import DEQUANT_BLOCK, _torch_int4_layout_known

    n = DEQUANT_BLOCK + 64  # prefill widens in blocks of rows: cover a partial last block
    w = torch.randn(n, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    full = make_linear(w, "int4", 32)
    packed_only = Int4Linear(full.nibbles, full.sz, 32, 128, keep_nibbles=False)
    assert (packed_only._nibbles is None) == _torch_int4_layout_known()
    assert torch.equal(packed_only.nibbles, full.nibbles)
    assert torch.equal(packed_only.dequantize(), full.dequantize())
    from geb.infer.quant import INT4_TORCH_WIDEN_MIN_ROWS

    x = torch.randn(INT4_TORCH_WIDEN_MIN_ROWS, 128, generator=torch.Generator().manual_seed(3))  # prefill path
    ref = x.bfloat16().float() @ full.dequantize().T
    scale = ref.abs().max().item()
    torch.testing.assert_close(packed_only(x), ref, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(packed_only(x[:3]), ref[:3], rtol=2e-2, atol=2e-2 * scale)  # decode kernel
