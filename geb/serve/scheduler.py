"""The engine thread: every client's requests run through one continuous-batching loop.

`Scheduler` owns a geb.infer BatchEngine and one thread that calls its `step()` while any request is
live (each step admits waiting requests into free slots, then decodes one token for every live
sequence together) and sleeps otherwise. HTTP handlers run on the asyncio loop: `submit()` returns a
`Ticket` whose updates (new text, the finish) arrive on an asyncio queue, and `Ticket.cancel()` frees
the requests' slots at the next step, which is what a disconnecting client triggers. The engine thread
never waits on a client: a slow reader's text queues up in its ticket while the batch moves on.

This module is the only place the server touches the batching core, so a different core only needs
the same four calls: submit, cancel, step, has_work.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import Counter
from dataclasses import dataclass

from geb.infer.sampling import SamplingParams

log = logging.getLogger("geb.serve")


class Busy(Exception):
    """More requests are waiting than the server accepts (answered as 429)."""


@dataclass
class Update:
    """What one request produced in one engine step (finish set on its last update)."""

    token_ids: list[int]
    text: str
    finish: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


class Ticket:
    """The engine requests of one HTTP request (n choices, several prompts): one queue of (index, Update)."""

    def __init__(self, scheduler: Scheduler, rids: list[str], prompt_tokens: list[int],
                 loop: asyncio.AbstractEventLoop):
        self.rids, self.prompt_tokens = rids, prompt_tokens
        self._sched, self._loop = scheduler, loop
        self.queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        self.completion_tokens = [0] * len(rids)
        self.finish: list[str | None] = [None] * len(rids)

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def cancel(self) -> None:
        """Free the slots of the unfinished requests (at the engine's next step)."""
        for rid, f in zip(self.rids, self.finish):
            if f is None:
                self._sched.cancel(rid)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Update]:
        if self.done:
            raise StopAsyncIteration
        i, u = await self.queue.get()
        self.completion_tokens[i] += len(u.token_ids)
        if u.finish is not None:
            self.finish[i] = u.finish
        return i, u

    def _put(self, index: int, u: Update) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (index, u))
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening any more
            pass


class Scheduler:
    def __init__(self, engine, slots: int, max_len: int, max_waiting: int):
        self.engine, self.slots, self.max_len, self.max_waiting = engine, slots, max_len, max_waiting
        self.be = engine.batch_engine(max_batch=slots, max_len=max_len)
        self._live: dict[str, tuple[Ticket, int]] = {}  # engine request id → its ticket, index
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.counts: Counter = Counter()  # finished requests by reason, tokens generated, steps
        self.peak_batch = 0

    # -- asyncio side ---------------------------------------------------------------------------
    def submit(self, jobs: list[tuple[list[int], SamplingParams]], rid: str) -> Ticket:
        """Queue all jobs of one HTTP request, or none of them (Busy) when the server is full."""
        loop = asyncio.get_running_loop()
        rids = [f"{rid}/{i}" for i in range(len(jobs))]
        with self._lock:
            if self._stop:
                raise Busy("the server is shutting down")
            if len(self._live) + len(jobs) > self.slots + self.max_waiting:
                raise Busy(f"{len(self._live)} requests are running or waiting (the limit is "
                           f"{self.slots} running + {self.max_waiting} waiting)")
            t = Ticket(self, rids, [len(ids) for ids, _ in jobs], loop)
            try:
                for i, (r, (ids, params)) in enumerate(zip(rids, jobs)):
                    self.be.submit(ids, params, request_id=r)
                    self._live[r] = (t, i)
            except Exception:  # all or none: withdraw the jobs already queued (a prompt the engine refuses)
                for r in rids:
                    if self._live.pop(r, None) is not None:
                        self.be.cancel(r)
                raise
            self.counts["requests"] += len(jobs)
            self._wake.notify()
        return t

    def cancel(self, rid: str) -> None:
        with self._lock:
            if rid in self._live:
                self.be.cancel(rid)
                self._wake.notify()

    def stats(self) -> dict:
        with self._lock:
            running = len(self.be.active)
            return {"slots": self.slots, "running": running, "waiting": len(self._live) - running,
                    "max_waiting": self.max_waiting, "context": self.max_len, "peak_batch": self.peak_batch,
                    "requests": self.counts["requests"], "generated_tokens": self.counts["tokens"],
                    "finished": {k: self.counts[f"finish_{k}"] for k in ("stop", "length", "cancelled", "error")}}

    # -- the engine thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="geb-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            for rid in self._live:
                self.be.cancel(rid)
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.be.has_work:
                    self._wake.wait()
                if self._stop and not self.be.has_work:
                    return
            try:
                events = self.be.step()
            except Exception as e:  # noqa: BLE001 - a bug or out of memory: fail what is in flight, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
                continue
            with self._lock:
                self.peak_batch = max(self.peak_batch, len(self.be.active))
                self.counts["steps"] += 1
                for ev in events:
                    target = self._live.get(ev.request.id)
                    self.counts["tokens"] += len(ev.token_ids)
                    if ev.finish_reason is not None:
                        self.counts[f"finish_{ev.finish_reason}"] += 1
                        self._live.pop(ev.request.id, None)
                    if target is not None:
                        t, i = target
                        t._put(i, Update(ev.token_ids, ev.text, ev.finish_reason, ev.request.error))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            live, self._live = self._live, {}
            self.be = self.engine.batch_engine(max_batch=self.slots, max_len=self.max_len)
            for t, i in live.values():
                self.counts["finish_error"] += 1
                t._put(i, Update([], "", "error", message))
