"""A JSONL reader bound to its rank, for the dedup stages.

`RankReader` reads exactly `<rank>.jsonl` of a folder. A stage that writes documents and computes
their signatures in one pass (see pipeline.build_stages) numbers documents by position in its own
task's file; the later filter must read that same file for the same rank, which datatrove's readers
do not promise (they shard the folder listing, so a task that wrote no file shifts every later one).
"""

from __future__ import annotations

from datatrove.pipeline.readers.jsonl import JsonlReader


class RankReader(JsonlReader):
    """Reads `<rank:05d>.jsonl` of its folder and nothing else (no file: no documents)."""

    name = "📖 rank reader"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        name = f"{rank:05d}.jsonl"
        if self.data_folder.exists(name):
            yield from self.read_files_shard([name])
