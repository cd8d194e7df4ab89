"""Reference language models for the perplexity filter: a character n-gram model and a geb model.

CharNgramLM is an interpolated absolute-discounting character model (order 4 by default, discount
0.75, uniform base over the seen alphabet + 1), fit on a trusted sample of text the user supplies.
Characters suit both languages (no segmentation) and need no download. Saved as gzipped JSON with
the counts and the held-out perplexity quantiles that the filter's `max_ppl=auto` uses.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from collections import defaultdict
from pathlib import Path

from geb.common import atomic_write
from geb.errors import GebError

FORMAT = "geb-char-ngram-v1"


class CharNgramLM:
    def __init__(self, order: int = 4, discount: float = 0.75):
        if order < 1:
            raise GebError(f"n-gram order must be ≥ 1 (got {order})")
        self.order, self.discount = order, discount
        self.counts: list[dict[str, int]] = [defaultdict(int) for _ in range(order)]  # k → (k+1)-grams
        self.meta: dict = {}
        self._ctx: list[dict[str, tuple[int, int]]] = []

    # -- fit ----------------------------------------------------------------------------------
    def add(self, text: str) -> None:
        s = "\x02" * (self.order - 1) + text + "\x03"
        for k in range(self.order):
            c = self.counts[k]
            for i in range(self.order - 1 - k, len(s) - k):
                c[s[i:i + k + 1]] += 1
        self._ctx = []

    @classmethod
    def fit(cls, texts: list[str], order: int = 4, heldout: float = 0.1, seed: int = 0,
            max_chars: int = 5_000_000) -> "CharNgramLM":
        """Fit on texts (documents); a held-out share sets the perplexity quantiles stored in meta."""
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise GebError("perplexity reference sample is empty")
        rng = random.Random(seed)
        order_ix = list(range(len(texts)))
        rng.shuffle(order_ix)
        n_held = max(1, int(len(texts) * heldout)) if len(texts) > 1 else 0
        held = [texts[i] for i in order_ix[:n_held]]
        lm = cls(order)
        used = 0
        for i in order_ix[n_held:] or order_ix:
            if used >= max_chars:
                break
            lm.add(texts[i])
            used += len(texts[i])
        ppls = sorted(lm.perplexity(t) for t in held) or [lm.perplexity(texts[0])]
        q = lambda f: ppls[min(len(ppls) - 1, int(f * (len(ppls) - 1) + 0.5))]  # noqa: E731
        lm.meta = {"format": FORMAT, "order": order, "train_chars": used, "heldout_docs": len(held),
                   "median_ppl": q(0.5), "p95_ppl": q(0.95), "p99_ppl": q(0.99)}
        return lm

    # -- score --------------------------------------------------------------------------------
    def _contexts(self):
        if not self._ctx:
            # per order k ≥ 1: context (k chars) → (count of context as a prefix, distinct followers)
            self._ctx = [dict() for _ in range(self.order)]
            for k in range(1, self.order):
                agg: dict[str, list[int]] = {}
                for g, c in self.counts[k].items():
                    a = agg.setdefault(g[:-1], [0, 0])
                    a[0] += c
                    a[1] += 1
                self._ctx[k] = {h: (a[0], a[1]) for h, a in agg.items()}
            uni = self.counts[0]
            self._n1 = sum(uni.values())
            self._v = len(uni)
        return self._ctx

    def logprob(self, text: str) -> tuple[float, int]:
        """(natural-log probability of text + end mark, number of predicted characters)."""
        ctx = self._contexts()
        d, uni = self.discount, self.counts[0]
        base = 1.0 / (self._v + 1)
        p_uni_bo = d * self._v / max(1, self._n1)
        s = "\x02" * (self.order - 1) + text + "\x03"
        total = 0.0
        for i in range(self.order - 1, len(s)):
            ch = s[i]
            p = max(uni.get(ch, 0) - d, 0) / max(1, self._n1) + p_uni_bo * base
            for k in range(1, self.order):
                h = s[i - k:i]
                hc = ctx[k].get(h)
                if hc is None:
                    break
                n, types = hc
                p = max(self.counts[k].get(h + ch, 0) - d, 0) / n + d * types / n * p
            total += math.log(p)
        return total, len(s) - self.order + 1

    def perplexity(self, text: str) -> float:
        lp, n = self.logprob(text)
        return math.exp(-lp / max(1, n))

    # -- io -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        def write(tmp: Path) -> None:
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                json.dump({"meta": {**self.meta, "format": FORMAT, "order": self.order, "discount": self.discount},
                           "counts": [dict(c) for c in self.counts]}, f, ensure_ascii=False)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "CharNgramLM":
        path = Path(path)
        if not path.is_file():
            raise GebError(f"{path}: n-gram model not found (make one with `geb data fit-lm`)")
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GebError(f"{path}: not a geb n-gram model ({e})") from None
        meta = obj.get("meta", {})
        if meta.get("format") != FORMAT:
            raise GebError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
        lm = cls(int(meta["order"]), float(meta["discount"]))
        lm.counts = [dict(c) for c in obj["counts"]]
        lm.meta = meta
        return lm


class GebModelScorer:
    """Per-token perplexity under a geb model folder (its own tokenizer; full-precision or quantized),
    through geb.scoring's one scorer: the document starts after the end-of-document id and its
    end is predicted too."""

    def __init__(self, folder: str | Path):
        from geb.infer.scoring import load_scorer

        self.scorer, self.tokenizer, _, _ = load_scorer(folder)

    def perplexity(self, text: str) -> float:
        from geb.scoring import perplexity_of

        ids = self.tokenizer.encode(text, allow_special=False) + [self.tokenizer.doc_id]
        return perplexity_of(self.scorer, ids)
