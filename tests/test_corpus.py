"""The built-in bilingual corpus: determinism, held-out phrasings absent from all training data,
chat/preference/MCQ data consistent with the facts, benchmark file layouts, and the raw noisy folder
(each injected kind of noise found again by independent detectors)."""

from __future__ import annotations

import collections
import csv
import gzip
import json
import re
from pathlib import Path

import pytest

import geb.corpus as corpus
from geb.corpus.templates import QA_PREFIX, QUESTIONS, STATEMENTS, fixed_parts
from geb.corpus.world import RELATIONS

CJK = re.compile(r"[\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]")
END_PUNCT = tuple(".!?。！？…\"」”")


def lang_of(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


@pytest.fixture(scope="module")
def world():
    return corpus.facts(0)


@pytest.fixture(scope="module")
def train():
    return corpus.pretrain_texts(0)


@pytest.fixture(scope="module")
def sft():
    return corpus.sft_conversations(0)


@pytest.fixture(scope="module")
def pairs():
    return corpus.preference_pairs(0)


def test_same_seed_same_data_other_seed_other_world(world, train):
    assert corpus.facts(0) == world and corpus.pretrain_texts(0) == train
    assert corpus.validation_texts(0) == corpus.validation_texts(0)
    assert corpus.heldout_prompts(0) == corpus.heldout_prompts(0)
    assert corpus.sft_conversations(0) == corpus.sft_conversations(0)
    assert corpus.preference_pairs(0) == corpus.preference_pairs(0)
    assert corpus.mcq_items("zh", 0) == corpus.mcq_items("zh", 0)
    other = corpus.facts(1)
    assert [f.id for f in other] == [f.id for f in world]  # same subjects and relations...
    assert sum(a.answer_en != b.answer_en for a, b in zip(world, other)) > len(world) // 2  # ...new answers
    assert corpus.pretrain_texts(1) != train


def test_facts_are_consistent_in_both_languages(world):
    assert len(world) == 160 and len({f.id for f in world}) == 160
    assert collections.Counter(f.kind for f in world) == {k: 40 for k in corpus.SUBJECTS}
    for rel, (_, pool) in RELATIONS.items():
        fs = [f for f in world if f.relation == rel]
        assert len({f.answer_en for f in fs}) == len(fs), f"{rel}: answers must be unique"
        zh_of = dict(pool)
        for f in fs:
            assert zh_of[f.answer_en] == f.answer_zh  # English and Chinese answers translate each other
            assert [zh_of[d] for d in f.distractors_en] == list(f.distractors_zh)
            assert len(set(f.distractors_en)) == 3 and f.answer_en not in f.distractors_en
            assert f.subject_en in f.statement_en and f.answer_en in f.statement_en
            assert f.subject_zh in f.statement_zh and f.answer_zh in f.statement_zh
            assert 1 <= len(f.answer_en.split()) <= 4 and 2 <= len(f.answer_zh.replace("·", "")) <= 6


def test_pretrain_texts_size_mix_and_cleanliness(world, train):
    chars = sum(map(len, train))
    assert 100_000 <= chars <= 300_000
    langs = collections.Counter("bi" if CJK.search(t) and LATIN.search(t) else lang_of(t) for t in train)
    assert min(langs.values()) >= 50, langs
    assert len(set(train)) == len(train)
    for t in train:  # nothing a cleaning rule would touch
        assert not re.search(r"[0-9@<&\ufffd]|http", t)
        for line in t.split("\n"):
            assert line.endswith(END_PUNCT), line
        assert len(set(t.split("\n"))) == len(t.split("\n"))
    blob = "\n".join(train)
    for f in world:  # every fact is stated in both languages
        assert f.answer_en in blob and f.answer_zh in blob


def _training_blob(train, sft, pairs) -> str:
    texts = list(train) + corpus.mcq_practice_texts(0)
    texts += [m["content"] for c in sft for m in c["messages"]]
    texts += [x for p in pairs for x in [p["chosen"], p["rejected"]] + [m["content"] for m in p["prompt"]]]
    return "\n\x00".join(texts)


def test_heldout_phrasings_never_appear_in_any_training_data(train, sft, pairs):
    blob = _training_blob(train, sft, pairs)
    checked = 0
    for rel in STATEMENTS:
        for lang in ("en", "zh"):
            pre, post = QA_PREFIX[lang]
            held = STATEMENTS[rel][lang]["heldout"] + [pre + q + post for q in QUESTIONS[rel][lang]["heldout"]]
            for t in held:
                longest = max(fixed_parts(t), key=len)
                assert longest not in blob, f"held-out phrase {longest!r} of {t!r} occurs in training data"
                pieces = re.split(r"(\{(?:s|a|an|as)\})", t)
                pattern = "".join(re.escape(p) if i % 2 == 0 else r"[^\n]{1,40}?" for i, p in enumerate(pieces))
                assert not re.search(pattern, blob), f"template {t!r} occurs in training data"
                checked += 1
    assert checked == 8 * 2 * 4
    val = corpus.validation_texts(0)
    assert val and not set(val) & set(train)
    for p in corpus.heldout_prompts(0, all_forms=True):
        assert p["prompt"] not in blob


def test_heldout_phrasings_use_only_words_the_training_text_uses(train):
    """Held-out phrasings are new sentences, not new vocabulary: every English word and every Chinese
    character of their fixed text occurs in the pretraining text, so a held-out prompt tests whether
    the model knows the fact, not whether it can guess an unseen word."""
    blob = "\n".join(train)
    words, chars = set(re.findall(r"[a-z']+", blob.lower())), set(blob)
    unseen = {}
    for rel in STATEMENTS:
        for lang in ("en", "zh"):
            pre, post = QA_PREFIX[lang]
            for t in STATEMENTS[rel][lang]["heldout"] + [pre + q + post for q in QUESTIONS[rel][lang]["heldout"]]:
                fixed = "".join(fixed_parts(t))
                units = re.findall(r"[a-z']+", fixed.lower()) if lang == "en" else CJK.findall(fixed)
                missing = [u for u in units if u not in (words if lang == "en" else chars)]
                if missing:
                    unseen[t] = missing
    assert not unseen, unseen


def test_heldout_prompts_cover_every_fact_in_both_languages(world):
    prompts = corpus.heldout_prompts(0)
    by_id = {f.id: f for f in world}
    seen = collections.Counter((p["fact_id"], p["lang"], p["form"]) for p in prompts)
    for f in world:
        for lang in ("en", "zh"):
            assert seen[(f.id, lang, "qa")] == 1 and seen[(f.id, lang, "cloze")] == 1
    for p in prompts:
        f = by_id[p["fact_id"]]
        assert p["answer"] == f.answer(p["lang"]) and f.subject(p["lang"]) in p["prompt"]
        assert p["answer"] not in p["prompt"]
        if p["form"] == "qa":
            assert p["prompt"].endswith(QA_PREFIX[p["lang"]][1])
    assert len(corpus.heldout_prompts(0, all_forms=True)) > len(prompts)


@pytest.mark.parametrize("generated, answer, ok", [
    (" Glass lanterns.\nQ: next", "glass lanterns", True),
    ("GLASS   LANTERNS!", "glass lanterns", True),
    ("Ｇｌａｓｓ ｌａｎｔｅｒｎｓ", "glass lanterns", True),          # full-width
    ("米拉托兰。", "米拉·托兰", True),                                # punctuation inside the answer
    ("玻璃灯笼", "玻璃灯笼", True),
    ("\n\n答：玻璃灯笼。", "玻璃灯笼", True),                         # leading blank lines skipped
    ("Copper bells.", "glass lanterns", False),
    ("Copper bells.\nQ: x\nA: Glass lanterns.", "glass lanterns", False),  # only the first line counts
    ("glass", "glass lanterns", False),
    ("anything", "", False),
    ("铜铃。", "玻璃灯笼", False),
])
def test_answer_matches(generated, answer, ok):
    assert corpus.answer_matches(generated, answer) is ok


def test_answer_matches_whole_text_when_asked():
    assert corpus.answer_matches("Copper bells.\nGlass lanterns.", "glass lanterns", first_line=False)


def test_sft_conversations(world, sft):
    kinds = collections.Counter()
    replies = {"en": "", "zh": ""}
    for c in sft:
        msgs = c["messages"]
        assert msgs[-1]["role"] == "assistant" and all(m["content"].strip() for m in msgs)
        assert {m["role"] for m in msgs} <= {"system", "user", "assistant"}
        body = msgs[1:] if msgs[0]["role"] == "system" else msgs
        assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)
        for u, a in zip(body[::2], body[1::2]):  # answered in the user's language
            assert lang_of(u["content"]) == lang_of(a["content"]), (u, a)
            replies[lang_of(a["content"])] += a["content"] + "\n"
            if corpus.is_refusal(a["content"]):
                kinds["refusal_" + lang_of(a["content"])] += 1
        kinds["system"] += msgs[0]["role"] == "system"
        kinds["multi"] += len(body) > 2
    assert kinds["system"] >= 20 and kinds["multi"] >= 20
    assert kinds["refusal_en"] >= 5 and kinds["refusal_zh"] >= 5
    for f in world:
        assert f.answer_en in replies["en"] and f.answer_zh in replies["zh"]


def test_chat_eval_and_refusal_eval_are_held_out(world, sft, pairs):
    train_users = {m["content"] for c in sft for m in c["messages"] if m["role"] == "user"}
    train_users |= {m["content"] for p in pairs for m in p["prompt"]}
    evals = corpus.chat_eval_prompts(0)
    assert len(evals) == 2 * len(world)
    by_id = {f.id: f for f in world}
    for e in evals:
        q = e["messages"][-1]["content"]
        assert q not in train_users and lang_of(q) == e["lang"]
        assert e["answer"] == by_id[e["fact_id"]].answer(e["lang"])
    refusals = corpus.refusal_eval_prompts(0)
    assert {r["lang"] for r in refusals} == {"en", "zh"}
    assert not {r["messages"][0]["content"] for r in refusals} & train_users


def test_preference_pairs(world, pairs):
    by_kind = collections.defaultdict(list)
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        by_kind[p["kind"]].append(p)
    assert set(by_kind) == {"language", "refusal", "fact"}
    for p in by_kind["language"]:
        assert lang_of(p["prompt"][0]["content"]) == lang_of(p["chosen"]) == p["lang"] != lang_of(p["rejected"])
    for p in by_kind["refusal"]:
        assert corpus.is_refusal(p["chosen"]) and not corpus.is_refusal(p["rejected"])
        assert lang_of(p["chosen"]) == lang_of(p["rejected"]) == p["lang"]
    assert {p["lang"] for p in by_kind["refusal"]} == {"en", "zh"}
    for p in by_kind["fact"]:
        f = next(f for f in world
                 if f.subject(p["lang"]) in p["prompt"][0]["content"] and f.answer(p["lang"]) in p["chosen"])
        assert f.answer(p["lang"]) not in p["rejected"]
        assert any(d in p["rejected"] for d in f.distractors(p["lang"]))


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_mcq_items(world, lang):
    items = corpus.mcq_items(lang, 0)
    by_id = {f.id: f for f in world}
    assert len(items) == len(world)
    for it in items:
        opts = [it[x] for x in "ABCD"]
        assert it["answer"] in "ABCD" and len(it["answer"]) == 1 and len(set(opts)) == 4
        f = by_id[it["fact_id"]]
        assert it[it["answer"]] == f.answer(lang)
        assert sorted(opts) == sorted([f.answer(lang), *f.distractors(lang)])
        assert lang_of(it["question"]) == lang
    groups = collections.defaultdict(collections.Counter)
    for it in items:
        groups[(it["subject"], it["split"])][it["answer"]] += 1
    assert {s for s, _ in groups} == {v["file"] for v in corpus.SUBJECTS.values()}
    for (subject, split), c in groups.items():
        counts = [c[x] for x in "ABCD"]
        assert max(counts) - min(counts) <= 1, (subject, split, c)
        if split == "dev":
            assert sum(counts) == 5


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_ceval_mmlu_cmmlu_layouts(tmp_path):
    subjects = [v["file"] for v in corpus.SUBJECTS.values()]
    zh = {it["question"]: it for it in corpus.mcq_items("zh", 0)}
    en = {it["question"]: it for it in corpus.mcq_items("en", 0)}

    corpus.write_ceval(tmp_path / "ceval", 0)
    total = 0
    for split in ("dev", "val"):
        for s in subjects:
            rows = _read_csv(tmp_path / "ceval" / split / f"{s}_{split}.csv")
            assert rows[0] == ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
            for i, r in enumerate(rows[1:]):
                it = zh[r[1]]
                assert r == [str(i), it["question"], it["A"], it["B"], it["C"], it["D"], it["answer"], r[7]]
                assert it["split"] == "dev" if split == "dev" else it["split"] in ("val", "test")
                assert bool(r[7]) == (split == "dev")
            total += len(rows) - 1
    assert total == len(zh)

    corpus.write_mmlu(tmp_path / "mmlu", 0)
    total = 0
    for split in ("dev", "val", "test"):
        for s in subjects:
            rows = _read_csv(tmp_path / "mmlu" / split / f"{s}_{split}.csv")
            for r in rows:  # no header: every row is an item
                it = en[r[0]]
                assert r == [it["question"], it["A"], it["B"], it["C"], it["D"], it["answer"]] and it["split"] == split
            total += len(rows)
    assert total == len(en)

    corpus.write_cmmlu(tmp_path / "cmmlu", 0)
    total = 0
    for split in ("dev", "test"):
        for s in subjects:
            rows = _read_csv(tmp_path / "cmmlu" / split / f"{s}.csv")
            assert rows[0] == ["", "Question", "A", "B", "C", "D", "Answer"]
            for i, r in enumerate(rows[1:]):
                assert r[0] == str(i) and r[6] == zh[r[1]]["answer"]
            total += len(rows) - 1
    assert total == len(zh)
    assert not list(tmp_path.rglob(".*tmp*"))


# -- raw corpus: independent detectors ---------------------------------------------------------
TAG = re.compile(r"<[A-Za-z/][^>]*>")
ENTITY = re.compile(r"&(?:[a-z]+|#\d+);")
DETECT = {
    "control_chars": re.compile(r"[\x00-\x08\x0e-\x1f\x7f]"),
    "replacement_chars": re.compile("\ufffd"),
    "emails": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "phone_numbers": re.compile(r"(?:\+\d{1,3}[ -]?)?(?:\(\d{2,4}\)|\d{2,4})[ -]\d{3,4}[ -]\d{4}"),
    "cn_mobile_numbers": re.compile(r"(?<!\d)1[3-9]\d{9}(?!\d)"),
    "id_card_numbers": re.compile(r"(?<!\d)\d{17}[\dXx](?!\d)"),
    "urls": re.compile(r"https?://\S+"),
    "fullwidth": re.compile(r"[Ａ-Ｚａ-ｚ]"),
    "html_tags": TAG,
    "html_entities": ENTITY,
}


def _line_kind(line: str) -> str | None:
    s = line.strip()
    if sum("\u00c0" <= ch <= "\u00ff" for ch in s) >= 3:
        return "mojibake"
    if len(s) >= 4 and sum(ch.isalnum() for ch in s) / len(s) < 0.3:
        return "symbol_lines"
    if s and not s.endswith(END_PUNCT):
        return "incomplete_lines"
    return None


def _detect(text: str) -> set[str]:
    found = {k for k, rx in DETECT.items() if rx.search(text)}
    from geb.corpus.raw import TRADITIONAL_CHARS
    if any(ch in TRADITIONAL_CHARS for ch in text):
        found.add("traditional")
    lines = [ln for ln in ENTITY.sub("", TAG.sub("", text)).split("\n") if ln.strip()]
    kinds = [_line_kind(ln) for ln in lines]
    found |= {k for k in kinds if k}
    if len(set(lines)) < len(lines):
        found.add("repeated_paragraphs")
    if all(k in ("symbol_lines", "incomplete_lines") or DETECT["urls"].search(ln) for k, ln in zip(kinds, lines)):
        found.add("junk_documents")
    return found


def _read_raw(folder: Path) -> list[str]:
    texts = []
    for p in sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.jsonl.gz")):
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    texts += [p.read_text(encoding="utf-8") for p in sorted(folder.glob("**/*.txt"))]
    return texts


def _near_duplicate_pairs(texts: list[str], threshold: float = 0.7) -> int:
    """Pairs of distinct documents whose character 5-gram sets overlap (Jaccard) ≥ threshold."""
    uniq = sorted(set(texts))
    grams = [{u[i:i + 5] for i in range(len(u) - 4)} for u in uniq]
    df = collections.Counter(g for s in grams for g in s)
    index = collections.defaultdict(list)
    for i, s in enumerate(grams):
        for g in s:
            if df[g] <= 20:  # rare shingles find the candidates; common ones would only cost time
                index[g].append(i)
    pairs = 0
    for i, s in enumerate(grams):
        cands = collections.Counter(j for g in s if df[g] <= 20 for j in index[g] if j > i)
        pairs += sum(len(s & grams[j]) / len(s | grams[j]) >= threshold for j, c in cands.items() if c >= 3)
    return pairs


def test_raw_corpus_holds_exactly_the_noise_it_reports(tmp_path, train):
    stats = corpus.write_raw_corpus(tmp_path / "raw", 0)
    texts = _read_raw(tmp_path / "raw")
    assert len(texts) == stats["documents"] == sum(stats["files"].values())
    assert {p.suffix for p in (tmp_path / "raw").rglob("*.*")} >= {".jsonl", ".gz", ".txt"}
    assert stats["clean_documents"] == len(train)
    for t in train:  # the clean corpus detects as clean, so what is found below was injected
        assert not _detect(t), t
    found = collections.Counter(k for t in texts for k in _detect(t))
    injected = stats["injected"]
    for kind, n in injected.items():
        if kind in ("exact_duplicates", "near_duplicates"):
            continue
        assert n > 0 and found[kind] == n, (kind, found[kind], n)
    assert len(texts) - len(set(texts)) == injected["exact_duplicates"] > 0
    # Junk pages (all boilerplate) may resemble each other; cleaning removes them, so leave them out.
    pages = [t for t in texts if "junk_documents" not in _detect(t)]
    assert _near_duplicate_pairs(pages) == injected["near_duplicates"] > 0
    clean_kept = set(train) & set(texts)
    assert len(clean_kept) > len(train) // 2


def test_raw_corpus_is_deterministic_and_bad_input_is_opt_in(tmp_path):
    a = corpus.write_raw_corpus(tmp_path / "a", 3)
    b = corpus.write_raw_corpus(tmp_path / "b", 3, bad_input=True)
    assert a["injected"] == b["injected"] and a["files"] == b["files"]
    for p in (tmp_path / "a").rglob("*"):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()
    assert not (tmp_path / "a" / "broken.jsonl").exists()
    lines = (tmp_path / "b" / "broken.jsonl").read_bytes().splitlines()
    assert len(lines) == sum(b["bad_input"].values()) == 4
    problems = collections.Counter()
    for raw in lines:
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problems["invalid_utf8"] += 1
            continue
        except json.JSONDecodeError:
            problems["invalid_json"] += 1
            continue
        problems["missing_text" if "text" not in rec else "empty_text" if not rec["text"] else "ok"] += 1
    assert problems == b["bad_input"]
