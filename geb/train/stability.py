"""The paper's four loss-spike measures, as pieces the training loop drives.

GEB-1.3B trained with a small batch and fought loss spikes with four measures (its Figure 1):

1. **Spike detection and batch replacement.** A step whose loss is non-finite, or far above the
   running statistics of recent accepted losses, is discarded (no optimizer update) and the next batch
   is drawn instead: the data cursor advances, the step counter does not.
2. **Skipping the data around a spike.** When a spike persists through `spike_retries` replacement
   batches, the weights, optimizer and loop state roll back to the last good in-memory snapshot and a
   window of data iterations before and after the spike is skipped (PaLM and OPT did the same; the
   paper skipped 100-200 iterations). Windows are stored in cursor units and persisted, so a resumed
   run skips exactly the same data.
3. **Embedding-gradient shrink** (GLM-130B): the embedding output becomes a*e + (1-a)*stop_grad(e),
   so the forward value is unchanged and the gradient into the table is scaled by a (default 0.1).
   The model implements it (`GEB.emb_grad_alpha`); this module only resolves the setting.
4. **Learning-rate adjustment.** A `small-batch` preset (lower peak, faster cosine decay) and an
   automatic cut of the LR scale after every `lr_cut_after` spikes.

Everything here is deterministic given the losses, so an interrupted and resumed run makes the same
decisions. Detection uses robust statistics (median and the median absolute successive difference)
so that the steady fall of the loss early in training is not mistaken for noise or for a spike.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median

import torch

from geb.errors import GebError

# Models from this size up count as "large runs": stability="auto" switches the measures on for them.
LARGE_RUN_PARAMS = 300_000_000
DEFAULT_EMB_ALPHA = 0.1  # GLM-130B and GEB-1.3B

# The small-batch LR preset: peak and floor scaled by LR_PRESET_SCALE, and the cosine reaches the floor
# after LR_PRESET_DECAY of the steps instead of at the end (the paper's "lower LR, faster decay").
LR_PRESET_SCALE = 0.5
LR_PRESET_DECAY = 0.6


@dataclass(frozen=True)
class Resolved:
    """What a TrainConfig means once 'auto' and the presets are resolved (recorded in meta.json)."""

    stability: bool
    lr: float
    min_lr: float
    decay_steps: int | None
    emb_grad_alpha: float

    def to_dict(self) -> dict:
        return {"stability": self.stability, "lr": self.lr, "min_lr": self.min_lr,
                "decay_steps": self.decay_steps, "emb_grad_alpha": self.emb_grad_alpha}


def resolve(c, num_params: int, task_kind: str | None) -> Resolved:
    """Resolve stability='auto', the LR preset and the embedding-gradient factor for a run.

    Resolution is a pure function of the (unresolved) config, so a resumed run resolves identically;
    checkpoints store the unresolved config.
    """
    if c.stability not in ("auto", "on", "off"):
        raise GebError(f"stability must be auto, on or off, got {c.stability!r}")
    if c.lr_preset not in ("none", "small-batch"):
        raise GebError(f"lr_preset must be none or small-batch, got {c.lr_preset!r}")
    on = c.stability == "on" or (c.stability == "auto" and task_kind == "pretrain" and num_params >= LARGE_RUN_PARAMS)
    lr, min_lr, decay = c.lr, c.min_lr, c.decay_steps
    if c.lr_preset == "small-batch":
        lr, min_lr = lr * LR_PRESET_SCALE, min_lr * LR_PRESET_SCALE
        if decay is None:
            decay = max(c.warmup_steps + 1, int(round(c.steps * LR_PRESET_DECAY)))
    alpha = c.emb_grad_alpha if c.emb_grad_alpha is not None else (DEFAULT_EMB_ALPHA if on else 1.0)
    if not 0.0 < alpha <= 1.0:
        raise GebError(f"emb_grad_alpha must be in (0, 1], got {alpha}")
    return Resolved(stability=on, lr=lr, min_lr=min_lr, decay_steps=decay, emb_grad_alpha=alpha)


class SpikeDetector:
    """Flags a loss that is non-finite or above median + max(sigma * noise, rel * median) of the window.

    noise = 1.4826 * median(|l_i - l_(i-1)|) / sqrt(2): the robust standard deviation of step-to-step
    changes, which a slow trend barely moves and a past spike cannot inflate.
    """

    def __init__(self, window: int, sigma: float, rel: float, min_history: int):
        if window < 3 or min_history < 3 or min_history > window:
            raise GebError(f"spike_window ({window}) and spike_min_history ({min_history}) must satisfy "
                           "3 <= min_history <= window")
        self.sigma, self.rel, self.min_history = sigma, rel, min_history
        self.history: deque[float] = deque(maxlen=window)

    def threshold(self) -> float | None:
        h = list(self.history)
        if len(h) < self.min_history:
            return None
        center = median(h)
        noise = 1.4826 * median(abs(b - a) for a, b in zip(h, h[1:])) / math.sqrt(2)
        return center + max(self.sigma * noise, self.rel * abs(center))

    def is_spike(self, loss: float, grad_norm: float = 0.0) -> bool:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return True
        t = self.threshold()
        return t is not None and loss > t

    def accept(self, loss: float) -> None:
        self.history.append(float(loss))

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, st: dict) -> None:
        self.history.clear()
        self.history.extend(st["history"])


class SkipWindows:
    """Half-open cursor ranges [start, end) of data that training must not draw again."""

    def __init__(self, windows: list | None = None):
        self.windows: list[list[int]] = sorted([int(a), int(b)] for a, b in (windows or []))

    def add(self, start: int, end: int) -> None:
        if end > start:
            self.windows = sorted(self.windows + [[int(start), int(end)]])

    def next_cursor(self, cursor: int) -> int:
        """The first cursor at or after `cursor` that lies in no window."""
        moved = True
        while moved:
            moved = False
            for a, b in self.windows:
                if a <= cursor < b:
                    cursor, moved = b, True
        return cursor

    def skipped(self) -> int:
        merged: list[list[int]] = []
        for a, b in self.windows:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return sum(b - a for a, b in merged)


# Rollback snapshots: where they live and how many exist at most (docs/training.md, "Snapshots").
# host: in CPU memory (pinned on CUDA, filled by asynchronous copies), two of them, so a rollback can
# go back at least snapshot_every/2 steps; device: one snapshot next to the weights on the device.
SNAPSHOT_SLOTS = {"host": 2, "device": 1}


def snapshot_memory(name: str) -> str:
    """Resolve --snapshot-memory (auto = host)."""
    if name not in ("auto", "host", "device"):
        raise GebError(f"snapshot_memory must be auto, host or device, got {name!r}")
    return "host" if name == "auto" else name


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 DTensor (a view), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


class Snapshot:
    """Buffers for one good state (weights, AdamW state, loop state), allocated on first use and then
    refilled in place, so taking a snapshot never allocates a second copy beside the one it replaces.

    Each rank copies its own tensors (its shard under FSDP2: no communication). With `where="host"`
    a CUDA tensor goes to pinned CPU memory by an asynchronous copy; `restore` waits for those copies
    before using them. Restoring copies values back into the same parameter and optimizer-state
    tensors, so DDP/FSDP wrappers and the optimizer's references stay valid.
    """

    def __init__(self, where: str):
        self.where = where
        self.params: list[torch.Tensor] = []
        # per parameter: None (no optimizer state yet) or {key: buffer tensor, or a plain value}
        self.opt: list[dict | None] = []
        self._bufs: list[dict[str, torch.Tensor]] = []  # optimizer buffers, kept while state is None
        self._where_from: list[dict[str, torch.device]] = []  # the device each optimizer tensor came from
        self.loop: dict = {}
        self._event = None

    def _buffer(self, old: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        if old is not None and old.shape == t.shape and old.dtype == t.dtype:
            return old
        if self.where == "host" and t.device.type == "cuda":
            return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    def capture(self, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, loop: dict) -> "Snapshot":
        self.wait()
        if not self.params:
            self._bufs, self._where_from = [{} for _ in params], [{} for _ in params]
            self.opt = [None] * len(params)
        with torch.no_grad():
            self.params = [self._buffer(old, _local(p)) for old, p in
                           zip(self.params or [None] * len(params), params)]
            for buf, p in zip(self.params, params):
                buf.copy_(_local(p), non_blocking=True)
            for i, p in enumerate(params):
                st = opt.state.get(p)
                if not st:
                    self.opt[i] = None
                    continue
                saved = {}
                for k, v in st.items():
                    if torch.is_tensor(v):
                        buf = self._bufs[i][k] = self._buffer(self._bufs[i].get(k), _local(v))
                        buf.copy_(_local(v), non_blocking=True)
                        self._where_from[i][k] = _local(v).device
                        saved[k] = buf
                    else:
                        saved[k] = v
                self.opt[i] = saved
        self.loop = dict(loop)
        if _on_cuda(params):
            self._event = torch.cuda.Event()
            self._event.record()
        return self

    def wait(self) -> None:
        """Block until the asynchronous copies into this snapshot's buffers have finished."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params) + \
            sum(t.numel() * t.element_size() for bufs in self._bufs for t in bufs.values())

    @property
    def step(self) -> int:
        return self.loop["step"]

    def restore(self, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> dict:
        self.wait()
        with torch.no_grad():
            for i, (p, saved, st) in enumerate(zip(params, self.params, self.opt)):
                _local(p).copy_(saved, non_blocking=True)
                if st is None:
                    opt.state.pop(p, None)
                    continue
                cur = opt.state.get(p)
                if cur is None or set(cur) != set(st):
                    cur = opt.state[p] = {}
                for k, v in st.items():
                    if not torch.is_tensor(v):
                        cur[k] = v
                    elif k in cur and torch.is_tensor(cur[k]) and _local(cur[k]).shape == v.shape:
                        _local(cur[k]).copy_(v, non_blocking=True)
                    else:  # no state tensor to copy into (state dropped since): rebuild one like p
                        cur[k] = _rebuild(v, p, self._where_from[i][k])
        if _on_cuda(params):
            torch.cuda.current_stream().synchronize()  # the buffers may be refilled right after
        return dict(self.loop)


def _on_cuda(params) -> bool:
    return bool(params) and params[0].device.type == "cuda"


def _rebuild(buf: torch.Tensor, like: torch.nn.Parameter, device: torch.device) -> torch.Tensor:
    """A new optimizer-state tensor holding `buf` on the device it was captured from; one shaped like
    the parameter becomes a DTensor sharded like it under FSDP2 (scalars such as AdamW's step stay
    plain tensors)."""
    local = buf.to(device, copy=True)
    if hasattr(like, "to_local") and buf.dim() > 0:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())
    return local


class Stability:
    """Decides what to do with each step's loss and keeps the state a resumed run needs.

    The loop calls `judge` with the global (all-reduced) loss, so every rank decides the same. State
    that survives a rollback (skip windows, LR scale, counters) is separate from the loop state that a
    snapshot restores (step, cursor, tokens seen, the detector's window).
    """

    def __init__(self, c, enabled: bool):
        self.enabled = enabled
        self.retries_max = max(0, int(c.spike_retries))
        self.rollback_on = bool(c.rollback) and enabled
        self.snapshot_every = max(1, int(c.snapshot_every))
        self.skip_before, self.skip_after = max(0, int(c.skip_before)), max(0, int(c.skip_after))
        self.lr_cut_after, self.lr_cut_factor = int(c.lr_cut_after), float(c.lr_cut_factor)
        self.max_rollbacks = int(c.max_rollbacks)
        if not 0.0 < self.lr_cut_factor <= 1.0:
            raise GebError(f"lr_cut_factor must be in (0, 1], got {self.lr_cut_factor}")
        self.detector = SpikeDetector(c.spike_window, c.spike_sigma, c.spike_rel, c.spike_min_history)
        self.skips = SkipWindows()
        self.lr_scale = 1.0
        self.counts = {"spikes": 0, "replaced_batches": 0, "rollbacks": 0, "accepted_spikes": 0, "lr_cuts": 0}
        self.since_cut = 0
        # The current spike episode: how many batches were replaced, and the first/last spiking cursors.
        self.retries = 0
        self.episode: list[int] | None = None
        self.where = snapshot_memory(getattr(c, "snapshot_memory", "auto"))
        self.slots = SNAPSHOT_SLOTS[self.where]
        self.snapshots: list[Snapshot] = []  # live, oldest first
        self._spare: list[Snapshot] = []  # released: their buffers are reused by the next snapshot

    # -- decisions ----------------------------------------------------------------------------------
    def judge(self, loss: float, grad_norm: float) -> bool:
        """True when this step must not be applied as is."""
        if not self.enabled:
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise GebError(f"loss became {loss} (grad norm {grad_norm}); lower the learning rate, check the "
                               "data, or turn on the spike measures (--stability on)")
            return False
        return self.detector.is_spike(loss, grad_norm)

    def on_spike(self, cursor: int, loss: float) -> list[dict]:
        """Register a spike at `cursor`; return the actions, the first of which the loop carries out.

        Actions: replace_batch (advance the cursor), rollback (restore a snapshot and skip a window),
        accept (apply the update anyway: replacement exhausted and rollback off), lr_cut (an extra entry).
        """
        acts: list[dict] = []
        if self.episode is None:
            self.episode = [cursor, cursor]
            self.counts["spikes"] += 1
            self.since_cut += 1
            if self.lr_cut_after > 0 and self.since_cut >= self.lr_cut_after:
                self.lr_scale *= self.lr_cut_factor
                self.since_cut = 0
                self.counts["lr_cuts"] += 1
                acts.append({"action": "lr_cut", "lr_scale": self.lr_scale})
        self.episode[1] = cursor
        if self.retries < self.retries_max:
            self.retries += 1
            self.counts["replaced_batches"] += 1
            return [{"action": "replace_batch"}] + acts
        if self.rollback_on and self.snapshots:
            if self.counts["rollbacks"] >= self.max_rollbacks:
                raise GebError(f"{self.max_rollbacks} rollbacks and the loss still spikes (last loss {loss}); "
                               "lower the learning rate (--lr, --lr-preset small-batch)")
            return [{"action": "rollback"}] + acts
        if not math.isfinite(loss):
            raise GebError(f"loss is {loss} after {self.retries} replacement batch(es) and no rollback is possible; "
                           "lower the learning rate or check the data")
        self.counts["accepted_spikes"] += 1
        self._end_episode()
        return [{"action": "accept"}] + acts

    def rollback(self, params, opt, spike_step: int) -> tuple[dict, list[int]]:
        """Restore the newest snapshot at least snapshot_every/2 steps before the spike (or the oldest)
        and add the skip window; return (loop state to continue from, the window)."""
        min_age = max(1, self.snapshot_every // 2)
        older = [s for s in self.snapshots if spike_step - s.step >= min_age]
        snap = older[-1] if older else self.snapshots[0]
        keep = self.snapshots.index(snap) + 1
        self._spare += self.snapshots[keep:]  # newer than the one restored: released
        self.snapshots = self.snapshots[:keep]
        loop = snap.restore(params, opt)
        first, last = self.episode
        window = [max(loop["cursor"], first - self.skip_before), last + 1 + self.skip_after]
        self.skips.add(*window)
        self.detector.load_state_dict(loop["detector"])
        self.counts["rollbacks"] += 1
        self._end_episode()
        return loop, window

    def on_accept(self, loss: float) -> None:
        self.detector.accept(loss)
        self._end_episode()

    def _end_episode(self) -> None:
        self.retries = 0
        self.episode = None

    # -- snapshots ----------------------------------------------------------------------------------
    def snapshot(self, params, opt, loop: dict, reset: bool = False) -> None:
        """Keep the last good states, at most SNAPSHOT_SLOTS[where] of them. The oldest is released
        (its buffers reused) before a new one is taken. `reset` (at a checkpoint save or a start)
        drops older ones, so an uninterrupted run and one resumed from that checkpoint hold the same
        snapshots."""
        if not self.rollback_on:
            return
        if reset:
            self._spare += self.snapshots
            self.snapshots = []
        elif len(self.snapshots) >= self.slots:
            self._spare.append(self.snapshots.pop(0))
        snap = self._spare.pop() if self._spare else Snapshot(self.where)
        self.snapshots.append(snap.capture(params, opt, {**loop, "detector": self.detector.state_dict()}))

    def snapshot_bytes(self) -> int:
        """Memory held by snapshot buffers (live and released-for-reuse) on this rank."""
        return sum(s.nbytes() for s in self.snapshots + self._spare)

    def due(self, step: int) -> bool:
        return self.rollback_on and step % self.snapshot_every == 0

    # -- persistence --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "skips": self.skips.windows, "lr_scale": self.lr_scale,
                "counts": dict(self.counts), "since_cut": self.since_cut}

    def load_state_dict(self, st: dict) -> None:
        self.detector.load_state_dict(st["detector"])
        self.skips = SkipWindows(st["skips"])
        self.lr_scale = st["lr_scale"]
        self.counts.update(st["counts"])
        self.since_cut = st["since_cut"]

    def summary(self) -> dict:
        return {"enabled": self.enabled, **self.counts, "lr_scale": self.lr_scale,
                "skip_windows": self.skips.windows, "skipped_iterations": self.skips.skipped()}


__all__ = ["Resolved", "resolve", "SpikeDetector", "SkipWindows", "Snapshot", "Stability", "LARGE_RUN_PARAMS",
           "SNAPSHOT_SLOTS", "snapshot_memory"]
