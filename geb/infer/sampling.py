"""Sampling settings and the next-token sampler (greedy, temperature, top-k, top-p, repetition penalty).

Defaults follow the released GEB-1.3B generation config: temperature 0.3, top-k 5, top-p 0.5,
repetition penalty 1.15.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from geb.errors import GebError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.3
    top_k: int = 5
    top_p: float = 0.5
    repetition_penalty: float = 1.15
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: list[int] | None = None  # None: the tokenizer's end tokens

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise GebError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise GebError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise GebError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise GebError("top_k must be >= 0 (0 = off)")
        if self.repetition_penalty <= 0:
            raise GebError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in transformers): divide positive, multiply negative logits of seen ids."""
    if penalty == 1.0 or seen is None or seen.numel() == 0:
        return logits
    logits = logits.clone()
    sel = logits.gather(-1, seen)
    sel = torch.where(sel > 0, sel / penalty, sel * penalty)
    # a tiny penalty divides a positive logit past the float range: keep it the largest finite value
    # (an inf would become NaN when the sampler subtracts the maximum)
    big = torch.finfo(sel.dtype).max
    return logits.scatter(-1, seen, sel.clamp(-big, big))


def sample_next(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] (FP32) → next ids [B]. `seen` [B, S] holds ids for the repetition penalty."""
    logits = apply_repetition_penalty(logits.float(), seen, p.repetition_penalty)
    if p.greedy:
        return logits.argmax(-1)
    # Shift so the largest logit is 0 before dividing: every value is then <= 0, so a tiny temperature
    # can only push the others towards -inf (probability 0), never overflow to +inf and give NaN.
    logits = (logits - logits.amax(-1, keepdim=True)) / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
