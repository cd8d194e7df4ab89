"""Pretraining: next-token prediction over packed token shards, run by the shared training loop.

Batches are windows of `seq_len + 1` tokens cut from the token stream. Each epoch visits every
non-overlapping window once in a seeded random order, so the batch for a data index is a pure function
of (seed, index): resuming and skipping data need only the cursor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from geb.checkpoint import load_model
from geb.config import ModelConfig, get_preset, pad_vocab
from geb.data.tokens import TokenData
from geb.errors import GebError
from geb.model import GEB
from geb.tokenizer import Tokenizer
from geb.train.dist import recover_folder
from geb.train.loop import EpochOrder, TrainConfig, resume_config, train


class PretrainTask:
    def __init__(self, data: TokenData, seq_len: int, batch_size: int, grad_accum: int, seed: int,
                 eval_batches: int = 8):
        self.data, self.seq_len, self.bs, self.accum, self.seed = data, seq_len, batch_size, grad_accum, seed
        self.train = data.array("train")
        self.n_windows = (len(self.train) - 1) // seq_len
        if self.n_windows < 1:
            raise GebError(f"{data.folder}: the train split has {len(self.train)} tokens, fewer than one "
                           f"sequence of {seq_len + 1}; use more data or a shorter --seq-len")
        self.val = data.array("val") if "val" in data.splits() else None
        self.eval_batches = eval_batches
        self.tokens_per_batch = batch_size * seq_len
        self._order = EpochOrder(self.n_windows, self.seed)

    def _window(self, g: int) -> int:
        return self._order(g) * self.seq_len

    def _rows(self, arr, starts) -> dict:
        x = np.stack([np.asarray(arr[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(x)
        return {"ids": t[:, :-1], "targets": t[:, 1:]}

    def batch(self, index: int, micro: int) -> dict:
        g0 = (index * self.accum + micro) * self.bs
        return self._rows(self.train, [self._window(g0 + j) for j in range(self.bs)])

    def val_batches(self):
        if self.val is None:
            return
        n = (len(self.val) - 1) // self.seq_len
        starts = [i * self.seq_len for i in range(min(n, self.eval_batches * self.bs))]
        for i in range(0, len(starts), self.bs):
            yield self._rows(self.val, starts[i : i + self.bs])

    def loss(self, model, b):
        return model(b["ids"], b["targets"]), {}

    def describe(self) -> dict:
        return {"kind": "pretrain", "seq_len": self.seq_len, "train_tokens": int(len(self.train)),
                "val_tokens": int(len(self.val)) if self.val is not None else 0, "data": str(self.data.folder)}


def build_config(preset: str | None, config_file: str | None, tokenizer: Tokenizer, seq_len: int) -> ModelConfig:
    if config_file:
        cfg = ModelConfig.load(config_file)
    else:
        cfg = get_preset(preset or "geb-tiny")
    vocab = pad_vocab(tokenizer.vocab_size)
    if cfg.vocab_size < tokenizer.vocab_size or (cfg.vocab_size != vocab and cfg.name != "geb-1.3b"):
        cfg = cfg.replace(vocab_size=vocab)  # size the embedding to the tokenizer, padded to 64
    if seq_len > cfg.max_seq_len:
        raise GebError(f"--seq-len {seq_len} exceeds the model's context {cfg.max_seq_len}")
    return cfg


def run_pretrain(data_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                 preset: str | None = None, config_file: str | None = None, init_from: str | None = None,
                 train_config: TrainConfig | None = None, seq_len: int = 256, resume: bool = False,
                 quiet: bool = False, overrides: dict | None = None, stop_after: int | None = None) -> dict:
    """Pretrain (or resume) and return the checkpoint's meta."""
    data = TokenData(data_dir)
    if resume:
        recover_folder(out_dir)  # a crash between a checkpoint swap's two renames
        model, tok, meta = load_model(out_dir)
        c = resume_config(out_dir, overrides)
        seq_len = meta["settings"]["task"]["seq_len"]
        parent = meta.get("parent")
    else:
        c = train_config or TrainConfig()
        if init_from:
            model, tok, _ = load_model(init_from)
            parent = str(init_from)
        else:
            tok_dir = tokenizer_dir or data.meta.get("tokenizer")
            if not tok_dir:
                raise GebError(f"{data_dir}: meta.json names no tokenizer; pass --tokenizer DIR")
            tok = Tokenizer.load(tok_dir)
            cfg = build_config(preset, config_file, tok, seq_len)
            torch.manual_seed(c.seed)
            model = GEB(cfg)
            model.init_weights(seed=c.seed)
            parent = None
    if data.vocab_size > model.cfg.vocab_size or tok.vocab_size > model.cfg.vocab_size:
        raise GebError(f"{data_dir}: token ids go up to {data.vocab_size} but the model's vocab_size is {model.cfg.vocab_size}")
    if data.meta.get("tokenizer_hash") and data.meta["tokenizer_hash"] != tok.hash():
        raise GebError(f"{data_dir}: shards were made with tokenizer {data.meta['tokenizer_hash']}, "
                       f"but the model's tokenizer is {tok.hash()}")
    task = PretrainTask(data, seq_len, c.batch_size, c.grad_accum, c.seed, c.eval_batches)
    meta = {"stage": "pretrain", "parent": parent, "data": str(data_dir), "data_hash": data.data_hash,
            "tokenizer_hash": tok.hash()}
    return train(model, task, c, out_dir, tok, meta, resume=resume, quiet=quiet, stop_after=stop_after)
