"""Packed token shards: the memory-mapped format that `geb pretrain` reads and the data pipeline writes.

A token folder holds raw little-endian arrays (`<split>_<NNNNN>.bin`, uint16 when the vocabulary fits,
else uint32) and a `meta.json` listing every finished shard with its token count, SHA-256 and a
sampled SHA-256 (`sample_sha256`: the size and SAMPLE_BLOCKS fixed blocks of SAMPLE_BYTES; the whole
file when it is smaller than that). A shard is written to a temporary name and renamed, and meta.json
last, so an interrupted writer never leaves a shard that looks finished. Documents are separated by
the tokenizer's end-of-document id.

Opening a folder checks every shard's size and sampled hash (milliseconds, whatever the size);
`verify=True` (`geb pretrain --verify-data`) checks the full SHA-256 of every byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from geb.common import TOKENS_FORMAT, atomic_write, atomic_write_text
from geb.errors import GebError

FORMAT = TOKENS_FORMAT  # named in geb.common, which recognises token folders by it
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 1 << 16


def sample_sha256(buf) -> str:
    """SHA-256 of the length and SAMPLE_BLOCKS evenly spaced blocks (first and last included) of `buf`."""
    mv = memoryview(buf).cast("B")
    n = len(mv)
    h = hashlib.sha256(n.to_bytes(8, "little"))
    if n <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        h.update(mv)
    else:
        for i in range(SAMPLE_BLOCKS):
            off = i * (n - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            h.update(mv[off : off + SAMPLE_BYTES])
    return h.hexdigest()


class TokenWriter:
    """Append documents (lists of ids) to shards of one split; call close() to publish meta.json."""

    def __init__(self, folder: str | Path, vocab_size: int, eos_id: int, shard_tokens: int = 1 << 26,
                 extra_meta: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = np.uint16 if vocab_size <= 65536 else np.uint32
        self.vocab_size, self.eos_id, self.shard_tokens = vocab_size, eos_id, shard_tokens
        self.extra_meta = extra_meta or {}
        self.shards: dict[str, list[dict]] = {}
        self.docs: dict[str, int] = {}
        self._buf: dict[str, list[np.ndarray]] = {}
        self._buf_len: dict[str, int] = {}

    def add(self, ids, split: str = "train") -> None:
        arr = np.asarray(list(ids) + [self.eos_id], dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise GebError(f"token id out of range [0, {self.vocab_size}) in a document for split '{split}'")
        self._buf.setdefault(split, []).append(arr.astype(self.dtype))
        self._buf_len[split] = self._buf_len.get(split, 0) + arr.size
        self.docs[split] = self.docs.get(split, 0) + 1
        if self._buf_len[split] >= self.shard_tokens:
            self._flush(split)

    def _flush(self, split: str) -> None:
        if not self._buf.get(split):
            return
        data = np.concatenate(self._buf[split])
        self._buf[split], self._buf_len[split] = [], 0
        n = len(self.shards.setdefault(split, []))
        name = f"{split}_{n:05d}.bin"
        # not ndarray.tofile: its short-write error carries no errno
        atomic_write(self.folder / name, lambda p: p.write_bytes(memoryview(data).cast("B")))
        self.shards[split].append({"file": name, "tokens": int(data.size),
                                   "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
                                   "sample_sha256": sample_sha256(data)})

    def close(self) -> dict:
        for split in list(self._buf):
            self._flush(split)
        if not self.shards:
            raise GebError(f"{self.folder}: no documents were written (empty training data)")
        meta = {"format": FORMAT, "dtype": np.dtype(self.dtype).name, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "shards": self.shards, "documents": self.docs, **self.extra_meta}
        meta["data_hash"] = hashlib.sha256(
            "".join(s["sha256"] for sp in sorted(self.shards) for s in self.shards[sp]).encode()).hexdigest()[:16]
        atomic_write_text(self.folder / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        return meta


class TokenData:
    """Read-only view of a token folder: one memory-mapped array per split (shards concatenated lazily)."""

    def __init__(self, folder: str | Path, verify: bool = False):
        self.folder = Path(folder)
        mf = self.folder / "meta.json"
        if not mf.is_file():
            raise GebError(f"{self.folder}: not a token folder (meta.json missing; run `geb data run` or `geb tokenize`)")
        try:
            self.meta = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise GebError(f"{mf}: not valid JSON ({e})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            got = self.meta.get("format") if isinstance(self.meta, dict) else type(self.meta).__name__
            raise GebError(f"{mf}: unknown format {got!r} (expected {FORMAT})")
        try:
            self.dtype = np.dtype(self.meta["dtype"])
            self.vocab_size = int(self.meta["vocab_size"])
            self.eos_id = int(self.meta["eos_id"])
            listed = {sp: [(str(s["file"]), int(s["tokens"]), s) for s in shards]
                      for sp, shards in self.meta["shards"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise GebError(f"{mf}: malformed ({type(e).__name__}: {e})") from None
        self.data_hash = self.meta.get("data_hash", "")
        self._arrays: dict[str, list[np.memmap]] = {}
        for split, shards in listed.items():
            arrs = []
            for name, tokens, s in shards:
                f = self.folder / name
                if not f.is_file():
                    raise GebError(f"{f}: shard listed in meta.json is missing")
                size = f.stat().st_size
                if size != tokens * self.dtype.itemsize:
                    raise GebError(f"{f}: size {size} bytes does not match {tokens} tokens in meta.json (truncated?)")
                arr = np.memmap(f, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
                if verify:
                    with open(f, "rb") as fh:
                        ok = hashlib.file_digest(fh, "sha256").hexdigest() == s["sha256"]
                    if not ok:
                        raise GebError(f"{f}: SHA-256 differs from meta.json (the shard is corrupt; rebuild the "
                                       "token folder)")
                elif s.get("sample_sha256") and sample_sha256(arr) != s["sample_sha256"]:
                    raise GebError(f"{f}: sampled SHA-256 differs from meta.json (the shard is corrupt; rebuild "
                                   "the token folder)")
                arrs.append(arr)
            self._arrays[split] = arrs

    def splits(self) -> list[str]:
        return list(self._arrays)

    def num_tokens(self, split: str = "train") -> int:
        return sum(a.size for a in self._arrays.get(split, []))

    def array(self, split: str = "train") -> np.ndarray:
        """The split as one array (a memmap when it has a single shard)."""
        arrs = self._arrays.get(split)
        if not arrs:
            raise GebError(f"{self.folder}: split '{split}' has no tokens")
        return arrs[0] if len(arrs) == 1 else np.concatenate(arrs)

    def documents(self, split: str = "train"):
        """Yield each document's ids (without the separator): for checking a packing round-trip."""
        arr = np.asarray(self.array(split))
        ends = np.flatnonzero(arr == self.eos_id)
        start = 0
        for e in ends:
            yield arr[start:e].astype(np.int64).tolist()
            start = e + 1
