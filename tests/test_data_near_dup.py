"""The MinHash defaults on a synthetic labelled set: one-edit copies found, boilerplate rarely merged.

The set is made by bench/near_dup.py's make_set from synthetic text (random Chinese characters and
random Latin words, so no two base documents share anything but the boilerplate): base documents of
50-2,000 characters, one or two copies with exactly one small edit each, and unrelated documents that
share one of a few boilerplate headers/footers. Clustering uses the pipeline's defaults, tokenizer
and hash through datatrove's own signature code.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from geb.data.settings import default_settings  # noqa: E402
from geb.data.text import BilingualWordTokenizer  # noqa: E402
from geb.errors import GebError  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench" / "near_dup.py"


def _bench():
    spec = importlib.util.spec_from_file_location("near_dup_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pools(seed: int = 7, n: int = 400) -> dict[str, list[str]]:
    rng = random.Random(seed)
    hanzi = [chr(0x4E00 + rng.randrange(3000)) for _ in range(600)]
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    zh = ["".join(rng.choice(hanzi) for _ in range(rng.randint(8, 30))) + rng.choice("，。！？") for _ in range(n * 20)]
    en = [" ".join(rng.choice(vocab) for _ in range(rng.randint(4, 14))) + rng.choice(".,!?") for _ in range(n * 20)]
    return {"zh": zh, "en": en}


@pytest.fixture(scope="module")
def scored():
    nd = _bench()
    mh = default_settings()["rules"]["minhash"]
    docs = nd.make_set(_pools(), per_lang=120, seed=3, edits=(1,))
    cl = nd.clusters(docs, mh["unit"], int(mh["n_grams"]), int(mh["num_buckets"]), int(mh["hashes_per_bucket"]))
    return docs, cl, nd.score(docs, cl)


def test_defaults_find_one_edit_copies(scored):
    docs, _, s = scored
    assert s["copies"] >= 200 and {d["lang"] for d in docs} == {"zh", "en"}
    assert min(len(d["text"]) for d in docs) >= 50
    assert s["recall"] >= 0.97, s
    assert min(s["recall_by_lang"].values()) >= 0.95, s


def test_defaults_do_not_merge_unrelated_documents_sharing_boilerplate(scored):
    docs, cl, s = scored
    unrelated = [i for i, d in enumerate(docs) if d["role"] == "unrelated"]
    assert len(unrelated) >= 200
    # every boilerplate really is shared by many unrelated documents, so the check below can fail
    assert max(sum(bp in docs[i]["text"] for i in unrelated) for bp in _bench().BOILERPLATE["en"]) >= 20
    assert s["precision"] >= 0.99, s
    # what does merge is a pair of short documents that are mostly the same boilerplate (Jaccard ≈ 0.4)
    merged = [i for i in unrelated if sum(c == cl[i] for c in cl) > 1]
    assert len(merged) <= 0.02 * len(unrelated), merged
    bp = [b for lang in ("zh", "en") for b in _bench().BOILERPLATE[lang]]
    assert all(len(docs[i]["text"]) < 3 * max(len(b) for b in bp if b in docs[i]["text"]) for i in merged), merged


def test_the_old_word_shingles_miss_short_english_copies(scored):
    """The set tells settings apart: word 5-grams with 14 × 8 (the old defaults) miss English copies."""
    docs, _, _ = scored
    nd = _bench()
    old = nd.score(docs, nd.clusters(docs, "words", 5, 14, 8))
    assert old["recall_by_lang"]["en"] < 0.9, old


def test_unknown_shingle_unit_is_refused():
    with pytest.raises(GebError, match="unit"):
        BilingualWordTokenizer("bytes")
