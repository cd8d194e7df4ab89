"""The one training loop: pretraining, SFT and DPO differ only in the Task they pass in.

A Task turns a data index into a micro-batch (deterministically: the same index always gives the same
batch) and a batch into a loss. Because batches are a pure function of the data cursor, the whole
data-loader state is one integer, so resume is exact and skipping data is a cursor move.

The loop owns: AdamW (decay on matrices only), warmup + cosine LR, gradient accumulation, clipping,
autocast (BF16 where the device computes it natively), periodic validation, JSONL metrics, a loss PNG,
progress lines, and atomic checkpoint folders (weights + config + tokenizer + meta + loop state, with
the optimizer in sharded DCP form) that `--resume` continues. It runs as one process or under
torchrun with DDP/FSDP2 (geb.train.dist), with GPU throughput options and MFU logging
(geb.train.perf), and with the paper's loss-spike measures (geb.train.stability): spike detection
with batch replacement, rollback with skipped data windows, embedding-gradient shrink and LR
adjustment. Every intervention is a `"kind": "spike"` record.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

from geb.checkpoint import META, TRAIN_STATE, check_destination, load_train_state
from geb.errors import GebError
from geb.train import dist, perf
from geb.train.stability import Stability, resolve


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 100
    # Cosine decay reaches min_lr at this step (default: `steps`). A shorter horizon decays faster,
    # the paper's fourth anti-spike measure for small batches.
    decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto | bf16 | fp32 (autocast dtype; weights and optimizer stay FP32)
    device: str = "auto"
    seed: int = 1234
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    log_every: int = 10
    # Embedding-gradient shrink (measure 3): None = 0.1 when the spike measures are on, else 1.0 (off).
    emb_grad_alpha: float | None = None
    # -- scale: only used under torchrun (parallel) or on GPUs; none of them changes the result
    parallel: str = "auto"  # auto (= ddp) | ddp | fsdp
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False
    attn: str = "sdpa"  # sdpa | sdpa-flash (SDPA pinned to FlashAttention) | flash-attn (the package)
    peak_tflops: float | None = None  # per-device peak for MFU (default: known GPUs' BF16 peak)
    # -- the loss-spike measures (geb.train.stability); "auto" = on for pretraining models >= 300M
    stability: str = "auto"  # auto | on | off
    spike_window: int = 100  # accepted losses the running statistics look at
    spike_min_history: int = 20  # no detection (except non-finite) before this many accepted steps
    spike_sigma: float = 6.0  # a spike is above median + max(sigma * noise, rel * median)
    spike_rel: float = 0.1
    spike_retries: int = 2  # measure 1: replacement batches before escalating (0 = no replacement)
    rollback: bool = True  # measure 2: roll back to the last good snapshot and skip a data window
    snapshot_every: int = 50  # steps between in-memory good snapshots (also taken at every save)
    snapshot_memory: str = "auto"  # auto (= host) | host: two snapshots in CPU memory | device: one beside the weights
    skip_before: int = 100  # data iterations skipped before the spike ...
    skip_after: int = 100  # ... and after it
    max_rollbacks: int = 20
    lr_cut_after: int = 3  # measure 4: multiply the LR by lr_cut_factor after this many spikes (0 = never)
    lr_cut_factor: float = 0.7
    lr_preset: str = "none"  # none | small-batch (peak x0.5, cosine ends at 60% of the steps)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for f in ("steps", "batch_size", "grad_accum"):
            if getattr(self, f) <= 0:
                raise GebError(f"training setting '{f}' must be positive, got {getattr(self, f)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise GebError(f"learning rates must satisfy 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise GebError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Task(Protocol):
    tokens_per_batch: int

    def batch(self, index: int, micro: int) -> dict: ...

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...

    def val_batches(self) -> Iterable[dict]: ...

    def describe(self) -> dict: ...


def lr_at(step: int, c: TrainConfig) -> float:
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    horizon = max(c.decay_steps or c.steps, c.warmup_steps + 1)
    t = min(1.0, (step - c.warmup_steps) / max(1, horizon - c.warmup_steps))
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * t))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def choose_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The autocast dtype for `--dtype name` on `device`, and why (logged and recorded in meta.json).

    auto: on CUDA, BF16 where the GPU supports it; on a CPU, BF16 only where the CPU computes it
    natively (AVX512-BF16 or AMX-BF16). Elsewhere torch emulates BF16 products and autocast makes
    training several times slower than FP32 (issue 14: an AVX-512 Xeon without AVX512-BF16), so auto
    means FP32 there.
    """
    from geb import cpu

    if name == "fp32":
        return torch.float32, "--dtype fp32"
    if name == "bf16":
        why = "--dtype bf16"
        if device.type == "cpu" and not cpu.native_bf16():
            why += " (this CPU has no native BF16: autocast emulates it, slower than FP32)"
        return torch.bfloat16, why
    if name != "auto":
        raise GebError(f"dtype must be auto, bf16 or fp32, got {name!r}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports BF16"
        return torch.float32, "auto: this GPU does not support BF16"
    if device.type == "cpu":
        if cpu.native_bf16():
            return torch.bfloat16, "auto: the CPU has native BF16 (avx512_bf16 or amx_bf16)"
        return torch.float32, "auto: the CPU has no native BF16 (no avx512_bf16 or amx_bf16), BF16 would be emulated"
    return torch.float32, f"auto: FP32 on {device.type}"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    return choose_dtype(name, device)[0]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def make_optimizer(model, c: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), fused=fused or None)


def plot_losses(records: list[dict], path: Path, title: str = "loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    va = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", ms=3)
    sp = [(r["step"], r["loss"]) for r in records if r.get("kind") == "spike" and r.get("action") != "lr_cut"
          and isinstance(r.get("loss"), (int, float))]
    if sp:
        ax.plot(*zip(*sp), "x", color="red", label="spike (step discarded)", ms=5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.t0 = total, stream, time.time()

    def line(self, step: int, msg: str, rate: float) -> None:
        left = (self.total - step) / max(rate, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if rate > 0 else "?"
        print(f"step {step}/{self.total} {msg} eta {eta}", file=self.stream, flush=True)


def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and device.type == "cuda":
        cuda = st["cuda"]
        torch.cuda.set_rng_state(cuda if torch.is_tensor(cuda) else cuda[0], device)


def _num(x: float):
    """A float for JSON, or its name when not finite (strict JSON has no NaN/Infinity)."""
    return x if math.isfinite(x) else str(x)


@torch.no_grad()
def evaluate(model, task: Task, device, amp_dtype, attn: str = "sdpa") -> float:
    model.eval()
    losses = []
    for b in task.val_batches():
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32), \
                perf.attention_context(attn):
            loss, _ = task.loss(model, b)
        losses.append(float(loss))
    model.train()
    return sum(losses) / len(losses) if losses else float("nan")


def train(model, task: Task, c: TrainConfig, out_dir: str | Path, tokenizer, meta: dict[str, Any],
          resume: bool = False, quiet: bool = False, stop_after: int | None = None) -> dict:
    """Run (or resume) training; write the checkpoint folder `out_dir`; return the final meta.

    `meta` carries stage, parent and data_hash; the loop adds settings, step, tokens seen and losses.
    `stop_after` ends the run early at that step without a final save (tests use it to fake a crash).
    Under torchrun every rank calls this with the same arguments; rank 0 writes the files.
    """
    out_dir = Path(out_dir)
    env = dist.setup(c.device)
    device = env.device
    amp_dtype, dtype_reason = choose_dtype(c.dtype, device)
    torch.manual_seed(c.seed)
    desc = task.describe()
    res = resolve(c, model.num_params(), desc.get("kind"))
    sched = replace(c, lr=res.lr, min_lr=res.min_lr, decay_steps=res.decay_steps)
    model.to(device)
    model.emb_grad_alpha = res.emb_grad_alpha
    model.train()
    perf.prepare(model, c, device, amp_dtype)
    module = dist.wrap(model, env, c.parallel)
    opt = make_optimizer(model, c)  # after wrap: FSDP2 replaces the parameters with sharded ones
    params = [p for p in model.parameters() if p.requires_grad]
    micros = dist.rank_micros(c.grad_accum, env)
    stab = Stability(c, res.stability)
    step, cursor, tokens_seen, records = 0, 0, 0, []
    if resume:
        dist.recover_folder(out_dir)
        st = load_train_state(out_dir)
        if dist.has_sharded_state(out_dir):
            dist.load_training_state(out_dir, module, opt)
        elif "optimizer" in st and not env.active:  # folders written before the optimizer moved to DCP
            opt.load_state_dict(st["optimizer"])
        else:
            raise GebError(f"{out_dir}: no optimizer state to resume from")
        step, cursor, tokens_seen = st["step"], st["cursor"], st["tokens_seen"]
        records = list(st.get("records", []))
        if "stability" in st:
            stab.load_state_dict(st["stability"])
        _set_rng_state(st["rng"], device)
    elif (out_dir / META).exists():
        raise GebError(f"{out_dir}: already holds a checkpoint; use --resume to continue it or choose another --out")
    settings = {"train": asdict(c), "resolved": res.to_dict(), "task": desc, "model": model.cfg.to_dict(),
                "world_size": env.world, "parallel": ("fsdp" if dist.is_fsdp(module) else "ddp") if env.active else "none",
                "device": str(device), "dtype_resolved": dtype_name(amp_dtype), "dtype_reason": dtype_reason}
    live = out_dir / "metrics.jsonl"
    if env.main:
        if not resume:  # before the first file lands in it: a folder geb did not write is refused, kept whole
            check_destination(out_dir, "model")
        out_dir.mkdir(parents=True, exist_ok=True)
        # The live log restarts from what the checkpoint recorded: lines a killed run appended after its
        # last save would otherwise appear twice.
        live.write_text("".join(json.dumps(r) + "\n" for r in records))

    def log(rec: dict) -> None:
        records.append(rec)
        if env.main:
            with open(live, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def save(final: bool) -> None:
        trains = [r for r in records if r["kind"] == "train"]
        vals = [r for r in records if r["kind"] == "val"]
        m = {**meta, "settings": settings, "step": step, "tokens_seen": tokens_seen, "final": final,
             "last_train_loss": trains[-1]["loss"] if trains else None,
             "last_val_loss": vals[-1]["val_loss"] if vals else None, "stability": stab.summary()}
        state = {"step": step, "cursor": cursor, "tokens_seen": tokens_seen, "rng": _rng_state(device),
                 "records": records, "train_config": asdict(c), "stability": stab.state_dict(),
                 "world_size": env.world}
        dist.save_training_checkpoint(out_dir, module, opt, env, tokenizer, m, state,
                                      extra_files={"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in records)})
        if env.main and records:
            plot_losses(records, out_dir / "loss.png", title=f"{meta.get('stage', 'train')}: {model.cfg.name}")

    def loop_state() -> dict:
        return {"step": step, "cursor": cursor, "tokens_seen": tokens_seen}

    prog = Progress(c.steps, stream=open(os.devnull, "w") if quiet or not env.main else sys.stderr)
    meter = perf.Meter(model.cfg, desc.get("seq_len"), device, env.world, c.peak_tflops)
    print(f"training on {device} in {dtype_name(amp_dtype)} ({dtype_reason})", file=prog.stream, flush=True)
    if meter.note:
        print(meter.note, file=prog.stream, flush=True)
    step_tokens = task.tokens_per_batch * c.grad_accum
    stab.snapshot(params, opt, loop_state(), reset=True)
    while step < c.steps:
        if stop_after is not None and step >= stop_after:
            return {"step": step, "stopped": True}
        cursor = stab.skips.next_cursor(cursor)
        lr = lr_at(step, sched) * stab.lr_scale
        for g in opt.param_groups:
            g["lr"] = lr
        agg: dict[str, float] = {}
        loss_acc = torch.zeros((), device=device)
        for j, micro in enumerate(micros):
            b = task.batch(cursor, micro)
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            with dist.grad_sync(module, j == len(micros) - 1), perf.attention_context(c.attn):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                    loss, mets = task.loss(module, b)
                (loss / len(micros)).backward()
            loss_acc += loss.detach().float() / len(micros)
            for k, v in mets.items():
                agg[k] = agg.get(k, 0.0) + float(v) / len(micros)
        keys = sorted(agg)
        vec = dist.all_reduce_mean(torch.stack([loss_acc] + [torch.tensor(float(agg[k]), device=device) for k in keys]), env)
        loss_sum = float(vec[0])
        agg = {k: float(vec[i + 1]) for i, k in enumerate(keys)}
        gnorm = dist.clip_grad_norm(params, c.grad_clip)
        if stab.judge(loss_sum, gnorm):
            opt.zero_grad(set_to_none=True)
            acts = stab.on_spike(cursor, loss_sum)
            event = {"kind": "spike", "step": step + 1, "cursor": cursor, "loss": _num(loss_sum),
                     "grad_norm": _num(gnorm), "lr": lr}
            action = acts[0]["action"]
            if action == "rollback":
                loop, window = stab.rollback(params, opt, step + 1)
                acts[0] = {"action": "rollback", "to_step": loop["step"], "skip": window}
            for a in acts:
                log({**event, **a})
                prog.line(step + 1, f"spike: loss {loss_sum:.4f} -> {a['action']}", 0)
            if action == "replace_batch":
                cursor += 1
                continue
            if action == "rollback":
                step, cursor, tokens_seen = loop["step"], loop["cursor"], loop["tokens_seen"]
                continue
            stab.on_accept(loss_sum)  # "accept": replacement exhausted and rollback off
        else:
            stab.on_accept(loss_sum)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        cursor += 1
        tokens_seen += step_tokens
        meter.add(step_tokens)
        if stab.due(step):
            stab.snapshot(params, opt, loop_state())
        if step % c.log_every == 0 or step == 1 or step == c.steps:
            speed = meter.read()
            log({"kind": "train", "step": step, "loss": loss_sum, "lr": lr, "grad_norm": gnorm,
                 "tokens": tokens_seen, **agg, **speed})
            extra = " ".join(f"{k} {v:.3f}" for k, v in agg.items())
            mfu = f" mfu {speed['mfu']:.1%}" if speed["mfu"] is not None else ""
            prog.line(step, f"loss {loss_sum:.4f} lr {lr:.2e} {extra} {speed['tok_s']:,.0f} tok/s{mfu}",
                      speed["tok_s"] / max(step_tokens, 1))
        if c.eval_every and (step % c.eval_every == 0 or step == c.steps):
            vl = evaluate(module, task, device, amp_dtype, c.attn)
            log({"kind": "val", "step": step, "val_loss": vl, "tokens": tokens_seen})
            prog.line(step, f"val_loss {vl:.4f}", 0)
        if step < c.steps and c.save_every and step % c.save_every == 0:
            save(final=False)
            stab.snapshot(params, opt, loop_state(), reset=True)
    save(final=True)
    dist.barrier(env)
    return json.loads((out_dir / META).read_text())


def resume_config(out_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with, with overrides (e.g. more steps) applied."""
    st = load_train_state(out_dir)
    d = {**st["train_config"], **(overrides or {})}
    return TrainConfig.from_dict(d)


__all__ = ["TrainConfig", "Task", "train", "lr_at", "evaluate", "plot_losses", "resume_config", "resolve_device",
           "resolve_dtype", "choose_dtype", "dtype_name", "TRAIN_STATE"]
