"""`geb eval {mcq,ppl,toxicity,compare,lm-eval-tasks}`: parse arguments and call geb.eval's stage functions."""

from __future__ import annotations

import json
import sys

from geb.commands.common import add_force, add_threads, apply_threads, claim_output
from geb.errors import GebError


def configure(p) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="<what>", required=True)

    m = sub.add_parser("mcq", help="MMLU / C-Eval / CMMLU accuracy under a named protocol",
                       description="Multiple-choice accuracy per subject, category and overall; writes "
                                   "results.json, results.md, categories.png and predictions.jsonl.")
    m.add_argument("--benchmark", required=True, choices=["mmlu", "ceval", "cmmlu"])
    m.add_argument("--data", required=True, help="benchmark folder in its official layout")
    m.add_argument("--model", required=True, help="model folder")
    m.add_argument("--protocol", default="lm-eval", choices=["lm-eval", "original", "cot"],
                   help="lm-eval (default): EleutherAI harness layout; original: the benchmark authors' "
                        "prompt and scoring; cot: zero-shot chain of thought with answer extraction")
    m.add_argument("--shots", type=int, default=5, help="k-shot examples from the first k dev rows (default 5)")
    m.add_argument("--limit", type=int, default=None, help="at most this many items per subject")
    m.add_argument("--subjects", default=None, help="comma-separated subject names (file names)")
    m.add_argument("--split", default=None, help="split to score (default: test; val for C-Eval)")
    m.add_argument("--out", default=None, help="run folder (default: eval-runs/<model>-<benchmark>-<protocol>)")
    m.add_argument("--name", default=None, help="model name in tables and charts (default: folder name)")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--chat", action="store_true", help="cot only: ask through the chat format (SFT/DPO models)")
    m.add_argument("--max-new-tokens", type=int, default=256, help="cot only: generation budget")
    m.add_argument("--no-prefix-cache", action="store_true", help="recompute the k-shot prefix for every question")
    add_threads(m)
    add_force(m)

    q = sub.add_parser("ppl", help="perplexity and bits per byte on a text file or token folder")
    q.add_argument("--model", required=True)
    q.add_argument("--data", required=True, help="UTF-8 text file, or a packed token folder")
    q.add_argument("--split", default="val", help="token folder split (default val)")
    q.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    q.add_argument("--stride", type=int, default=None, help="window stride (default: the context, disjoint)")
    q.add_argument("--out", default=None, help="write the figures as JSON here (a .json file)")
    add_threads(q)
    add_force(q)

    t = sub.add_parser("toxicity", help="ToxiGen-style %% toxic continuations per target group")
    t.add_argument("--model", required=True)
    t.add_argument("--prompts", required=True, help="folder of ToxiGen prompt files (<kind>_<group>_1k.txt)")
    t.add_argument("--kind", default="hate", choices=["hate", "neutral"])
    t.add_argument("--groups", default=None, help="comma-separated target groups (default: all files)")
    t.add_argument("--limit", type=int, default=None, help="prompts per group (default: all)")
    t.add_argument("--classifier", default="wordlist",
                   help="'wordlist' (bundled, default), 'wordlist:FILE', or a local HF classifier folder")
    t.add_argument("--toxic-label", default=None, help="the classifier's toxic label name or index")
    t.add_argument("--threshold", type=float, default=0.5)
    t.add_argument("--max-new-tokens", type=int, default=48)
    t.add_argument("--temperature", type=float, default=0.1)
    t.add_argument("--top-p", type=float, default=0.9)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="run folder (default: eval-runs/<model>-toxigen)")
    add_threads(t)
    add_force(t)

    c = sub.add_parser("compare", help="print and plot several mcq runs side by side")
    c.add_argument("runs", nargs="+", help="run folders (or results.json files)")
    c.add_argument("--out", default=None, help="write compare.md and compare.png here")

    k = sub.add_parser("lm-eval-tasks", help="write lm-eval task configs that read a local benchmark folder")
    k.add_argument("--benchmark", required=True, choices=["mmlu", "ceval", "cmmlu"])
    k.add_argument("--data", required=True)
    k.add_argument("--out", required=True, help="folder for the YAMLs (pass it to lm-eval's --include_path)")
    k.add_argument("--split", default=None)
    k.add_argument("--subjects", default=None)


def _list(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _default_out(model: str, *parts: str) -> str:
    from pathlib import Path

    return str(Path("eval-runs") / "-".join([Path(model).resolve().name, *parts]))


def run(args) -> int:
    cmd = args.eval_command
    if cmd == "mcq":
        from geb.eval.mcq import evaluate

        apply_threads(args)
        out = args.out or _default_out(args.model, args.benchmark, args.protocol)
        claim_output(out, "eval", args.force)  # before the evaluation, not after it
        r = evaluate(args.model, args.benchmark, args.data, protocol=args.protocol, shots=args.shots,
                     limit=args.limit, subjects=_list(args.subjects), split=args.split, out_dir=out,
                     batch_size=args.batch_size, name=args.name, chat=args.chat, max_new_tokens=args.max_new_tokens,
                     reuse_prefix=not args.no_prefix_cache, progress=lambda s: print(s, file=sys.stderr))
        from geb.eval.report import category_table, pct

        print(category_table([r], [r["model"]["name"]]), end="")
        for n in r["notes"]:
            print(f"note: {n}")
        print(f"{r['benchmark_title']} {r['protocol']} {r['shots']}-shot: {pct(r['headline']['accuracy'])} "
              f"({r['headline']['metric']} average, {r['overall']['n']} items, "
              f"{r['speed']['items_per_s']} items/s) → {out}")
        return 0
    if cmd == "ppl":
        from geb.eval.ppl import perplexity

        apply_threads(args)
        if args.out is not None and not args.out.endswith(".json"):
            raise GebError(f"--out {args.out}: the figures are written as JSON; name a .json file")
        claim_output(args.out, "result", args.force)  # before the scoring, not after it
        r = perplexity(args.model, args.data, split=args.split, max_tokens=args.max_tokens, stride=args.stride,
                       out=args.out)
        print(json.dumps({k: r[k] for k in ("tokens", "bytes", "perplexity", "bits_per_byte", "nll_per_token",
                                            "context", "stride", "tokens_per_s")}, indent=2))
        return 0
    if cmd == "toxicity":
        from geb.eval.toxicity import toxicity, toxicity_markdown

        apply_threads(args)
        out = args.out or _default_out(args.model, "toxigen", args.kind)
        claim_output(out, "eval", args.force)
        r = toxicity(args.model, args.prompts, kind=args.kind, groups=_list(args.groups), limit=args.limit,
                     classifier=args.classifier, toxic_label=args.toxic_label, threshold=args.threshold,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed, out_dir=out, progress=lambda s: print(s, file=sys.stderr))
        print(toxicity_markdown([r]), end="")
        print(f"→ {out}")
        return 0
    if cmd == "compare":
        from geb.eval.report import compare

        md, _ = compare(args.runs, args.out)
        print(md, end="")
        if args.out:
            print(f"→ {args.out}/compare.md, {args.out}/compare.png")
        return 0
    if cmd == "lm-eval-tasks":
        from geb.eval.lmeval import write_task_configs

        names = write_task_configs(args.benchmark, args.data, args.out, split=args.split, subjects=_list(args.subjects))
        print(f"wrote {len(names)} task(s) and group geb_{args.benchmark} to {args.out}; run e.g.\n"
              f"  python -m geb.eval.lmeval --model geb --model_args path=MODEL --include_path {args.out} "
              f"--tasks geb_{args.benchmark}")
        return 0
    raise AssertionError(cmd)
