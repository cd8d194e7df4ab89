"""Multiple-choice benchmarks read from their official file layouts (nothing is downloaded).

- MMLU: `[data/]{dev,val,test}/<subject>_<split>.csv`, no header: question, A, B, C, D, answer.
- C-Eval: `<split>/<subject>_<split>.csv` with header `id,question,A,B,C,D,answer,explanation`; the
  scored split is `val` (test answers are hidden).
- CMMLU: `{dev,test}/<subject>.csv` with header `,Question,A,B,C,D,Answer`.

Subject names (English, Chinese) and categories come from `subjects.json` beside this file. A subject
the map does not know (e.g. the quickstart's own) is still evaluated, under category "Other".
Malformed rows are skipped and counted with file:line and the reason; they never stop a run.
"""

from __future__ import annotations

import csv
import io
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from geb.common import read_json_object
from geb.errors import GebError

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    eval_split: str
    header: tuple[str, ...] | None  # expected header (lowercased), None = headerless
    lang: str  # prompt language of the benchmark: "en" or "zh"


SPECS = {
    "mmlu": Spec("mmlu", "MMLU", "test", None, "en"),
    "ceval": Spec("ceval", "C-Eval", "val", ("id", "question", "a", "b", "c", "d", "answer", "explanation"), "zh"),
    "cmmlu": Spec("cmmlu", "CMMLU", "test", ("", "question", "a", "b", "c", "d", "answer"), "zh"),
}


@dataclass
class Item:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"
    id: str  # "<file name>:<line>"


@dataclass
class Subject:
    name: str
    en: str
    zh: str
    categories: list[str]
    dev: list[Item] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    known: bool = True


@dataclass
class Benchmark:
    spec: Spec
    root: Path
    split: str
    subjects: list[Subject]
    categories: dict[str, tuple[str, str]]  # name -> (en, zh), in the paper's order
    skipped: list[str]  # "file:line: reason" for every malformed row
    empty_subjects: list[str]
    data_hash: str


@functools.lru_cache(maxsize=1)
def subject_maps() -> dict:
    return json.loads((Path(__file__).with_name("subjects.json")).read_text(encoding="utf-8"))


def subject_info(benchmark: str, name: str, extra: dict | None = None) -> tuple[str, str, list[str], bool]:
    """(English name, Chinese name, categories, known) for a subject of a benchmark; `extra` maps
    more subjects the same way ({name: [en, zh, category or [categories]]}) and wins over the
    built-in map."""
    m = subject_maps()[benchmark]["subjects"]
    if extra and name in extra:
        en, zh, cats = extra[name]
        return en, zh, [cats] if isinstance(cats, str) else list(cats), True
    if name in m:
        en, zh, cats = m[name]
        return en, zh, list(cats), True
    pretty = name.replace("_", " ")
    return pretty.title(), pretty, ["Other"], False


def _find_root(spec: Spec, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise GebError(f"{data_dir}: benchmark folder not found")
    for cand in (data_dir, data_dir / "data"):
        if (cand / "dev").is_dir() or (cand / spec.eval_split).is_dir():
            return cand
    raise GebError(f"{data_dir}: no '{spec.eval_split}/' or 'dev/' folder: not the official {spec.title} layout "
                   f"({layout_help(spec.name)})")


def layout_help(name: str) -> str:
    return {
        "mmlu": "expected [data/]{dev,val,test}/<subject>_<split>.csv without header",
        "ceval": "expected <split>/<subject>_<split>.csv with header id,question,A,B,C,D,answer,explanation",
        "cmmlu": "expected {dev,test}/<subject>.csv with header ,Question,A,B,C,D,Answer",
    }[name]


def _split_files(spec: Spec, root: Path, split: str) -> dict[str, Path]:
    folder = root / split
    if not folder.is_dir():
        return {}
    out = {}
    for f in sorted(folder.glob("*.csv")):
        stem = f.stem
        if spec.name in ("mmlu", "ceval"):
            suffix = f"_{split}"
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        out[stem] = f
    return out


def read_rows(spec: Spec, path: Path, skipped: list[str], need_answer: bool = True) -> list[Item]:
    """Parse one CSV file into items; malformed rows are appended to `skipped`, not raised."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise GebError(f"{path}: not UTF-8 text ({e})") from None
    # csv splits records on \r and \n only (str.splitlines would also split on \x1c, \x85, \u2028 ...)
    reader = csv.reader(io.StringIO(text, newline=""))
    items: list[Item] = []
    start = 1
    first = True
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            skipped.append(f"{path.name}:{start}: unreadable CSV ({e})")
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if first and spec.header is not None:
            first = False
            got = tuple(c.strip().lower() for c in row)
            if got[1:7] != spec.header[1:7]:
                raise GebError(f"{path}:1: header {','.join(row)!r} is not the {spec.title} header "
                               f"({layout_help(spec.name)})")
            continue
        first = False
        if not any(c.strip() for c in row):
            continue  # blank line
        fields = row if spec.name == "mmlu" else row[1:7]  # C-Eval/CMMLU: column 0 is an id
        rid = f"{path.name}:{line}"
        if len(fields) < 6 or (spec.name == "mmlu" and len(fields) != 6):
            skipped.append(f"{path.name}:{line}: expected question, 4 options and an answer, got {len(row)} field(s)")
            continue
        q, a, b, c, d, ans = fields[:6]
        ans = ans.strip().upper()
        if not q.strip():
            skipped.append(f"{path.name}:{line}: empty question")
            continue
        missing = [L for L, opt in zip(LETTERS, (a, b, c, d)) if not opt.strip()]
        if missing:
            skipped.append(f"{path.name}:{line}: missing option {', '.join(missing)}")
            continue
        if need_answer and ans not in LETTERS:
            skipped.append(f"{path.name}:{line}: answer {ans!r} is not one of A, B, C, D")
            continue
        items.append(Item(q, (a, b, c, d), ans, rid))
    return items


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def read_subject_mapping(path: Path) -> dict:
    """C-Eval's `subject_mapping.json` format: {subject: [English name, Chinese name, category]}."""
    m = read_json_object(path, "subject mapping")
    for k, v in m.items():
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, str) for x in v[:2])
                and isinstance(v[2], (str, list))):
            raise GebError(f"{path}: subject {k!r}: expected [English name, Chinese name, category]")
    return m


def load_benchmark(name: str, data_dir: str | Path, split: str | None = None,
                   subjects: list[str] | None = None, subject_map: dict | None = None) -> Benchmark:
    """Read a benchmark folder. `subjects` limits it to those names (unknown names are an error).
    Names and categories come from the built-in map, overridden by a `subject_mapping.json` in the
    folder (C-Eval's format) and then by `subject_map` (same format)."""
    if name not in SPECS:
        raise GebError(f"unknown benchmark {name!r} (choose from: {', '.join(SPECS)})")
    spec = SPECS[name]
    root = _find_root(spec, Path(data_dir))
    split = split or spec.eval_split
    if name == "ceval" and split == "test":
        raise GebError("C-Eval's test answers are hidden: score the 'val' split (the default)")
    eval_files = _split_files(spec, root, split)
    dev_files = _split_files(spec, root, "dev")
    if not eval_files:
        raise GebError(f"{root / split}: no {spec.title} files for split '{split}' ({layout_help(name)})")
    chosen = sorted(eval_files)
    if subjects:
        unknown = [s for s in subjects if s not in eval_files]
        if unknown:
            raise GebError(f"{root / split}: no file for subject(s) {', '.join(unknown)} "
                           f"(available: {', '.join(chosen[:8])}{' ...' if len(chosen) > 8 else ''})")
        chosen = [s for s in chosen if s in set(subjects)]
    maps = subject_maps()[name]
    extra = {}
    for cand in (root / "subject_mapping.json", root.parent / "subject_mapping.json"):
        if cand.is_file():
            extra.update(read_subject_mapping(cand))
            break
    extra.update(subject_map or {})
    categories = {k: tuple(v) for k, v in maps["categories"].items()}
    skipped: list[str] = []
    out: list[Subject] = []
    empty: list[str] = []
    used: list[Path] = []
    for s in chosen:
        en, zh, cats, known = subject_info(name, s, extra)
        for c in cats:
            categories.setdefault(c, (c, c))
        subj = Subject(s, en, zh, cats, known=known)
        subj.items = read_rows(spec, eval_files[s], skipped)
        used.append(eval_files[s])
        if s in dev_files:
            subj.dev = read_rows(spec, dev_files[s], skipped)
            used.append(dev_files[s])
        if not subj.items:
            empty.append(s)
            continue
        out.append(subj)
    if not out:
        raise GebError(f"{root}: no valid {spec.title} items in split '{split}' "
                       f"({len(skipped)} malformed row(s); first: {skipped[0] if skipped else 'none'})")
    return Benchmark(spec, root, split, out, categories, skipped, empty, _hash_files(used))
