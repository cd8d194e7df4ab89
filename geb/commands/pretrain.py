"""`geb pretrain`: train a model on packed token shards, or `--resume DIR` to continue one.

Also runs under torchrun (`torchrun --nproc-per-node N -m geb pretrain ...`) with DDP or FSDP2, and
`--consolidate DIR` rebuilds a checkpoint's model.safetensors from its sharded (DCP) state.
"""

from __future__ import annotations

from geb.commands.common import add_force, add_threads, claim_output

# Settings a resumed run may change: they alter speed, length or logging, not the math of a step.
_RESUME_KEYS = ("steps", "eval_every", "save_every", "log_every", "device", "parallel", "compile",
                "activation_checkpointing", "attn", "peak_tflops")


def configure(p) -> None:
    from geb.train.loop import TrainConfig

    d = TrainConfig()
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
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {d.steps}; with --resume: extend the run)")
    g.add_argument("--batch-size", type=int, help=f"sequences per micro-batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step, over all processes "
                   f"(default {d.grad_accum})")
    g.add_argument("--global-batch", type=int, help="sequences per optimizer step (sets --grad-accum = "
                   "global / batch-size); the same whatever the number of processes")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--min-lr", type=float, help=f"final learning rate (default {d.min_lr})")
    g.add_argument("--warmup-steps", type=int, help=f"default {d.warmup_steps}")
    g.add_argument("--decay-steps", type=int, help="step at which the cosine reaches --min-lr (default: --steps)")
    g.add_argument("--lr-preset", choices=["none", "small-batch"], help="small-batch: peak and min LR x0.5 and "
                   "the cosine ends at 60%% of the steps (the paper's LR adjustment for small batches)")
    g.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    g.add_argument("--grad-clip", type=float, help=f"default {d.grad_clip}")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="autocast dtype (default auto: BF16 on GPUs "
                   "that support it and on CPUs with native BF16 (AVX512-BF16, AMX), else FP32)")
    g.add_argument("--device", help="auto (default), cpu, cuda")
    g.add_argument("--seed", type=int, help=f"default {d.seed}")
    g.add_argument("--eval-every", type=int, help=f"default {d.eval_every}")
    g.add_argument("--save-every", type=int, help=f"default {d.save_every}")
    g.add_argument("--log-every", type=int, help=f"default {d.log_every}")
    s = p.add_argument_group("loss-spike measures (GEB-1.3B Figure 1; see docs/training.md)")
    s.add_argument("--stability", choices=["auto", "on", "off"], help="spike detection, batch replacement, "
                   "rollback with skipped data, automatic LR cut, embedding-gradient shrink 0.1 (default auto: "
                   "on for pretraining models of 300M parameters and more)")
    s.add_argument("--emb-grad-alpha", type=float, help="embedding gradient shrink factor (1 = off; default 0.1 "
                   "with --stability on, else 1)")
    s.add_argument("--spike-sigma", type=float, help=f"spike threshold in robust noise units (default {d.spike_sigma})")
    s.add_argument("--spike-rel", type=float, help=f"and at least this fraction above the median (default {d.spike_rel})")
    s.add_argument("--spike-window", type=int, help=f"recent losses in the statistics (default {d.spike_window})")
    s.add_argument("--spike-min-history", type=int, help=f"default {d.spike_min_history}")
    s.add_argument("--spike-retries", type=int, help=f"replacement batches before a rollback (default {d.spike_retries})")
    s.add_argument("--no-rollback", dest="rollback", action="store_false", default=None,
                   help="never roll back (spikes that survive the replacements are applied)")
    s.add_argument("--snapshot-every", type=int, help=f"steps between in-memory good states (default {d.snapshot_every})")
    s.add_argument("--snapshot-memory", choices=["auto", "host", "device"], help="where rollback snapshots live: "
                   "host (default): at most two in CPU memory (pinned on CUDA), 12 bytes per parameter each; "
                   "device: one, beside the weights (docs/training.md)")
    s.add_argument("--skip-before", type=int, help=f"data iterations skipped before a spike (default {d.skip_before})")
    s.add_argument("--skip-after", type=int, help=f"data iterations skipped after a spike (default {d.skip_after})")
    s.add_argument("--lr-cut-after", type=int, help=f"cut the LR after this many spikes, 0 = never (default {d.lr_cut_after})")
    s.add_argument("--lr-cut-factor", type=float, help=f"default {d.lr_cut_factor}")
    h = p.add_argument_group("scale (torchrun, GPUs)")
    h.add_argument("--parallel", choices=["auto", "ddp", "fsdp"], help="data parallelism under torchrun: ddp "
                   "(default) or fsdp (FSDP2, BF16 compute with FP32 master weights and reductions)")
    h.add_argument("--compile", action="store_true", default=None, help="torch.compile each block")
    h.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward (less memory)")
    h.add_argument("--attn", choices=["sdpa", "sdpa-flash", "flash-attn"], help="attention kernel (default sdpa: "
                   "PyTorch picks FlashAttention-2 on CUDA; sdpa-flash insists on it; flash-attn: the package)")
    h.add_argument("--peak-tflops", type=float, help="per-device dense BF16 peak for the MFU log (default: the "
                   "GPUs in geb's table; others log no MFU until given this)")
    p.add_argument("--verify-data", action="store_true", help="check the full SHA-256 of every token shard "
                   "before training (opening always checks sizes and a sampled hash)")
    p.add_argument("--quiet", action="store_true")
    add_force(p)
    add_threads(p)


_TRAIN_KEYS = ("steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "decay_steps", "weight_decay",
               "grad_clip", "dtype", "device", "seed", "eval_every", "save_every", "log_every", "emb_grad_alpha",
               "lr_preset", "stability", "spike_sigma", "spike_rel", "spike_window", "spike_min_history",
               "spike_retries", "rollback", "snapshot_every", "snapshot_memory", "skip_before", "skip_after", "lr_cut_after",
               "lr_cut_factor", "parallel", "compile", "activation_checkpointing", "attn", "peak_tflops")


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
    given = {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k) is not None}
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
