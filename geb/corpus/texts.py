"""Pretraining and validation documents, held-out completion prompts, and answer scoring.

Document kinds (each line of every document ends with sentence punctuation, so a cleaning rule that
drops incomplete lines keeps them all): English and Chinese paragraphs of statements, Q&A documents
("Q: ...\\nA: ..." / "问：...\\n答：..."), profiles of one entity and the entities linked to it, and
bilingual documents that pair each English statement with its Chinese one. Pretraining uses only the
`train` templates; validation documents and held-out prompts use only the `heldout` ones.
"""

from __future__ import annotations

import random
import unicodedata

from geb.corpus.templates import GLOSSARY, QA_PREFIX, QUESTIONS, STATEMENTS, cloze_prefix, render
from geb.corpus.world import Fact, facts

LANGS = ("en", "zh")
_SEP = {"en": " ", "zh": ""}


def _rng(seed: int, what: str) -> random.Random:
    return random.Random(f"geb-corpus:{seed}:{what}")


def _qa_pair(fact: Fact, question: str, lang: str) -> str:
    """"Q: question\nA: Answer." (English) or "问：question\n答：answer。" (Chinese)."""
    a = fact.answer(lang)
    reply = f" {a[0].upper()}{a[1:]}." if lang == "en" else f"{a}。"
    return _qa_line(question, lang) + reply


def _qa_line(question: str, lang: str) -> str:
    pre, post = QA_PREFIX[lang]
    return pre + question + post


def _chunks(items: list, rng: random.Random, lo: int, hi: int) -> list[list]:
    """Cut (fact, template) items into chunks of lo..hi items, never two of one fact in a chunk
    (a Q&A document would otherwise repeat an answer line); an item that would repeat a fact waits
    for the next chunk."""
    out, pending = [], list(items)
    while pending:
        n, chunk, rest, seen = rng.randint(lo, hi), [], [], set()
        for it in pending:
            if len(chunk) < n and it[0].id not in seen:
                chunk.append(it)
                seen.add(it[0].id)
            else:
                rest.append(it)
        out.append(chunk)
        pending = rest
    return out


def _pick(templates: list[str], rng: random.Random, one: bool) -> list[str]:
    return [rng.choice(templates)] if one else templates


def _paragraphs(fs: list[Fact], lang: str, split: str, rng: random.Random, repeats: int, one: bool) -> list[str]:
    """Each (fact, template) pair once per repeat (or one template per fact), shuffled and cut
    into paragraphs."""
    docs = []
    for _ in range(repeats):
        items = [(f, t) for f in fs for t in _pick(STATEMENTS[f.relation][lang][split], rng, one)]
        rng.shuffle(items)
        lo, hi = (4, 7) if lang == "en" else (5, 9)
        docs += [_SEP[lang].join(render(t, f, lang) for f, t in c) for c in _chunks(items, rng, lo, hi)]
    return docs


def _qa_docs(fs: list[Fact], lang: str, split: str, rng: random.Random, one: bool) -> list[str]:
    items = [(f, q) for f in fs for q in _pick(QUESTIONS[f.relation][lang][split], rng, one)]
    rng.shuffle(items)
    return ["\n".join(_qa_pair(f, render(q, f, lang), lang) for f, q in c) for c in _chunks(items, rng, 3, 5)]


def _glossary(fact: Fact, lang: str) -> str:
    the = "the " if fact.kind in ("animals", "inventions") else ""
    if lang == "en":
        return GLOSSARY["en"].format(the=the, s_en=fact.subject_en, s_zh=fact.subject_zh)
    return GLOSSARY["zh"].format(the="", s_en=fact.subject_en, s_zh=fact.subject_zh)


def _bilingual(fs: list[Fact], split: str, rng: random.Random, passes: int) -> list[str]:
    docs = []
    for _ in range(passes):
        order = [(f, None) for f in fs]
        rng.shuffle(order)
        for c in _chunks(order, rng, 3, 4):
            lines = [_glossary(c[0][0], rng.choice(LANGS))]
            for f, _ in c:
                en = rng.choice(STATEMENTS[f.relation]["en"][split])
                zh = rng.choice(STATEMENTS[f.relation]["zh"][split])
                lines += [render(en, f, "en"), render(zh, f, "zh")]
            docs.append("\n".join(lines))
    return docs


def _profiles(fs: list[Fact], lang: str, split: str, rng: random.Random) -> list[str]:
    """One paragraph per subject: its own facts, then the facts whose answer is that subject
    (people born in a town, inventions of a person), so linked facts also appear together."""
    by_subject: dict[str, list[Fact]] = {}
    for f in fs:
        by_subject.setdefault(f.subject_en, []).append(f)
    docs, sents = [], []
    for subject, own in by_subject.items():
        linked = [f for f in fs if f.answer_en == subject]
        sents += [render(rng.choice(STATEMENTS[f.relation][lang][split]), f, lang) for f in own + linked]
        if len(sents) >= 4:  # short profiles (animals have no linked facts) share a document
            docs.append(_SEP[lang].join(sents))
            sents = []
    if sents:
        docs.append(_SEP[lang].join(sents))
    return docs


def _documents(seed: int, split: str, repeats: int) -> list[str]:
    fs = facts(seed)
    rng = _rng(seed, f"docs:{split}")
    docs: list[str] = []
    train = split == "train"
    for lang in LANGS:
        docs += _paragraphs(fs, lang, split, rng, repeats, one=not train)
        docs += _qa_docs(fs, lang, split, rng, one=not train)
        if train:
            docs += _profiles(fs, lang, split, rng)
    docs += _bilingual(fs, split, rng, passes=2 if train else 1)
    rng.shuffle(docs)
    return docs


def pretrain_texts(seed: int = 0, repeats: int = 1) -> list[str]:
    """Clean training documents (English, Chinese and bilingual), from the training templates only.

    `repeats` > 1 states every (fact, template) pair that many times in different paragraphs, for a
    larger corpus; the default gives about 170K characters in about 900 documents.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    return _documents(seed, "train", repeats)


def validation_texts(seed: int = 0) -> list[str]:
    """Documents in the style of `pretrain_texts`, written only with held-out phrasings: every fact
    once per language in a paragraph, once in a Q&A document and once in a bilingual one."""
    return _documents(seed, "heldout", 1)


def heldout_prompts(seed: int = 0, all_forms: bool = False) -> list[dict]:
    """Completion prompts about every fact, in both languages, in phrasings never used in training.

    Each is `{"prompt", "answer", "lang", "fact_id", "form", "relation", "kind"}`; `form` is "qa"
    (a held-out question in the Q&A layout, e.g. "Q: What is Varnel famous for?\\nA:") or "cloze"
    (a held-out statement cut before its answer). By default one prompt of each form per fact and
    language (640 in all); `all_forms=True` gives every held-out question and cloze statement.
    """
    fs = facts(seed)
    rng = _rng(seed, "heldout-prompts")
    out = []
    for f in fs:
        for lang in LANGS:
            qs = QUESTIONS[f.relation][lang]["heldout"]
            cl = [p for p in (cloze_prefix(t) for t in STATEMENTS[f.relation][lang]["heldout"]) if p]
            if not all_forms:
                qs, cl = [rng.choice(qs)], [rng.choice(cl)] if cl else []
            base = {"answer": f.answer(lang), "lang": lang, "fact_id": f.id, "relation": f.relation, "kind": f.kind}
            out += [{"prompt": _qa_line(render(q, f, lang), lang), "form": "qa", **base} for q in qs]
            out += [{"prompt": render(p, f, lang), "form": "cloze", **base} for p in cl]
    return out


def normalize_answer(text: str) -> str:
    """NFKC (full-width → half-width), case-folded, without punctuation, symbols or whitespace."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PSZC")


def answer_matches(generated: str, answer: str, first_line: bool = True) -> bool:
    """Whether `generated` contains `answer`, ignoring case, whitespace, punctuation and full-width
    forms. With `first_line` (default), only the first non-empty line counts, so a model that runs
    on into further Q&A pairs is not credited for answers it states later."""
    if first_line:
        lines = [ln for ln in generated.splitlines() if normalize_answer(ln)]
        generated = lines[0] if lines else ""
    want = normalize_answer(answer)
    return bool(want) and want in normalize_answer(generated)
