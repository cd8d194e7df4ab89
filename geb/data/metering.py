"""Accounting for the data pipeline: datatrove steps that count what each stage and rule removed.

Every GEB step is a `MeteredStep`: a datatrove PipelineStep that counts documents and characters in
and out, keeps a few examples of what it removed (with the document's id and source), and at the
end of its task writes `<stats_dir>/<step>/<rank>.json` atomically. datatrove's own steps (MinHash,
sentence dedup) are wrapped between a `Meter("in")` and a `Meter("out")` pair that do the same
counting around them. The report (report.py) merges these files over ranks.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from geb.common import atomic_write_json
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

EXAMPLE_CHARS = 240


def snippet(text: str, n: int = EXAMPLE_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def source_of(doc: Document) -> str:
    src = doc.metadata.get("source", "?")
    line = doc.metadata.get("line")
    return f"{src}:{line}" if line is not None else str(src)


class Acc:
    """Counts for one step in one task."""

    def __init__(self, max_examples: int):
        self.docs_in = self.docs_out = self.chars_in = self.chars_out = 0
        self.seconds = 0.0  # time in this step's own work, not in the steps before it
        self.reasons: Counter = Counter()
        self.examples: list[dict] = []
        self.max_examples = max_examples

    def example(self, doc: Document, removed: str, reason: str = "") -> None:
        if len(self.examples) < self.max_examples and removed.strip():
            self.examples.append({"id": str(doc.id), "source": source_of(doc), "reason": reason,
                                  "removed": snippet(removed)})

    def to_dict(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "chars_in": self.chars_in,
                "chars_out": self.chars_out, "seconds": round(self.seconds, 4), "reasons": dict(self.reasons),
                "examples": self.examples}


class MeteredStep(PipelineStep):
    """A GEB pipeline step with accounting. Subclasses implement `process(doc) -> Document | None`.

    `process` may shorten doc.text (cleaning) and call `self.removed(doc, piece, reason)` for what it
    cut, or return None to drop the document (after calling `self.removed` with the reason).
    """

    type = "🧹 - GEB"
    stage = "clean"

    def __init__(self, name: str, stats_dir: str | Path, max_examples: int = 5):
        self.name = name  # before PipelineStep.__init__, which names the step's datatrove stats after it
        super().__init__()
        self.stats_dir = str(stats_dir)
        self.max_examples = max_examples
        self.acc: Acc | None = None

    def removed(self, doc: Document, piece: str, reason: str = "", count: int = 1) -> None:
        self.acc.reasons[reason or "removed"] += count
        self.acc.example(doc, piece, reason)

    def process(self, doc: Document) -> Document | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self) -> None:
        """Called once per task before the first document (load models, compile patterns)."""

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.acc = Acc(self.max_examples)
        self.setup()
        acc = self.acc
        clock = time.perf_counter
        for doc in data or ():
            acc.docs_in += 1
            acc.chars_in += len(doc.text)
            t0 = clock()  # our own clock: datatrove's track_time costs more than some rules
            out = self.process(doc)
            if out is not None and (not out.text or out.text.isspace()):  # strip() would copy every text
                self.removed(doc, "", "empty after cleaning")
                out = None
            acc.seconds += clock() - t0
            if out is None:
                continue
            acc.docs_out += 1
            acc.chars_out += len(out.text)
            yield out
        self.save(rank)

    def save(self, rank: int) -> None:
        atomic_write_json(Path(self.stats_dir) / self.name / f"{rank:05d}.json",
                          {"step": self.name, "stage": self.stage, **self.acc.to_dict()})


class Meter(PipelineStep):
    """Counts documents/characters passing a point; a pair around a datatrove step gives its in/out."""

    type = "🧹 - GEB"

    def __init__(self, name: str, side: str, stats_dir: str | Path, stage: str = "dedup"):
        self.name = f"{name} ({side})"
        super().__init__()
        self.rule, self.side, self.stats_dir, self.stage = name, side, str(stats_dir), stage

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        docs = chars = 0
        for doc in data or ():
            docs += 1
            chars += len(doc.text)
            yield doc
        atomic_write_json(Path(self.stats_dir) / self.rule / f"{rank:05d}.{self.side}.json",
                          {"step": self.rule, "stage": self.stage, "docs": docs, "chars": chars})


class Timed(PipelineStep):
    """Wraps a datatrove step (reader, writer, dedup stage) and records the time of its own work.

    Steps are generators chained together, so a step's wall time includes the steps before it; this
    measures the time spent inside the wrapped step minus the time it spent waiting for its input,
    and writes `<stats_dir>/timing/<label>/<rank>.json` for the report. The wrapped step's datatrove
    stats stay its own (they are what the executor saves)."""

    type = "🧹 - GEB"

    def __init__(self, step: PipelineStep, label: str, stats_dir: str | Path):
        self.name = f"{step.name} ({label})"
        super().__init__()
        self.step, self.label, self.stats_dir = step, label, str(stats_dir)
        self.stats = step.stats

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        clock = time.perf_counter
        waited = 0.0

        def upstream():
            nonlocal waited
            it = iter(data)
            while True:
                t0 = clock()
                try:
                    doc = next(it)
                except StopIteration:
                    waited += clock() - t0
                    return
                waited += clock() - t0
                yield doc

        t0 = clock()
        out = self.step.run(upstream() if data is not None else None, rank, world_size)
        total = clock() - t0
        if out is not None:  # a generator: time each document it hands on
            it = iter(out)
            while True:
                t0 = clock()
                try:
                    doc = next(it)
                except StopIteration:
                    total += clock() - t0
                    break
                total += clock() - t0
                yield doc
        atomic_write_json(Path(self.stats_dir) / "timing" / self.label / f"{rank:05d}.json",
                          {"step": self.label, "seconds": round(total - waited, 4)})
