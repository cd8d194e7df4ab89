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

import numpy as np
import torch

from geb.checkpoint import META, TRAIN_STATE, load_train_state
from geb.common import atomic_write, check_destination
from geb.errors import GebError
from geb.train import dist, perf
from geb.train.stability import Stability, resolve


def _opt(default, help: str | None = None, *, group: str | None = None, choices: tuple | None = None,
         flag_default: bool = True):
    """A TrainConfig field with what its command-line flag needs (geb.commands.common.add_config_args):
    `help` (None: no flag), the `group` it is listed under, `choices`, and whether the help states the default."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices,
                                            "flag_default": flag_default})


_MODES = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Every training setting, one line each: the default, and the help text `geb pretrain`, `geb sft` and
    `geb dpo` show for the flag generated from it (geb.commands.common.add_config_args)."""

    steps: int = _opt(1000, "optimizer steps (with --resume: extend the run)", group="schedule")
    batch_size: int = _opt(16, "sequences per micro-batch", group="schedule")
    grad_accum: int = _opt(1, "micro-batches per optimizer step, over all processes", group="schedule")
    lr: float = _opt(4e-4, "peak learning rate", group="schedule")
    min_lr: float = _opt(4e-5, "final learning rate", group="schedule")
    warmup_steps: int = _opt(100, "", group="schedule")
    # A shorter horizon decays faster, the paper's fourth anti-spike measure for small batches.
    decay_steps: int | None = _opt(None, "step at which the cosine reaches --min-lr (default: --steps)",
                                   group="schedule", flag_default=False)
    weight_decay: float = _opt(0.1, "", group="schedule")
    beta1: float = _opt(0.9)
    beta2: float = _opt(0.95)
    grad_clip: float = _opt(1.0, "", group="schedule")
    # the autocast dtype; weights and optimizer stay FP32
    dtype: str = _opt("auto", "autocast dtype (default auto: BF16 on GPUs that support it and on CPUs with "
                      "native BF16 (AVX512-BF16, AMX), else FP32)", group="schedule", choices=_MODES,
                      flag_default=False)
    device: str = _opt("auto", "auto (default), cpu, cuda", group="schedule", flag_default=False)
    seed: int = _opt(1234, "", group="schedule")
    eval_every: int = _opt(100, "", group="schedule")
    eval_batches: int = _opt(8, "validation batches per pass")
    save_every: int = _opt(500, "", group="schedule")
    log_every: int = _opt(10, "", group="schedule")
    # -- the loss-spike measures (geb.train.stability); "auto" = on for pretraining models >= 300M
    stability: str = _opt("auto", "spike detection, batch replacement, rollback with skipped data, automatic LR "
                          "cut, embedding-gradient shrink 0.1 (default auto: on for pretraining models of 300M "
                          "parameters and more)", group="stability", choices=("auto", "on", "off"),
                          flag_default=False)
    # measure 3; None = 0.1 when the spike measures are on, else 1.0 (off)
    emb_grad_alpha: float | None = _opt(None, "embedding gradient shrink factor (1 = off; default 0.1 with "
                                        "--stability on, else 1)", group="stability", flag_default=False)
    # a spike is above median + max(sigma * noise, rel * median)
    spike_sigma: float = _opt(6.0, "spike threshold in robust noise units", group="stability")
    spike_rel: float = _opt(0.1, "and at least this fraction above the median", group="stability")
    spike_window: int = _opt(100, "recent losses in the statistics", group="stability")
    # no detection (except non-finite) before this many accepted steps
    spike_min_history: int = _opt(20, "", group="stability")
    # measure 1 (0 = no replacement)
    spike_retries: int = _opt(2, "replacement batches before a rollback", group="stability")
    # measure 2: roll back to the last good snapshot and skip a data window
    rollback: bool = _opt(True, "never roll back (spikes that survive the replacements are applied)",
                          group="stability")
    snapshot_every: int = _opt(50, "steps between in-memory good states", group="stability")
    snapshot_memory: str = _opt("auto", "where rollback snapshots live: host (default): at most two in CPU "
                                "memory (pinned on CUDA), 12 bytes per parameter each; device: one, beside the "
                                "weights (docs/training.md)", group="stability",
                                choices=("auto", "host", "device"), flag_default=False)
    skip_before: int = _opt(100, "data iterations skipped before a spike", group="stability")
    skip_after: int = _opt(100, "data iterations skipped after a spike", group="stability")
    max_rollbacks: int = _opt(20)
    # measure 4
    lr_cut_after: int = _opt(3, "cut the LR after this many spikes, 0 = never", group="stability")
    lr_cut_factor: float = _opt(0.7, "", group="stability")
    lr_preset: str = _opt("none", "small-batch: peak and min LR x0.5 and the cosine ends at 60%% of the steps "
                          "(the paper's LR adjustment for small batches)", group="schedule",
                          choices=("none", "small-batch"), flag_default=False)
    # -- scale: only used under torchrun (parallel) or on GPUs; none of them changes the result
    parallel: str = _opt("auto", "data parallelism under torchrun: ddp (default) or fsdp (FSDP2, BF16 compute "
                         "with FP32 master weights and reductions)", group="scale",
                         choices=("auto", "ddp", "fsdp"), flag_default=False)
    compile: bool = _opt(False, "torch.compile each block", group="scale")
    activation_checkpointing: bool = _opt(False, "recompute activations in backward (less memory)", group="scale")
    attn: str = _opt("sdpa", "attention kernel (default sdpa: PyTorch picks FlashAttention-2 on CUDA; sdpa-flash "
                     "insists on it; flash-attn: the package)", group="scale",
                     choices=("sdpa", "sdpa-flash", "flash-attn"), flag_default=False)
    peak_tflops: float | None = _opt(None, "per-device dense BF16 peak for the MFU log (default: the GPUs in "
                                     "geb's table; others log no MFU until given this)", group="scale",
                                     flag_default=False)
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


class EpochOrder:
    """The g-th item a training run draws from n items: every epoch is a fresh permutation seeded by
    (seed, epoch), so a resumed run draws exactly what an uninterrupted one would."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[i])


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
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


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
    run = _Run(model, task, c, Path(out_dir), tokenizer, meta)
    run.restore(resume)
    run.open_logs(quiet)
    while run.step < c.steps:
        if stop_after is not None and run.step >= stop_after:
            return {"step": run.step, "stopped": True}
        run.cursor = run.stab.skips.next_cursor(run.cursor)
        lr = lr_at(run.step, run.sched) * run.stab.lr_scale
        for g in run.opt.param_groups:
            g["lr"] = lr
        loss_sum, agg = run.forward_backward()
        gnorm = dist.clip_grad_norm(run.params, c.grad_clip)
        if run.stab.judge(loss_sum, gnorm):
            if run.on_spike(loss_sum, gnorm, lr):
                continue  # the step was discarded (batch replaced or rolled back)
        else:
            run.stab.on_accept(loss_sum)
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        run.advance()
        run.after_step(loss_sum, gnorm, lr, agg)
    run.save(final=True)
    dist.barrier(run.env)
    return json.loads((run.out_dir / META).read_text())


class _Run:
    """The state of one training run and its phases: set up, restore, step, log, save."""

    def __init__(self, model, task: Task, c: TrainConfig, out_dir: Path, tokenizer, meta: dict[str, Any]):
        self.model, self.task, self.c, self.out_dir, self.tokenizer, self.meta = model, task, c, out_dir, tokenizer, meta
        self.env = env = dist.setup(c.device)
        self.device = device = env.device
        self.amp_dtype, self.dtype_reason = choose_dtype(c.dtype, device)
        torch.manual_seed(c.seed)
        self.desc = task.describe()
        self.res = res = resolve(c, model.num_params(), self.desc.get("kind"))
        self.sched = replace(c, lr=res.lr, min_lr=res.min_lr, decay_steps=res.decay_steps)
        model.to(device)
        model.emb_grad_alpha = res.emb_grad_alpha
        model.train()
        perf.prepare(model, c, device, self.amp_dtype)
        self.module = dist.wrap(model, env, c.parallel)
        self.opt = make_optimizer(model, c)  # after wrap: FSDP2 replaces the parameters with sharded ones
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.micros = dist.rank_micros(c.grad_accum, env)
        self.stab = Stability(c, res.stability)
        self.step, self.cursor, self.tokens_seen, self.records = 0, 0, 0, []
        self.step_tokens = task.tokens_per_batch * c.grad_accum

    def restore(self, resume: bool) -> None:
        """Load the loop, optimizer, spike-measure and RNG state of `out_dir` (or refuse to overwrite it)."""
        out_dir = self.out_dir
        if not resume:
            if (out_dir / META).exists():
                raise GebError(f"{out_dir}: already holds a checkpoint; use --resume to continue it or choose "
                               "another --out")
            if self.env.main:  # before the first file lands in it: a folder geb did not write is refused, kept whole
                check_destination(out_dir, "model")
            return
        dist.recover_folder(out_dir)
        st = load_train_state(out_dir)
        if dist.has_sharded_state(out_dir):
            dist.load_training_state(out_dir, self.module, self.opt)
        elif "optimizer" in st and not self.env.active:  # folders written before the optimizer moved to DCP
            self.opt.load_state_dict(st["optimizer"])
        else:
            raise GebError(f"{out_dir}: no optimizer state to resume from")
        self.step, self.cursor, self.tokens_seen = st["step"], st["cursor"], st["tokens_seen"]
        self.records = list(st.get("records", []))
        if "stability" in st:
            self.stab.load_state_dict(st["stability"])
        _set_rng_state(st["rng"], self.device)

    def open_logs(self, quiet: bool) -> None:
        """The settings meta.json records, the live metrics log, progress lines and the first snapshot."""
        env, device, c = self.env, self.device, self.c
        self.settings = {"train": asdict(c), "resolved": self.res.to_dict(), "task": self.desc,
                         "model": self.model.cfg.to_dict(), "world_size": env.world,
                         "parallel": ("fsdp" if dist.is_fsdp(self.module) else "ddp") if env.active else "none",
                         "device": str(device), "dtype_resolved": dtype_name(self.amp_dtype),
                         "dtype_reason": self.dtype_reason}
        self.live = self.out_dir / "metrics.jsonl"
        if env.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # The live log restarts from what the checkpoint recorded: lines a killed run appended after its
            # last save would otherwise appear twice.
            self.live.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.prog = Progress(c.steps, stream=open(os.devnull, "w") if quiet or not env.main else sys.stderr)
        self.meter = perf.Meter(self.model.cfg, self.desc.get("seq_len"), device, env.world, c.peak_tflops)
        print(f"training on {device} in {dtype_name(self.amp_dtype)} ({self.dtype_reason})", file=self.prog.stream,
              flush=True)
        if self.meter.note:
            print(self.meter.note, file=self.prog.stream, flush=True)
        self.stab.snapshot(self.params, self.opt, self.loop_state(), reset=True)

    def log(self, rec: dict) -> None:
        self.records.append(rec)
        if self.env.main:
            with open(self.live, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def loop_state(self) -> dict:
        return {"step": self.step, "cursor": self.cursor, "tokens_seen": self.tokens_seen}

    def save(self, final: bool) -> None:
        records = self.records
        trains = [r for r in records if r["kind"] == "train"]
        vals = [r for r in records if r["kind"] == "val"]
        m = {**self.meta, "settings": self.settings, "step": self.step, "tokens_seen": self.tokens_seen,
             "final": final, "last_train_loss": trains[-1]["loss"] if trains else None,
             "last_val_loss": vals[-1]["val_loss"] if vals else None, "stability": self.stab.summary()}
        state = {**self.loop_state(), "rng": _rng_state(self.device), "records": records,
                 "train_config": asdict(self.c), "stability": self.stab.state_dict(), "world_size": self.env.world}
        dist.save_training_checkpoint(self.out_dir, self.module, self.opt, self.env, self.tokenizer, m, state,
                                      extra_files={"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in records)})
        if self.env.main and records:
            plot_losses(records, self.out_dir / "loss.png",
                        title=f"{self.meta.get('stage', 'train')}: {self.model.cfg.name}")

    def forward_backward(self) -> tuple[float, dict[str, float]]:
        """Accumulate the gradients of this step's micro-batches; the loss and metrics averaged over ranks."""
        device, amp_dtype, micros = self.device, self.amp_dtype, self.micros
        agg: dict[str, float] = {}
        loss_acc = torch.zeros((), device=device)
        for j, micro in enumerate(micros):
            b = self.task.batch(self.cursor, micro)
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            with dist.grad_sync(self.module, j == len(micros) - 1), perf.attention_context(self.c.attn):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                    loss, mets = self.task.loss(self.module, b)
                (loss / len(micros)).backward()
            loss_acc += loss.detach().float() / len(micros)
            for k, v in mets.items():
                agg[k] = agg.get(k, 0.0) + float(v) / len(micros)
        keys = sorted(agg)
        vec = dist.all_reduce_mean(torch.stack([loss_acc] + [torch.tensor(float(agg[k]), device=device)
                                                             for k in keys]), self.env)
        return float(vec[0]), {k: float(vec[i + 1]) for i, k in enumerate(keys)}

    def on_spike(self, loss_sum: float, gnorm: float, lr: float) -> bool:
        """Apply the spike measures; True when the step is discarded (batch replaced or rolled back)."""
        stab = self.stab
        self.opt.zero_grad(set_to_none=True)
        acts = stab.on_spike(self.cursor, loss_sum)
        event = {"kind": "spike", "step": self.step + 1, "cursor": self.cursor, "loss": _num(loss_sum),
                 "grad_norm": _num(gnorm), "lr": lr}
        action = acts[0]["action"]
        if action == "rollback":
            loop, window = stab.rollback(self.params, self.opt, self.step + 1)
            acts[0] = {"action": "rollback", "to_step": loop["step"], "skip": window}
        for a in acts:
            self.log({**event, **a})
            self.prog.line(self.step + 1, f"spike: loss {loss_sum:.4f} -> {a['action']}", 0)
        if action == "replace_batch":
            self.cursor += 1
            return True
        if action == "rollback":
            self.step, self.cursor, self.tokens_seen = loop["step"], loop["cursor"], loop["tokens_seen"]
            return True
        stab.on_accept(loss_sum)  # "accept": replacement exhausted and rollback off
        return False

    def advance(self) -> None:
        self.step += 1
        self.cursor += 1
        self.tokens_seen += self.step_tokens
        self.meter.add(self.step_tokens)
        if self.stab.due(self.step):
            self.stab.snapshot(self.params, self.opt, self.loop_state())

    def after_step(self, loss_sum: float, gnorm: float, lr: float, agg: dict[str, float]) -> None:
        """Log, validate and save on their schedules."""
        c, step = self.c, self.step
        if step % c.log_every == 0 or step == 1 or step == c.steps:
            speed = self.meter.read()
            self.log({"kind": "train", "step": step, "loss": loss_sum, "lr": lr, "grad_norm": gnorm,
                      "tokens": self.tokens_seen, **agg, **speed})
            extra = " ".join(f"{k} {v:.3f}" for k, v in agg.items())
            mfu = f" mfu {speed['mfu']:.1%}" if speed["mfu"] is not None else ""
            self.prog.line(step, f"loss {loss_sum:.4f} lr {lr:.2e} {extra} {speed['tok_s']:,.0f} tok/s{mfu}",
                           speed["tok_s"] / max(self.step_tokens, 1))
        if c.eval_every and (step % c.eval_every == 0 or step == c.steps):
            vl = evaluate(self.module, self.task, self.device, self.amp_dtype, c.attn)
            self.log({"kind": "val", "step": step, "val_loss": vl, "tokens": self.tokens_seen})
            self.prog.line(step, f"val_loss {vl:.4f}", 0)
        if step < c.steps and c.save_every and step % c.save_every == 0:
            self.save(final=False)
            self.stab.snapshot(self.params, self.opt, self.loop_state(), reset=True)


def resume_config(out_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with, with overrides (e.g. more steps) applied."""
    st = load_train_state(out_dir)
    d = {**st["train_config"], **(overrides or {})}
    return TrainConfig.from_dict(d)


__all__ = ["TrainConfig", "Task", "train", "lr_at", "evaluate", "plot_losses", "resume_config", "resolve_device",
           "resolve_dtype", "choose_dtype", "dtype_name", "TRAIN_STATE"]
