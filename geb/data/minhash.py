"""MinHash signatures and LSH buckets with datatrove's file formats and results, at array speed.

datatrove's `MinhashDedupSignature` hashes each shingle with a Python call, computes the N x K
permuted hashes with a uint64 `%` (a division per element), splits the signature into Python lists
and packs one struct per bucket per document; its `MinhashDedupBuckets` merges the sorted signature
files one record at a time through a heap of dataclasses and needs one task per bucket. With the
defaults (80 bands x 10 rows: 800 hashes per document, 80 bucket tasks) that was most of the
pipeline's time. Here, with the same inputs and outputs:

- `FastMinhashSignature`: each distinct shingle is hashed once (the minimum over a set does not
  depend on repeats), on geb's native core one call per document (geb/csrc/text.c finds the distinct
  windows of the space-joined tokens and SHA-1s them), and `(h * a + b) mod (2^61 - 1)` uses
  the Mersenne reduction (`(x & p) + (x >> 61)`, one conditional subtract) in blocks that stay in
  cache; records are written a batch of documents at a time per bucket and sorted per bucket as
  datatrove does. The signature files are byte for byte datatrove's (tests/test_data_minhash.py).
- `GroupedBuckets`: one task runs several buckets (a task's fixed cost, ~60 ms of datatrove logging
  setup, was paid 80 times), and a bucket whose merge fits in `max_memory_bytes` (~3x its files) is merged
  with one array sort instead of the heap; larger buckets, and runs with an index folder, go through
  datatrove's own step. Both write the same `.dups` pairs in the same order.
"""

from __future__ import annotations

import functools
import hashlib
import struct

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupSignature

from geb.data.text import simplify

P61 = np.uint64((1 << 61) - 1)  # datatrove's _mersenne_prime
SHIFT = np.uint64(61)
BLOCK = 256  # shingles per block of the N x K product: 256 x 800 x 8 bytes stays in L2
BATCH = 2048  # documents whose signatures are stacked into one block


def record_dtype(rows: int, fmt: str, with_doc: bool = True) -> np.dtype:
    """A signature file record as datatrove writes it: `<{rows}{Q|I}I` (hashes, then the document index)."""
    fields = [(f"field{i + 1}", f"<{fmt}") for i in range(rows)]
    return np.dtype(fields + ([(f"field{rows + 1}", "<I")] if with_doc else []))


class FastMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash signature step (same config, files and values), vectorized."""

    name = "🎯 MinHash stage 1 (vectorized)"

    def shingle_hashes(self, text: str, native: bool | None = None) -> np.ndarray:
        """The hashes of text's distinct shingles (datatrove's get_shingles, 1-D, in no set order: only
        their minimum matters). With sha1, on geb's native core where it is built (`native` as for
        `signature`): one call finds and hashes the distinct windows of the space-joined tokens; else
        one Python call per distinct shingle."""
        n = self.config.n_grams
        toks = self.word_tokenizer.word_tokenize(simplify(text, self.config.norm_config))
        if len(toks) < n:
            return np.empty(0, dtype=np.uint64)
        if self.config.hash_config.hash_fc != "sha1":  # other hash functions: datatrove's, one call per shingle
            grams = set(map(" ".join, zip(*(toks[k:] for k in range(n)))))
            return np.fromiter(map(self._hash_func, grams), dtype=np.uint64, count=len(grams))
        width = 8 if self.config.hash_config.precision == 64 else 4
        fn = _core_function("geb_shingle_hashes", native)
        joined = " ".join(toks)
        # a shingle is then a byte range of `joined`, unless a token holds a space itself
        if fn is not None and joined and joined.count(" ") == len(toks) - 1:
            buf = joined.encode("utf-8")
            out = np.empty(len(toks) - n + 1, dtype=np.uint64)
            got = fn(buf, len(buf), n, width, out.ctypes.data, out.size)
            if got < 0:
                raise RuntimeError(f"geb_shingle_hashes failed ({got}) on a text of {len(buf)} bytes")
            return out[:got]
        grams = set(map(" ".join, zip(*(toks[k:] for k in range(n)))))
        sha1 = hashlib.sha1
        # sha1_hash64/32: the digest's first 8/4 bytes, little-endian
        raw = b"".join([sha1(g.encode("utf-8")).digest()[:width] for g in grams])
        return np.frombuffer(raw, dtype="<u8" if width == 8 else "<u4").astype(np.uint64)

    def signature(self, hashes: np.ndarray, native: bool | None = None) -> np.ndarray:
        """min over shingles of ((h * a + b) mod 2^64) mod (2^61 - 1), as datatrove's get_signature (K values).

        On geb's native core where it is built (`native=None`: when available; False: numpy, True: the
        core or an error); both give the same values."""
        a, b = (np.ascontiguousarray(p.reshape(-1), dtype=np.uint64) for p in self.parameters)
        k = a.size
        best = np.full(k, np.iinfo(np.uint64).max, dtype=np.uint64)
        mask = np.uint64(self.config.hash_config.max) if self.config.hash_config.precision == 32 else None
        fn = _core_function("geb_minhash", native)
        if fn is not None:
            h = np.ascontiguousarray(hashes, dtype=np.uint64)
            full = np.iinfo(np.uint64).max if mask is None else int(mask)
            fn(h.ctypes.data, h.size, a.ctypes.data, b.ctypes.data, k, full, best.ctypes.data)
            return best
        buf = np.empty((BLOCK, k), dtype=np.uint64)
        hi = np.empty((BLOCK, k), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for s in range(0, hashes.size, BLOCK):
                h = hashes[s:s + BLOCK, None]
                x, y = buf[: h.shape[0]], hi[: h.shape[0]]
                np.multiply(h, a, out=x)  # wraps mod 2^64, as datatrove's product does
                np.add(x, b, out=x)
                # x mod p for p = 2^61 - 1: x = hi * 2^61 + lo ≡ hi + lo, which is at most p + 7
                np.right_shift(x, SHIFT, out=y)
                np.bitwise_and(x, P61, out=x)
                np.add(x, y, out=x)
                np.subtract(x, P61, out=x, where=x >= P61)
                if mask is not None:  # 32-bit signatures: datatrove masks each value before the minimum
                    np.bitwise_and(x, mask, out=x)
                np.minimum(best, x.min(axis=0), out=best)
        return best

    # signatures a task holds before it spills them to its bucket files (then re-read to sort them);
    # below this every bucket file is written once, already sorted (a file open costs ~0.3 ms here)
    max_memory_bytes = 256 << 20

    def run(self, data, rank: int = 0, world_size: int = 1):
        cfg = self.config
        rows, nb = cfg.hashes_per_bucket, cfg.num_buckets
        fmt = cfg.hash_config.struct_format
        width = struct.calcsize(fmt)
        dtype = record_dtype(rows, fmt)
        paths = [f"bucket_{bi:03d}/{rank:05d}.minhash.sig" for bi in range(nb)]
        with self.track_time():
            sigs, idx, n_docs = [], [], 0
            held: list[tuple[np.ndarray, np.ndarray]] = []  # (signatures [docs, nb, rows], doc indices)
            files: list = []  # the bucket files, once the held signatures outgrew max_memory_bytes

            def bucket(bi: int, m: np.ndarray, ids: np.ndarray) -> np.ndarray:
                """Bucket bi's records of a block (datatrove's struct layout, as a structured array)."""
                rec = np.empty((len(m), rows * width + 4), dtype=np.uint8)
                rec[:, : rows * width] = np.ascontiguousarray(m[:, bi, :]).view(np.uint8).reshape(len(m), -1)
                rec[:, rows * width:] = ids.view(np.uint8).reshape(-1, 4)
                return rec.view(dtype).reshape(-1)

            def spill():
                if not files:
                    files.extend(self.output_folder.open(p, mode="wb") for p in paths)
                for m, ids in held:
                    for bi, f in enumerate(files):
                        f.write(bucket(bi, m, ids).tobytes())
                held.clear()

            def flush():
                if sigs:
                    held.append((np.stack(sigs).astype("<u8" if fmt == "Q" else "<u4").reshape(len(sigs), nb, rows),
                                 np.asarray(idx, dtype="<u4")))
                    sigs.clear()
                    idx.clear()
                if files or sum(m.nbytes for m, _ in held) > self.max_memory_bytes:
                    spill()

            for doc_idx, doc in enumerate(data or ()):
                self.stat_update("total")
                hashes = self.shingle_hashes(doc.text)
                if hashes.size:
                    sigs.append(self.signature(hashes))
                    idx.append(doc_idx)
                    n_docs += 1
                    if len(sigs) >= BATCH:
                        flush()
            flush()
            for bi, path in enumerate(paths):  # each bucket's records sorted, as datatrove's step leaves them
                if files:
                    files[bi].close()
                    with self.output_folder.open(path, mode="rb") as f:
                        records = np.frombuffer(f.read(), dtype=dtype)
                else:
                    records = (np.concatenate([bucket(bi, m, ids) for m, ids in held]) if held
                               else np.empty(0, dtype=dtype))
                if records.size != n_docs:
                    raise ValueError(f"{path}: {records.size} signatures written, {n_docs} expected")
                with self.output_folder.open(path, mode="wb") as f:
                    f.write(records[sort_order(records)].tobytes())


def _core_function(name: str, native: bool | None):
    """A function of geb's native core, or None where it is not built (`native=None`) or not wanted
    (`native=False`); `native=True` makes its absence an error."""
    fn = _core_functions().get(name) if native is not False else None
    if native and fn is None:
        from geb import corelib

        raise RuntimeError(f"the native core is unavailable: {corelib.load()[1]}")
    return fn


@functools.cache  # called per document: bind once per process (corelib.load caches the library itself)
def _core_functions() -> dict:
    """geb_minhash (geb/csrc kernels.inc) and geb_shingle_hashes (geb/csrc/text.c) from geb's native
    core, or {} without it."""
    import ctypes

    from geb import corelib

    lib, _ = corelib.load()
    if lib is None:
        return {}
    p, i64, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64
    sigs = {"geb_minhash": ([p, i64, p, p, i64, u64, p], ctypes.c_int),
            "geb_shingle_hashes": ([ctypes.c_char_p, i64, i64, i64, p, i64], i64)}
    corelib.bind(lib, sigs)
    return {name: getattr(lib, name) for name in sigs}


def sort_order(records: np.ndarray) -> np.ndarray:
    """The order of records.sort(order=all fields) (lexicographic over the fields). The first hash
    nearly always decides: one argsort, and np.lexsort over every field only when it has ties."""
    names = records.dtype.names
    first = records[names[0]]
    order = np.argsort(first, kind="stable")
    if records.size > 1 and not (first[order[1:]] != first[order[:-1]]).all():
        order = np.lexsort([records[name] for name in reversed(names)])
    return order


class GroupedBuckets(PipelineStep):
    """datatrove's MinhashDedupBuckets for buckets rank, rank + world_size, ... in one task (same .dups files)."""

    type = "🫂 - DEDUP"
    name = "🎯 MinHash stage 2 (grouped)"

    # 512 MiB: inside the memory a task is given by default on Slurm (datatrove: 2 GB per CPU) and Ray (1 GB here)
    def __init__(self, step: MinhashDedupBuckets, max_memory_bytes: int = 512 << 20):
        super().__init__()
        self.step = step
        self.max_memory_bytes = max_memory_bytes

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        st = self.step
        nb = st.config.num_buckets
        for bucket in range(rank, nb, world_size):
            files = st.input_folder.list_files(subdirectory=f"bucket_{bucket:03d}")
            size = sum(st.input_folder.size(f) for f in files)
            # in memory: the records, their file index and the sort's index arrays (~8 bytes each per key)
            if st.index_folder is None and size * 3 <= self.max_memory_bytes:
                self.merge_in_memory(bucket, files)
            else:
                st.run(None, bucket, nb)

    def merge_in_memory(self, bucket: int, files: list[str]) -> None:
        """The heap merge's output with one sort: consecutive equal signatures in (sig, file, doc) order."""
        st = self.step
        cfg = st.config
        rows, fmt = cfg.hashes_per_bucket, cfg.hash_config.struct_format
        dtype = record_dtype(rows, fmt)
        parts, stems = [], []
        for fi, name in enumerate(files):
            with st.input_folder.open(name, mode="rb") as f:
                rec = np.frombuffer(f.read(), dtype=dtype)
            parts.append((np.full(rec.size, fi, dtype=np.uint32), rec))
            stems.append(int(name.rsplit("/", 1)[-1].removesuffix(".minhash.sig")))
        with st.output_folder.open(f"{bucket:05d}_00.dups", mode="wb") as out:
            if not parts:
                return
            fid = np.concatenate([p[0] for p in parts])
            rec = np.concatenate([p[1] for p in parts])
            names = dtype.names
            # heap order: HashSig(sig, file_id, file_stem, doc_id) compares the signature, then the file, then the doc
            order = np.lexsort([rec[names[-1]], fid, *[rec[n] for n in reversed(names[:-1])]])
            rec, fid = rec[order], fid[order]
            same = np.ones(rec.size - 1, dtype=bool) if rec.size > 1 else np.zeros(0, dtype=bool)
            for n in names[:-1]:
                col = rec[n]
                same &= col[1:] == col[:-1]
            j = np.nonzero(same)[0]
            stem = np.asarray(stems, dtype=np.uint32)[fid]
            doc = rec[names[-1]]
            pairs = np.stack([stem[j], doc[j], stem[j + 1], doc[j + 1]], axis=1).astype("<u4")
            out.write(pairs.tobytes())
            if j.size:
                self.stat_update("total_matches", value=int(j.size))
