"""Reading already-clean text and packing it into token shards (no cleaning: see the pipeline).

The token folder is written under a temporary name and renamed when complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from geb.common import AtomicFolder
from geb.data.tokens import TokenWriter
from geb.errors import GebError


def read_texts(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Documents from .jsonl (one object per line) or .txt (blank-line-separated paragraphs)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise GebError(f"{path}: input file not found")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise GebError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise GebError(f"{path}:{i}: missing string field '{text_field}'")
                    yield obj[text_field]
        else:
            text = path.read_text(encoding="utf-8")
            for para in text.split("\n\n"):
                if para.strip():
                    yield para.strip()


def pack_texts(docs: list[str], tokenizer, out: str | Path, val_fraction: float = 0.02, seed: int = 0,
               tokenizer_dir: str | Path | None = None, val_docs: list[str] | None = None) -> dict:
    """Tokenize documents and write train/val shards; val is `val_docs` or a seeded random fraction."""
    if not docs:
        raise GebError("no documents to pack (empty training data)")
    order = np.random.default_rng(seed).permutation(len(docs))
    if val_docs is None:
        n_val = max(1, int(round(len(docs) * val_fraction))) if val_fraction > 0 and len(docs) > 1 else 0
        val_set = set(order[:n_val].tolist())
        val_docs = [docs[i] for i in sorted(val_set)]
        docs = [docs[i] for i in range(len(docs)) if i not in val_set]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFolder(out, kind="tokens") as tmp:
        w = TokenWriter(tmp, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.doc_id,
                        extra_meta={"tokenizer": str(Path(tokenizer_dir).resolve()) if tokenizer_dir else None,
                                    "tokenizer_hash": tokenizer.hash()})
        for split, items in (("train", docs), ("val", val_docs)):
            for ids in tokenizer.encode_batch(items):
                w.add(ids, split)
        meta = w.close()
    return meta
