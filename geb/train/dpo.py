"""Direct Preference Optimization (Rafailov et al., 2023) on preference pairs, run by the shared loop.

The frozen reference model is the starting checkpoint. Its log-probabilities of every chosen and
rejected answer are computed once, before training, with the same device and autocast dtype as
training, and cached in `reference_logps.pt` (keyed by the reference weights' hash, the data hashes
and the length limit), so training holds one model in memory and `--resume` never recomputes them.
While a run is unfinished the cache sits beside the output folder (`.<out>.reference_logps.pt`)
because the loop replaces the folder at every checkpoint; the finished folder holds it.

Loss (sigmoid DPO with optional label smoothing, the "conservative DPO" of Mitchell 2023):
    z = β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]
    L = −(1−ε)·log σ(z) − ε·log σ(−z)
averaged over pairs, where log π(y|x) sums the answer's token log-probs (its content and <|im_end|>).
Logged per step: loss, reward_chosen/rejected (β·(log π − log π_ref)), reward_margin, reward_acc
(fraction of pairs with chosen reward > rejected reward), logp_chosen, logp_rejected.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from geb.checkpoint import CONFIG, META, WEIGHTS, check_folder, load_model, read_meta
from geb.common import atomic_write, atomic_write_json
from geb.config import ModelConfig
from geb.errors import GebError
from geb.tokenizer import Tokenizer
from geb.train.chatdata import LABELS, Data, Pair, check_resumed_data, data_label, load_pairs, load_train_val
from geb.train.loop import EpochOrder, TrainConfig, resolve_device, resolve_dtype, resume_config, train
from geb.train.sft import IGNORE, collate, fit_schedule, pack_rows

REF_FILE = "reference_logps.pt"

# What DPO changes in TrainConfig's pretraining defaults (run_dpo and `geb dpo` read it here)
DPO_DEFAULTS = {"lr": 1e-6, "min_lr": 1e-7, "weight_decay": 0.0}


# -- the math -------------------------------------------------------------------------------------------
def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """Per sequence, the sum of log p(target) where target != -100: logits [R, T, V], targets and the
    sequence index of each position `seq` [R, T] (-1 on padding) → [n] (FP32)."""
    lp = -F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    # padding and prompt positions carry target -100, so their lp is 0 whatever bin they land in
    return lp.new_zeros(n).index_add(0, seq.clamp(min=0).reshape(-1), lp.reshape(-1))


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy/reference log-probs of chosen and rejected answers [B] → (mean loss, metrics)."""
    chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
    z = chosen_r - rejected_r
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    with torch.no_grad():
        m = {"reward_chosen": float(chosen_r.mean()), "reward_rejected": float(rejected_r.mean()),
             "reward_margin": float(z.mean()), "reward_acc": float((z > 0).float().mean()),
             "logp_chosen": float(pc.mean()), "logp_rejected": float(pr.mean())}
    return losses.mean(), m


# -- batches --------------------------------------------------------------------------------------------
def collate_pairs(pairs: list[Pair], pad_id: int, pack: bool = True) -> dict:
    """B pairs → a batch of their 2B sequences (chosen 0..B-1, then rejected B..2B-1), packed.

    Answers vary several-fold in length, so rather than one padded row per sequence the sequences
    are packed into rows as wide as the longest one, each attending only to itself (sft.collate's
    block-diagonal mask, positions restarting at 0): the same log-probs as one sequence per row at
    a fraction of the positions. `seq` [R, T] is the sequence of each position (-1: padding).
    `pack=False`: one right-padded row per sequence and no mask (kernels that take no mask).
    """
    seqs = [(p.chosen, p.chosen_mask) for p in pairs] + [(p.rejected, p.rejected_mask) for p in pairs]
    lengths = [len(s) - 1 for s, _ in seqs]
    rows = pack_rows(lengths, max(lengths), pack)
    b = collate([[seqs[i] for i in row] for row in rows], pad_id)
    owner = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        owner[r, : len(row)] = torch.tensor(row)
    seg = b.pop("segments")
    b["seq"] = torch.where(seg >= 0, owner.gather(1, seg.clamp(min=0)), -1)
    b["pairs"] = len(pairs)
    return b


def policy_logps(model, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed answer log-probs [B] each of a collate_pairs batch under `model`."""
    logits = model(b["ids"], positions=b["positions"], attn_mask=b.get("attn_mask"))
    n = b["pairs"]
    lp = sequence_logps(logits, b["targets"], b["seq"], 2 * n)
    return lp[:n], lp[n:]


@torch.no_grad()
def compute_logps(model, pairs: list[Pair], batch_size: int, pad_id: int, device, amp_dtype) -> torch.Tensor:
    """[N, 2] (chosen, rejected) summed answer log-probs under `model`, in training's dtype."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        b = collate_pairs(pairs[i : i + batch_size], pad_id)
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            c, r = policy_logps(model, b)
        out.append(torch.stack([c, r], 1).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 2)


class DPOTask:
    """Preference pairs with cached reference log-probs; loss = sigmoid DPO."""

    def __init__(self, pairs: list[Pair], ref: torch.Tensor, val_pairs: list[Pair], val_ref: torch.Tensor,
                 batch_size: int, grad_accum: int, seed: int, pad_id: int, beta: float = 0.1,
                 label_smoothing: float = 0.0, eval_batches: int = 8, info: dict | None = None, pack: bool = True):
        if beta <= 0:
            raise GebError(f"beta must be positive, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise GebError(f"label smoothing must be in [0, 0.5), got {label_smoothing}")
        self.pairs, self.ref, self.val_pairs, self.val_ref = pairs, ref, val_pairs, val_ref
        self.bs, self.accum, self.seed, self.pad_id = batch_size, grad_accum, seed, pad_id
        self.beta, self.ls, self.eval_batches, self.info = beta, label_smoothing, eval_batches, info or {}
        mean_len = sum(len(p.chosen) + len(p.rejected) - 2 for p in pairs) / len(pairs)
        self.tokens_per_batch = round(batch_size * mean_len)
        self._index = EpochOrder(len(pairs), seed)
        self.pack = pack

    def _batch(self, pairs, ref, idx) -> dict:
        b = collate_pairs([pairs[i] for i in idx], self.pad_id, self.pack)
        b["ref"] = ref[idx]
        return b

    def batch(self, index: int, micro: int) -> dict:
        g0 = (index * self.accum + micro) * self.bs
        return self._batch(self.pairs, self.ref, [self._index(g0 + j) for j in range(self.bs)])

    def val_batches(self):
        n = min(len(self.val_pairs), self.eval_batches * self.bs)
        for i in range(0, n, self.bs):
            yield self._batch(self.val_pairs, self.val_ref, list(range(i, min(n, i + self.bs))))

    def loss(self, model, b):
        pc, pr = policy_logps(model, b)
        ref = b["ref"].float()
        return dpo_loss(pc, pr, ref[:, 0], ref[:, 1], self.beta, self.ls)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.pairs) / (self.bs * self.accum))

    def describe(self) -> dict:
        return {"kind": "dpo", "beta": self.beta, "label_smoothing": self.ls, "pairs": len(self.pairs),
                "val_pairs": len(self.val_pairs), **self.info}


# -- the reference cache --------------------------------------------------------------------------------
def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _cache_paths(out_dir: Path) -> tuple[Path, Path]:
    """(inside the finished folder, beside the folder while training)."""
    return out_dir / REF_FILE, out_dir.parent / f".{out_dir.name}.{REF_FILE}"


def _load_cache(out_dir: Path, key: dict) -> dict | None:
    for p in _cache_paths(out_dir):
        if p.is_file():
            try:
                d = torch.load(p, map_location="cpu", weights_only=True)
            except Exception:
                continue  # unreadable: recompute
            if d.get("key") == key:
                return d
    return None


def _park_cache(out_dir: Path, inside: bool) -> None:
    """Move the cache into the folder (`inside`) or beside it (before the loop rewrites the folder)."""
    a, b = _cache_paths(out_dir)
    src, dst = (b, a) if inside else (a, b)
    if src.is_file():
        os.replace(src, dst)


# -- the stage ------------------------------------------------------------------------------------------
def _reference_logps(out_dir: Path, key: dict, ref_dir: Path, pairs, val, batch_size: int, pad_id: int, device,
                     amp_dtype, log) -> tuple[dict, object]:
    """The reference model's log-probs of every pair: the cache beside `out_dir` when its key matches, else
    computed (and cached). Returns (cache, the reference model when it was loaded, else None)."""
    cache = _load_cache(out_dir, key)
    if cache is not None:
        log("reusing cached reference log-probs")
        return cache, None
    log(f"computing reference log-probs of {len(pairs) + len(val)} pairs with {ref_dir} ...")
    model, _, _ = load_model(ref_dir, device=device)
    cache = {"key": key, "train": compute_logps(model, pairs, batch_size, pad_id, device, amp_dtype),
             "val": compute_logps(model, val, batch_size, pad_id, device, amp_dtype)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(_cache_paths(out_dir)[1], lambda p: torch.save(cache, p))
    return cache, model


def run_dpo(model_dir: str | Path | None, data: Data, out_dir: str | Path, *, val_data: Data | None = None,
            val_fraction: float = 0.0, beta: float = 0.1, label_smoothing: float = 0.0,
            train_config: TrainConfig | None = None, epochs: float | None = None, warmup_ratio: float | None = None,
            max_len: int | None = None, on_bad: str = "error", resume: bool = False, quiet: bool = False,
            overrides: dict | None = None, stop_after: int | None = None) -> dict:
    """DPO-train `model_dir` (usually an SFT checkpoint, which is also the reference) on preference
    pairs (a JSONL path or a list of records); return the meta, which includes the final reward
    accuracy and margin on the validation pairs (`final_eval`)."""
    log = (lambda s: None) if quiet else (lambda s: print(f"dpo: {s}", file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    if resume:
        old = read_meta(out_dir)
        if old.get("stage") != "dpo":
            raise GebError(f"{out_dir}: not a DPO checkpoint (stage {old.get('stage')!r}); cannot resume it as DPO")
        st = old["settings"]["task"]
        c = resume_config(out_dir, overrides)
        ref_dir = Path(old["reference"]["model"])
        beta, label_smoothing, max_len = st["beta"], st["label_smoothing"], st["max_len"]
        on_bad, val_fraction = st["on_bad"], st["val_fraction"]
        tok_dir = out_dir
    else:
        if model_dir is None:
            raise GebError("give the model folder to align (an SFT checkpoint)")
        if (out_dir / META).exists():
            raise GebError(f"{out_dir}: already holds a checkpoint; use --resume to continue it or choose another --out")
        ref_dir = Path(check_folder(model_dir))
        c = train_config or TrainConfig(**DPO_DEFAULTS, warmup_steps=10)
        tok_dir = ref_dir
    tok = Tokenizer.load(tok_dir)
    cfg = ModelConfig.load(Path(tok_dir) / CONFIG)
    max_len = max_len or cfg.max_seq_len
    if max_len > cfg.max_seq_len:
        raise GebError(f"max length {max_len} exceeds the model's context {cfg.max_seq_len}")
    pairs, val, reports, data_hash, val_hash = load_train_val(
        load_pairs, data, val_data, val_fraction, c.seed, log, tok, max_len, on_bad)
    if resume:
        check_resumed_data(out_dir, old, data_hash, val_hash)

    device = resolve_device(c.device)
    amp_dtype = resolve_dtype(c.dtype, device)
    if resume:  # the data hashes matched above; the run's own key needs no reference model at hand
        key = old["reference"]["key"]
    else:
        key = {"reference_weights": _file_hash(check_folder(ref_dir) / WEIGHTS), "data_hash": data_hash,
               "val_data_hash": val_hash, "val_fraction": val_fraction, "seed": c.seed, "max_len": max_len,
               "on_bad": on_bad, "dtype": str(amp_dtype), "device": device.type}
    cache, model = _reference_logps(out_dir, key, ref_dir, pairs, val, max(1, c.batch_size), tok.pad_id, device,
                                    amp_dtype, log)
    _park_cache(out_dir, inside=False)  # the loop replaces the folder at each checkpoint
    if resume or model is None:
        model, _, _ = load_model(out_dir if resume else ref_dir, device=device)

    info = {"max_len": max_len, "on_bad": on_bad, "val_fraction": val_fraction, "data": data_label(data),
            "val_data": data_label(val_data)}
    # packed rows need a block-diagonal mask, which SDPA's flash kernel (--attn sdpa-flash) does not take
    task = DPOTask(pairs, cache["train"], val, cache["val"], c.batch_size, c.grad_accum, c.seed, tok.pad_id,
                   beta, label_smoothing, c.eval_batches, info, pack=c.attn != "sdpa-flash")
    if not resume:
        steps = None if epochs is None else max(1, math.ceil(epochs * task.steps_per_epoch()))
        c = fit_schedule(c, steps, warmup_ratio, bool(val))
    log(f"{len(pairs)} pairs ({len(val)} for validation), beta {beta}, label smoothing {label_smoothing}; "
        f"{c.steps} steps of {c.batch_size * c.grad_accum} pairs (~{c.steps / task.steps_per_epoch():.2f} epochs)")
    meta = {"stage": "dpo", "parent": str(ref_dir), "parent_stage": read_meta(ref_dir).get("stage"),
            "reference": {"model": str(ref_dir), "cache": REF_FILE, "key": key}, "data_hash": data_hash,
            "val_data_hash": val_hash, "tokenizer_hash": tok.hash(), "data_report": reports}
    res = train(model, task, c, out_dir, tok, meta, resume=resume, quiet=quiet, stop_after=stop_after)
    if res.get("stopped"):
        return res
    _park_cache(out_dir, inside=True)
    final = {"val": preference_eval(model, val, cache["val"], beta, tok.pad_id, c.batch_size, device, amp_dtype)} if val else {}
    return _finish(out_dir, res, final, log)


def _finish(out_dir: Path, res: dict, final: dict, log) -> dict:
    """Add the final validation figures and the last training metrics to meta.json; plot the rewards."""
    res["final_eval"] = final
    recs = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    res["last_train_metrics"] = next((r for r in reversed(recs) if r.get("kind") == "train"), {})
    atomic_write_json(out_dir / META, res, indent=2, default=str)
    plot_rewards(out_dir)
    if final:
        log(f"validation reward accuracy {final['val']['reward_acc']:.1%}, margin {final['val']['reward_margin']:.3f}")
    return res


def preference_eval(model, pairs: list[Pair], ref: torch.Tensor, beta: float, pad_id: int, batch_size: int = 16,
                    device="cpu", amp_dtype=torch.float32) -> dict:
    """Reward accuracy/margin and mean log-prob shifts of `model` against cached reference log-probs."""
    device = torch.device(device)
    lp = compute_logps(model, pairs, batch_size, pad_id, device, amp_dtype)
    d = lp - ref
    z = beta * (d[:, 0] - d[:, 1])

    def summary(idx) -> dict:
        zi, di = z[idx], d[idx]
        return {"pairs": len(idx), "reward_acc": float((zi > 0).float().mean()), "reward_margin": float(zi.mean()),
                "logp_chosen_shift": float(di[:, 0].mean()), "logp_rejected_shift": float(di[:, 1].mean())}

    out = summary(list(range(len(pairs))))
    for label in LABELS:  # e.g. per kind of preference, per language, when the records say
        values = sorted({p.labels[label] for p in pairs if label in p.labels})
        if values:
            out[f"by_{label}"] = {v: summary([i for i, p in enumerate(pairs) if p.labels.get(label) == v]) for v in values}
    return out


def plot_rewards(out_dir: Path) -> None:
    """rewards.png: reward accuracy and margin, and chosen/rejected log-probs, per logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = Path(out_dir) / "metrics.jsonl"
    recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.is_file() else []
    tr = [r for r in recs if r.get("kind") == "train" and "reward_acc" in r]
    if not tr:
        return
    steps = [r["step"] for r in tr]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(steps, [r["reward_acc"] for r in tr], label="reward accuracy")
    a.plot(steps, [r["reward_margin"] for r in tr], label="reward margin")
    a.axhline(0.5, color="grey", lw=0.5, ls=":")
    a.set_xlabel("step")
    a.set_title("DPO rewards (train batches)")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(steps, [r["logp_chosen"] for r in tr], label="log p(chosen)")
    b.plot(steps, [r["logp_rejected"] for r in tr], label="log p(rejected)")
    b.set_xlabel("step")
    b.set_title("answer log-probabilities")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(Path(out_dir) / "rewards.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


__all__ = ["dpo_loss", "sequence_logps", "collate_pairs", "compute_logps", "DPOTask", "run_dpo",
           "preference_eval", "plot_rewards", "REF_FILE"]
