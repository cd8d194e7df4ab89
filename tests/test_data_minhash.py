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
    for r, docs in enumerate(ranks):  # signatures spilled to the bucket files, then re-read and sorted
        step = FastMinhashSignature(str(tmp_path / "spill" / "sigs"), cfg, language=BilingualWordTokenizer(unit))
        step.max_memory_bytes = 0
        step.run(iter(docs), r, len(ranks))
    ref, new = _files(tmp_path / "dt" / "sigs"), _files(tmp_path / "fast" / "sigs")
    assert len(ref) == 2 * bands and ref.keys() == new.keys()
    assert all(ref[k] == new[k] for k in ref), [k for k in ref if ref[k] != new[k]][:3]
    assert _files(tmp_path / "spill" / "sigs") == ref

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


def _messy_texts(seed: int = 11) -> list[str]:
    """Short and long texts over letters with and without combining marks, full-width forms, digits,
    punctuation, several kinds of whitespace, CJK (basic and past plane 1) and emoji."""
    rng = random.Random(seed)
    alphabet = list("abcXYZ éÅçñ\u0301\u0308\u0345ς Σ 中文字 ，。！ 1,2.3 ４５ \t\n\u2000\u00a0\u3000 ﬁ ǅ 😀 Monday")
    alphabet += ["\U00020000", "\U0002a6d6", "\U000e0100"]  # CJK extension B, a plane-14 variation selector
    out = ["", " ", "a", "e\u0301", "  Hello,  World!  ", "2024年1月1日，天气很好。", "\U00020000\u0301x"]
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(400)]
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(500, 3000))) for _ in range(10)]
    return out


def test_simplify_equals_datatrove():
    """geb.data.text.simplify gives datatrove's simplify_text output for every normalization config."""
    from datatrove.utils.text import TextNormConfig, simplify_text

    from geb.data.text import simplify

    configs = [TextNormConfig(), TextNormConfig(lowercase=False, norm_weekdays=True),
               TextNormConfig(norm_whitespace=False), TextNormConfig(remove_punctuation=False),
               TextNormConfig(norm_unicode_diacritics=False)]
    texts = _messy_texts()
    for cfg in configs:
        bad = [t for t in texts if simplify(t, cfg) != simplify_text(t, cfg)]
        assert not bad, (cfg, bad[:3])
    # the marks really are removed (the test above would pass if neither side removed them)
    assert simplify("Crème brûlée", TextNormConfig()) == "creme brulee"


@pytest.mark.parametrize("unit,n,precision", [("chars", 4, 64), ("words", 5, 64), ("chars", 3, 32), ("chars", 40, 64)])
def test_native_shingle_hashes_equal_python(unit, n, precision):
    """The core's shingle hashing (geb/csrc/text.c: distinct windows, SHA-1 heads) gives the set of
    hashes of the Python path, for texts with repeats, tokens of 1-4 UTF-8 bytes, shingles longer than
    one SHA-1 block (n=40) and 32-bit hashes; a token holding a space falls back to the Python path."""
    import numpy as np

    from geb.infer import native

    if not native.available():
        pytest.skip(f"native core unavailable: {native.why()}")
    cfg = MinhashConfig(n_grams=n, num_buckets=4, hashes_per_bucket=2, seed=3,
                        hash_config=HashConfig(precision=precision, hash_fc="sha1"))
    step = FastMinhashSignature("/tmp/unused-minhash", cfg, language=BilingualWordTokenizer(unit))
    texts = _messy_texts() + [" ".join(["to be or not to be"] * 50), "啊" * 200]
    sizes = []
    for t in texts:
        want = step.shingle_hashes(t, native=False)
        got = step.shingle_hashes(t, native=True)
        assert got.dtype == np.uint64 and got.size == np.unique(got).size  # each distinct shingle once
        assert set(got.tolist()) == set(want.tolist()), t[:40]
        sizes.append(got.size)
    assert max(sizes) > 100 and min(sizes) == 0
    # a tokenizer whose tokens hold spaces: byte ranges would be wrong, so the Python path answers
    spaced = FastMinhashSignature("/tmp/unused-minhash", cfg, language=_SpacedPairs())
    text = "one two three four five six seven eight nine ten eleven twelve " * 10
    got, want = spaced.shingle_hashes(text, native=True), spaced.shingle_hashes(text, native=False)
    assert set(got.tolist()) == set(want.tolist()) and got.size > 0


class _SpacedPairs(BilingualWordTokenizer):
    """Tokens of two words with a space inside."""

    def word_tokenize(self, text: str) -> list[str]:
        w = text.split()
        return [f"{a} {b}" for a, b in zip(w[::2], w[1::2])]


@pytest.mark.parametrize("split_sentences,n", [(False, 1), (True, 3)])
def test_span_signatures_equal_datatrove(tmp_path, split_sentences, n):
    """geb.data.dedup.SpanSignature writes datatrove's SentenceDedupSignature files byte for byte."""
    from datatrove.pipeline.dedup.sentence_dedup import SentDedupConfig, SentenceDedupSignature

    from geb.data.dedup import SpanSignature

    cfg = SentDedupConfig(n_sentences=n, split_sentences=split_sentences,
                          hash_config=HashConfig(**minhash_hash_config()))
    texts = _messy_texts()
    docs = [Document(text="\n".join(texts[i: i + 5]) + "。Crème brûlée! Ｆｕｌｌ.", id=str(i)) for i in range(0, len(texts), 3)]
    for cls, name in ((SentenceDedupSignature, "dt"), (SpanSignature, "geb")):
        cls(str(tmp_path / name), config=cfg, language=BilingualWordTokenizer()).run(iter(docs), 0, 1)
    ref, new = _files(tmp_path / "dt"), _files(tmp_path / "geb")
    assert ref and sum(map(len, ref.values())) > 0 and ref == new
