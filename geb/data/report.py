"""The data pipeline's report: per stage and rule, documents and characters in/out, examples, bad input.

Merges the per-task files the steps wrote (work/stats/<step>/<rank>.json, work/rejects/<rank>.jsonl,
work/removed/<step>/*.jsonl.gz) and writes report.json, report.md and report.png (a bar chart of
documents and characters removed per step) into the output folder.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

from geb.common import atomic_write, atomic_write_json, atomic_write_text
from geb.data import settings as S
from geb.data.metering import snippet

MAX_REJECT_EXAMPLES = 20
MAX_EXAMPLES = 5


def _load(folder: Path, pattern: str) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(folder.glob(pattern))] if folder.is_dir() else []


def _rule_row(L, name: str, stage: str) -> dict:
    parts = _load(L.stats / name, "[0-9]*[0-9].json")
    row = {"step": name, "stage": stage, "docs_in": 0, "docs_out": 0, "chars_in": 0, "chars_out": 0,
           "seconds": 0.0, "reasons": Counter(), "examples": []}
    for p in parts:
        for k in ("docs_in", "docs_out", "chars_in", "chars_out"):
            row[k] += p[k]
        row["seconds"] += p.get("seconds", 0.0)
        row["reasons"].update(p["reasons"])
        row["examples"].extend(p["examples"][: max(0, MAX_EXAMPLES - len(row["examples"]))])
    return row


def _dedup_row(L, name: str) -> dict:
    ins, outs = _load(L.stats / name, "*.in.json"), _load(L.stats / name, "*.out.json")
    row = {"step": name, "stage": "dedup", "docs_in": sum(p["docs"] for p in ins), "docs_out": sum(p["docs"] for p in outs),
           "chars_in": sum(p["chars"] for p in ins), "chars_out": sum(p["chars"] for p in outs),
           "reasons": Counter(), "examples": []}
    folder = L.removed / name
    n_removed = 0
    for f in sorted(folder.glob("*.jsonl.gz")) if folder.is_dir() else []:
        with gzip.open(f, "rt", encoding="utf-8") as g:
            for line in g:
                n_removed += 1
                if len(row["examples"]) < MAX_EXAMPLES:
                    d = json.loads(line)
                    m = d.get("metadata", {})
                    text = d["text"]
                    if ">>>" in text:  # sentence dedup marks the dropped spans >>> ... <<<
                        a = text.index(">>>")
                        b = text.find("<<<", a)
                        text = text[a + 3: b if b > 0 else None]
                    row["examples"].append({"id": d.get("id"), "source": f"{m.get('source', '?')}:{m.get('line', '?')}",
                                            "reason": "duplicate", "removed": snippet(text)})
    dropped = row["docs_in"] - row["docs_out"]
    if name == "minhash":
        row["reasons"]["near-duplicate document"] = dropped
    else:
        row["reasons"]["documents with repeated spans"] = n_removed
        if dropped:
            row["reasons"]["documents left too short"] = dropped
    return row


def step_seconds(L, stages, steps: list[dict]) -> dict:
    """Seconds of each step's own work summed over tasks, in pipeline order: rules from their rows,
    readers, writers and datatrove's dedup steps from the Timed wrappers' files."""
    from geb.data.metering import MeteredStep, Timed

    rows = {r["step"]: r for r in steps}
    out = {}
    for st in stages:
        for step in st.pipeline:
            if isinstance(step, Timed):
                out[step.label] = round(sum(p["seconds"] for p in _load(L.stats / "timing" / step.label, "*.json")), 3)
            elif isinstance(step, MeteredStep) and step.name in rows:
                out[step.name] = round(rows[step.name]["seconds"], 3)
    return out


def build_report(L, settings: dict, files: list[str], stages, times: dict, elapsed: float, text_meta: dict,
                 packed: dict | None) -> dict:
    rules = settings["rules"]
    reads = _load(L.stats / "read", "*.json")
    reject_counts: Counter = Counter()
    for p in reads:
        reject_counts.update(p["rejects"])
    reject_examples = []
    for f in sorted(L.rejects.glob("*.jsonl")) if L.rejects.is_dir() else []:
        for line in f.read_text(encoding="utf-8").splitlines():
            if len(reject_examples) >= MAX_REJECT_EXAMPLES:
                break
            reject_examples.append(json.loads(line))
    docs_read = sum(p["docs_out"] for p in reads)
    chars_read = sum(p["chars_out"] for p in reads)

    steps = []
    for name, cls in S.rule_classes().items():
        if rules[name]["enabled"]:
            steps.append(_rule_row(L, name, cls.stage))
    for name in S.DEDUP_RULES:
        if rules[name]["enabled"]:
            steps.append(_dedup_row(L, name))
    for r in steps:
        r["docs_removed"] = r["docs_in"] - r["docs_out"]
        r["chars_removed"] = r["chars_in"] - r["chars_out"]
        r["reasons"] = dict(r["reasons"])
        if "seconds" in r:
            r["seconds"] = round(r["seconds"], 3)
    seconds = step_seconds(L, stages, steps)
    for r in steps:
        if r["stage"] == "dedup":  # a dedup rule's time: its signature, bucket/find, cluster and filter steps
            r["seconds"] = round(sum(v for k, v in seconds.items() if k.startswith(f"{r['step']} ")), 3)
    mb = chars_read / 1e6
    report = {
        "input": {"files": len(files), "documents": docs_read, "chars": chars_read,
                  "bad_input": dict(reject_counts), "bad_input_examples": reject_examples},
        "steps": steps,
        "output": {"documents": text_meta["documents"], "chars": text_meta["chars"], "text": str(L.text),
                   "tokens": str(L.tokens) if packed else None,
                   "token_counts": ({sp: sum(s["tokens"] for s in sh) for sp, sh in packed["shards"].items()}
                                    if packed else None),
                   "token_documents": packed["documents"] if packed else None},
        "timing": {"seconds": round(elapsed, 3), "stages": {k: round(v, 3) for k, v in times.items()},
                   "steps": seconds,
                   "docs_per_s": round(docs_read / elapsed, 1) if elapsed > 0 else None,
                   "mchars_per_s": round(mb / elapsed, 3) if elapsed > 0 else None},
        "settings": settings,
    }
    if not files:
        report["input"]["note"] = "the input folder holds no files"
    atomic_write_json(L.out / "report.json", report)
    chart = _chart(steps, L.out / "report.png")
    atomic_write_text(L.out / "report.md", _markdown(report, chart))
    return report


def _chart(steps: list[dict], path: Path) -> str | None:
    """Two horizontal bar panels (documents and characters removed per step) drawn with Pillow.

    Pillow (a requirement of matplotlib, so installed with geb) draws it in a fraction of a second;
    matplotlib's import and layout took over a second, a fixed cost of every run that no worker shares."""
    if not steps:
        return None
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    row, top, width = 26, 40, 1100
    names = [s["step"] for s in steps]
    img = Image.new("RGB", (width, top + row * len(steps) + 20), "white")
    draw = ImageDraw.Draw(img)
    label_w = max(draw.textlength(n, font=font) for n in names) + 12
    panel = width // 2
    for p, (key, title) in enumerate((("docs_removed", "documents removed"), ("chars_removed", "characters removed"))):
        x0 = p * panel + label_w
        span = panel - label_w - 90  # room after the longest bar for its value
        vals = [s[key] for s in steps]
        top_val = max(max(vals), 1)
        draw.text((p * panel + panel // 2, 12), title, fill="black", font=font, anchor="mt")
        for i, (name, v) in enumerate(zip(names, vals)):
            y = top + i * row
            draw.text((x0 - 6, y + row // 2), name, fill="black", font=font, anchor="rm")
            end = x0 + max(0, v) / top_val * span
            draw.rectangle((x0, y + 4, max(x0 + 1, end), y + row - 4), fill="#4c72b0")
            draw.text((end + 4, y + row // 2), f"{v:,}", fill="black", font=font, anchor="lm")
        draw.line((x0, top - 4, x0, top + row * len(steps)), fill="black")
    atomic_write(path, lambda p: img.save(p, format="PNG"))
    return path.name


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def _markdown(r: dict, chart: str | None) -> str:
    inp, out = r["input"], r["output"]
    md = ["# Data pipeline report", "",
          f"Input: {inp['files']} file(s), {inp['documents']:,} documents, {inp['chars']:,} characters. "
          f"Output: {out['documents']:,} documents ({_pct(out['documents'], inp['documents'])}), "
          f"{out['chars']:,} characters ({_pct(out['chars'], inp['chars'])}) in `{out['text']}`."]
    if inp.get("note"):
        md += ["", f"**{inp['note']}.**"]
    if out["tokens"]:
        md += ["", f"Packed tokens in `{out['tokens']}`: " + ", ".join(f"{k} {v:,} tokens ({out['token_documents'].get(k, 0):,} docs)"
                                                          for k, v in out["token_counts"].items()) + "."]
    md += ["", "## Bad input", ""]
    if inp["bad_input"]:
        md += ["| problem | count |", "|---|---:|"] + [f"| {k} | {v:,} |" for k, v in sorted(inp["bad_input"].items())]
        md += ["", "First cases (file:line, kept = the document went on):", ""]
        md += [f"- `{e['file']}:{e['line'] if e['line'] is not None else '-'}` {e['reason']}{' (kept)' if e['kept'] else ''}"
               for e in inp["bad_input_examples"]]
    else:
        md += ["None."]
    md += ["", "## Steps", "", "| step | stage | docs in | docs out | docs removed | chars in | chars out | chars removed |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in r["steps"]:
        md.append(f"| {s['step']} | {s['stage']} | {s['docs_in']:,} | {s['docs_out']:,} | {s['docs_removed']:,} "
                  f"({_pct(s['docs_removed'], s['docs_in'])}) | {s['chars_in']:,} | {s['chars_out']:,} | "
                  f"{s['chars_removed']:,} ({_pct(s['chars_removed'], s['chars_in'])}) |")
    if chart:
        md += ["", f"![removed per step]({chart})"]
    md += ["", "## What each step removed", ""]
    for s in r["steps"]:
        if not s["reasons"] and not s["examples"]:
            continue
        reasons = ", ".join(f"{k}: {v:,}" for k, v in s["reasons"].items())
        md += [f"### {s['step']}", "", f"Counts: {reasons or '-'}", ""]
        for e in s["examples"]:
            txt = e["removed"].replace("\n", " ⏎ ").replace("|", "\\|")
            md.append(f"- `{e['source']}` ({e['reason']}): {txt}")
        md.append("")
    t = r["timing"]
    md += ["## Timing", "", f"{t['seconds']} s in all; {t['docs_per_s']} docs/s, {t['mchars_per_s']} M chars/s.", ""]
    md += ["| stage | seconds |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in t["stages"].items()]
    if t.get("steps"):
        total = sum(t["steps"].values()) or 1
        md += ["", "Time in each step's own work (summed over tasks; rules, readers, writers, dedup steps):", "",
               "| step | seconds | share |", "|---|---:|---:|"]
        md += [f"| {k} | {v} | {_pct(v, total)} |" for k, v in t["steps"].items()]
    md += ["", "Settings are in report.json (`settings`) and config.json."]
    return "\n".join(md) + "\n"
