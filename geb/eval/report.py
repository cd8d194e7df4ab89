"""Tables and charts for evaluation runs: one run's Markdown, side-by-side comparison, category bars.

Accuracies are shown as percentages with two decimals, the way the GEB paper and the C-Eval/CMMLU
leaderboards print them. Charts are drawn on a matplotlib `Figure` with the Agg canvas directly, so
nothing touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import json
from pathlib import Path

from geb.common import atomic_write, atomic_write_text
from geb.errors import GebError


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def load_run(path) -> dict:
    """A run folder (with results.json) or a results.json file."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise GebError(f"{path}: no results.json (not an evaluation run)")
    try:
        r = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GebError(f"{f}: not valid JSON ({e})") from None
    for k in ("benchmark", "protocol", "categories", "overall", "model"):
        if k not in r:
            raise GebError(f"{f}: field '{k}' missing (not a `geb eval mcq` result)")
    return r


def _labels(runs: list[dict]) -> list[str]:
    """Model names, made unique by protocol/shots/split where names repeat."""
    base = [r["model"]["name"] for r in runs]
    out = []
    for r, b in zip(runs, base):
        same = [x for x, y in zip(runs, base) if y == b and x["benchmark"] == r["benchmark"]]
        if len(same) > 1:
            b = f"{b} ({r['protocol']}, {r['shots']}-shot)"
        out.append(b)
    return out


def _category_order(runs: list[dict]) -> list[str]:
    cats: list[str] = []
    for r in runs:
        for c in r["categories"]:
            if c not in cats:
                cats.append(c)
    return cats


def category_table(runs: list[dict], labels: list[str] | None = None) -> str:
    """Rows = runs, columns = categories + Average (micro, the headline) + macro + items."""
    labels = labels or _labels(runs)
    cats = _category_order(runs)
    head = "| Model | " + " | ".join(cats) + " | Average | Macro avg | Items |"
    sep = "|---|" + "---:|" * (len(cats) + 3)
    lines = [head, sep]
    for r, lab in zip(runs, labels):
        cells = [pct(r["categories"].get(c, {}).get("micro")) for c in cats]
        lines.append(f"| {lab} | " + " | ".join(cells) +
                     f" | {pct(r['overall']['micro'])} | {pct(r['overall']['macro'])} | {r['overall']['n']} |")
    return "\n".join(lines) + "\n"


def run_markdown(r: dict) -> str:
    title = f"{r['model']['name']} on {r['benchmark_title']} ({r['split']})"
    out = [f"# {title}\n",
           f"Protocol `{r['protocol']}`, {r['shots']}-shot{', chat' if r.get('chat') else ''}; "
           f"{r['overall']['n']} items in {r['data']['subjects']} subjects; data hash `{r['data']['hash']}`; "
           f"{r['date']}. Headline: {r['headline']['metric']} average accuracy "
           f"**{pct(r['headline']['accuracy'])}**.\n\n",
           category_table([r], [r["model"]["name"]])]
    if r.get("notes"):
        out.append("\nNotes:\n" + "".join(f"- {n}\n" for n in r["notes"]))
    out.append("\n| Subject | 科目 | Category | Items | Accuracy |\n|---|---|---|---:|---:|\n")
    for name, s in sorted(r["subjects"].items(), key=lambda kv: (kv[1]["categories"][0], kv[0])):
        out.append(f"| {s['en']} | {s['zh']} | {' / '.join(s['categories'])} | {s['n']} | {pct(s['accuracy'])} |\n")
    return "".join(out)


def compare_markdown(runs: list[dict]) -> str:
    """The paper's layout: one headline column per benchmark (Table 3), then each benchmark's
    category table with the models side by side (Figure 2 as numbers)."""
    labels = _labels(runs)
    models: list[str] = []
    cols: list[tuple] = []
    for r in runs:
        if r["model"]["name"] not in models:
            models.append(r["model"]["name"])
        key = (r["benchmark"], r["protocol"], r["shots"])
        if key not in cols:
            cols.append(key)
    title = {r["benchmark"]: r["benchmark_title"] for r in runs}
    head = "| Model | " + " | ".join(f"{title[b]} ({p}, {k}-shot)" for b, p, k in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for m in models:
        cells = []
        for b, p, k in cols:
            hit = [r for r in runs
                   if r["model"]["name"] == m and (r["benchmark"], r["protocol"], r["shots"]) == (b, p, k)]
            cells.append(pct(hit[-1]["headline"]["accuracy"]) if hit else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    out = ["\n".join(lines) + "\n"]
    for b in dict.fromkeys(r["benchmark"] for r in runs):
        sel = [(r, lab) for r, lab in zip(runs, labels) if r["benchmark"] == b]
        out.append(f"\n## {title[b]} by category\n\n")
        out.append(category_table([r for r, _ in sel], [lab for _, lab in sel]))
    hashes = {(r["benchmark"], r["data"]["hash"]) for r in runs}
    if len(hashes) > len({b for b, _ in hashes}):
        out.append("\nWarning: runs of the same benchmark used different data files (data hashes differ).\n")
    return "".join(out)


def plot_categories(runs: list[dict], path) -> Path:
    """Grouped bars: categories + Average on the x axis, one bar per run; one panel per benchmark."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = _labels(runs)
    colour = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(r["model"]["name"] for r in runs))}
    benches = list(dict.fromkeys(r["benchmark"] for r in runs))
    fig = Figure(figsize=(max(6.0, 2.2 + 1.6 * len(runs)) * min(len(benches), 2), 4.2 * ((len(benches) + 1) // 2)))
    FigureCanvasAgg(fig)
    ncol = min(len(benches), 2)
    nrow = (len(benches) + 1) // 2
    for bi, b in enumerate(benches):
        ax = fig.add_subplot(nrow, ncol, bi + 1)
        sel = [(r, lab) for r, lab in zip(runs, labels) if r["benchmark"] == b]
        cats = _category_order([r for r, _ in sel])
        xs = cats + ["Average"]
        width = 0.8 / len(sel)
        for j, (r, lab) in enumerate(sel):
            vals = [100 * r["categories"].get(c, {}).get("micro", 0.0) for c in cats] + [100 * r["overall"]["micro"]]
            pos = [i - 0.4 + width * (j + 0.5) for i in range(len(xs))]
            same_model = sum(x["model"]["name"] == r["model"]["name"] for x, _ in sel) > 1
            bars = ax.bar(pos, vals, width=width * 0.95, label=lab,
                          color=None if same_model else colour[r["model"]["name"]])
            if len(sel) <= 4:
                ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        ax.axhline(25.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, max(50.0, max(100 * r["overall"]["micro"] for r, _ in sel) + 15, *(
            100 * c.get("micro", 0) + 15 for r, _ in sel for c in r["categories"].values())))
        ax.set_title(f"{sel[0][0]['benchmark_title']} by category (dashed: chance)", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    return path


def compare(paths: list, out_dir=None) -> tuple[str, list[dict]]:
    """Load runs, return the comparison Markdown; with out_dir also write compare.md and compare.png."""
    if not paths:
        raise GebError("give at least one run folder to compare")
    runs = [load_run(p) for p in paths]
    md = compare_markdown(runs)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.md", md)
        plot_categories(runs, out / "compare.png")
    return md, runs
