"""The whole data pipeline on a small mixed folder: bad input, dedup with known answers, packing, resume."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("jieba")

from geb.data.pipeline import iter_docs, pack_text, run_pipeline  # noqa: E402
from geb.errors import GebError  # noqa: E402

BOILER = "本文由环球新闻社独家发布，未经许可不得转载或者引用全文的任何内容。"
SHARED = ("The committee met on a cold morning in early spring. Every member had read the long report twice. "
          "Nobody expected the vote to be so close.")
A = ("<p>北京是中华人民共和国的首都，也是全国的政治和文化中心。这座城市有三千多年的历史，留下了许多名胜古迹。</p>"
     "<p>如需合作请联系 editor@news.cn 或拨打13812345678。</p>\n这一行没有结尾\n版权所有 © 2024 环球新闻网\n" + BOILER)
B = ("Python is a popular language for data work, and many people learn it as their first language.\n"
     "The docs are at https://docs.python.org/3/ for everyone.\n"
     "Fetch a page with `requests.get('https://example.com/api')` in one line.")
C = ("熊猫是中国特有的动物，主要生活在四川、陕西和甘肃的山区里。它们每天要花十几个小时吃竹子，"
     "成年熊猫一天能吃掉几十公斤的竹子。大熊猫的数量在过去几十年里有了明显的增长，这是保护工作的成果。\n" + BOILER)
D = ("The river starts high in the mountains and runs for more than two thousand kilometres before it reaches "
     "the sea. Farmers along its banks have used its water for centuries, and several large cities grew up "
     "where boats could stop to trade goods. In the summer the river is wide and slow, but in the spring it "
     "can flood the fields after the snow melts in the hills.")
E = D.replace("several large cities", "several big cities")  # a near-duplicate of D in another dataset
F = ("春天来了，公园里的花都开了，很多人带着孩子来散步。湖边的柳树发出了新芽，小鸟在树枝上唱歌。"
     "老人们在亭子里下棋，年轻人在草地上放风筝，到处都是欢声笑语。\n" + BOILER)
H = ("Our town library opened a new reading room last month for students who need a quiet place. " + SHARED +
     " The room stays open until nine in the evening on weekdays and the staff are very helpful.")
J = ("The city council published its yearly budget and most of the money goes to schools and roads. " + SHARED +
     " After the meeting the mayor answered questions from local reporters for about an hour.")
I_ = ("长江是中国最长的河流，全长六千三百多公里，流经十一个省、自治区和直辖市。长江流域的人口很多，"
      "经济也很发达，沿岸有上海、武汉和重庆等大城市。")
G = "这一段里有坏掉的字节 \xff\xfe 它们会被删掉，这一行留下。\n但是这一行是好的，它讲的是一件普通的事情，结尾也完整。"


def _huge() -> str:
    zh = "。".join(f"第{i}位同学在{i % 7 + 1}月份读完了{i % 13 + 2}本关于{['历史', '地理', '天文', '数学', '音乐'][i % 5]}的书" for i in range(400))
    return zh + "。"


def make_raw(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (root / "web").mkdir(parents=True)
    (root / "books").mkdir()
    lines = [json.dumps({"id": "A", "text": A}, ensure_ascii=False), json.dumps({"id": "B", "text": B}),
             '{"text": "broken', json.dumps({"text": "   "}), json.dumps({"content": "no text field"}),
             json.dumps({"text": 5}), json.dumps({"id": "C-copy", "text": C}, ensure_ascii=False)]
    # with a UTF-8 byte-order mark, as Windows editors write it
    (root / "web" / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8"))
    with gzip.open(root / "web" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "C", "text": C}, ensure_ascii=False) + "\n" + json.dumps({"id": "D", "text": D}) + "\n")
    txt = (E + "\n\n" + F + "\n\n").encode() + G.encode("utf-8").replace("\xff\xfe".encode(), b"\xff\xfe")
    (root / "books" / "c.txt").write_bytes(txt)
    zst = (json.dumps({"id": "H", "text": H}) + "\n" + json.dumps({"id": "big", "text": _huge()}, ensure_ascii=False) + "\n")
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst.encode()))
    pq.write_table(pa.table({"id": ["I", "nul", "J"], "text": [I_, None, J]}), root / "e.parquet")
    (root / "notes.csv").write_text("a,b\n1,2\n")


SETS = ["read.max_doc_chars=3000"]
OVERRIDES = {"read": {"max_doc_chars": 3000}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    from tests.conftest import run_geb

    base = tmp_path_factory.mktemp("data")
    raw, out, tok = base / "raw", base / "out", base / "tok"
    make_raw(raw)
    tokenizer.save(tok)
    p = run_geb("data", "run", "--input", raw, "--output", out, "--tokenizer", tok, *sum((["--set", s] for s in SETS), []))
    report = json.loads((out / "report.json").read_text())
    docs = dict(iter_docs(out / "text"))
    return {"raw": raw, "out": out, "tok": tok, "report": report, "docs": docs, "stdout": p.stdout, "base": base}


def test_bad_input_is_counted_with_file_and_line(run):
    cases = {(e["file"], e["line"], e["reason"].split(" (")[0], e["kept"]) for e in run["report"]["input"]["bad_input_examples"]}
    assert ("web/a.jsonl", 3, "invalid JSON", False) in cases
    assert ("web/a.jsonl", 4, "empty document", False) in cases
    assert ("web/a.jsonl", 5, "missing field 'text'", False) in cases
    assert ("web/a.jsonl", 6, "field 'text' is not a string", False) in cases
    assert ("books/c.txt", 6, "invalid UTF-8", True) in cases
    assert ("d.jsonl.zst", 2, "huge document", True) in cases
    assert ("e.parquet", 2, "missing field 'text'", False) in cases
    assert ("notes.csv", None, "unsupported file type", False) in cases
    md = (run["out"] / "report.md").read_text()
    assert "`web/a.jsonl:3` invalid JSON" in md and "(kept)" in md


def test_every_document_is_accounted_for(run):
    r = run["report"]
    steps = r["steps"]
    assert steps[0]["docs_in"] == r["input"]["documents"]
    for a, b in zip(steps, steps[1:]):
        assert a["docs_out"] == b["docs_in"] and a["chars_out"] == b["chars_in"], (a["step"], b["step"])
    assert steps[-1]["docs_out"] == r["output"]["documents"] == len(run["docs"])
    # 12 good records, the huge one split into parts
    parts = r["input"]["documents"] - 12
    assert parts >= 2


def test_cleaning_shows_in_the_output(run):
    docs = run["docs"]
    a = docs["A"]
    assert "<p>" not in a and "editor@" not in a and "13812345678" not in a
    assert "<EMAIL>" in a and "<PHONE>" in a and "这一行没有结尾" not in a and "版权所有" not in a
    assert "<URL>" in docs["B"] and "`requests.get('https://example.com/api')`" in docs["B"]
    g = [t for t in docs.values() if "但是这一行是好的" in t]
    assert len(g) == 1 and "坏掉的字节  它们会被删掉" in g[0] and "\ufffd" not in g[0]


def test_exact_and_near_duplicates_removed_with_known_answers(run):
    texts = list(run["docs"].values())
    ids = set(run["docs"])
    assert sum("熊猫是中国特有的动物" in t for t in texts) == 1            # exact copy across files
    assert sum("The river starts high" in t for t in texts) == 1          # near-duplicate across datasets
    assert len(ids & {"C", "C-copy"}) == 1
    assert sum(BOILER in t for t in texts) == 1                            # repeated paragraph across docs
    assert sum("Every member had read the long report twice." in t for t in texts) == 1  # 3-sentence span
    assert "H" in ids and "J" in ids and "last month" in run["docs"]["H"] and "yearly budget" in run["docs"]["J"]
    assert {"A", "B", "I"} <= ids  # distinct documents all survive
    steps = {s["step"]: s for s in run["report"]["steps"]}
    assert steps["minhash"]["docs_removed"] == 2
    assert steps["para_dedup"]["reasons"]["documents with repeated spans"] == 2
    assert steps["sent_dedup"]["reasons"]["documents with repeated spans"] == 1


def test_packing_round_trip(run, tokenizer, tmp_path):
    from geb.data.tokens import TokenData

    held = ["A held-out sentence.", "一句留出的话。"]  # the quickstart passes its own validation texts
    own = TokenData(pack_text(run["out"] / "text", run["tok"], tmp_path / "own", val_texts=held) and tmp_path / "own")
    assert list(own.documents("val")) == [tokenizer.encode(t) for t in held]
    assert len(list(own.documents("train"))) == len(run["docs"])

    td = TokenData(run["out"] / "tokens", verify=True)
    assert set(td.splits()) == {"train", "val"}  # the split names `geb pretrain` reads
    packed = [d for sp in ("train", "val") for d in td.documents(sp)]
    assert sorted(map(tuple, packed)) == sorted(tuple(tokenizer.encode(t, allow_special=False)) for t in run["docs"].values())
    assert sorted(tokenizer.decode(d) for d in packed) == sorted(run["docs"].values())
    assert td.meta["tokenizer_hash"] == tokenizer.hash()
    assert 1 <= td.meta["documents"]["val"] < td.meta["documents"]["train"]


def test_report_files_and_provenance(run):
    out = run["out"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "config.json").read_text())
    meta = json.loads((out / "text" / "meta.json").read_text())
    assert cfg["parent"] == str(run["raw"].resolve()) and cfg["text_hash"] == meta["data_hash"]
    assert cfg["settings"]["read"]["max_doc_chars"] == 3000
    assert "kept" in run["stdout"] and "report" in run["stdout"]


def test_report_times_every_rule_and_step(run):
    r = run["report"]
    steps = r["timing"]["steps"]
    rules = [s["step"] for s in r["steps"]]
    # every enabled rule, the reader, the writers and each dedup step, in pipeline order
    assert [k for k in steps if k in rules] == [x for x in rules if x not in ("minhash", "para_dedup", "sent_dedup")]
    for k in ("read", "write clean", "minhash signatures", "minhash buckets", "minhash cluster", "minhash filter",
              "para_dedup find", "sent_dedup filter"):
        assert k in steps, k
    assert all(v >= 0 for v in steps.values())
    assert steps["read"] > 0 and steps["minhash signatures"] > 0  # real work is measured, not a placeholder
    for s in r["steps"]:
        if s["stage"] != "dedup":
            assert s["seconds"] == steps[s["step"]]
    mh = next(s for s in r["steps"] if s["step"] == "minhash")
    assert mh["seconds"] == round(sum(v for k, v in steps.items() if k.startswith("minhash ")), 3)
    md = (run["out"] / "report.md").read_text()
    assert "| minhash signatures |" in md and "| incomplete_lines |" in md


def test_rerun_resumes_and_settings_change_is_refused(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    before = json.loads((out / "text" / "meta.json").read_text())["data_hash"]
    clean_stats = out / "work" / "stats" / "html" / "00000.json"
    mtime = clean_stats.stat().st_mtime_ns
    # interrupt the last stage: its completion markers and output gone, the published text gone
    shutil.rmtree(out / "work" / "logs" / "sent_dedup_filter")
    shutil.rmtree(out / "work" / "sent_dedup" / "out")
    shutil.rmtree(out / "text")
    report = run_pipeline(run["raw"], out, overrides=OVERRIDES)
    assert json.loads((out / "text" / "meta.json").read_text())["data_hash"] == before
    assert clean_stats.stat().st_mtime_ns == mtime  # finished stages were not run again
    assert report["output"]["documents"] == run["report"]["output"]["documents"]
    with pytest.raises(GebError, match="other inputs or settings"):
        run_pipeline(run["raw"], out, overrides={"rules": {"t2s": {"enabled": True}}})


def test_interrupted_packing_leaves_nothing_that_looks_finished(run, tmp_path, monkeypatch):
    from geb.data import tokens

    real_add, calls = tokens.TokenWriter.add, []

    def failing_add(self, ids, split="train"):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        real_add(self, ids, split)

    monkeypatch.setattr(tokens.TokenWriter, "add", failing_add)
    dest = tmp_path / "tokens"
    with pytest.raises(KeyboardInterrupt):
        pack_text(run["out"] / "text", run["tok"], dest)
    assert not dest.exists() and not list(tmp_path.glob("**/meta.json"))
    monkeypatch.setattr(tokens.TokenWriter, "add", real_add)
    meta = pack_text(run["out"] / "text", run["tok"], dest)
    assert meta["data_hash"] == json.loads((run["out"] / "tokens" / "meta.json").read_text())["data_hash"]


def _lines_hash(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.jsonl")):
        with open(f, "rb") as g:
            for line in g:
                h.update(line)
    return h.hexdigest()[:16]


def test_two_workers_give_the_same_cleaning(run, tmp_path):
    """Worker processes (datatrove's local executor pool) clean exactly what one process does."""
    off = {"rules": {"minhash": False, "para_dedup": False, "sent_dedup": False}, **OVERRIDES}
    run_pipeline(run["raw"], tmp_path / "w2", workers=2, overrides=off)
    a = json.loads((tmp_path / "w2" / "text" / "meta.json").read_text())
    assert a["data_hash"] == _lines_hash(run["out"] / "work" / "clean")
    assert a["documents"] == run["report"]["steps"][[s["step"] for s in run["report"]["steps"]].index("minhash")]["docs_in"]


def test_empty_input_folder_is_reported_not_a_crash(tmp_path, geb_cli):
    (tmp_path / "raw").mkdir()
    p = geb_cli("data", "run", "--input", tmp_path / "raw", "--output", tmp_path / "out", check=False)
    assert p.returncode == 2 and "no documents left" in p.stderr and "Traceback" not in p.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["input"]["files"] == 0 and rep["output"]["documents"] == 0
    assert "no files" in (tmp_path / "out" / "report.md").read_text()


def test_slurm_executors_produce_the_same_text(run, tmp_path, monkeypatch):
    """The Slurm path end to end with a stand-in sbatch: submit, run each array task, finish locally."""
    import dill

    from geb.data.pipeline import submit_slurm

    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("sbatch", "echo Submitted batch job 42"), ("scontrol", "echo localhost")):
        f = bindir / name
        f.write_text(f"#!/bin/sh\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "slurm"
    execs = submit_slurm(run["raw"], out, overrides=OVERRIDES, partition="cpu", time="01:00:00",
                         with_srun=False, slurm_logs_folder=str(tmp_path / "slurm_logs"))
    assert all((Path(e.logging_dir.path) / "launch_script.slurm").is_file() for e in execs)
    monkeypatch.setenv("SLURM_NODELIST", "localhost")
    for e in execs:  # what each array task runs: launch_pickled_pipeline <executor.pik>
        with open(Path(e.logging_dir.path) / "executor.pik", "rb") as f:
            pickled = dill.load(f)
        for i in range(pickled.tasks):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
            pickled.run()
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    run_pipeline(run["raw"], out, overrides=OVERRIDES)  # every task done: publish + report only
    a = json.loads((out / "text" / "meta.json").read_text())
    b = json.loads((run["out"] / "text" / "meta.json").read_text())
    assert a["data_hash"] == b["data_hash"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_ray_executor_gives_the_local_text(run, tmp_path):
    """`geb data run --executor ray` on a local 2-CPU Ray cluster: same published text as the local run."""
    ray = pytest.importorskip("ray")
    from tests.conftest import run_geb

    out = tmp_path / "ray"
    ray.shutdown()  # the CLI starts its own local cluster in its own process
    p = run_geb("data", "run", "--input", run["raw"], "--output", out, "--executor", "ray", "--workers", "2",
                *sum((["--set", s] for s in SETS), []))
    assert "kept" in p.stdout
    local = json.loads((run["out"] / "text" / "meta.json").read_text())
    remote = json.loads((out / "text" / "meta.json").read_text())
    assert remote["data_hash"] == local["data_hash"] and remote["documents"] == local["documents"]
    # the stages ran under Ray: the executor config each stage left has the Ray executor's resource fields
    # (the local pass that publishes found every task complete and did not rewrite it)
    for stage in ("clean", "minhash_buckets", "sent_dedup_filter"):
        cfg = json.loads((out / "work" / "logs" / stage / "executor.json").read_text())
        assert cfg.get("mem_per_cpu_gb") == 1.0 and cfg.get("cpus_per_task") == 1, stage
