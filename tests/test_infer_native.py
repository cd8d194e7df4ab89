"""geb's native decode core (geb/csrc, geb.infer.native) against PyTorch references, for every kernel
variant this CPU runs: single products, the whole decode step, batch and thread-count invariance,
a forked child, and the GEB_ISA switch. Skips only where the extension was not built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from geb.infer import native
from geb.infer.quant import make_linear

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native core unavailable: {native.why()}")
ISAS = native.supported_isas() if native.available() else []


@pytest.fixture(params=ISAS)
def isa(request):
    before = native.isa()
    native.select_isa(request.param)
    yield request.param
    native.select_isa(before)


def _reference(lin, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """The product the core computes, in float64 torch: activations quantized per group of 32 (int8,
    int4) as the core does, exact integer sums, then the group scales."""
    if fmt in ("fp32", "bf16"):
        return x.double() @ lin.w.double().T
    out = []
    kp = lin.native_in if fmt == "int4" else lin.in_features
    for row in x:
        q, d, sx = native.quantize_activation(row, kp)
        g = d.numel()
        qx = torch.nn.functional.pad(q.double(), (0, g * 32 - q.numel())).view(g, 32)
        if fmt == "int8":
            w = torch.nn.functional.pad(lin.q.double(), (0, g * 32 - lin.in_features)).view(-1, g, 32)
            out.append(((w * qx).sum(-1) * d.double()).sum(-1) * lin._scale_f32.double())
        else:
            codes = lin._codes().double().view(-1, g, 32)
            s, z = lin.s.double(), lin.z.double()
            out.append(((codes * qx).sum(-1) * s * d.double()).sum(-1) + ((z - 8 * s) * sx.double()).sum(-1))
    return torch.stack(out)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("n,k", [(64, 64), (200, 176), (37, 256), (300, 2048)])
def test_products_equal_the_reference_and_do_not_depend_on_rows_or_threads(isa, fmt, n, k):
    g = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g)
    lin = make_linear(w, fmt, 32, native=True)
    x = torch.randn(9, k, generator=g)
    y = native.matmul(lin, x)
    ref = _reference(lin, fmt, x).float()
    tol = 3e-3 if fmt == "bf16" and isa == "avx512bf16" else 1e-5  # BF16-rounded activations there
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.abs().max().item())
    # batch invariance: each row alone gives the same bits as in any batch
    alone = torch.cat([native.matmul(lin, x[i : i + 1]) for i in range(9)])
    assert torch.equal(alone, y)
    for b in range(1, 9):
        assert torch.equal(native.matmul(lin, x[:b]), y[:b])
    before = native.threads()
    try:
        for t in (1, 3):
            native.set_threads(t)
            assert torch.equal(native.matmul(lin, x), y)
    finally:
        native.set_threads(before)
    # prefill widening: the same weights as FP32
    full = {"fp32": w, "bf16": w.bfloat16().float()}.get(fmt)
    torch.testing.assert_close(native.dequantize(lin), full if full is not None else lin.dequantize())


def _pair(cfg, fmt):
    from geb.infer.runtime import runtime_from_model
    from geb.model import GEB

    torch.manual_seed(0)
    m = GEB(cfg)
    m.init_weights(seed=3)
    return m, runtime_from_model(m, fmt, 32, "native")


@pytest.mark.parametrize("rope", ["half", "interleaved"])
@pytest.mark.parametrize("tie", [False, True])
def test_whole_step_matches_the_torch_backend_in_fp32(isa, tiny_cfg, rope, tie):
    from geb.infer.runtime import SlotCache, runtime_from_model

    cfg = tiny_cfg.replace(rope_style=rope, tie_embeddings=tie)
    m, rn = _pair(cfg, "fp32")
    rt = runtime_from_model(m, "fp32", 32, "torch")
    assert rn.native and not rt.native
    ids = torch.randint(0, cfg.vocab_size, (5, 40), generator=torch.Generator().manual_seed(1))
    cn, ct = SlotCache(cfg, 5, 64), SlotCache(cfg, 5, 64)
    for s in range(5):  # caches at several depths
        rn.prefill(ids[s, : 3 + 6 * s], cn, s)
        rt.prefill(ids[s, : 3 + 6 * s], ct, s)
    for step in range(6):
        tok = ids[:, 33 + step]
        ln, lt = rn.decode(tok, cn), rt.decode(tok, ct)
        torch.testing.assert_close(ln, lt, rtol=1e-4, atol=1e-4 * lt.abs().max().item())


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_each_sequence_of_a_step_is_bit_identical_to_it_alone(tiny_cfg, fmt):
    from geb.infer.runtime import SlotCache

    _, rn = _pair(tiny_cfg, fmt)
    ids = torch.randint(0, tiny_cfg.vocab_size, (9, 20), generator=torch.Generator().manual_seed(2))
    batch = SlotCache(tiny_cfg, 9, 32)
    for s in range(9):
        rn.prefill(ids[s, : 2 + s], batch, s)
    together = rn.decode(ids[:, 15], batch)
    for s in range(9):
        alone = SlotCache(tiny_cfg, 1, 32)
        rn.prefill(ids[s, : 2 + s], alone, 0)
        assert torch.equal(rn.decode(ids[s : s + 1, 15], alone)[0], together[s]), f"row {s} differs"


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_greedy_output_equals_the_torch_backend(tiny_model_dir, fmt):
    from geb.infer.engine import Engine
    from geb.infer.sampling import SamplingParams

    p = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    nat = Engine.from_folder(tiny_model_dir, format=fmt, backend="native")
    ref = Engine.from_folder(tiny_model_dir, format=fmt, backend="torch")
    assert nat.rt.native and not ref.rt.native
    same = [nat.generate(t, p).ids == ref.generate(t, p).ids for t in ("hello", "北京是", "The river")]
    if fmt == "fp32":
        assert all(same)
    else:  # int4: activations are quantized per group of 32 natively, per row by torch: most agree
        assert sum(same) >= 2


def test_a_forked_child_decodes_and_a_bad_isa_is_refused(tiny_model_dir):
    """The core's threads do not exist in a forked child: it starts its own. (The child decodes from a
    cache the parent prefilled: torch's own OpenMP pool is not usable after fork, a torch limitation.)"""
    code = (
        "import os, torch\n"
        "from geb.infer.engine import Engine\nfrom geb.infer.runtime import SlotCache\n"
        f"e = Engine.from_folder({str(tiny_model_dir)!r}, format='int8', threads=2)\n"
        "def run():\n"
        "    c = SlotCache(e.cfg, 2, 32)\n"
        "    for s in range(2): c.k[:, s].normal_(generator=torch.Generator().manual_seed(s)); c.lengths[s] = 5\n"
        "    c.v.copy_(c.k)\n"
        "    return [e.rt.decode(torch.tensor([3, 4]), c) for _ in range(3)]\n"
        "a = run()\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    b = run(); os.write(w, b'same' if all(torch.equal(x, y) for x, y in zip(a, b)) else b'diff'); os._exit(0)\n"
        "os.close(w); got = os.read(r, 100).decode(); os.waitpid(pid, 0)\n"
        "assert got == 'same', got\nprint('ok')\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr
    bad = subprocess.run([sys.executable, "-c", "from geb.infer import native; native.lib()"],
                         env={**env, "GEB_ISA": "avx9000"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "GEB_ISA=avx9000 is not a kernel variant" in bad.stderr
    off = subprocess.run([sys.executable, "-c", "from geb.infer import native; print(native.describe()['path'])"],
                         env={**env, "GEB_NATIVE": "0"}, capture_output=True, text=True, timeout=60)
    assert off.stdout.strip() == "torch"
