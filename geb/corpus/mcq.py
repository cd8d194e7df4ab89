"""Multiple-choice questions about the facts, and writers for the C-Eval, MMLU and CMMLU file layouts,
so the quickstart's evaluation runs the same code path as the real benchmarks.

Each fact gives one item per language; its options are the answer and the fact's three distractors.
The four kinds are the subjects (SUBJECTS[kind]["file"] names the files). Per subject: 5 `dev`
items (k-shot examples), 5 `val` and the rest `test`; answer letters are balanced within each
subject and split. Where a benchmark scores one split, it gets every non-dev item: C-Eval's `val`
file holds val+test items, CMMLU's `test` file too; MMLU gets dev, val and test as they are.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

from geb.common import atomic_write_text
from geb.corpus.templates import QUESTIONS, render
from geb.corpus.world import SUBJECTS, facts

LETTERS = "ABCD"
N_DEV, N_VAL = 5, 5


def mcq_items(lang: str, seed: int = 0) -> list[dict]:
    """Items `{"id", "subject", "kind", "category", "split", "question", "A", "B", "C", "D",
    "answer", "fact_id", "lang", "explanation"}` in `lang` ("en" or "zh"), grouped by subject."""
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', not {lang!r}")
    rng = random.Random(f"geb-corpus:{seed}:mcq:{lang}")
    fs = facts(seed)
    items = []
    for kind, info in SUBJECTS.items():
        kfs = [f for f in fs if f.kind == kind]
        rng.shuffle(kfs)
        groups = {"dev": kfs[:N_DEV], "val": kfs[N_DEV:N_DEV + N_VAL], "test": kfs[N_DEV + N_VAL:]}
        for split, group in groups.items():
            offset = rng.randrange(4)  # balanced letters (counts differ by at most one), in random order
            letters = [LETTERS[(offset + i) % 4] for i in range(len(group))]
            rng.shuffle(letters)
            for n, (f, letter) in enumerate(zip(group, letters)):
                wrong = list(f.distractors(lang))
                rng.shuffle(wrong)
                opts = wrong[:]
                opts.insert(LETTERS.index(letter), f.answer(lang))
                items.append({
                    "id": f"{info['file']}-{split}-{n}", "subject": info["file"], "kind": kind,
                    "category": info["category"], "split": split,
                    "question": render(QUESTIONS[f.relation][lang]["heldout"][0], f, lang),
                    **dict(zip(LETTERS, opts)), "answer": letter, "fact_id": f.id, "lang": lang,
                    "explanation": f.statement_zh if lang == "zh" else f.statement_en,
                })
    return items


def _csv(rows: list[list], header: list[str] | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header is not None:
        w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write_all(folder: str | Path, files: dict[str, str]) -> list[Path]:
    """Write every file (all rendered in memory first) via a temporary name and a rename."""
    folder = Path(folder)
    paths = []
    for rel, text in files.items():
        paths.append(atomic_write_text(folder / rel, text))
    return paths


def _by_subject(items: list[dict], splits: tuple[str, ...]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for it in items:
        if it["split"] in splits:
            out.setdefault(it["subject"], []).append(it)
    return out


def _summary(paths: list[Path], counts: dict[str, int]) -> dict:
    return {"files": [str(p) for p in paths], "items": counts}


def write_ceval(folder: str | Path, seed: int = 0) -> dict:
    """C-Eval layout (Chinese): `dev/<subject>_dev.csv` and `val/<subject>_val.csv`, header
    `id,question,A,B,C,D,answer,explanation` (dev rows explain with the fact's statement)."""
    items = mcq_items("zh", seed)
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    files, counts = {}, {}
    for split, splits in (("dev", ("dev",)), ("val", ("val", "test"))):
        counts[split] = 0
        for subject, its in _by_subject(items, splits).items():
            rows = [[i, it["question"], *(it[x] for x in LETTERS), it["answer"],
                     it["explanation"] if split == "dev" else ""] for i, it in enumerate(its)]
            files[f"{split}/{subject}_{split}.csv"] = _csv(rows, header)
            counts[split] += len(rows)
    return _summary(_write_all(folder, files), counts)


def write_mmlu(folder: str | Path, seed: int = 0) -> dict:
    """MMLU layout (English): `{dev,val,test}/<subject>_<split>.csv`, no header, columns
    question,A,B,C,D,answer."""
    items = mcq_items("en", seed)
    files, counts = {}, {}
    for split in ("dev", "val", "test"):
        counts[split] = 0
        for subject, its in _by_subject(items, (split,)).items():
            files[f"{split}/{subject}_{split}.csv"] = _csv(
                [[it["question"], *(it[x] for x in LETTERS), it["answer"]] for it in its], None)
            counts[split] += len(its)
    return _summary(_write_all(folder, files), counts)


def write_cmmlu(folder: str | Path, seed: int = 0) -> dict:
    """CMMLU layout (Chinese): `{dev,test}/<subject>.csv`, header `,Question,A,B,C,D,Answer`
    (the first column is a row index)."""
    items = mcq_items("zh", seed)
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    files, counts = {}, {}
    for split, splits in (("dev", ("dev",)), ("test", ("val", "test"))):
        counts[split] = 0
        for subject, its in _by_subject(items, splits).items():
            rows = [[i, it["question"], *(it[x] for x in LETTERS), it["answer"]] for i, it in enumerate(its)]
            files[f"{split}/{subject}.csv"] = _csv(rows, header)
            counts[split] += len(rows)
    return _summary(_write_all(folder, files), counts)


def mcq_practice_texts(seed: int = 0) -> list[str]:
    """Multiple-choice practice documents in the lm-eval prompt layout ("question\\nA. ...\\nD. ...
    \\nAnswer: X" / "...\\n答案：X"), about the `dev` facts only, each shown with its answer under
    every letter in turn. Optional extra pretraining text that teaches a small model the letter
    format without ever showing a val/test item's fact as a question. Option lines have no final
    punctuation, so mix these in after any cleaning that drops incomplete lines."""
    rng = random.Random(f"geb-corpus:{seed}:mcq-practice")
    by_id = {f.id: f for f in facts(seed)}
    docs = []
    for lang in ("en", "zh"):
        tail = "Answer:" if lang == "en" else "答案："
        blocks = []
        for it in mcq_items(lang, seed):
            if it["split"] != "dev":
                continue
            f = by_id[it["fact_id"]]
            q = render(rng.choice(QUESTIONS[f.relation][lang]["train"]), f, lang)
            wrong = list(f.distractors(lang))
            for pos in range(4):
                rng.shuffle(wrong)
                opts = wrong[:pos] + [f.answer(lang)] + wrong[pos:]
                body = "\n".join(f"{x}. {o}" for x, o in zip(LETTERS, opts))
                blocks.append(f"{q}\n{body}\n{tail}{' ' if lang == 'en' else ''}{LETTERS[pos]}")
        rng.shuffle(blocks)
        docs += ["\n\n".join(blocks[i:i + 4]) for i in range(0, len(blocks), 4)]
    rng.shuffle(docs)
    return docs
