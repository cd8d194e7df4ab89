"""GPU pretraining throughput: geb-1.3b at sequence 4096 for a few dozen steps on one GPU, through the
same training loop as `geb pretrain` (BF16 autocast, FlashAttention through SDPA, the spike measures on
as for any large pretraining run); reports tokens/s per device, MFU and peak memory.

    python bench/gpu_pretrain.py                       # one H200/H100: about 2-3 minutes
    python bench/gpu_pretrain.py --no-compile          # eager, for comparison
    python bench/gpu_pretrain.py --device cpu --config geb-test --seq-len 64 --batch-size 2 --steps 6 --warmup 2
                                                       # smoke test of the script itself (no MFU on CPU)

Data are random tokens (throughput does not depend on them; no dataset needed on the GPU machine). No
checkpoint is written. MFU follows docs/training.md: (6 N + 12 L H Dh T) x tokens/s / peak BF16 FLOP/s,
the steady state being the mean over the logged intervals after --warmup steps (compilation excluded).
Writes bench/results/gpu_pretrain.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RandomTokens:
    """A pretraining task over uniform random tokens: deterministic per (cursor, micro-batch)."""

    def __init__(self, vocab: int, batch: int, seq: int):
        self.vocab, self.batch_size, self.seq = vocab, batch, seq
        self.tokens_per_batch = batch * seq

    def batch(self, index, micro):
        import torch

        g = torch.Generator().manual_seed(index * 1009 + micro)
        x = torch.randint(0, self.vocab, (self.batch_size, self.seq + 1), generator=g)
        return {"ids": x[:, :-1], "targets": x[:, 1:]}

    def loss(self, model, b):
        return model(b["ids"], b["targets"]), {}

    def val_batches(self):
        return iter(())

    def describe(self):
        return {"kind": "pretrain", "seq_len": self.seq, "data": "random tokens"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="geb-1.3b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the steady-state figures")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--attn", default=None, help="sdpa | sdpa-flash | flash-attn (default: sdpa-flash on CUDA)")
    ap.add_argument("--stability", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "gpu_pretrain.json"))
    args = ap.parse_args()

    import torch

    from geb.config import get_preset
    from geb.model import GEB
    from geb.train.loop import TrainConfig, train

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("bench/gpu_pretrain.py needs a CUDA GPU (use --device cpu for a smoke test of the script)", file=sys.stderr)
        return 2
    if args.log_every > args.warmup or args.warmup >= args.steps:
        print("need --log-every <= --warmup < --steps", file=sys.stderr)
        return 2
    cfg = get_preset(args.config)
    dev = torch.device(args.device)
    t0 = time.time()
    with torch.device("meta"):
        model = GEB(cfg)
    model.to_empty(device=dev)
    model.init_weights(seed=None if cuda else 0)  # on the GPU itself: a 1.3B init on CPU takes a minute
    attn = args.attn or ("sdpa-flash" if cuda else "sdpa")
    # steps + 1 with stop_after=steps: the run stops after the last measured step without the final save
    c = TrainConfig(steps=args.steps + 1, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=3e-4, min_lr=3e-5,
                    warmup_steps=min(100, args.steps), eval_every=0, save_every=0, log_every=args.log_every,
                    dtype="bf16", device=args.device, seed=0, compile=not args.no_compile and cuda,
                    activation_checkpointing=args.activation_checkpointing, attn=attn,
                    peak_tflops=args.peak_tflops, stability=args.stability)
    task = RandomTokens(cfg.vocab_size, args.batch_size, args.seq_len)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory() as tmp:
        train(model, task, c, Path(tmp) / "run", None, {"stage": "bench"}, stop_after=args.steps)
        recs = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in recs if r["kind"] == "train"]
    steady = [r for r in trains if r["step"] > args.warmup and r["step"] % args.log_every == 0]

    def mean(key):
        vals = [r[key] for r in steady if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__, "config": args.config, "params": cfg.num_params(), "seq_len": args.seq_len,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "tokens_per_step": args.batch_size * args.seq_len * args.grad_accum,
        "compile": c.compile, "activation_checkpointing": c.activation_checkpointing, "attn": attn,
        "stability": args.stability, "steps": args.steps, "warmup_steps_excluded": args.warmup,
        "tokens_per_s_per_device": mean("tok_s_device"), "mfu": mean("mfu"),
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
        "final_loss": trains[-1]["loss"] if trains else None, "wall_s": round(time.time() - t0, 1),
        "intervals": [{k: r.get(k) for k in ("step", "loss", "tok_s_device", "mfu", "peak_mem_gib")} for r in trains],
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
    mem = f"{result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else "n/a"
    print(f"{result['device']}: {args.config} seq {args.seq_len} x {args.batch_size}: "
          f"{result['tokens_per_s_per_device']:,.0f} tokens/s per device, MFU {mfu}, peak memory {mem} "
          f"(compile={c.compile}, attn={attn}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
