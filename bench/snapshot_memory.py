"""Memory that rollback snapshots (the loss-spike measures' in-memory good states) cost, measured as the
process's resident memory (RSS) on CPU, against the formula docs/training.md states.

    python bench/snapshot_memory.py                       # geb-small, --snapshot-memory host (2 slots)
    python bench/snapshot_memory.py --memory device       # the one-snapshot mode

A model and AdamW state (after one optimizer step, so both moments exist) are built; then the loop's
own `Stability.snapshot` is called as training calls it: a first snapshot, a second, several more
(each must replace the oldest in its memory), a reset (a checkpoint save), and a rollback. After each,
the RSS above the model + optimizer baseline is recorded, with the peak RSS since the previous call
(Linux /proc/self/status VmHWM, reset through /proc/self/clear_refs). The formula: one snapshot holds
params x 4 bytes (FP32 weights) + params x 8 (AdamW's two FP32 moments) + 4 per parameter tensor
(AdamW's step counter). On CPU both modes keep the snapshots in the same RAM; they differ in how many.
Writes bench/results/snapshot_memory-PRESET-MEMORY.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _trim() -> None:
    """Return freed heap memory to the OS (glibc), so the baseline holds no reusable free memory."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def main() -> None:
    import torch

    from geb import cpu
    from geb.config import get_preset
    from geb.model import GEB
    from geb.train.loop import TrainConfig, make_optimizer
    from geb.train.stability import SNAPSHOT_SLOTS, Stability

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="geb-small")
    ap.add_argument("--memory", choices=["host", "device"], default="host", help="--snapshot-memory mode")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/snapshot_memory-PRESET-MEMORY.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = GEB(get_preset(args.preset))
    model.init_weights(seed=0)
    c = TrainConfig(stability="on", snapshot_memory=args.memory)
    opt = make_optimizer(model, c)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # creates AdamW's moments
    opt.zero_grad(set_to_none=False)  # keep the gradients: freed memory would be reused by the snapshots
    n = sum(p.numel() for p in params)
    formula = 12 * n + 4 * len(params)

    stab = Stability(c, enabled=True)
    gc.collect()
    _trim()
    base = _status("VmRSS")
    rows = []

    def measure(event: str, fn) -> None:
        gc.collect()
        _reset_peak()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        gc.collect()
        rss, peak = _status("VmRSS"), _status("VmHWM")
        rows.append({"event": event, "live_snapshots": len(stab.snapshots), "rss_above_base": rss - base,
                     "peak_above_base": peak - base, "rss_per_formula": (rss - base) / formula,
                     "peak_per_formula": (peak - base) / formula, "seconds": dt})
        print(f"{event:<26} live {len(stab.snapshots)}  RSS +{(rss - base) / 2**20:8.1f} MiB "
              f"(x{(rss - base) / formula:.3f} of one snapshot)  peak +{(peak - base) / 2**20:8.1f} MiB "
              f"(x{(peak - base) / formula:.3f})", flush=True)

    loop = {"step": 0, "cursor": 0, "tokens_seen": 0}
    measure("snapshot 1", lambda: stab.snapshot(params, opt, {**loop, "step": 50}))
    measure("snapshot 2", lambda: stab.snapshot(params, opt, {**loop, "step": 100}))
    for i in range(3, 6):
        measure(f"snapshot {i} (replaces oldest)", lambda i=i: stab.snapshot(params, opt, {**loop, "step": 50 * i}))
    measure("reset (checkpoint save)", lambda: stab.snapshot(params, opt, {**loop, "step": 300}, reset=True))
    measure("snapshot after reset", lambda: stab.snapshot(params, opt, {**loop, "step": 350}))
    stab.episode = [0, 0]
    measure("rollback (restore)", lambda: stab.rollback(params, opt, 360))

    result = {"bench": "snapshot_memory", "preset": args.preset, "params": n, "param_tensors": len(params),
              "formula_bytes_per_snapshot": formula, "memory": args.memory, "slots": SNAPSHOT_SLOTS[args.memory],
              "baseline_rss": base, "rows": rows, "cpu": cpu.describe(), "torch": torch.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out or ROOT / "bench" / "results" / f"snapshot_memory-{args.preset}-{args.memory}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
