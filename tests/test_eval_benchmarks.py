"""Benchmark readers and subject maps: official layouts, malformed rows, real MMLU/CMMLU files."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest

from geb.errors import GebError
from geb.eval.benchmarks import load_benchmark, subject_maps

_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (a worktree one level deeper also finds it)
SHARED = next((p / "shared" / "data" for p in (_ROOT.parent, _ROOT.parent.parent) if (p / "shared").is_dir()),
              _ROOT.parent / "shared" / "data")


def write_csv(path: Path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]


def test_subject_maps_match_the_papers_category_sizes():
    m = subject_maps()
    counts = {b: Counter(c for v in m[b]["subjects"].values() for c in v[2]) for b in ("mmlu", "ceval", "cmmlu")}
    assert len(m["mmlu"]["subjects"]) == 57
    assert counts["mmlu"] == {"STEM": 18, "Humanities": 13, "Social Sciences": 12, "Other": 14}
    assert len(m["ceval"]["subjects"]) == 52
    assert counts["ceval"] == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    assert len(m["cmmlu"]["subjects"]) == 67
    assert counts["cmmlu"]["China specific"] == 15
    # every CMMLU subject sits in exactly one of the four main categories
    main = {"STEM", "Humanities", "Social Science", "Other"}
    assert all(len(set(v[2]) & main) == 1 for v in m["cmmlu"]["subjects"].values())
    for b in ("mmlu", "ceval", "cmmlu"):
        for name, (en, zh, cats) in m[b]["subjects"].items():
            assert en and re.search(r"[\u4e00-\u9fff]", zh), (b, name)
            assert set(cats) <= set(m[b]["categories"]), (b, name)


@pytest.mark.skipif(not (SHARED / "mmlu").is_dir(), reason="shared MMLU copy absent")
def test_real_mmlu_files_parse_and_match_the_map():
    b = load_benchmark("mmlu", SHARED / "mmlu")
    assert {s.name for s in b.subjects} == set(subject_maps()["mmlu"]["subjects"])
    assert sum(len(s.dev) for s in b.subjects) == 57 * 5
    assert not b.skipped and not b.empty_subjects
    # an early release: about 14,079 test rows (the final one has 14,042)
    assert 14_000 <= sum(len(s.items) for s in b.subjects) <= 14_100
    # multi-line quoted fields stay inside one item
    assert any("\n" in it.question for s in b.subjects for it in s.items)


@pytest.mark.skipif(not (SHARED / "cmmlu").is_dir(), reason="shared CMMLU copy absent")
def test_real_cmmlu_files_parse_and_match_the_map():
    b = load_benchmark("cmmlu", SHARED / "cmmlu")
    assert {s.name for s in b.subjects} == set(subject_maps()["cmmlu"]["subjects"])
    assert sum(len(s.dev) for s in b.subjects) == 67 * 5
    assert sum(len(s.items) for s in b.subjects) == 11_582 and not b.skipped  # CMMLU v1 test split
    agr = next(s for s in b.subjects if s.name == "agronomy")
    assert agr.zh == "农学" and agr.categories == ["Other"]
    assert agr.items[0].answer in "ABCD" and agr.items[0].id == "agronomy.csv:2"


def test_ceval_reader_skips_and_reports_malformed_rows(tmp_path):
    good = ["1", "1+1=?", "1", "2", "3", "4", "B", ""]
    write_csv(tmp_path / "val" / "law_val.csv", [
        good,
        ["2", "Missing C", "x", "y", "", "z", "A", ""],
        ["3", "Bad answer", "x", "y", "w", "z", "E", ""],
        ["4", "Too short", "x", "y"],
        ["5", "", "x", "y", "w", "z", "A", ""],
        ["6", "多行\n问题", "甲", "乙", "丙", "丁", " c ", ""],
    ], CEVAL_HEADER)
    write_csv(tmp_path / "val" / "logic_val.csv", [], CEVAL_HEADER)  # an empty subject
    write_csv(tmp_path / "dev" / "law_dev.csv", [good], CEVAL_HEADER)
    b = load_benchmark("ceval", tmp_path)
    assert [s.name for s in b.subjects] == ["law"]
    law = b.subjects[0]
    assert [it.answer for it in law.items] == ["B", "C"]
    assert law.items[1].question == "多行\n问题" and law.items[1].id == "law_val.csv:7"
    assert law.zh == "法学" and law.categories == ["Humanities"] and len(law.dev) == 1
    assert b.empty_subjects == ["logic"]
    reasons = "\n".join(b.skipped)
    assert "law_val.csv:3: missing option C" in reasons
    assert "law_val.csv:4: answer 'E'" in reasons
    assert "law_val.csv:5: expected question" in reasons
    assert "law_val.csv:6: empty question" in reasons
    assert len(b.skipped) == 4


def test_unknown_subject_is_kept_under_other(tmp_path):
    write_csv(tmp_path / "val" / "geb_facts_val.csv", [["0", "q", "a", "b", "c", "d", "A", ""]], CEVAL_HEADER)
    b = load_benchmark("ceval", tmp_path)
    s = b.subjects[0]
    assert s.name == "geb_facts" and s.categories == ["Other"] and not s.known


def test_subject_mapping_file_and_argument(tmp_path):
    import json

    write_csv(tmp_path / "val" / "geb_facts_val.csv", [["0", "q", "a", "b", "c", "d", "A", ""]], CEVAL_HEADER)
    write_csv(tmp_path / "val" / "law_val.csv", [["0", "q", "a", "b", "c", "d", "A", ""]], CEVAL_HEADER)
    (tmp_path / "subject_mapping.json").write_text(json.dumps({"geb_facts": ["GEB Facts", "事实", "STEM"]}))
    b = load_benchmark("ceval", tmp_path)
    facts = next(s for s in b.subjects if s.name == "geb_facts")
    assert (facts.en, facts.zh, facts.categories, facts.known) == ("GEB Facts", "事实", ["STEM"], True)
    b = load_benchmark("ceval", tmp_path, subject_map={"law": ["Law!", "法", ["Other"]]})
    assert next(s for s in b.subjects if s.name == "law").categories == ["Other"]
    (tmp_path / "subject_mapping.json").write_text(json.dumps({"geb_facts": "STEM"}))
    with pytest.raises(GebError, match="subject_mapping.json: subject 'geb_facts'"):
        load_benchmark("ceval", tmp_path)


def test_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(GebError, match="not found"):
        load_benchmark("ceval", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GebError, match="official C-Eval layout"):
        load_benchmark("ceval", tmp_path / "empty")
    write_csv(tmp_path / "cm" / "test" / "arts.csv", [["0", "q", "a", "b", "c", "d", "A"]], ["x", "y"])
    with pytest.raises(GebError, match=r"arts.csv:1: header"):
        load_benchmark("cmmlu", tmp_path / "cm")
    write_csv(tmp_path / "ce" / "val" / "law_val.csv", [["0", "q", "a", "b", "c", "d", "A", ""]], CEVAL_HEADER)
    with pytest.raises(GebError, match="test answers are hidden"):
        load_benchmark("ceval", tmp_path / "ce", split="test")
    with pytest.raises(GebError, match="no file for subject"):
        load_benchmark("ceval", tmp_path / "ce", subjects=["physics"])
    write_csv(tmp_path / "bad" / "val" / "law_val.csv", [["0", "q", "a", "b", "c", "d", "Z", ""]], CEVAL_HEADER)
    with pytest.raises(GebError, match="no valid C-Eval items"):
        load_benchmark("ceval", tmp_path / "bad")
    with pytest.raises(GebError, match="unknown benchmark"):
        load_benchmark("gsm8k", tmp_path)
