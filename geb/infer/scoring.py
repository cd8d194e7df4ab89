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
    each row continues it in slot 1, whose prefix positions stay valid from row to row; a row whose
    targets all sit on its last position (the MCQ letter case) runs the output layer on that position
    only instead of on every position. Rows still go one at a time: the runtime has no batched prefill."""

    def __init__(self, source, max_len: int | None = None, tok=None):
        self.rt = getattr(source, "rt", source)  # an Engine (its runtime) or a Runtime
        self.model = None
        self.tok = tok if tok is not None else source.tok
        self.cfg = self.rt.cfg
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.batch_size = 1
        self.n_vocab = self.tok.vocab_size
        self.device = torch.device("cpu")
        self.prefix_forwards = 0

    def _seq_log_probs(self, ids: list[int]) -> torch.Tensor:
        with self.rt.threads_scope():
            return self._masked_log_probs(self.rt.forward_logits(ids))

    @torch.inference_mode()
    def score_rows(self, rows: list[Row], prefix: list[int] | None = None) -> list[list[tuple[float, bool]]]:
        from geb.infer.runtime import SlotCache

        prefix = prefix or []
        out: list[list[tuple[float, bool]]] = []
        if not rows:
            return out
        p = len(prefix)
        longest = max(len(r.ids) for r in rows)
        if p + longest > self.max_len:
            raise GebError(f"internal: {p} + {longest} tokens exceed the context {self.max_len}")
        cache = SlotCache(self.cfg, 1, p + longest)
        with self.rt.threads_scope():
            if prefix:
                self.rt.prefill(prefix, cache, 0)
                self.prefix_forwards += 1
            for r in rows:
                cache.lengths[0] = p  # positions past the prefix are overwritten by this row
                last = len(r.ids) - 1
                only_last = all(pos == last and len(toks) == 1 for pos, toks in r.targets)
                logits = self.rt.prefill(r.ids, cache, 0, all_logits=not only_last)
                lp = self._masked_log_probs(logits.view(1 if only_last else len(r.ids), -1))
                res = []
                for pos, toks in r.targets:
                    rows_lp = lp[-1:] if only_last else lp[pos: pos + len(toks)]
                    t = torch.tensor(toks)
                    res.append((float(rows_lp.gather(1, t[:, None]).sum()), bool((rows_lp.argmax(-1) == t).all())))
                out.append(res)
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
        return RuntimeScorer(engine, max_len), engine.tok, dict(getattr(engine, "meta", {}) or {}), engine
    from geb.checkpoint import load_model

    model, tok, meta = load_model(folder)
    return Scorer(model, tok, batch_size=batch_size, max_len=max_len), tok, meta, None


