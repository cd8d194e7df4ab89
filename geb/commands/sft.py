"""`geb sft`: supervised fine-tuning of a checkpoint on chat JSONL, or `--resume DIR` to continue one."""

from __future__ import annotations

from geb.commands.common import add_train_args, start_stage

def configure(p) -> None:
    p.add_argument("--model", help="the checkpoint folder to fine-tune (a pretrained model)")
    p.add_argument("--data", required=True, help="JSONL conversations: {\"messages\": [{\"role\", \"content\"}, ...]} "
                   "or {\"instruction\", \"input\", \"output\"}")
    p.add_argument("--seq-len", type=int, default=None, help="packed row length (default: the model's context)")
    p.add_argument("--no-pack", action="store_true", help="one conversation per row (padded) instead of packing")
    from geb.train.sft import SFT_DEFAULTS

    add_train_args(p, SFT_DEFAULTS, epochs=3, unit="packed rows")


def run(args) -> int:
    from geb.train.sft import run_sft

    out, kw = start_stage(args, "the checkpoint to fine-tune")
    meta = run_sft(args.model, args.data, out, val_data=args.val_data, seq_len=args.seq_len, pack=not args.no_pack,
                   quiet=args.quiet, **kw)
    rep = meta["data_report"]["train"]
    print(f"wrote {out}: step {meta['step']} ({meta['epochs']:.2f} epochs), train loss {meta['last_train_loss']:.4f}, "
          f"val loss {meta['last_val_loss']}; {rep['used']} conversations used, {rep['skipped_total']} skipped")
    return 0
