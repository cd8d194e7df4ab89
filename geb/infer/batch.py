"""Continuous batching: a slot scheduler that runs many sequences' decode steps as one batch.

`BatchEngine.submit()` queues a request (thread-safe); each `step()` first admits queued requests into
free cache slots (prefilling each prompt alone, so its first token is exactly what it would be served
alone), then runs ONE decode step for every live sequence together, and returns what each request
produced. Requests leave when they hit a stop id, a stop string, their token budget or the context,
or when `cancel()` is called; their slot is free for the next step. An exception in one request's
admission, prefill or sampling (a seed torch refuses, a tokenizer error, ...) finishes that request
alone with "error" and its message; only a failure of the batched decode itself escapes `step()`.
The HTTP server runs `step()` in
a loop on one thread and hands the events to its clients; `Engine.generate_batch` drives it to the
end for offline batches.

Live sequences always occupy slots 0..B-1 (a leaving sequence's slot is refilled by moving the last
one), so the decode step reads one contiguous block of the cache.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field

import torch

from geb.errors import GebError
from geb.infer.runtime import Runtime, SlotCache
from geb.infer.sampling import SamplingParams, sample_next

log = logging.getLogger("geb.infer")


class TextStream:
    """Incremental detokenizer with stop strings.

    Bytes of an unfinished UTF-8 character are held back, and so is any tail of the text that could
    still grow into a stop string, so a stop string never leaks out in pieces.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self._off = 0  # ids before this index are decoded into _done
        self._done = ""
        self.emitted = 0  # characters already handed out
        self.stopped = False
        self.text = ""  # what has been handed out so far

    def _text(self) -> str:
        pending = self.tok.decode(self.ids[self._off :])
        if not pending.endswith("\ufffd"):
            self._done += pending
            self._off = len(self.ids)
            pending = ""
        return self._done, pending

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        done, pending = self._text()
        full = done
        hit = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            return self._emit(full[:hit])
        safe = len(full)
        for s in self.stop:  # hold back a tail that is a prefix of a stop string
            for n in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:n]):
                    safe = min(safe, len(full) - n)
                    break
        return self._emit(full[:safe])

    def finish(self) -> str:
        """Flush what was held back (the sequence has ended without a stop string)."""
        if self.stopped:
            return ""
        done, pending = self._text()
        return self._emit(done + pending.replace("\ufffd", "") if pending else done)

    def _emit(self, upto: str) -> str:
        delta = upto[self.emitted :] if len(upto) > self.emitted else ""
        self.emitted = max(self.emitted, len(upto))
        self.text = upto[: self.emitted]
        return delta


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    id: str = ""
    ids: list[int] = field(default_factory=list)  # generated token ids
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    slot: int = -1
    _stream: TextStream | None = None
    _gen: torch.Generator | None = None
    _seen: list[int] = field(default_factory=list)
    _next: int = -1  # sampled but not yet fed token
    _budget: int = 0
    _prefilled: int = 0  # prompt tokens already in the cache

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    """What one request produced in one step: new ids and text; `finish_reason` set when it ended."""

    request: Request
    token_ids: list[int]
    text: str
    finish_reason: str | None


class BatchEngine:
    """Slot scheduler. Prompts are prefilled in chunks of `prefill_chunk` tokens (None: whole prompts at
    once), at most about one chunk per step, so a long prompt joining the batch delays the others' next
    token by one chunk, not by its whole prefill (each chunk attends to the cached part). A request's
    chunks and its decode rows are computed the same way whatever else runs: served under load, it
    gets bit for bit what it gets alone."""

    def __init__(self, runtime: Runtime, tokenizer, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int | None = 256):
        self.rt, self.tok = runtime, tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.cache = SlotCache(runtime.cfg, max_batch, max_len or runtime.cfg.max_seq_len)
        self.active: list[Request] = []  # generating; index = slot (slots 0..G-1)
        self.prefilling: list[Request] = []  # arrival order; they hold slots G..G+P-1 in any order
        self._queue: list[Request] = []
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()

    # -- called from any thread ---------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        n = len(prompt_ids)
        if n == 0:
            raise GebError("the prompt is empty")
        if n >= self.cache.max_len:
            raise GebError(f"the prompt has {n} tokens but the context is {self.cache.max_len} "
                           "(shorten it, or leave room for at least one new token)")
        r = Request(list(prompt_ids), params, id=request_id or f"req-{next(self._ids)}")
        with self._lock:
            self._queue.append(r)
        return r

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancel.add(request_id)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self.active or self.prefilling or self._queue)

    # -- the loop (one thread) ----------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            queued = [r for r in self._queue if r.id not in cancel]
            for r in self._queue:
                if r.id in cancel:
                    r.finish_reason = "cancelled"
                    events.append(Event(r, [], "", "cancelled"))
            free = self.max_batch - len(self.active) - len(self.prefilling)
            admit, self._queue = queued[:free], queued[free:]
        for r in self.active + self.prefilling:
            if r.id in cancel:
                self._finish(r, "cancelled", events)
        # No thread-count restore per step: the scheduler's loop owns its thread, and resizing
        # torch's pool every step would cost more than the step's small ops.
        for r in admit:
            try:
                self._admit(r, events)
            except Exception as e:  # noqa: BLE001 - one request's bad settings fail it alone
                self._fail(r, e, events)
        # A prompt is cut at the same positions (multiples of prefill_chunk from its own start) whatever
        # else is queued: the products of a chunk depend on its row count, so cutting where the step's
        # budget ran out would make a request's tokens depend on its neighbours. The last chunk of a step
        # may overshoot the budget by less than one chunk.
        chunk = self.prefill_chunk or float("inf")
        budget = chunk
        while self.prefilling and budget > 0:
            r = self.prefilling[0]
            n0 = r._prefilled
            n1 = int(min(len(r.prompt_ids), n0 + chunk))
            try:
                logits = self.rt.prefill(r.prompt_ids[n0:n1], self.cache, r.slot)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone; the batch goes on
                self._fail(r, e, events)
                continue
            budget -= n1 - n0
            r._prefilled = n1
            if n1 == len(r.prompt_ids):
                self._start_generating(r)
                self._take(r, logits[None], events)
        if self.active:
            self._decode(events)
        return events

    def _admit(self, r: Request, events: list[Event]) -> None:
        p = r.params
        r._budget = min(p.max_new_tokens, self.cache.max_len - len(r.prompt_ids))
        r._stream = TextStream(self.tok, p.stop)
        r._gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        r._seen = list(r.prompt_ids)
        r._prefilled = 0
        if r._budget <= 0:
            self._finish(r, "length", events)
            return
        r.slot = len(self.active) + len(self.prefilling)
        self.cache.lengths[r.slot] = 0
        self.prefilling.append(r)

    def _start_generating(self, r: Request) -> None:
        """r's prompt is in its slot: move it to slot G (the first after the generating ones)."""
        g = len(self.active)
        if r.slot != g:
            other = next(q for q in self.prefilling if q.slot == g)
            self.cache.swap(r.slot, g)
            other.slot, r.slot = r.slot, g
        self.prefilling.remove(r)
        self.active.append(r)

    def _decode(self, events: list[Event]) -> None:
        toks = torch.tensor([r._next for r in self.active])
        logits = self.rt.decode(toks, self.cache)
        for r, row in zip(list(self.active), logits):
            self._take(r, row[None], events)

    def _take(self, r: Request, logits: torch.Tensor, events: list[Event]) -> None:
        """Sample the next token of r from its logits; emit it, or finish r (with "error" if that fails)."""
        p = r.params
        try:
            logits = mask_padding(logits, self.tok.vocab_size)
            seen = torch.tensor([r._seen]) if p.repetition_penalty != 1.0 else None
            t = int(sample_next(logits, p, seen, r._gen))
            stop_ids = self.tok.stop_ids if p.stop_ids is None else p.stop_ids
            end = t in stop_ids
            if not end:
                r.ids.append(t)
                r._seen.append(t)
                delta = r._stream.push(t)
                r.text = r._stream.text
        except Exception as e:  # noqa: BLE001 - its sampling or detokenizing: this request only
            self._fail(r, e, events)
            return
        if end:
            self._finish(r, "stop", events)
            return
        if r._stream.stopped:
            self._finish(r, "stop", events, [t], delta)
            return
        if len(r.ids) >= r._budget:
            self._finish(r, "length", events, [t], delta)
            return
        r._next = t
        events.append(Event(r, [t], delta, None))

    def _move(self, q: Request, dst: int) -> None:
        self.cache.move(q.slot, dst)
        q.slot = dst

    def _fail(self, r: Request, e: Exception, events: list[Event]) -> None:
        """Finish r with "error" and a one-line message; its traceback goes to the log."""
        r.error = str(e) if isinstance(e, GebError) else f"{type(e).__name__}: {e}"
        log.warning("request %s failed: %s", r.id, r.error, exc_info=not isinstance(e, GebError))
        self._finish(r, "error", events)

    def _finish(self, r: Request, reason: str, events: list[Event], ids: list[int] | None = None,
                delta: str = "") -> None:
        if r.done:  # finished already (an error while finishing it): never free its slot twice
            return
        if r._stream is not None:
            try:
                delta += r._stream.finish()
            except Exception as e:  # noqa: BLE001 - its last text cannot be decoded: it ends in error
                if reason != "error":
                    reason, r.error = "error", f"{type(e).__name__}: {e}"
            r.text = r._stream.text
        r.finish_reason = reason
        if r in self.active:  # keep generating sequences in slots 0..G-1, prefilling ones right after
            last = len(self.active) - 1
            hole = r.slot
            if hole != last:
                self._move(self.active[last], hole)
                self.active[hole] = self.active[last]
            self.active.pop()
            self.cache.lengths[last] = 0
            if self.prefilling:
                self._move(max(self.prefilling, key=lambda q: q.slot), last)
        elif r in self.prefilling:
            top = max(self.prefilling, key=lambda q: q.slot)
            hole = r.slot
            self.prefilling.remove(r)
            self.cache.lengths[hole] = 0
            if top is not r:
                self._move(top, hole)
        r.slot = -1
        events.append(Event(r, ids or [], delta, reason))

    def run(self) -> None:
        """Step until every submitted request has finished, then give the process back its torch
        thread count (decode steps drop torch to one thread; a caller that trains next needs all)."""
        with self.rt.threads_scope():
            while self.has_work:
                self.step()


def mask_padding(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Rows past the tokenizer's vocabulary are padding (vocab rounded up): never sample them."""
    if n < logits.shape[-1]:
        logits = logits.float().clone()
        logits[..., n:] = float("-inf")
    return logits
