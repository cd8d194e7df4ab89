"""The quantize-time clipping search (geb.infer.clip, `geb quantize --clip`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from geb.infer.clip import clip_weight, fake_quant
from geb.infer.quant import make_linear
from geb.infer.folders import load_runtime, quantize_folder


def _outlier_matrix(n=64, k=256, seed=0):
    """Heavy-tailed weights (Student's t, 3 degrees of freedom): a few large values in most groups."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((n, k)) * 0.02


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_clipping_search_reduces_reconstruction_error_with_outliers(fmt):
    w = _outlier_matrix()
    plain = ((fake_quant(w, fmt) - w) ** 2).sum()
    clipped = ((fake_quant(clip_weight(w, fmt), fmt) - w) ** 2).sum()
    # int4: about 5% less squared error here; int8's 255 levels leave little to gain (never a loss)
    assert clipped < plain * 0.97 if fmt == "int4" else clipped <= plain
    # per group it never does worse (ratio 1.0 is always a candidate)
    per_plain = ((fake_quant(w, "int4") - w) ** 2).reshape(64, -1, 32).sum(-1)
    per_clip = ((fake_quant(clip_weight(w, "int4"), "int4") - w) ** 2).reshape(64, -1, 32).sum(-1)
    assert bool((per_clip <= per_plain * (1 + 1e-5) + 1e-12).all())
    assert bool((per_clip < per_plain).any())


def test_fake_quant_is_what_the_stored_layer_computes():
    w = _outlier_matrix(k=200)  # not whole groups: padded like make_linear pads
    for fmt in ("int8", "int4"):
        layer = make_linear(clip_weight(w, fmt), fmt)
        x = torch.randn(3, 200)
        ref = x @ fake_quant(clip_weight(w, fmt), fmt).t()
        assert torch.allclose(layer(x), ref, rtol=2e-2, atol=2e-3)


def test_clip_leaves_other_formats_and_plain_groups_alone():
    w = torch.randn(8, 64)
    assert clip_weight(w, "bf16") is w
    # groups lying exactly on a 16-level grid quantize without error: any shrinking would only lose
    exact = ((torch.arange(16.0) - 8) * 0.0625).repeat(4, 4)
    assert float((fake_quant(exact, "int4") - exact).abs().max()) == 0.0
    assert torch.equal(clip_weight(exact, "int4"), exact)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_clipped_folder_has_the_same_layout_and_loader(tmp_path, tiny_model_dir, fmt):
    plain = quantize_folder(tiny_model_dir, tmp_path / "plain", fmt)
    clip = quantize_folder(tiny_model_dir, tmp_path / "clip", fmt, clip=True)
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(clip / "model.safetensors"))
    assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}
    if fmt == "int4":  # int8 rows of a Gaussian model: no shrink beats min/max, nothing changes
        assert any(not torch.equal(a[k], b[k]) for k in a)
    qa = json.loads((plain / "config.json").read_text())["quantization"]
    assert qa == json.loads((clip / "config.json").read_text())["quantization"]
    assert json.loads((clip / "meta.json").read_text())["settings"]["clip_search"] is True
    # the loader reads it as any quantized folder, and it runs what was quantized in memory
    disk, tok, _ = load_runtime(clip)
    mem, _, _ = load_runtime(tiny_model_dir, fmt, clip=True)
    ids = tok.encode("北京是中国的首都。Paris.")
    assert torch.equal(mem.forward_logits(ids), disk.forward_logits(ids))
