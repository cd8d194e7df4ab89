"""Log-likelihood scoring: the one place geb turns token ids into log-probs and perplexity.

`Scorer` scores on a PyTorch geb model; geb.infer.scoring.RuntimeScorer (the CPU runtime, quantized
folders) has the same interface. Every perplexity in geb goes through `perplexity_of` with one of them:
evaluation (geb.eval), the quantization report (geb.infer.bench), the data pipeline's perplexity filter
(geb.data.reference_lm) and the released-checkpoint layout check (geb.interop.geb_release).

Multiple-choice evaluation shares a k-shot prefix computed once into a KV cache and reused by every
question of a subject; perplexity scores rolling windows; the lm-eval bridge uses both. Pairs are
tokenized the lm-eval way (`encode_pair`) so geb and the harness see identical tokens. Only the
positions that are scored go through the output layer, so memory stays small for large vocabularies,
and logits of padded vocabulary rows (vocab rounded up) are masked out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from geb.errors import GebError
from geb.model import KVCache


@dataclass
class Row:
    """One forward sequence and what to read from it.

    `targets[j] = (pos, tokens)`: the log-probability of `tokens` where logits at input position
    `pos + i` predict `tokens[i]`. Positions count from the start of `ids` (after any prefix).
    """

    ids: list[int]
    targets: list[tuple[int, list[int]]]


class _CacheView(KVCache):
    """The first `b` rows of a larger cache (shares its storage: writes land in the parent)."""

    def __init__(self, parent: KVCache, b: int, pos: int):  # noqa: D401 - no super().__init__: no allocation
        self.k, self.v = parent.k[:, :b], parent.v[:, :b]
        self.max_len = parent.max_len
        self.pos = pos


class Scorer:
    def __init__(self, model, tokenizer, batch_size: int = 8, max_len: int | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.cfg = model.cfg
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.batch_size = max(1, int(batch_size))
        self.n_vocab = tokenizer.vocab_size
        self.device = next(model.parameters()).device
        self.prefix_forwards = 0  # how many prefixes were computed (for reporting cache reuse)
        self.max_batch_tokens = 2048
        self.min_fill = 0.7

    # -- tokenization ---------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's pairing: trailing spaces of the context move to the continuation, the
        continuation's ids are those of the whole string past the context's length, and an empty
        context becomes the document start (`Tokenizer.doc_id`, lm-eval's prefix token)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if not context:
            return [self.tok.doc_id], self.tok.encode(continuation)
        ctx = self.tok.encode(context)
        whole = self.tok.encode(context + continuation)
        return ctx, whole[len(ctx):]

    def encode_choices(self, context: str, continuations) -> tuple[list[int], list[list[int]]]:
        """encode_pair for several continuations of one context, encoding the context once."""
        n = len(context) - len(context.rstrip())
        if n:
            ctx = self.encode_pair(context, continuations[0])[0]
            return ctx, [self.encode_pair(context, c)[1] for c in continuations]
        if not context:
            return [self.tok.doc_id], [self.tok.encode(c) for c in continuations]
        ctx, *wholes = self.tok.encode_batch([context] + [context + c for c in continuations])
        return ctx, [w[len(ctx):] for w in wholes]

    def _start(self, start: int | None) -> int:
        """The token a document's first token is predicted from: the document-start id
        (`Tokenizer.doc_id`) unless given."""
        return self.tok.doc_id if start is None else int(start)

    # -- core -----------------------------------------------------------------------------------
    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed hidden states [N, d] → log-probs [N, V] over the tokenizer's real vocabulary."""
        return self._masked_log_probs(self.model.lm_head(hidden))

    def _masked_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-softmax in FP32 with the padded vocabulary rows (past the tokenizer's) masked out."""
        logits = logits.float()
        if self.n_vocab < logits.shape[-1]:
            logits[..., self.n_vocab:] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    def _prefix_cache(self, prefix: list[int], batch: int, extra: int) -> KVCache:
        p = len(prefix)
        one = KVCache(self.cfg, 1, p, device=self.device)
        self.model(torch.tensor([prefix], device=self.device), cache=one, return_hidden=True)
        self.prefix_forwards += 1
        cache = KVCache(self.cfg, batch, p + extra, device=self.device)
        cache.k[:, :, :, :p] = one.k
        cache.v[:, :, :, :p] = one.v
        cache.pos = p
        return cache

    def _batches(self, order: list[int], rows: list[Row]) -> list[list[int]]:
        """Split rows (longest first) into batches that waste little on padding: a batch closes when
        full, when it would pass `max_batch_tokens` padded tokens, or when the next row is under
        `min_fill` of its first row's length (padding is pure extra compute on a large model)."""
        out: list[list[int]] = []
        for i in order:
            n = len(rows[i].ids)
            if out:
                cur = out[-1]
                t = len(rows[cur[0]].ids)
                if len(cur) < self.batch_size and t * (len(cur) + 1) <= max(self.max_batch_tokens, t) \
                        and n >= self.min_fill * t:
                    cur.append(i)
                    continue
            out.append([i])
        return out

    @torch.inference_mode()
    def score_rows(self, rows: list[Row], prefix: list[int] | None = None) -> list[list[tuple[float, bool]]]:
        """For each row, [(sum log-prob, all greedy)] per target. With `prefix`, every row continues
        it: the prefix runs once and its keys/values are copied into each batch row."""
        prefix = prefix or []
        out: list[list[tuple[float, bool]]] = [[] for _ in rows]
        if not rows:
            return out
        longest = max(len(r.ids) for r in rows)
        if len(prefix) + longest > self.max_len:
            raise GebError(f"internal: {len(prefix)} + {longest} tokens exceed the context {self.max_len}")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
        cache = self._prefix_cache(prefix, min(self.batch_size, len(rows)), longest) if prefix else None
        pad = self.tok.pad_id
        for idx in self._batches(order, rows):
            t = len(rows[idx[0]].ids)
            ids = torch.full((len(idx), t), pad, dtype=torch.long)
            for b, i in enumerate(idx):
                ids[b, : len(rows[i].ids)] = torch.tensor(rows[i].ids)
            view = _CacheView(cache, len(idx), len(prefix)) if cache is not None else None
            # Right padding is harmless: a causal model's real positions never see later pads.
            hidden = self.model(ids.to(self.device), cache=view, return_hidden=True)
            sel_b, sel_p, tgt = [], [], []
            for b, i in enumerate(idx):
                for pos, toks in rows[i].targets:
                    for j, tk in enumerate(toks):
                        sel_b.append(b)
                        sel_p.append(pos + j)
                        tgt.append(tk)
            lp = self._log_probs(hidden[sel_b, sel_p])
            tgt_t = torch.tensor(tgt, device=lp.device)
            got = lp.gather(1, tgt_t[:, None])[:, 0].tolist()
            greedy = (lp.argmax(-1) == tgt_t).tolist()
            k = 0
            for i in idx:
                for _pos, toks in rows[i].targets:
                    n = len(toks)
                    out[i].append((float(sum(got[k : k + n])), bool(all(greedy[k : k + n]))))
                    k += n
        return out

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) → (log-prob of the continuation, greedy?), lm-eval style:
        a sequence longer than the context window keeps its last max_len + 1 tokens."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise GebError("a continuation tokenized to nothing")
            whole = (ctx + cont)[-(self.max_len + 1):]
            inp = whole[:-1]
            rows.append(Row(inp, [(len(inp) - len(cont), cont)]))
        return [r[0] for r in self.score_rows(rows)]

    @torch.inference_mode()
    def rolling(self, ids: list[int], stride: int | None = None, chunk: int = 512,
                start: int | None = None) -> tuple[float, int]:
        """Sum of log-probs of every token of a document (the first predicted from `start`, by default
        the end-of-document id) and the token count. Windows of at most max_len tokens; with stride <
        max_len each window scores only its last `stride` tokens and sees the ones before as context.
        stride = max_len (the default) is lm-eval's loglikelihood_rolling (disjoint windows)."""
        n = len(ids)
        if n == 0:
            return 0.0, 0
        stride = min(stride or self.max_len, self.max_len)
        seq = [self._start(start)] + list(ids)
        total = 0.0
        k = 0
        while k < n:
            end = min(k + stride, n)
            start = max(0, end - self.max_len)
            inp = torch.tensor([seq[start:end]], device=self.device)
            hidden = self.model(inp, return_hidden=True)[0]
            tgt = torch.tensor(ids[k:end], device=self.device)
            first = k - start
            for c in range(first, end - start, chunk):
                c_end = min(c + chunk, end - start)
                lp = self._log_probs(hidden[c:c_end])
                total += float(lp.gather(1, tgt[c - first : c_end - first, None]).sum())
            k = end
        return total, n


def perplexity_from(logprob: float, n: int) -> float:
    """exp(mean negative log-likelihood) of `n` tokens whose log-probs sum to `logprob`."""
    return math.exp(-logprob / max(n, 1))


def perplexity_of(scorer: Scorer, ids: list[int], stride: int | None = None, start: int | None = None) -> float:
    """Perplexity of a document under any scorer (model or runtime): the one perplexity every caller
    shares (evaluation, the quantization report, the data filter, the release layout check). Its first
    token is predicted from `start` (default: the end-of-document id)."""
    return perplexity_from(*scorer.rolling(ids, stride=stride, start=start))


def bits_per_byte(logprob: float, n_bytes: int) -> float:
    return -logprob / math.log(2) / max(n_bytes, 1)
