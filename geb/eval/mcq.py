"""Multiple-choice evaluation (MMLU, C-Eval, CMMLU) under a named protocol → results dict and files.

`evaluate()` is the stage function behind `geb eval mcq` and the one the quickstart calls. Letter
scoring runs one forward pass per question: the subject's k-shot prefix is computed once into a KV
cache and its keys/values are copied into each batch of questions (`Scorer.score_rows`). A prompt
longer than the model's context loses its oldest shots first (counted and reported); if even the
zero-shot prompt is too long it is cut from the left, as lm-eval does, and counted too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from geb.errors import GebError
from geb.eval import prompts
from geb.eval.benchmarks import LETTERS, Benchmark, Subject, load_benchmark
from geb.eval.scoring import Row, Scorer, load_scorer

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


def _score_group(scorer: Scorer, prefix_ids: list[int], members: list, reuse: bool, stats: dict):
    """Log-likelihoods [4] per member; members share prefix_ids when their tokens start with it."""
    L = scorer.max_len
    cached, plain, long_ = [], [], []
    for m in members:
        _, ctx, cs = m
        if len(ctx) + max(map(len, cs)) > L + 1:
            long_.append(m)
        elif reuse and prefix_ids and ctx[: len(prefix_ids)] == prefix_ids and len(ctx) > len(prefix_ids):
            cached.append(m)
        else:
            plain.append(m)
    if reuse and plain and prefix_ids:
        stats["prefix_mismatch"] += len(plain)
    stats["items_left_truncated"] += len(long_)
    out: dict[int, list[float]] = {}

    def rows_for(ctx: list[int], cs: list[list[int]]) -> list[Row]:
        if all(len(c) == 1 for c in cs):  # the usual case: one forward pass reads all four letters
            return [Row(ctx, [(len(ctx) - 1, c) for c in cs])]
        return [Row(ctx + c[:-1], [(len(ctx) - 1, c)]) for c in cs]

    for batch, prefix in ((cached, prefix_ids), (plain, [])):
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


def evaluate(model_dir=None, benchmark: str = "ceval", data_dir=None, protocol: str = "lm-eval", shots: int = 5,
             limit: int | None = None, subjects: list[str] | None = None, split: str | None = None,
             out_dir=None, batch_size: int = 8, model=None, tokenizer=None, name: str | None = None,
             chat: bool = False, max_new_tokens: int = 256, reuse_prefix: bool = True, progress=None,
             keep_predictions: bool = False, subject_map: dict | None = None) -> dict:
    """Evaluate a model folder (or a loaded `model` + `tokenizer`) on a benchmark folder.

    Returns the results dict (also written as results.json / results.md / categories.png /
    predictions.jsonl under out_dir when given). `limit` caps items per subject; `progress` is called
    with a one-line message per subject. `subject_map` ({subject: [English, Chinese, category]})
    names and places subjects the built-in maps do not know (e.g. the quickstart's).
    """
    from geb import __version__
    from geb.checkpoint import now_iso, read_meta

    prompts.check_protocol(protocol)
    if data_dir is None:
        raise GebError("no benchmark folder given (--data)")
    if shots < 0:
        raise GebError("--shots must be >= 0")
    if limit is not None and limit <= 0:
        raise GebError("--limit must be a positive number of items per subject")
    bench = load_benchmark(benchmark, data_dir, split=split, subjects=subjects, subject_map=subject_map)
    meta = {}
    engine = None
    if model is None:
        if model_dir is None:
            raise GebError("no model given (--model)")
        scorer, tokenizer, meta, engine = load_scorer(model_dir, batch_size=batch_size)
    else:
        if model_dir is not None:
            meta = read_meta(model_dir)
        scorer = Scorer(model, tokenizer, batch_size=batch_size)
    conts = prompts.continuations(protocol, benchmark)
    tok_conts = [scorer.encode_pair("Answer:", c)[1] for c in conts]
    if len({tuple(c) for c in tok_conts}) < 4 or not all(tok_conts):
        raise GebError(f"the tokenizer does not give the answers {conts} distinct token ids")
    n_shots = 0 if protocol == "cot" else shots
    stats = {"items_with_fewer_shots": 0, "shots_dropped": 0, "items_left_truncated": 0, "prefix_mismatch": 0}
    cot_stats = {"unanswered": 0}
    if protocol == "cot" and engine is None:
        from geb.infer.engine import Engine

        engine = Engine(scorer.model, tokenizer)
    per_subject: dict[str, dict] = {}
    predictions: list[dict] = []
    dev_short: dict[str, int] = {}
    t0 = time.perf_counter()
    n_items = 0
    for subj in bench.subjects:
        items = subj.items[:limit] if limit else subj.items
        shots_list = subj.dev[:n_shots]
        if len(shots_list) < n_shots:
            dev_short[subj.name] = len(shots_list)
        preds: list[str | None]
        extra: list
        if protocol == "cot":
            res = _cot_subject(engine, benchmark, subj, items, chat, max_new_tokens, stats)
            preds = [r[0] for r in res]
            extra = [{"generation": r[1]} for r in res]
            cot_stats["unanswered"] += sum(p is None for p in preds)
        else:
            groups = _plan_subject(scorer, protocol, benchmark, subj, shots_list, items, conts, stats)
            lps: dict[int, list[float]] = {}
            for k, members in groups.items():
                prefix_text = prompts.context(protocol, benchmark, subj, shots_list[len(shots_list) - k:], items[0])[0]
                lps.update(_score_group(scorer, tokenizer.encode(prefix_text), members, reuse_prefix, stats))
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
    seconds = time.perf_counter() - t0
    cats, overall = _summary(bench, per_subject)
    notes = []
    if stats["items_with_fewer_shots"]:
        notes.append(f"{stats['items_with_fewer_shots']} prompt(s) were longer than the model's context "
                     f"({scorer.max_len} tokens): their oldest shots were dropped ({stats['shots_dropped']} in all)")
    if stats["items_left_truncated"]:
        notes.append(f"{stats['items_left_truncated']} prompt(s) did not fit even without shots "
                     "and were cut from the left")
    if bench.skipped:
        notes.append(f"{len(bench.skipped)} malformed row(s) skipped (first: {bench.skipped[0]})")
    if bench.empty_subjects:
        notes.append(f"empty subject(s) left out: {', '.join(bench.empty_subjects)}")
    if dev_short:
        notes.append("fewer dev rows than --shots in: " + ", ".join(f"{k} ({v})" for k, v in dev_short.items()))
    if protocol == "cot" and shots:
        notes.append("the cot protocol is zero-shot: --shots was not used")
    model_path = str(model_dir) if model_dir is not None else None
    results = {
        "benchmark": benchmark, "benchmark_title": bench.spec.title, "split": bench.split,
        "protocol": protocol, "shots": n_shots, "limit": limit, "chat": chat if protocol == "cot" else False,
        "model": {"path": model_path, "name": name or (Path(model_dir).name if model_dir else "model"),
                  "stage": meta.get("stage"), "parameters": scorer.cfg.num_params(), "tokenizer_hash": tokenizer.hash(),
                  "context": scorer.max_len,
                  "format": engine.format if engine is not None and scorer.model is None else "fp32"},
        "data": {"dir": str(bench.root), "hash": bench.data_hash, "subjects": len(per_subject)},
        "date": now_iso(), "geb_version": __version__,
        "headline": {"metric": HEADLINE, "accuracy": overall[HEADLINE]},
        "overall": overall, "categories": cats, "subjects": per_subject,
        "skipped": {"malformed_rows": len(bench.skipped), "rows": bench.skipped[:50],
                    "empty_subjects": bench.empty_subjects},
        "truncation": {k: stats[k] for k in ("items_with_fewer_shots", "shots_dropped", "items_left_truncated")},
        "dev_shortfall": dev_short, "notes": notes,
        "speed": {"seconds": round(seconds, 3), "items": n_items, "items_per_s": round(n_items / max(seconds, 1e-9), 2),
                  "batch_size": scorer.batch_size, "prefix_forwards": scorer.prefix_forwards,
                  "prefix_reuse": bool(reuse_prefix and protocol != "cot"),
                  "prefix_mismatch": stats["prefix_mismatch"]},
    }
    if protocol == "cot":
        results["cot"] = {**cot_stats, "max_new_tokens": max_new_tokens}
    if out_dir is not None:
        write_run(results, predictions, out_dir)
    if keep_predictions:
        results["predictions"] = predictions
    return results


def write_run(results: dict, predictions: list[dict], out_dir) -> Path:
    """results.json, results.md, categories.png and predictions.jsonl, written as one atomic folder."""
    from geb.checkpoint import AtomicFolder
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
