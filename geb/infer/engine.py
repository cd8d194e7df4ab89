"""The Engine: the one generation path for `geb generate`, `geb chat`, evaluation and the server.

Prefill runs the prompt through the model once into a pre-allocated KV cache; decode then feeds one
token at a time. Text streams out incrementally (a token that ends inside a UTF-8 sequence is held
back until the character is complete), stop ids and stop strings end generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from geb.errors import GebError
from geb.infer.sampling import SamplingParams, sample_next
from geb.model import KVCache


@dataclass
class Generation:
    text: str
    ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"


class Engine:
    def __init__(self, model, tokenizer, cache_dtype: torch.dtype = torch.float32):
        self.model = model.eval()
        self.tok = tokenizer
        self.cfg = model.cfg
        self.cache_dtype = cache_dtype
        self.device = next(model.parameters()).device

    @classmethod
    def from_folder(cls, folder, device: str = "cpu") -> "Engine":
        from geb.checkpoint import load_model

        model, tok, _ = load_model(folder, device=device)
        return cls(model, tok)

    def _mask_pad(self, logits: torch.Tensor) -> torch.Tensor:
        """Rows past the tokenizer's vocabulary are padding (vocab rounded up): never sample them."""
        n = self.tok.vocab_size
        if n < logits.shape[-1]:
            logits = logits.float()
            logits[..., n:] = float("-inf")
        return logits

    # -- token level ----------------------------------------------------------------------------
    def check_prompt(self, n: int) -> None:
        if n == 0:
            raise GebError("the prompt is empty")
        if n >= self.cfg.max_seq_len:
            raise GebError(f"the prompt has {n} tokens but the model's context is {self.cfg.max_seq_len} "
                           "(shorten it, or leave room for at least one new token)")

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], p: SamplingParams) -> Iterator[int]:
        """Yield new token ids until a stop id, max_new_tokens or the end of the context."""
        n = len(prompt_ids)
        self.check_prompt(n)
        budget = min(p.max_new_tokens, self.cfg.max_seq_len - n)
        if budget <= 0:
            return
        stop_ids = set(self.tok.stop_ids if p.stop_ids is None else p.stop_ids)
        gen = torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
        cache = KVCache(self.cfg, 1, n + budget, dtype=self.cache_dtype, device=self.device)
        ids = torch.tensor([prompt_ids], device=self.device)
        logits = self._mask_pad(self.model(ids, cache=cache)[:, -1])
        seen = ids
        for i in range(budget):
            nxt = sample_next(logits, p, seen, gen)
            t = int(nxt)
            if t in stop_ids:
                return
            yield t
            if i + 1 == budget:
                return
            seen = torch.cat([seen, nxt[:, None]], 1)
            logits = self._mask_pad(self.model(nxt[:, None], cache=cache)[:, -1])

    # -- text level -----------------------------------------------------------------------------
    def stream(self, prompt_ids: list[int], p: SamplingParams, out: list | None = None) -> Iterator[str]:
        """Yield text pieces as they complete. If `out` is given, the final Generation is appended."""
        new: list[int] = []
        text = ""
        finish = "length"
        for t in self.generate_ids(prompt_ids, p):
            new.append(t)
            full = self.tok.decode(new)
            if full.endswith("\ufffd"):
                continue  # an unfinished multi-byte character: wait for its next byte
            hit = min((full.find(s) for s in p.stop if s and s in full), default=-1)
            if hit >= 0:
                full, finish = full[:hit], "stop"
            if len(full) > len(text):
                yield full[len(text):]
            text = full
            if finish == "stop":
                break
        else:
            if len(new) < min(p.max_new_tokens, self.cfg.max_seq_len - len(prompt_ids)):
                finish = "stop"
            full = self.tok.decode(new)
            if len(full) > len(text) and not any(s and s in full for s in p.stop):
                yield full[len(text):]
                text = full
        if out is not None:
            out.append(Generation(text=text, ids=new, prompt_tokens=len(prompt_ids), finish_reason=finish))

    def generate(self, prompt: str | list[int], p: SamplingParams) -> Generation:
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        out: list[Generation] = []
        for _ in self.stream(ids, p, out):
            pass
        return out[0]

    def chat(self, messages: list[dict], p: SamplingParams) -> Generation:
        ids, _ = self.tok.render_chat(messages, add_generation_prompt=True)
        return self.generate(ids, p)
