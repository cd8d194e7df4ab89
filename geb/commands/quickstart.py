"""`geb quickstart`: every stage of the recipe on a built-in bilingual corpus; writes a report folder."""

from __future__ import annotations

from geb.commands.common import add_threads


def configure(p) -> None:
    p.add_argument("--out", default="quickstart_out", help="output folder (reused: finished stages are skipped)")
    p.add_argument("--small", action="store_true", help="tiny sizes (about a minute): the test-suite version")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default 450; 40 with --small)")
    p.add_argument("--seed", type=int, default=0)
    add_threads(p)


def run(args) -> int:
    from geb.quickstart import QuickstartConfig, run_quickstart

    cfg = QuickstartConfig.small_config(args.out) if args.small else QuickstartConfig(out=args.out)
    cfg.seed, cfg.threads = args.seed, args.threads
    if args.steps:
        cfg.pretrain_steps = args.steps
    s = run_quickstart(cfg)
    r = s["results"]
    print(f"quickstart finished in {s['total_seconds']:.0f} s: validation loss {r['pretrain']['val_loss']:.3f} "
          f"(unigram baseline {r['pretrain']['unigram_val_loss']:.3f}); held-out accuracy "
          f"{r['heldout']['overall']:.0%}. Report: {args.out}/report.md")
    return 0
