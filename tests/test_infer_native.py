"""geb's optional native one-row kernels: compiled on first use, equal to torch's BF16 product up to
FP32 summation order, split across threads without changing the result, and replaceable by torch's
kernels (GEB_NATIVE=0) with the same engine output."""

from __future__ import annotations

import pytest
import torch

from geb.infer import native

kern = native.kernels()
needs_native = pytest.mark.skipif(kern is None, reason=f"native kernels unavailable: {native.why()}")


@needs_native
@pytest.mark.parametrize("n,k", [(64, 64), (200, 176), (1000, 96), (37, 45), (3072, 2048)])
def test_bf16_one_row_equals_the_bf16_product(n, k):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g)
    ref = x.to(torch.bfloat16).float() @ w.float().T  # what torch's BF16 path computes, in FP32
    for threads in (1, 2, 3):
        kern.set_threads(threads)
        got = kern.bf16_matmul(w, x)
        assert got.shape == (1, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    kern.set_threads(torch.get_num_threads())


@needs_native
@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_bf16_matmul_several_rows_reads_each_weight_row_once_with_the_same_result(m):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(300, 176, generator=g).to(torch.bfloat16)
    x = torch.randn(m, 176, generator=g)
    ref = x.to(torch.bfloat16).float() @ w.float().T
    got = kern.bf16_matmul(w, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    # row by row gives the same numbers: the rows do not interact
    torch.testing.assert_close(torch.cat([kern.bf16_matmul(w, x[i : i + 1]) for i in range(m)]), got)
    with pytest.raises(ValueError):
        kern.bf16_matmul(w, torch.randn(native.MAX_ROWS + 1, 176))


@needs_native
def test_engine_bf16_output_is_the_same_with_and_without_native_kernels(tiny_model_dir, monkeypatch):
    from geb.infer.engine import Engine
    from geb.infer.sampling import SamplingParams

    p = SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    with_native = Engine.from_folder(tiny_model_dir, format="bf16")
    assert with_native.rt.head.native is not None and with_native.rt.head.packed is None
    monkeypatch.setitem(native._state, "kernels", None)  # as where no compiler is found
    without = Engine.from_folder(tiny_model_dir, format="bf16")
    assert without.rt.head.native is None
    for prompt in ("hello", "北京是", "The river"):
        assert with_native.generate(prompt, p).ids == without.generate(prompt, p).ids


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("GEB_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.kernels() is None and "GEB_NATIVE" in native.why()


def test_broken_compiler_means_torch_kernels_not_a_crash(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: no such thing' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("GEB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {})
    assert native.kernels() is None and "compiling kernels.c failed" in native.why()
    assert not list((tmp_path / "cache" / "native").glob("*.so"))  # nothing half-written is left


@needs_native
def test_a_forked_child_gets_its_own_worker_threads():
    import multiprocessing as mp

    w = torch.randn(256, 64).to(torch.bfloat16)
    x = torch.randn(1, 64)
    kern.set_threads(2)
    want = kern.bf16_matmul(w, x)  # the parent's pool now exists
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:  # would hang on the parent's (absent) worker threads
        got = pool.apply_async(_child_matmul, (w, x)).get(timeout=60)
    torch.testing.assert_close(got, want)
    kern.set_threads(torch.get_num_threads())


def _child_matmul(w, x):
    return native.kernels().bf16_matmul(w, x)


@needs_native
@pytest.mark.parametrize("n,k", [(128, 128), (192, 100), (64, 384)])
def test_int4_vnni_layer_stores_what_torchs_does_and_errs_only_by_activation_rounding(n, k, monkeypatch):
    import geb.infer.quant as quant
    from geb.infer.quant import Int4Linear, Int4VnniLinear, make_linear

    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    assert isinstance(make_linear(w, "int4", 32), Int4Linear)  # too small to pay for the native call
    monkeypatch.setattr(quant, "INT4_NATIVE_MIN_WEIGHTS", 0)
    layer = make_linear(w, "int4", 32)
    assert isinstance(layer, Int4VnniLinear)
    plain = Int4Linear.from_float(w, 32)
    a, b = layer.state("p."), plain.state("p.")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)  # same folder contents
    deq = layer.dequantize()
    assert torch.equal(deq, plain.dequantize())
    x = torch.randn(3, k, generator=g)
    got = layer(x)
    for i in range(3):  # one row: the activation is rounded to int8 per group of 32, nothing else
        xi = torch.nn.functional.pad(x[i], (0, layer.padded_in - k)).view(-1, 32)
        step = xi.abs().amax(-1) / 127
        wg = torch.nn.functional.pad(deq, (0, layer.padded_in - k)).view(n, -1, 32)
        bound = (0.5 * step[None, :] * wg.abs().sum(-1)).sum(-1) * 1.01 + 1e-5
        assert ((got[i] - x[i] @ deq.T).abs() <= bound).all()
        torch.testing.assert_close(layer(x[i : i + 1])[0], got[i])  # rows do not interact
    xs = torch.randn(130, k, generator=g)  # from 128 rows: BF16 GEMM on the widened weight
    ref = xs.bfloat16().float() @ deq.bfloat16().float().T
    torch.testing.assert_close(layer(xs), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    monkeypatch.setattr(quant, "INT4_NATIVE", False)
    assert isinstance(make_linear(w, "int4", 32), Int4Linear)
