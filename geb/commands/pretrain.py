"""`geb pretrain`: train a model on packed token shards, or `--resume DIR` to continue one."""

from __future__ import annotations

from geb.commands.common import add_threads, apply_threads


def configure(p) -> None:
    from geb.train.loop import TrainConfig

    d = TrainConfig()
    p.add_argument("--data", required=True, help="token folder (geb tokenize / geb data run)")
    p.add_argument("--out", help="output checkpoint folder (with --resume: the folder to continue)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one named by the token folder)")
    p.add_argument("--config", default="geb-tiny", help="model preset (geb-1.3b, geb-small, geb-tiny, geb-test)")
    p.add_argument("--config-file", help="a ModelConfig JSON instead of a preset")
    p.add_argument("--init-from", help="start from this checkpoint's weights (continued pretraining)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--decay-steps", type=int, default=None, help="cosine horizon (default: --steps)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--emb-grad-alpha", type=float, default=d.emb_grad_alpha,
                   help="embedding gradient shrink factor (1 = off; GLM-130B/GEB used 0.1)")
    p.add_argument("--quiet", action="store_true")
    add_threads(p)


_TRAIN_KEYS = ("steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "decay_steps", "weight_decay",
               "grad_clip", "dtype", "device", "seed", "eval_every", "save_every", "log_every", "emb_grad_alpha")


def run(args) -> int:
    from geb.errors import GebError
    from geb.train.loop import TrainConfig
    from geb.train.pretrain import run_pretrain

    apply_threads(args)
    if args.resume:
        meta = run_pretrain(args.data, args.resume, resume=True, quiet=args.quiet, overrides={"steps": args.steps})
        out = args.resume
    else:
        if not args.out:
            raise GebError("give --out DIR (or --resume DIR)")
        c = TrainConfig(**{k: getattr(args, k) for k in _TRAIN_KEYS})
        meta = run_pretrain(args.data, args.out, tokenizer_dir=args.tokenizer, preset=args.config,
                            config_file=args.config_file, init_from=args.init_from, train_config=c,
                            seq_len=args.seq_len, quiet=args.quiet)
        out = args.out
    print(f"wrote {out}: step {meta['step']}, {meta['tokens_seen']:,} tokens, "
          f"train loss {meta['last_train_loss']:.4f}, val loss {meta['last_val_loss']}")
    return 0
