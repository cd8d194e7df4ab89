"""Supervised fine-tuning on chat conversations, run by the shared training loop.

Conversations are rendered with the one chat template (`Tokenizer.render_chat`); the loss is the mean
cross-entropy over assistant tokens only (each assistant turn's content and its <|im_end|>).

Packing: several conversations share a row of `seq_len` positions. Each conversation keeps its own
RoPE positions (from 0) and a block-diagonal causal attention mask, and its targets never cross into
the next conversation, so a conversation's loss is the same packed as alone (tests check it). Rows are
packed once (best-fit decreasing) and visited in a seeded random order each epoch, so the batch for a
data index is a pure function of (seed, index) and resume needs only the loop's cursor. `pack=False`
puts one conversation per row instead (right-padded, plain causal attention).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import sys
from pathlib import Path

import torch

from geb.checkpoint import check_folder, load_model
from geb.errors import GebError
from geb.train.chatdata import Data, check_resumed_data, data_label, load_conversations, load_train_val
from geb.train.loop import EpochOrder, TrainConfig, resume_config, train

IGNORE = -100

# What fine-tuning changes in TrainConfig's pretraining defaults (run_sft and `geb sft` read it here)
SFT_DEFAULTS = {"lr": 1e-4, "min_lr": 1e-5, "weight_decay": 0.0}


def pack_rows(lengths: list[int], capacity: int, pack: bool = True) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens (best-fit decreasing)."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def collate(rows: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict:
    """Rows of (ids, mask) conversations → a batch dict for `GEB.forward`.

    Each conversation of n tokens contributes n-1 positions: inputs ids[:-1], targets ids[1:] where
    the mask is set. Positions restart at 0 per conversation. `attn_mask` [B,1,T,T] is block-diagonal
    causal when some row holds more than one conversation, else None (plain causal; padding trails).
    `segments` [B,T] says which conversation of its row each position belongs to (-1: padding).
    """
    width = max(sum(len(ids) - 1 for ids, _ in row) for row in rows)
    b = len(rows)
    ids_t = torch.full((b, width), pad_id, dtype=torch.long)
    tgt_t = torch.full((b, width), IGNORE, dtype=torch.long)
    pos_t = torch.zeros((b, width), dtype=torch.long)
    seg_t = torch.full((b, width), -1, dtype=torch.long)  # -1: padding (attends to padding only)
    multi = False
    for r, row in enumerate(rows):
        multi |= len(row) > 1
        o = 0
        for d, (ids, mask) in enumerate(row):
            n = len(ids) - 1
            x = torch.tensor(ids, dtype=torch.long)
            m = torch.tensor(mask[1:], dtype=torch.bool)
            ids_t[r, o : o + n] = x[:-1]
            tgt_t[r, o : o + n] = torch.where(m, x[1:], IGNORE)
            pos_t[r, o : o + n] = torch.arange(n)
            seg_t[r, o : o + n] = d
            o += n
        pos_t[r, o:] = torch.arange(width - o)
    out = {"ids": ids_t, "targets": tgt_t, "positions": pos_t, "segments": seg_t}
    if multi:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        out["attn_mask"] = ((seg_t[:, :, None] == seg_t[:, None, :]) & causal)[:, None]
    return out


class SFTTask:
    """Packed (or padded) chat conversations; loss = mean CE over assistant tokens."""

    def __init__(self, examples, val_examples, seq_len: int, batch_size: int, grad_accum: int, seed: int,
                 pad_id: int, pack: bool = True, eval_batches: int = 8, info: dict | None = None):
        self.examples, self.val_examples = examples, val_examples or []
        self.seq_len, self.bs, self.accum, self.seed, self.pad_id = seq_len, batch_size, grad_accum, seed, pad_id
        self.pack, self.eval_batches, self.info = pack, eval_batches, info or {}
        self.rows = pack_rows([len(ids) - 1 for ids, _ in examples], seq_len, pack)
        self.val_rows = pack_rows([len(ids) - 1 for ids, _ in self.val_examples], seq_len, pack)
        # the loop counts tokens seen from this: real (non-padding) positions of an average row
        self.tokens_per_batch = round(batch_size * sum(len(ids) - 1 for ids, _ in examples) / len(self.rows))
        self.target_tokens = sum(sum(m[1:]) for _, m in examples)
        self._order = EpochOrder(len(self.rows), seed)

    def _row(self, g: int) -> list:
        return [self.examples[j] for j in self.rows[self._order(g)]]

    def batch(self, index: int, micro: int) -> dict:
        g0 = (index * self.accum + micro) * self.bs
        return collate([self._row(g0 + j) for j in range(self.bs)], self.pad_id)

    def val_batches(self):
        rows = self.val_rows[: self.eval_batches * self.bs]
        for i in range(0, len(rows), self.bs):
            yield collate([[self.val_examples[j] for j in row] for row in rows[i : i + self.bs]], self.pad_id)

    def loss(self, model, b):
        loss = model(b["ids"], b["targets"], positions=b["positions"], attn_mask=b.get("attn_mask"))
        return loss, {"target_tokens": float((b["targets"] != IGNORE).sum())}

    def steps_per_epoch(self, grad_accum: int | None = None) -> int:
        return math.ceil(len(self.rows) / (self.bs * (grad_accum or self.accum)))

    def describe(self) -> dict:
        return {"kind": "sft", "seq_len": self.seq_len, "pack": self.pack, "conversations": len(self.examples),
                "rows": len(self.rows), "target_tokens": self.target_tokens,
                "fill": round(sum(len(i) - 1 for i, _ in self.examples) / (len(self.rows) * self.seq_len), 4),
                "val_conversations": len(self.val_examples), **self.info}


def steps_for(epochs: float, rows: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * rows / (batch_size * grad_accum)))


def fit_schedule(c: TrainConfig, steps: int | None, warmup_ratio: float | None, has_val: bool) -> TrainConfig:
    """A new SFT/DPO run's config: `steps` (from --epochs) and warmup from `warmup_ratio` when given, and no
    validation points without validation data (they would be NaN)."""
    if steps is not None:
        c = dataclasses.replace(c, steps=steps)
    if warmup_ratio is not None:
        c = dataclasses.replace(c, warmup_steps=max(1, round(warmup_ratio * c.steps)))
    if not has_val:
        c = dataclasses.replace(c, eval_every=0)
    return c


def run_sft(model_dir: str | Path | None, data: Data, out_dir: str | Path, *, val_data: Data | None = None,
            val_fraction: float = 0.0, train_config: TrainConfig | None = None, epochs: float | None = None,
            warmup_ratio: float | None = None, seq_len: int | None = None, pack: bool = True,
            on_bad: str = "error", resume: bool = False, quiet: bool = False, overrides: dict | None = None,
            stop_after: int | None = None) -> dict:
    """Fine-tune `model_dir` on chat `data` (a JSONL path or a list of records); return the meta.

    `epochs` (if given) sets the step count from the packed row count; `warmup_ratio` sets warmup
    steps as a fraction of it. With `resume=True`, `out_dir` is continued with its own settings (the
    data must hash the same); `overrides` may change e.g. `steps`.
    """
    log = (lambda s: None) if quiet else (lambda s: print(f"sft: {s}", file=sys.stderr, flush=True))
    if resume:
        model, tok, old = load_model(out_dir)
        st = old["settings"]["task"]
        c = resume_config(out_dir, overrides)
        seq_len, pack, on_bad, val_fraction = st["seq_len"], st["pack"], st["on_bad"], st["val_fraction"]
        parent, parent_stage = old.get("parent"), old.get("parent_stage")
    else:
        if model_dir is None:
            raise GebError("give the model folder to fine-tune")
        check_folder(model_dir)
        model, tok, pmeta = load_model(model_dir)
        c = train_config or TrainConfig(**SFT_DEFAULTS, warmup_steps=10)
        parent, parent_stage = str(model_dir), pmeta.get("stage")
    seq_len = seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise GebError(f"sequence length {seq_len} exceeds the model's context {model.cfg.max_seq_len}")
    examples, val, reports, data_hash, val_hash = load_train_val(
        load_conversations, data, val_data, val_fraction, c.seed, log, tok, seq_len, on_bad)
    if resume:
        check_resumed_data(out_dir, old, data_hash, val_hash)
    info = {"on_bad": on_bad, "val_fraction": val_fraction, "data": data_label(data), "val_data": data_label(val_data)}
    task = SFTTask(examples, val, seq_len, c.batch_size, c.grad_accum, c.seed, tok.pad_id, pack, c.eval_batches, info)
    if not resume:
        steps = None if epochs is None else steps_for(epochs, len(task.rows), c.batch_size, c.grad_accum)
        c = fit_schedule(c, steps, warmup_ratio, bool(val))
    log(f"{len(examples)} conversations in {len(task.rows)} rows of {seq_len} ({task.describe()['fill']:.0%} full), "
        f"{len(val)} for validation; {c.steps} steps of {c.batch_size * c.grad_accum} rows "
        f"(~{c.steps * c.batch_size * c.grad_accum / len(task.rows):.2f} epochs)")
    meta = {"stage": "sft", "parent": parent, "parent_stage": parent_stage, "data_hash": data_hash,
            "val_data_hash": val_hash, "tokenizer_hash": tok.hash(), "data_report": reports,
            "epochs": round(c.steps * c.batch_size * c.grad_accum / len(task.rows), 4)}
    return train(model, task, c, out_dir, tok, meta, resume=resume, quiet=quiet, stop_after=stop_after)


__all__ = ["SFTTask", "pack_rows", "collate", "run_sft", "steps_for", "IGNORE"]
