"""One-row (decode) matrix products per kernel on the geb-1.3b matrix shapes, timed side by side.

    python bench/decode_kernels.py            # 2 threads; prints a table, writes bench/results/decode_kernels.json

For each shape (fused q/k/v, attention output, fused gate/up, down) and each available kernel: milliseconds
per product of one activation row (median of --reps rounds of --iters calls) and the weight bytes read
per second. Kernels: BF16 on torch's packed oneDNN layout, on the plain weight (`F.linear`) and on geb's
native kernel; int8 weight-only (`torch._weight_int8pack_mm`) and with the activation quantized too
(`torch._int_mm`, what geb runs at one row); int4 on torch's kernel and on geb's native VNNI kernel.
Matrices are random; a matrix this size does not fit in cache, but repeated calls on one matrix still
find part of it there, so whole-model decode (bench/llamacpp_vs_geb.py) is the figure that counts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geb.infer import native  # noqa: E402
from geb.infer.bench import machine_info  # noqa: E402
from geb.infer.quant import Int4Linear, Int4VnniLinear, Int8Linear, _onednn_pack, quantize_int4  # noqa: E402

SHAPES = {"qkv 3072x2048": (3072, 2048), "wo 2048x2048": (2048, 2048), "gate/up 11264x2048": (11264, 2048),
          "down 2048x5632": (2048, 5632)}


def timed(fn, iters: int, reps: int) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(out)


def kernels_for(n: int, k: int) -> dict:
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(1, k, generator=g)
    wb = w.to(torch.bfloat16).contiguous()
    out = {}
    packed = _onednn_pack(wb)
    if packed is not None:
        out["bf16 packed (oneDNN)"] = (lambda: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, None, "none", [], ""), 2)
    out["bf16 plain (F.linear)"] = (lambda: F.linear(x.bfloat16(), wb), 2)
    kern = native.kernels()
    if kern is not None:
        out["bf16 geb native"] = (lambda: kern.bf16_matmul(wb, x), 2)
    i8 = Int8Linear.from_float(w)
    out["int8 weight-only"] = (lambda: torch._weight_int8pack_mm(x.bfloat16(), i8.q, i8.scale), 1)
    out["int8 x int8 (_int_mm)"] = (lambda: i8._dynamic(x), 1)
    nib, sz = quantize_int4(w, 32)
    i4 = Int4Linear(nib, sz, 32, k)
    out["int4 torch"] = (lambda: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), i4.packed, 32, i4.sz), 0.5)
    if kern is not None:
        v4 = Int4VnniLinear(nib, sz, 32, k, kern)
        out["int4 geb native (VNNI)"] = (lambda: v4(x), 0.5)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_kernels.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    kern = native.kernels()
    if kern is not None:
        kern.set_threads(a.threads)
    rows = []
    for name, (n, k) in SHAPES.items():
        for kname, (fn, bytes_per_weight) in kernels_for(n, k).items():
            ms = timed(fn, a.iters, a.reps)
            gbs = n * k * bytes_per_weight / 1e9 / (ms / 1e3)
            rows.append({"shape": name, "kernel": kname, "ms": round(ms, 4), "weight_gb_s": round(gbs, 1)})
            print(f"{name:>20}  {kname:<24} {ms:8.3f} ms  {gbs:6.1f} GB/s", flush=True)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/decode_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine_info(), "threads": a.threads, "native": native.why() or "yes", "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
