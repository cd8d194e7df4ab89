"""A JSONL reader bound to its rank, and datatrove's sentence-dedup signatures made faster, for the dedup stages.

`RankReader` reads exactly `<rank>.jsonl` of a folder. A stage that writes documents and computes
their signatures in one pass (see pipeline.build_stages) numbers documents by position in its own
task's file; the later filter must read that same file for the same rank, which datatrove's readers
do not promise (they shard the folder listing, so a task that wrote no file shifts every later one).

`SpanSignature` is datatrove's SentenceDedupSignature with geb.data.text.simplify in place of
datatrove's simplify_text (same output; its per-character diacritics pass was most of the step).
"""

from __future__ import annotations

from datatrove.pipeline.dedup.sentence_dedup import SentenceDedupSignature
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.utils.text import ngrams

from geb.data.text import simplify


class RankReader(JsonlReader):
    """Reads `<rank:05d>.jsonl` of its folder and nothing else (no file: no documents)."""

    name = "📖 rank reader"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        name = f"{rank:05d}.jsonl"
        if self.data_folder.exists(name):
            yield from self.read_files_shard([name])


class SpanSignature(SentenceDedupSignature):
    """datatrove's paragraph/sentence-span signatures (same files), with the faster text simplification."""

    def get_hashes(self, doc, doc_idx: int) -> list[tuple[int, int, int]]:
        cfg = self.config
        sentences = self.tokenizer.sent_tokenize(doc.text) if cfg.split_sentences else doc.text.splitlines()
        if len(sentences) < cfg.n_sentences:
            return []
        simple = [simplify(s, cfg.norm_config) for s in sentences]
        grams = [" ".join(x) for x in ngrams(simple, cfg.n_sentences)]
        # an empty span (only punctuation/whitespace) is not hashed, as datatrove's step does
        return [(self.hash_fc(g), doc_idx, i) for i, g in enumerate(grams) if g.strip() != ""]
