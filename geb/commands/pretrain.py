"""`geb pretrain`: train a model on packed token shards, or `--resume DIR` to continue one.

Also runs under torchrun (`torchrun --nproc-per-node N -m geb pretrain ...`) with DDP or FSDP2, and
`--consolidate DIR` rebuilds a checkpoint's model.safetensors from its sharded (DCP) state.
"""

from __future__ import annotations

from geb.commands.common import (add_config_args, add_force, add_threads, claim_output, config_fields,
                                 settings_from_args)

# Settings a resumed run may change: they alter speed, length or logging, not the math of a step.
_RESUME_KEYS = ("steps", "eval_every", "save_every", "log_every", "device", "parallel", "compile",
                "activation_checkpointing", "attn", "peak_tflops")


def configure(p) -> None:
    from geb.train.loop import TrainConfig

    p.add_argument("--data", help="token folder (geb tokenize / geb data run)")
    p.add_argument("--out", help="output checkpoint folder (with --resume: the folder to continue)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint (any number "
                   "of processes: the sharded state is re-split)")
    p.add_argument("--consolidate", metavar="DIR", help="only gather DIR/dcp (the sharded checkpoint) into "
                   "DIR/model.safetensors, or into a new folder given by --out, and exit")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one named by the token folder)")
    p.add_argument("--config", default="geb-tiny", help="model preset (geb-1.3b, geb-small, geb-tiny, geb-test)")
    p.add_argument("--config-file", help="a ModelConfig JSON instead of a preset")
    p.add_argument("--init-from", help="start from this checkpoint's weights (continued pretraining)")
    p.add_argument("--seq-len", type=int, default=256)
    add_config_args(p, TrainConfig, _train_keys(), groups=True)
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step (sets --grad-accum = "
                   "global / batch-size); the same whatever the number of processes")
    p.add_argument("--verify-data", action="store_true", help="check the full SHA-256 of every token shard "
                   "before training (opening always checks sizes and a sampled hash)")
    p.add_argument("--quiet", action="store_true")
    add_force(p)
    add_threads(p)


def _train_keys() -> list[str]:
    """The TrainConfig settings `geb pretrain` takes: every field listed under a flag group."""
    from geb.train.loop import TrainConfig

    return [f.name for f in config_fields(TrainConfig) if f.metadata.get("group")]


def _threads(args) -> None:
    """Physical cores shared among the processes torchrun started on this machine."""
    import torch

    from geb.cpu import physical_cores
    from geb.train.dist import local_world_size

    torch.set_num_threads(args.threads or max(1, physical_cores() // local_world_size()))


def run(args) -> int:
    import os

    from geb.errors import GebError
    from geb.train import dist
    from geb.train.loop import TrainConfig
    from geb.train.pretrain import run_pretrain

    if args.consolidate:
        claim_output(args.out, "model", args.force)
        print(f"wrote {dist.consolidate(args.consolidate, args.out)}")
        return 0
    if not args.data:
        raise GebError("give --data DIR (the token folder)")
    if args.verify_data:
        from geb.data.tokens import TokenData

        TokenData(args.data, verify=True)
    if not args.resume:
        claim_output(args.out, "model", args.force)
    _threads(args)
    given = settings_from_args(args, _train_keys())
    if args.global_batch is not None:
        bs = given.get("batch_size", TrainConfig().batch_size)
        if args.global_batch % bs or "grad_accum" in given:
            raise GebError(f"--global-batch {args.global_batch} must be a multiple of --batch-size {bs} "
                           "(and replaces --grad-accum)")
        given["grad_accum"] = args.global_batch // bs
    try:
        if args.resume:
            fixed = sorted(k for k in given if k not in _RESUME_KEYS)
            if fixed:
                raise GebError(f"--resume continues the run's own settings; these cannot change: "
                               f"{', '.join('--' + k.replace('_', '-') for k in fixed)}")
            meta = run_pretrain(args.data, args.resume, resume=True, quiet=args.quiet, overrides=given)
            out = args.resume
        else:
            if not args.out:
                raise GebError("give --out DIR (or --resume DIR)")
            meta = run_pretrain(args.data, args.out, tokenizer_dir=args.tokenizer, preset=args.config,
                                config_file=args.config_file, init_from=args.init_from,
                                train_config=TrainConfig(**given), seq_len=args.seq_len, quiet=args.quiet)
            out = args.out
    finally:
        dist.shutdown()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line (rank 0's)
        st = meta.get("stability", {})
        spikes = f", {st.get('spikes', 0)} spike(s)" if st.get("enabled") else ""
        print(f"wrote {out}: step {meta['step']}, {meta['tokens_seen']:,} tokens, "
              f"train loss {meta['last_train_loss']:.4f}, val loss {meta['last_val_loss']}{spikes}")
    return 0
