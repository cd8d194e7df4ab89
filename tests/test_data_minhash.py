"""geb.data.minhash against datatrove's own MinHash steps: the same signature files byte for byte, the
same duplicate pairs, on a small zh/en corpus with exact and near copies, for the default and the old
settings and 32-bit hashes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupSignature  # noqa: E402
from datatrove.utils.hashing import HashConfig  # noqa: E402

from geb.data.minhash import FastMinhashSignature, GroupedBuckets  # noqa: E402
from geb.data.pipeline import minhash_hash_config  # noqa: E402
from geb.data.text import BilingualWordTokenizer  # noqa: E402


def _corpus(seed: int = 5) -> list[list[Document]]:
    """Two ranks' documents: Chinese and English, some copied (exactly or with an edit) across and
    within ranks, repeated words inside documents, a number, and texts too short for one shingle."""
    rng = random.Random(seed)
    hanzi = [chr(0x4E00 + rng.randrange(2000)) for _ in range(300)]
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(200)]
    base = []
    for i in range(60):
        if i % 2:
            base.append("".join(rng.choice(hanzi) for _ in range(rng.randint(20, 400))) + "。")
        else:
            base.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 300))) + f" {i * 37}.")
    docs = list(base)
    for t in base[:20]:
        k = rng.randrange(len(t))
        docs.append(t[:k] + "x" + t[k:])  # a near copy
        docs.append(t)  # an exact copy
    docs += ["ab", "你好", "", "the the the the the the the"]
    rng.shuffle(docs)
    ranks = [docs[: len(docs) // 2], docs[len(docs) // 2:]]
    return [[Document(text=t, id=f"{r}-{i}") for i, t in enumerate(part)] for r, part in enumerate(ranks)]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("unit,n,bands,rows,precision", [("chars", 4, 80, 10, 64), ("words", 5, 14, 8, 64),
                                                          ("chars", 3, 9, 4, 32)])
def test_signatures_and_pairs_equal_datatrove(tmp_path, unit, n, bands, rows, precision):
    hc = HashConfig(**{**minhash_hash_config(), "precision": precision})
    cfg = MinhashConfig(n_grams=n, num_buckets=bands, hashes_per_bucket=rows, seed=1, hash_config=hc)
    ranks = _corpus()
    for cls, name in ((MinhashDedupSignature, "dt"), (FastMinhashSignature, "fast")):
        for r, docs in enumerate(ranks):
            step = cls(str(tmp_path / name / "sigs"), cfg, language=BilingualWordTokenizer(unit))
            out = step.run(iter(docs), r, len(ranks))
            assert out is None or list(out) == []
    ref, new = _files(tmp_path / "dt" / "sigs"), _files(tmp_path / "fast" / "sigs")
    assert len(ref) == 2 * bands and ref.keys() == new.keys()
    assert all(ref[k] == new[k] for k in ref), [k for k in ref if ref[k] != new[k]][:3]

    for b in range(bands):  # datatrove: one task per bucket
        MinhashDedupBuckets(str(tmp_path / "dt" / "sigs"), str(tmp_path / "dt" / "buckets"), config=cfg,
                            only_dedup_in_index=False).run(None, b, bands)
    for rank in range(3):  # grouped: three tasks for all buckets, merged in memory
        GroupedBuckets(MinhashDedupBuckets(str(tmp_path / "dt" / "sigs"), str(tmp_path / "fast" / "buckets"),
                                           config=cfg, only_dedup_in_index=False)).run(None, rank, 3)
    for rank in range(2):  # a memory limit of 0 sends every bucket through datatrove's heap merge
        GroupedBuckets(MinhashDedupBuckets(str(tmp_path / "dt" / "sigs"), str(tmp_path / "heap" / "buckets"),
                                           config=cfg, only_dedup_in_index=False), max_memory_bytes=0).run(None, rank, 2)
    ref = _files(tmp_path / "dt" / "buckets")
    assert len(ref) == bands and sum(map(len, ref.values())) > 0  # the copies make pairs
    assert _files(tmp_path / "fast" / "buckets") == ref
    assert _files(tmp_path / "heap" / "buckets") == ref


@pytest.mark.parametrize("precision", [64, 32])
def test_native_signature_equals_numpy(precision):
    """geb's native MinHash kernel (every kernel variant this CPU runs) gives the numpy path's values,
    for a parameter count that is not a multiple of the kernel's tile of 64 and hashes that use all
    64 bits (the product wraps; the Mersenne reduction's conditional subtract is exercised)."""
    import numpy as np

    from geb.infer import native

    if not native.available():
        pytest.skip(f"native core unavailable: {native.why()}")
    cfg = MinhashConfig(n_grams=4, num_buckets=14, hashes_per_bucket=8, seed=3,
                        hash_config=HashConfig(precision=precision, hash_fc="sha1"))
    step = FastMinhashSignature("/tmp/unused-minhash", cfg, language=BilingualWordTokenizer("chars"))
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True) for n in (1, 7, 300)]
    cases.append(np.array([0, 2**61 - 1, 2**61, 2**64 - 1], dtype=np.uint64))
    before = native.isa()
    try:
        for variant in native.supported_isas():
            native.select_isa(variant)
            for h in cases:
                want = step.signature(h, native=False)
                got = step.signature(h, native=True)
                assert got.dtype == np.uint64 and got.shape == (112,)
                np.testing.assert_array_equal(got, want, err_msg=f"{variant}, {h.size} hashes")
    finally:
        native.select_isa(before)
