"""`geb data`: clean, filter, deduplicate and pack raw text (run, pack, rules, fit-lm)."""

from __future__ import annotations

import json
import os
import sys


def configure(p) -> None:
    from geb.commands.common import add_force

    sub = p.add_subparsers(dest="data_command", metavar="<action>")
    r = sub.add_parser("run", help="raw files → cleaned text (OUT/text) → token shards (OUT/tokens, with --tokenizer) + report",
                       description="Clean, quality-filter and deduplicate every .jsonl/.json/.txt/.parquet file (plain, "
                                   ".gz or .zst) under --input; write OUT/text, OUT/report.{md,json,png}; pack OUT/tokens "
                                   "when --tokenizer is given. Re-running with the same inputs and settings resumes.")
    r.add_argument("--input", required=True, help="folder of raw files (searched recursively)")
    r.add_argument("--output", required=True, help="output folder")
    r.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json: also pack OUT/tokens")
    r.add_argument("--workers", type=int, default=1, help="worker processes (datatrove local executor)")
    r.add_argument("--tasks", type=int, default=None, help="shards per stage (default: max(4, workers), at most one per file)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="RULE.KEY=VALUE",
                   help="override a setting, e.g. --set t2s=on --set pii.mode=remove --set read.txt_mode=line (repeatable)")
    r.add_argument("--config", default=None, help="JSON file of settings overrides ({\"rules\": {...}, \"read\": {...}})")
    r.add_argument("--restart", action="store_true", help="discard an earlier run in OUT and start over")
    add_force(r)
    r.add_argument("--verbose", action="store_true", help="show datatrove's logs (default: OUT/work/logs/datatrove.log)")
    r.add_argument("--executor", choices=("local", "slurm", "ray"), default="local",
                   help="slurm: submit every stage as dependent sbatch array jobs, then re-run with --executor local "
                        "to publish OUT/text, pack and report; ray: run the stages on a Ray cluster (ray.init(): "
                        "RAY_ADDRESS, else a local one with --workers CPUs), then publish, pack and report here")
    r.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="SlurmPipelineExecutor argument, e.g. --slurm partition=cpu --slurm time=04:00:00 "
                        "--slurm venv_path=.venv/bin/activate (repeatable)")

    k = sub.add_parser("pack", help="cleaned text folder → geb token shards (train/validation)")
    k.add_argument("--text", required=True, help="a cleaned-text folder (OUT/text of `geb data run`)")
    k.add_argument("--tokenizer", required=True, help="tokenizer folder or tokenizer.json")
    k.add_argument("--output", required=True, help="token folder to write")
    k.add_argument("--val-fraction", type=float, default=0.01)
    k.add_argument("--seed", type=int, default=0)
    add_force(k)

    ru = sub.add_parser("rules", help="list every rule with its default on/off and parameters")
    ru.add_argument("--json", action="store_true")

    f = sub.add_parser("fit-lm", help="fit the character n-gram reference model for the perplexity filter")
    f.add_argument("--input", required=True, help="folder of trusted text (same formats as `run`)")
    f.add_argument("--output", required=True, help="model file to write (e.g. ref.lm.json.gz)")
    f.add_argument("--order", type=int, default=4)
    f.add_argument("--set", dest="sets", action="append", default=[], help="read.* settings, e.g. read.txt_mode=line")


def _overrides(args) -> dict:
    from pathlib import Path

    from geb.data.settings import parse_overrides
    from geb.errors import GebError

    over: dict = {}
    if getattr(args, "config", None):
        f = Path(args.config)
        try:
            over = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise GebError(f"{f}: cannot read settings ({e})") from None
    extra = parse_overrides(args.sets)
    for key, val in extra.items():
        if isinstance(val, dict):
            node = over.setdefault(key, {})
            for k2, v2 in val.items():
                if isinstance(v2, dict) and isinstance(node.get(k2), dict):
                    node[k2].update(v2)
                else:
                    node[k2] = v2
        else:
            over[key] = val
    return over


def run(args) -> int:
    from geb.errors import GebError

    cmd = args.data_command
    if cmd == "rules":
        from geb.data.settings import rule_table

        rows = rule_table()
        if args.json:
            print(json.dumps(rows, indent=2, ensure_ascii=False))
        else:
            for r in rows:
                params = ", ".join(f"{k}={v}" for k, v in r["defaults"].items()) or "-"
                print(f"{r['rule']:<18} {r['stage']:<8} {'on ' if r['enabled'] else 'off'}  {r['help']}\n"
                      f"{'':<31}defaults: {params}")
        return 0
    if cmd in ("pack", "run"):
        from geb.commands.common import claim_output

        claim_output(args.output, "tokens" if cmd == "pack" else "data", args.force)
    if cmd == "pack":
        from geb.data.pipeline import pack_text

        meta = pack_text(args.text, args.tokenizer, args.output, val_fraction=args.val_fraction, seed=args.seed)
        counts = {sp: sum(s["tokens"] for s in sh) for sp, sh in meta["shards"].items()}
        print(f"packed {args.output}: " + ", ".join(f"{k} {v:,} tokens" for k, v in counts.items()))
        return 0
    if cmd == "fit-lm":
        return _fit_lm(args)
    if cmd == "run" and args.executor == "slurm":
        from geb.data.pipeline import submit_slurm
        from geb.data.settings import _parse_value

        kw = {}
        for item in args.slurm:
            if "=" not in item:
                raise GebError(f"--slurm {item!r}: expected KEY=VALUE")
            key, val = item.split("=", 1)
            kw[key] = _parse_value(val)
        if args.tokenizer:
            print("note: packing runs in the final local step (geb data run ... --executor local --tokenizer TOK)")
        execs = submit_slurm(args.input, args.output, overrides=_overrides(args), restart=args.restart,
                             tasks=args.tasks, **kw)
        print(f"submitted {len(execs)} stage(s) to Slurm (last job id {execs[-1].job_id}); when they finish, run "
              "the same command with --executor local to publish the text, pack and write the report")
        return 0
    if cmd == "run" and args.executor == "ray":
        try:
            import ray
        except ImportError:
            raise GebError("--executor ray needs Ray: pip install 'geb[ray]'") from None
        from geb.data.pipeline import run_ray

        if not ray.is_initialized():
            ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(1, args.workers)}))
        run_ray(args.input, args.output, overrides=_overrides(args), restart=args.restart, tasks=args.tasks)
        args.restart = False  # the Ray stages are done; the local pass below only publishes, packs, reports
    if cmd == "run":
        from geb.data.pipeline import run_pipeline

        def progress(msg):
            print(msg, flush=True)

        report = run_pipeline(args.input, args.output, tokenizer_dir=args.tokenizer, workers=args.workers,
                              overrides=_overrides(args), restart=args.restart, quiet=not args.verbose,
                              progress=progress, tasks=args.tasks)
        inp, out = report["input"], report["output"]
        print(f"read {inp['files']} file(s): {inp['documents']:,} documents; bad input: "
              f"{sum(inp['bad_input'].values()):,} case(s)")
        for s in report["steps"]:
            print(f"  {s['step']:<18} docs {s['docs_in']:>9,} → {s['docs_out']:>9,}   chars {s['chars_in']:>12,} → {s['chars_out']:>12,}")
        print(f"kept {out['documents']:,} documents in {out['text']}; report: {args.output}/report.md")
        if out["tokens"]:
            print("tokens: " + ", ".join(f"{k} {v:,}" for k, v in out["token_counts"].items()) + f" in {out['tokens']}")
        if out["documents"] == 0:
            raise GebError(f"no documents left after the pipeline (see {args.output}/report.md)")
        return 0
    print("usage: geb data {run,pack,rules,fit-lm} ... (geb data -h)", file=sys.stderr)
    return 2


def _fit_lm(args) -> int:
    import tempfile
    from pathlib import Path

    from geb.data.reference_lm import CharNgramLM
    from geb.data.readers import GebReader, list_inputs
    from geb.data.settings import resolve
    from geb.errors import GebError

    root = Path(args.input)
    if not root.is_dir():
        raise GebError(f"{root}: input folder not found")
    read = resolve(_overrides(args))["read"]
    files = [str(p.relative_to(root)) for p in list_inputs(root)]
    with tempfile.TemporaryDirectory() as tmp:
        reader = GebReader(root, files, Path(tmp) / "rejects", Path(tmp) / "stats", **read)
        texts = [d.text for d in reader.run()]
    lm = CharNgramLM.fit(texts, order=args.order)
    lm.save(args.output)
    m = lm.meta
    print(f"fit a {args.order}-gram character model on {m['train_chars']:,} characters; held-out perplexity "
          f"median {m['median_ppl']:.2f}, p99 {m['p99_ppl']:.2f} (the filter's max_ppl=auto) → {args.output}")
    return 0
