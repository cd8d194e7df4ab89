"""The Engine: the one generation path for `geb generate`, `geb chat`, evaluation and the server.

It wraps a `Runtime` (geb.infer.runtime: fused weights in fp32, bf16, int8 or int4, prefill and a
cheap single-token decode over a static KV cache). One sequence runs straight through the runtime;
several run through the slot scheduler of geb.infer.batch (`generate_batch`, `batch_engine()` for
the server's continuous batching). Text streams out incrementally: a token that ends inside a UTF-8
sequence, or text that may still become a stop string, is held back until it is settled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from geb.errors import GebError
from geb.infer.batch import BatchEngine, TextStream, mask_padding
from geb.infer.quant import INT4_GROUP_SIZE
from geb.infer.runtime import Runtime, SlotCache, runtime_from_model
from geb.infer.sampling import SamplingParams, sample_next


@dataclass
class Generation:
    text: str
    ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"


class Engine:
    """Engine(model, tokenizer) over a live GEB model, or Engine.from_folder(folder, format=...)."""

    def __init__(self, model=None, tokenizer=None, *,
                 runtime: Runtime | None = None, format: str = "fp32", group_size: int = INT4_GROUP_SIZE,
                 threads: int | None = None, backend: str = "auto"):
        if runtime is None:
            if model is None:
                raise GebError("Engine needs a model or a runtime")
            runtime = runtime_from_model(model.eval(), format, group_size, backend)
        self.model = model  # None when loaded from a folder (quantized folders have no GEB model)
        self.rt = runtime
        self.tok = tokenizer
        self.cfg = runtime.cfg
        self.rt.set_threads(threads or torch.get_num_threads())

    @classmethod
    def from_folder(cls, folder, device: str = "cpu", format: str | None = None, group_size: int = INT4_GROUP_SIZE,
                    threads: int | None = None, backend: str = "auto") -> "Engine":
        """Load a full-precision folder (converted to `format`, default fp32) or a quantized folder.
        `backend`: 'auto' (geb's native decode core where it was built), 'native' or 'torch'."""
        from geb.infer.folders import load_runtime

        if str(device) != "cpu":
            raise GebError(f"the inference engine runs on CPU (asked for device '{device}')")
        rt, tok, meta = load_runtime(folder, format, group_size, backend)
        eng = cls(None, tok, runtime=rt, threads=threads)
        eng.meta = meta
        return eng

    meta: dict = {}

    @property
    def fmt(self) -> str:
        """The weight format the engine runs (fp32, bf16, int8, int4): its runtime's."""
        return self.rt.fmt

    def set_threads(self, n: int) -> None:
        self.rt.set_threads(n)

    # -- token level ----------------------------------------------------------------------------
    def check_prompt(self, n: int) -> None:
        if n == 0:
            raise GebError("the prompt is empty")
        if n >= self.cfg.max_seq_len:
            raise GebError(f"the prompt has {n} tokens but the model's context is {self.cfg.max_seq_len} "
                           "(shorten it, or leave room for at least one new token)")

    def generate_ids(self, prompt_ids: list[int], p: SamplingParams) -> Iterator[int]:
        """Yield new token ids until a stop id, max_new_tokens or the end of the context."""
        yield from self._generate(prompt_ids, p, {})

    def _generate(self, prompt_ids: list[int], p: SamplingParams, state: dict) -> Iterator[int]:
        n = len(prompt_ids)
        self.check_prompt(n)
        budget = min(p.max_new_tokens, self.cfg.max_seq_len - n)
        state["finish"] = "length"
        if budget <= 0:
            return
        stop_ids = set(self.tok.stop_ids if p.stop_ids is None else p.stop_ids)
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        cache = SlotCache(self.cfg, 1, n + budget)
        seen = list(prompt_ids)
        # One thread scope for the whole sequence: switching torch's pool per token costs time.
        with self.rt.threads_scope():
            logits = self.rt.prefill(prompt_ids, cache, 0)
            for i in range(budget):
                pen = torch.tensor([seen]) if p.repetition_penalty != 1.0 else None
                t = int(sample_next(mask_padding(logits[None], self.tok.vocab_size), p, pen, gen))
                if t in stop_ids:
                    state["finish"] = "stop"
                    return
                yield t
                if i + 1 == budget:
                    return
                seen.append(t)
                logits = self.rt.decode(torch.tensor([t]), cache)[0]

    def logits(self, ids: list[int]) -> torch.Tensor:
        """FP32 logits [T, V] of one sequence in this engine's format (scoring, perplexity)."""
        with self.rt.threads_scope():
            return self.rt.forward_logits(ids)

    # -- text level -----------------------------------------------------------------------------
    def stream(self, prompt_ids: list[int], p: SamplingParams, out: list | None = None) -> Iterator[str]:
        """Yield text pieces as they settle. If `out` is given, the final Generation is appended."""
        ts = TextStream(self.tok, p.stop)
        state: dict = {}
        finish = None
        for t in self._generate(prompt_ids, p, state):
            piece = ts.push(t)
            if piece:
                yield piece
            if ts.stopped:
                finish = "stop"
                break
        piece = ts.finish()
        if piece:
            yield piece
        if out is not None:
            out.append(Generation(text=ts.text, ids=list(ts.ids), prompt_tokens=len(prompt_ids),
                                  finish_reason=finish or state.get("finish", "length")))

    def generate(self, prompt: str | list[int], p: SamplingParams) -> Generation:
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        out: list[Generation] = []
        for _ in self.stream(ids, p, out):
            pass
        return out[0]

    def chat(self, messages: list[dict], p: SamplingParams) -> Generation:
        ids, _ = self.tok.render_chat(messages, add_generation_prompt=True)
        return self.generate(ids, p)

    # -- batches --------------------------------------------------------------------------------
    def batch_engine(self, max_batch: int = 8, max_len: int | None = None,
                     prefill_chunk: int | None = 256) -> BatchEngine:
        """A continuous-batching scheduler over this engine's weights (see geb.infer.batch)."""
        return BatchEngine(self.rt, self.tok, max_batch=max_batch, max_len=max_len, prefill_chunk=prefill_chunk)

    def generate_batch(self, prompts: list, params: SamplingParams | list[SamplingParams],
                       max_batch: int = 8) -> list[Generation]:
        """Generate for several prompts at once (decode steps batched); results in prompt order."""
        ids = [self.tok.encode(x) if isinstance(x, str) else list(x) for x in prompts]
        ps = params if isinstance(params, list) else [params] * len(ids)
        if len(ps) != len(ids):
            raise GebError(f"{len(ids)} prompts but {len(ps)} sampling settings")
        for x in ids:
            self.check_prompt(len(x))
        longest = max((len(x) + p.max_new_tokens for x, p in zip(ids, ps)), default=1)
        be = self.batch_engine(max_batch=min(max_batch, max(1, len(ids))), max_len=min(longest, self.cfg.max_seq_len))
        reqs = [be.submit(x, p) for x, p in zip(ids, ps)]
        be.run()
        return [Generation(text=r.text, ids=list(r.ids), prompt_tokens=len(r.prompt_ids),
                           finish_reason=r.finish_reason) for r in reqs]
