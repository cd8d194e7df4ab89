"""`geb sft`: supervised fine-tuning of a checkpoint on chat JSONL, or `--resume DIR` to continue one.

Also holds the training-option helpers that `geb dpo` shares.
"""

from __future__ import annotations

from geb.commands.common import add_force, add_threads, apply_threads, claim_output

_TRAIN_KEYS = ("batch_size", "grad_accum", "lr", "min_lr", "decay_steps", "weight_decay", "grad_clip", "dtype",
               "device", "seed", "eval_every", "eval_batches", "save_every", "log_every")


def add_train_args(p, *, lr: float, min_lr: float, batch_size: int, epochs: float, unit: str) -> None:
    """Options shared by `geb sft` and `geb dpo` (defaults differ per stage)."""
    from geb.train.chatdata import ON_BAD
    from geb.train.loop import TrainConfig

    d = TrainConfig()
    p.add_argument("--out", help="output checkpoint folder")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint "
                   "(give the same --data; --steps may extend it)")
    p.add_argument("--val-data", help="validation JSONL (same format as --data)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="without --val-data: hold out this fraction of --data for validation")
    p.add_argument("--on-bad", choices=ON_BAD, default="error",
                   help="a bad record (unknown role, empty turn, too long, ...) is an error, or is skipped "
                        "and counted in the log and meta.json (default: error)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=None, help=f"passes over the data (default {epochs:g})")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"{unit} per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--min-lr", type=float, default=min_lr, help="cosine floor")
    wg = p.add_mutually_exclusive_group()
    wg.add_argument("--warmup-ratio", type=float, default=None, help="warmup as a fraction of the steps (default 0.05)")
    wg.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--decay-steps", type=int, default=None, help="cosine horizon (default: all steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "bf16", "fp32"], help="autocast dtype (default "
                   "auto: BF16 on GPUs that support it and on CPUs with native BF16, else FP32)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation passes")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="validation batches per pass")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--quiet", action="store_true")
    add_force(p)
    p.set_defaults(_default_epochs=epochs)
    add_threads(p)


def stage_kwargs(args) -> dict:
    """The keyword arguments run_sft/run_dpo take from the shared options."""
    from geb.errors import GebError
    from geb.train.loop import TrainConfig

    if args.resume:
        return {"resume": True, "overrides": {"steps": args.steps} if args.steps else None}
    if not args.out:
        raise GebError("give --out DIR (or --resume DIR)")
    claim_output(args.out, "model", args.force)
    c = TrainConfig(steps=args.steps or 1, warmup_steps=args.warmup_steps or 0,
                    **{k: getattr(args, k) for k in _TRAIN_KEYS})
    epochs = None if args.steps else (args.epochs if args.epochs is not None else args._default_epochs)
    warmup_ratio = None if args.warmup_steps is not None else (args.warmup_ratio if args.warmup_ratio is not None else 0.05)
    return {"train_config": c, "epochs": epochs, "warmup_ratio": warmup_ratio, "val_fraction": args.val_fraction,
            "on_bad": args.on_bad}


def configure(p) -> None:
    p.add_argument("--model", help="the checkpoint folder to fine-tune (a pretrained model)")
    p.add_argument("--data", required=True, help="JSONL conversations: {\"messages\": [{\"role\", \"content\"}, ...]} "
                   "or {\"instruction\", \"input\", \"output\"}")
    p.add_argument("--seq-len", type=int, default=None, help="packed row length (default: the model's context)")
    p.add_argument("--no-pack", action="store_true", help="one conversation per row (padded) instead of packing")
    add_train_args(p, lr=1e-4, min_lr=1e-5, batch_size=8, epochs=3, unit="packed rows")


def run(args) -> int:
    from geb.errors import GebError
    from geb.train.sft import run_sft

    apply_threads(args)
    kw = stage_kwargs(args)
    if not args.resume and not args.model:
        raise GebError("give --model DIR (the checkpoint to fine-tune) or --resume DIR")
    out = args.resume or args.out
    meta = run_sft(args.model, args.data, out, val_data=args.val_data, seq_len=args.seq_len, pack=not args.no_pack,
                   quiet=args.quiet, **kw)
    rep = meta["data_report"]["train"]
    print(f"wrote {out}: step {meta['step']} ({meta['epochs']:.2f} epochs), train loss {meta['last_train_loss']:.4f}, "
          f"val loss {meta['last_val_loss']}; {rep['used']} conversations used, {rep['skipped_total']} skipped")
    return 0
