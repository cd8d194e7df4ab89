"""Multiple-choice evaluation (MMLU, C-Eval, CMMLU) under a named protocol → results dict and files.

`evaluate()` is the stage function behind `geb eval mcq` and the one the quickstart calls: `load`
(a model folder or a loaded model) → `score` (every subject) → `report` (the results dict), with
the run's settings in one `EvalOptions`. Letter
scoring runs one forward pass per question: the subject's k-shot prefix is computed once into a KV
cache and its keys/values are copied into each batch of questions (`Scorer.score_rows`). A prompt
longer than the model's context loses its oldest shots first (counted and reported); if even the
zero-shot prompt is too long it is cut from the left, as lm-eval does, and counted too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from geb.errors import GebError
from geb.eval import prompts
from geb.eval.benchmarks import LETTERS, Benchmark, Subject, load_benchmark
from geb.infer.scoring import load_scorer
from geb.scoring import Row, Scorer

HEADLINE = "micro"  # accuracy over all items (lm-eval's size-weighted group score; MMLU's "average")


def _plan_subject(scorer: Scorer, protocol: str, bench: str, subj: Subject, shots: list, items: list,
                  conts: tuple[str, ...], stats: dict):
    """Tokenize each item with as many shots as fit. Returns {k_used: [(item_index, ctx, conts)]}."""
    groups: dict[int, list] = {}
    L = scorer.max_len
    for i, it in enumerate(items):
        k = len(shots)
        while True:
            prefix, q = prompts.context(protocol, bench, subj, shots[len(shots) - k:], it)
            ctx, cs = scorer.encode_choices(prefix + q, conts)
            if len(ctx) + max(map(len, cs)) <= L + 1 or k == 0:
                break
            k -= 1
        if k < len(shots):
            stats["items_with_fewer_shots"] += 1
            stats["shots_dropped"] += len(shots) - k
        groups.setdefault(k, []).append((i, ctx, cs))
    return groups


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _score_group(scorer: Scorer, prefix_ids: list[int], members: list, reuse: bool, stats: dict):
    """Log-likelihoods [4] per member. With `reuse`, the members' longest common token prefix with
    the k-shot prefix's own tokenization runs once into a KV cache: a BPE often merges the prefix's
    last tokens ("\n\n") with the question's first, so an exact-prefix test would miss, but the
    tokens before that boundary are shared and caching them is exact (a causal model's keys/values
    of a position depend only on the tokens before it)."""
    L = scorer.max_len
    cached, plain, long_ = [], [], []
    shared = []
    for m in members:
        _, ctx, cs = m
        if len(ctx) + max(map(len, cs)) > L + 1:
            long_.append(m)
            continue
        # at least one token of the context stays out of the cache: it is the input that predicts the answer
        shared.append((m, min(_common_len(prefix_ids, ctx), len(ctx) - 1) if reuse else 0))
    # One cache per group: the shortest common length among the members that share at least half
    # of the longest one (an odd item with a short overlap is scored without the cache).
    top = max((n for _, n in shared), default=0)
    keep = [n for _, n in shared if n and 2 * n >= top]
    p = min(keep, default=0)
    for m, n in shared:
        (cached if p and n >= p else plain).append(m)
    if reuse and prefix_ids:
        stats["prefix_mismatch"] += len(plain)
        stats["prefix_hits"] += len(cached)
        stats["prefix_cached_tokens"] += p * len(cached)
    stats["items_left_truncated"] += len(long_)
    out: dict[int, list[float]] = {}

    def rows_for(ctx: list[int], cs: list[list[int]]) -> list[Row]:
        if all(len(c) == 1 for c in cs):  # the usual case: one forward pass reads all four letters
            return [Row(ctx, [(len(ctx) - 1, c) for c in cs])]
        return [Row(ctx + c[:-1], [(len(ctx) - 1, c)]) for c in cs]

    cache_ids = cached[0][1][:p] if cached else []
    for batch, prefix in ((cached, cache_ids), (plain, [])):
        rows, owners = [], []
        for i, ctx, cs in batch:
            rs = rows_for(ctx[len(prefix):], cs)
            rows.extend(rs)
            owners.extend([i] * len(rs))
        for i, res in zip(owners, scorer.score_rows(rows, prefix=prefix)):
            out.setdefault(i, []).extend(lp for lp, _ in res)
    if long_:
        pairs = [(ctx, c) for _, ctx, cs in long_ for c in cs]
        res = scorer.loglikelihood(pairs)
        for n, (i, _, _) in enumerate(long_):
            out[i] = [lp for lp, _ in res[4 * n: 4 * n + 4]]
    return out


def _cot_subject(engine, protocol_bench: str, subj: Subject, items: list, chat: bool, max_new: int, stats: dict):
    from geb.infer.sampling import SamplingParams

    tok = engine.tok
    L = engine.cfg.max_seq_len
    p = SamplingParams(max_new_tokens=max_new, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                       stop=[] if chat else ["\n\n\n", "\n\n以下是", "\n\nThe following"])
    out = []
    for it in items:
        if chat:
            ids, _ = tok.render_chat([{"role": "user", "content": prompts.cot_chat_message(protocol_bench, subj, it)}],
                                     add_generation_prompt=True)
        else:
            text = prompts.description("cot", protocol_bench, subj) + prompts.question("cot", protocol_bench, it)
            ids = tok.encode(text)
        room = max(16, min(max_new, L // 4))
        if len(ids) > L - room:
            ids = ids[-(L - room):]
            stats["items_left_truncated"] += 1
        text = engine.generate(ids, p).text
        out.append((prompts.extract_answer(text), text))
    return out


def _summary(bench: Benchmark, per_subject: dict) -> tuple[dict, dict]:
    cats = {}
    for cat, (en, zh) in bench.categories.items():
        names = [s.name for s in bench.subjects if cat in s.categories and s.name in per_subject]
        if not names:
            continue
        n = sum(per_subject[s]["n"] for s in names)
        c = sum(per_subject[s]["correct"] for s in names)
        cats[cat] = {"en": en, "zh": zh, "subjects": len(names), "n": n, "correct": c, "micro": c / n,
                     "macro": sum(per_subject[s]["accuracy"] for s in names) / len(names)}
    n = sum(v["n"] for v in per_subject.values())
    c = sum(v["correct"] for v in per_subject.values())
    overall = {"n": n, "correct": c, "micro": c / n if n else 0.0,
               "macro": sum(v["accuracy"] for v in per_subject.values()) / max(len(per_subject), 1)}
    return cats, overall


@dataclass
class EvalOptions:
    """How to evaluate (everything but which model and which benchmark folder). `limit` caps items
    per subject; `subject_map` ({subject: [English, Chinese, category]}) names and places subjects
    the built-in maps do not know (e.g. the quickstart's)."""

    protocol: str = "lm-eval"
    shots: int = 5
    limit: int | None = None
    subjects: list[str] | None = None
    split: str | None = None
    batch_size: int = 8
    chat: bool = False
    max_new_tokens: int = 256
    reuse_prefix: bool = True
    subject_map: dict | None = None

    def check(self) -> None:
        prompts.check_protocol(self.protocol)
        if self.shots < 0:
            raise GebError("--shots must be >= 0")
        if self.limit is not None and self.limit <= 0:
            raise GebError("--limit must be a positive number of items per subject")


@dataclass
class Loaded:
    """A model ready to score: its scorer, tokenizer, folder metadata and engine (quantized folders,
    or the cot protocol's generator)."""

    scorer: Scorer
    tokenizer: object
    meta: dict
    engine: object | None
    path: object | None


def load(model_dir=None, batch_size: int = 8, model=None, tokenizer=None) -> Loaded:
    """A model folder (full precision or quantized), or an already loaded `model` + `tokenizer`."""
    from geb.checkpoint import read_meta

    if model is None:
        if model_dir is None:
            raise GebError("no model given (--model)")
        scorer, tokenizer, meta, engine = load_scorer(model_dir, batch_size=batch_size)
        return Loaded(scorer, tokenizer, meta, engine, model_dir)
    meta = read_meta(model_dir) if model_dir is not None else {}
    return Loaded(Scorer(model, tokenizer, batch_size=batch_size), tokenizer, meta, None, model_dir)


@dataclass
class Scored:
    """What `score` measured: per-subject counts, per-item predictions and the run's counters."""

    per_subject: dict
    predictions: list
    stats: dict
    cot_stats: dict
    dev_short: dict
    seconds: float
    items: int


def score(m: Loaded, bench: Benchmark, opts: EvalOptions, progress=None) -> Scored:
    """Score every subject of a loaded benchmark (letter log-likelihoods, or cot generations)."""
    scorer, tokenizer, benchmark = m.scorer, m.tokenizer, bench.spec.name
    conts = prompts.continuations(opts.protocol, benchmark)
    tok_conts = [scorer.encode_pair("Answer:", c)[1] for c in conts]
    if len({tuple(c) for c in tok_conts}) < 4 or not all(tok_conts):
        raise GebError(f"the tokenizer does not give the answers {conts} distinct token ids")
    n_shots = 0 if opts.protocol == "cot" else opts.shots
    stats = {"items_with_fewer_shots": 0, "shots_dropped": 0, "items_left_truncated": 0, "prefix_mismatch": 0,
             "prefix_hits": 0, "prefix_cached_tokens": 0}
    cot_stats = {"unanswered": 0}
    if opts.protocol == "cot" and m.engine is None:
        from geb.infer.engine import Engine

        m.engine = Engine(scorer.model, tokenizer)
    per_subject: dict[str, dict] = {}
    predictions: list[dict] = []
    dev_short: dict[str, int] = {}
    t0 = time.perf_counter()
    n_items = 0
    for subj in bench.subjects:
        items = subj.items[:opts.limit] if opts.limit else subj.items
        shots_list = subj.dev[:n_shots]
        if len(shots_list) < n_shots:
            dev_short[subj.name] = len(shots_list)
        preds: list[str | None]
        extra: list
        if opts.protocol == "cot":
            res = _cot_subject(m.engine, benchmark, subj, items, opts.chat, opts.max_new_tokens, stats)
            preds = [r[0] for r in res]
            extra = [{"generation": r[1]} for r in res]
            cot_stats["unanswered"] += sum(p is None for p in preds)
        else:
            groups = _plan_subject(scorer, opts.protocol, benchmark, subj, shots_list, items, conts, stats)
            lps: dict[int, list[float]] = {}
            for k, members in groups.items():
                prefix_text = prompts.context(opts.protocol, benchmark, subj, shots_list[len(shots_list) - k:],
                                              items[0])[0]
                lps.update(_score_group(scorer, tokenizer.encode(prefix_text), members, opts.reuse_prefix, stats))
            preds = [LETTERS[max(range(4), key=lambda j: lps[i][j])] for i in range(len(items))]
            extra = [{"logprobs": lps[i]} for i in range(len(items))]
        correct = sum(p == it.answer for p, it in zip(preds, items))
        n_items += len(items)
        per_subject[subj.name] = {"en": subj.en, "zh": subj.zh, "categories": subj.categories, "known": subj.known,
                                  "n": len(items), "correct": correct, "accuracy": correct / len(items),
                                  "shots": len(shots_list)}
        for it, p, ex in zip(items, preds, extra):
            predictions.append({"subject": subj.name, "id": it.id, "answer": it.answer, "pred": p, **ex})
        if progress:
            progress(f"{subj.name}: {correct}/{len(items)} = {correct / len(items):.3f}")
    return Scored(per_subject, predictions, stats, cot_stats, dev_short, time.perf_counter() - t0, n_items)


def _notes(bench: Benchmark, s: Scored, opts: EvalOptions, context: int) -> list[str]:
    stats, notes = s.stats, []
    if stats["items_with_fewer_shots"]:
        notes.append(f"{stats['items_with_fewer_shots']} prompt(s) were longer than the model's context "
                     f"({context} tokens): their oldest shots were dropped ({stats['shots_dropped']} in all)")
    if stats["items_left_truncated"]:
        notes.append(f"{stats['items_left_truncated']} prompt(s) did not fit even without shots "
                     "and were cut from the left")
    if bench.skipped:
        notes.append(f"{len(bench.skipped)} malformed row(s) skipped (first: {bench.skipped[0]})")
    if bench.empty_subjects:
        notes.append(f"empty subject(s) left out: {', '.join(bench.empty_subjects)}")
    if s.dev_short:
        notes.append("fewer dev rows than --shots in: " + ", ".join(f"{k} ({v})" for k, v in s.dev_short.items()))
    if opts.protocol == "cot" and opts.shots:
        notes.append("the cot protocol is zero-shot: --shots was not used")
    return notes


def report(m: Loaded, bench: Benchmark, opts: EvalOptions, s: Scored, name: str | None = None) -> dict:
    """The results dict (what results.json holds) of a scored run."""
    from geb import __version__
    from geb.common import now_iso

    scorer, stats = m.scorer, s.stats
    cats, overall = _summary(bench, s.per_subject)
    hits, misses = stats["prefix_hits"], stats["prefix_mismatch"]
    results = {
        "benchmark": bench.spec.name, "benchmark_title": bench.spec.title, "split": bench.split,
        "protocol": opts.protocol, "shots": 0 if opts.protocol == "cot" else opts.shots, "limit": opts.limit,
        "chat": opts.chat if opts.protocol == "cot" else False,
        "model": {"path": str(m.path) if m.path is not None else None,
                  "name": name or (Path(m.path).name if m.path else "model"),
                  "stage": m.meta.get("stage"), "parameters": scorer.cfg.num_params(),
                  "tokenizer_hash": m.tokenizer.hash(), "context": scorer.max_len,
                  "format": m.engine.fmt if m.engine is not None and scorer.model is None else "fp32"},
        "data": {"dir": str(bench.root), "hash": bench.data_hash, "subjects": len(s.per_subject)},
        "date": now_iso(), "geb_version": __version__,
        "headline": {"metric": HEADLINE, "accuracy": overall[HEADLINE]},
        "overall": overall, "categories": cats, "subjects": s.per_subject,
        "skipped": {"malformed_rows": len(bench.skipped), "rows": bench.skipped[:50],
                    "empty_subjects": bench.empty_subjects},
        "truncation": {k: stats[k] for k in ("items_with_fewer_shots", "shots_dropped", "items_left_truncated")},
        "dev_shortfall": s.dev_short, "notes": _notes(bench, s, opts, scorer.max_len),
        "speed": {"seconds": round(s.seconds, 3), "items": s.items,
                  "items_per_s": round(s.items / max(s.seconds, 1e-9), 2),
                  "batch_size": scorer.batch_size, "prefix_forwards": scorer.prefix_forwards,
                  "prefix_reuse": bool(opts.reuse_prefix and opts.protocol != "cot"),
                  "prefix_mismatch": misses, "prefix_hits": hits,
                  "prefix_hit_rate": round(hits / max(hits + misses, 1), 4),
                  "prefix_cached_tokens": stats["prefix_cached_tokens"]},
    }
    if opts.protocol == "cot":
        results["cot"] = {**s.cot_stats, "max_new_tokens": opts.max_new_tokens}
    return results


def evaluate(model_dir=None, benchmark: str = "ceval", data_dir=None, options: EvalOptions | None = None, *,
             model=None, tokenizer=None, out_dir=None, name: str | None = None, progress=None,
             keep_predictions: bool = False, **option_fields) -> dict:
    """load → score → report for a model folder (or a loaded `model` + `tokenizer`) on a benchmark
    folder. Options come as an `EvalOptions` or as its fields by keyword (`shots=5`, ...).

    Returns the results dict (also written as results.json / results.md / categories.png /
    predictions.jsonl under out_dir when given); `progress` is called with a line per subject.
    """
    opts = options or EvalOptions(**option_fields)
    if options is not None and option_fields:
        raise GebError(f"give options either as EvalOptions or as keywords, not both ({sorted(option_fields)})")
    opts.check()
    if data_dir is None:
        raise GebError("no benchmark folder given (--data)")
    bench = load_benchmark(benchmark, data_dir, split=opts.split, subjects=opts.subjects, subject_map=opts.subject_map)
    m = load(model_dir, opts.batch_size, model, tokenizer)
    s = score(m, bench, opts, progress)
    results = report(m, bench, opts, s, name)
    if out_dir is not None:
        write_run(results, s.predictions, out_dir)
    if keep_predictions:
        results["predictions"] = s.predictions
    return results


def write_run(results: dict, predictions: list[dict], out_dir) -> Path:
    """results.json, results.md, categories.png and predictions.jsonl, written as one atomic folder."""
    from geb.common import AtomicFolder
    from geb.eval import report

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFolder(out, kind="eval") as tmp:  # a folder geb did not write is refused
        (tmp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "results.md").write_text(report.run_markdown(results), encoding="utf-8")
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for p in predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        report.plot_categories([results], tmp / "categories.png")
    return out
