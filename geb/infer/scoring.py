"""Scoring through the CPU runtime, and the scorer for any model folder (full-precision or quantized).

`RuntimeScorer` has geb.scoring.Scorer's interface over a Runtime or an Engine, so quantized folders
(which have no PyTorch module) are scored by the same code; `load_scorer` picks the one a folder needs.
"""

from __future__ import annotations

import torch

from geb.errors import GebError
from geb.scoring import Row, Scorer


class RuntimeScorer(Scorer):
    """Scoring through the CPU runtime (quantized folders, which have no GEB module; the quantization
    report). A shared prefix (the k-shot shots) is prefilled once into slot 0 of a runtime cache and
    copied into the other slots; rows then go `batch_size` at a time (at most `max_batch_tokens`
    tokens), each continuing the prefix in its own slot, through one multi-row prefill whose weight
    products run once for the whole batch (no padding: rows keep their own lengths). A row whose targets
    all sit on its last position (the MCQ letter case) runs the output layer on that position only."""

    def __init__(self, source, max_len: int | None = None, tok=None, batch_size: int = 8):
        self.rt = getattr(source, "rt", source)  # an Engine (its runtime) or a Runtime
        self.model = None
        self.tok = tok if tok is not None else source.tok
        self.cfg = self.rt.cfg
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.batch_size = max(1, int(batch_size))
        self.max_batch_tokens = 2048
        self.n_vocab = self.tok.vocab_size
        self.device = torch.device("cpu")
        self.prefix_forwards = 0

    def _seq_log_probs(self, ids: list[int]) -> torch.Tensor:
        with self.rt.threads_scope():
            return self._masked_log_probs(self.rt.forward_logits(ids))

    def _groups(self, rows: list[Row]) -> list[list[int]]:
        """Consecutive rows grouped at most batch_size and max_batch_tokens tokens at a time."""
        out: list[list[int]] = []
        for i, r in enumerate(rows):
            if out and len(out[-1]) < self.batch_size and \
                    sum(len(rows[j].ids) for j in out[-1]) + len(r.ids) <= self.max_batch_tokens:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    @torch.inference_mode()
    def score_rows(self, rows: list[Row], prefix: list[int] | None = None) -> list[list[tuple[float, bool]]]:
        from geb.infer.runtime import SlotCache

        prefix = prefix or []
        out: list[list[tuple[float, bool]]] = [[] for _ in rows]
        if not rows:
            return out
        p = len(prefix)
        longest = max(len(r.ids) for r in rows)
        if p + longest > self.max_len:
            raise GebError(f"internal: {p} + {longest} tokens exceed the context {self.max_len}")
        groups = self._groups(rows)
        cache = SlotCache(self.cfg, max(len(g) for g in groups), p + longest)
        with self.rt.threads_scope():
            if prefix:
                self.rt.prefill(prefix, cache, 0)
                self.prefix_forwards += 1
                cache.k[:, 1:, :, :p] = cache.k[:, :1, :, :p]
                cache.v[:, 1:, :, :p] = cache.v[:, :1, :, :p]
            for g in groups:
                slots = list(range(len(g)))
                for s in slots:
                    cache.lengths[s] = p  # positions past the prefix are overwritten by this row
                last_only = [all(pos == len(rows[i].ids) - 1 and len(toks) == 1 for pos, toks in rows[i].targets)
                             for i in g]
                positions = [[len(rows[i].ids) - 1] if lo else list(range(len(rows[i].ids)))
                             for i, lo in zip(g, last_only)]
                logits = self.rt.prefill_rows([rows[i].ids for i in g], cache, slots, positions)
                for i, lo, lg in zip(g, last_only, logits):
                    lp = self._masked_log_probs(lg)
                    for pos, toks in rows[i].targets:
                        rows_lp = lp[-1:] if lo else lp[pos: pos + len(toks)]
                        t = torch.tensor(toks)
                        out[i].append((float(rows_lp.gather(1, t[:, None]).sum()),
                                       bool((rows_lp.argmax(-1) == t).all())))
        return out

    @torch.inference_mode()
    def rolling(self, ids: list[int], stride: int | None = None, chunk: int = 512,
                start: int | None = None) -> tuple[float, int]:
        n = len(ids)
        stride = min(stride or self.max_len, self.max_len)
        seq = [self._start(start)] + list(ids)
        total, k = 0.0, 0
        while k < n:
            end = min(k + stride, n)
            start = max(0, end - self.max_len)
            lp = self._seq_log_probs(seq[start:end])[k - start:]
            total += float(lp.gather(1, torch.tensor(ids[k:end])[:, None]).sum())
            k = end
        return total, n


def is_quantized(folder) -> bool:
    """A folder written by `geb quantize` (its config.json carries a quantization field); False for a
    folder whose config cannot be read (loading it as a full-precision folder then says why)."""
    from pathlib import Path

    from geb.checkpoint import CONFIG
    from geb.config import ModelConfig

    try:
        return bool(ModelConfig.load_with_quantization(Path(folder) / CONFIG)[1])
    except (GebError, OSError):
        return False


def load_scorer(folder, batch_size: int = 8, max_len: int | None = None):
    """(scorer, tokenizer, meta, engine or None) for a full-precision or a quantized model folder."""
    if is_quantized(folder):
        from geb.infer.engine import Engine

        engine = Engine.from_folder(folder)
        scorer = RuntimeScorer(engine, max_len, batch_size=batch_size)
        return scorer, engine.tok, dict(getattr(engine, "meta", {}) or {}), engine
    from geb.checkpoint import load_model

    model, tok, meta = load_model(folder)
    return Scorer(model, tok, batch_size=batch_size, max_len=max_len), tok, meta, None


