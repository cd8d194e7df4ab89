"""Reading raw input: JSONL, Parquet and plain text, plain or gzip/zstd compressed, as a datatrove reader.

Every document gets an id (the record's id field, else `<file>:<line>`) and metadata `source`
(path relative to the input folder) and `line` (1-based line, or row for Parquet), so any later
removal traces back to its origin. Bad input never stops the run and is never dropped silently:
each problem becomes a record in `<rejects_dir>/<rank>.jsonl` (file, line, reason, whether the
document was kept), and the report counts them.

Why not datatrove's JsonlReader/ParquetReader: they skip invalid JSON lines and empty texts with only a
log warning and stop reading a file at the first invalid UTF-8 byte; there is no plain-text reader.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseReader

from geb.common import atomic_write_json

JSONL_EXT = (".jsonl", ".json", ".ndjson")
TXT_EXT = (".txt", ".text")
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TXT_MODES = ("paragraph", "line", "file")


def classify(path: str | Path) -> tuple[str, str | None] | None:
    """(format, compression) for a supported file name, else None."""
    name = Path(path).name.lower()
    comp = None
    for ext, c in COMPRESSED.items():
        if name.endswith(ext):
            comp, name = c, name[: -len(ext)]
            break
    if name.endswith(JSONL_EXT):
        return "jsonl", comp
    if name.endswith(TXT_EXT):
        return "txt", comp
    if name.endswith(".parquet") and comp is None:
        return "parquet", None
    return None


def list_inputs(folder: str | Path) -> list[Path]:
    """Every regular file under folder (recursively, sorted; hidden files and folders skipped)."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _open_binary(path: Path, comp: str | None):
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


class GebReader(BaseReader):
    """Reads the files given (sharded over tasks by index), yielding Documents with id and source."""

    name = "📖 GEB raw reader"

    def __init__(self, root: str | Path, files: list[str], rejects_dir: str | Path, stats_dir: str | Path,
                 text_key: str = "text", id_key: str = "id", txt_mode: str = "paragraph",
                 max_doc_chars: int = 1_000_000, huge_docs: str = "split"):
        super().__init__(text_key=text_key, id_key=id_key)
        self.root = str(root)
        self.files = list(files)
        self.rejects_dir, self.stats_dir = str(rejects_dir), str(stats_dir)
        self.txt_mode, self.max_doc_chars, self.huge_docs = txt_mode, max_doc_chars, huge_docs

    # -- bookkeeping --------------------------------------------------------------------------
    def _reject(self, rel: str, line: int | None, reason: str, kept: bool = False) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        self._rej.write(json.dumps({"file": rel, "line": line, "reason": reason, "kept": kept},
                                   ensure_ascii=False) + "\n")

    def _emit(self, rel: str, line: int, text, doc_id) -> list[Document]:
        """Checks and builds the document(s) for one record; problems are rejected with file and line."""
        if text is None:
            self._reject(rel, line, f"missing field '{self.text_key}'")
            return []
        if not isinstance(text, str):
            self._reject(rel, line, f"field '{self.text_key}' is not a string")
            return []
        if not text.strip():
            self._reject(rel, line, "empty document")
            return []
        did = str(doc_id) if doc_id not in (None, "") else f"{rel}:{line}"
        meta = {"source": rel, "line": line}
        if len(text) <= self.max_doc_chars:
            return [Document(text=text, id=did, metadata=meta)]
        if self.huge_docs == "drop":
            self._reject(rel, line, f"huge document (> {self.max_doc_chars:,} chars) dropped")
            return []
        parts = split_huge(text, self.max_doc_chars)
        self._reject(rel, line, f"huge document (> {self.max_doc_chars:,} chars) split into parts", kept=True)
        return [Document(text=p, id=f"{did}#part{k}", metadata={**meta, "part": k}) for k, p in enumerate(parts)]

    # -- formats ------------------------------------------------------------------------------
    def _lines(self, path: Path, rel: str, comp: str | None):
        """(1-based line number, decoded line) with invalid UTF-8 replaced and reported."""
        with _open_binary(path, comp) as f:
            for i, raw in enumerate(f, 1):
                if i == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not text
                    raw = raw[3:]
                try:
                    yield i, raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._reject(rel, i, "invalid UTF-8 (bad bytes replaced with U+FFFD)", kept=True)
                    yield i, raw.decode("utf-8", errors="replace")

    def read_jsonl(self, path: Path, rel: str, comp: str | None):
        import orjson

        for i, line in self._lines(path, rel, comp):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                self._reject(rel, i, f"invalid JSON ({str(e).split(':')[0]})")
                continue
            if not isinstance(obj, dict):
                self._reject(rel, i, f"not a JSON object ({type(obj).__name__})")
                continue
            yield from self._emit(rel, i, obj.get(self.text_key), obj.get(self.id_key))

    def read_txt(self, path: Path, rel: str, comp: str | None):
        mode = self.txt_mode
        buf: list[str] = []
        start = 1
        for i, line in self._lines(path, rel, comp):
            line = line.rstrip("\r\n")
            if mode == "line":
                if line.strip():
                    yield from self._emit(rel, i, line, None)
                continue
            if mode == "paragraph" and not line.strip():
                if buf:
                    yield from self._emit(rel, start, "\n".join(buf), None)
                buf = []
                continue
            if not buf:
                start = i
            buf.append(line)
        if "\n".join(buf).strip():
            yield from self._emit(rel, start, "\n".join(buf), None)

    def read_parquet(self, path: Path, rel: str):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if self.text_key not in names:
            self._reject(rel, None, f"missing column '{self.text_key}' (columns: {', '.join(names)})")
            return
        cols = [self.text_key] + ([self.id_key] if self.id_key in names else [])
        row = 0
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            d = batch.to_pydict()
            ids = d.get(self.id_key, [None] * batch.num_rows)
            for text, did in zip(d[self.text_key], ids):
                row += 1
                yield from self._emit(rel, row, text, did)

    # -- datatrove entry ----------------------------------------------------------------------
    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        self._counts: dict[str, int] = {}
        rej_path = Path(self.rejects_dir) / f"{rank:05d}.jsonl"
        rej_path.parent.mkdir(parents=True, exist_ok=True)
        docs = chars = 0
        files = self.files[rank::world_size]
        with open(rej_path, "w", encoding="utf-8") as self._rej:
            for rel in files:
                path = Path(self.root) / rel
                kind = classify(path)
                if kind is None:
                    self._reject(rel, None, "unsupported file type (not .jsonl/.json/.txt/.parquet, optionally .gz/.zst)")
                    continue
                fmt, comp = kind
                n0, r0 = docs, sum(self._counts.values())
                try:
                    it = (self.read_parquet(path, rel) if fmt == "parquet" else
                          self.read_jsonl(path, rel, comp) if fmt == "jsonl" else self.read_txt(path, rel, comp))
                    for doc in it:
                        docs += 1
                        chars += len(doc.text)
                        self.stat_update("documents")
                        yield doc
                except Exception as e:  # corrupt archive, unreadable Parquet: report, go on with the next file
                    self._reject(rel, None, f"unreadable file ({type(e).__name__}: {str(e)[:200]})")
                    continue
                if docs == n0 and sum(self._counts.values()) == r0:
                    self._reject(rel, None, "no documents in file (empty)")
        atomic_write_json(Path(self.stats_dir) / "read" / f"{rank:05d}.json",
                          {"step": "read", "stage": "read", "files": len(files), "docs_out": docs,
                           "chars_out": chars, "rejects": self._counts})


def split_huge(text: str, limit: int) -> list[str]:
    """Cut text into parts of at most `limit` characters at paragraph, then line, then any boundary."""
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[:limit]
        cut = window.rfind("\n\n")
        if cut < limit // 2:
            cut = window.rfind("\n")
        if cut < limit // 2:
            cut = limit
        parts.append(rest[:cut])
        rest = rest[cut:].lstrip("\n")
    if rest.strip():
        parts.append(rest)
    return [p for p in parts if p.strip()]
