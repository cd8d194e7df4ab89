"""`geb dpo`: align an SFT checkpoint with Direct Preference Optimization on preference-pair JSONL."""

from __future__ import annotations

from geb.commands.common import add_train_args, start_stage


def configure(p) -> None:
    p.add_argument("--model", help="the checkpoint to align (an SFT model); it is also the frozen reference")
    p.add_argument("--data", required=True, help="JSONL pairs: {\"prompt\": text or messages, \"chosen\": text, "
                   "\"rejected\": text}")
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature β (default 0.1)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed fraction of flipped preference labels (conservative DPO; default 0)")
    p.add_argument("--max-len", type=int, default=None, help="longest prompt + answer in tokens (default: the context)")
    from geb.train.dpo import DPO_DEFAULTS

    add_train_args(p, DPO_DEFAULTS, epochs=1, unit="pairs")


def run(args) -> int:
    from geb.train.dpo import run_dpo

    out, kw = start_stage(args, "the SFT checkpoint")
    meta = run_dpo(args.model, args.data, out, val_data=args.val_data, beta=args.beta,
                   label_smoothing=args.label_smoothing, max_len=args.max_len, quiet=args.quiet, **kw)
    last = meta.get("last_train_metrics", {})
    rep = meta["data_report"]["train"]
    msg = (f"wrote {out}: step {meta['step']}, loss {meta['last_train_loss']:.4f}, last logged reward accuracy "
           f"{last.get('reward_acc', float('nan')):.0%}, margin {last.get('reward_margin', float('nan')):.3f}")
    v = meta.get("final_eval", {}).get("val")
    if v:
        msg += f"; validation reward accuracy {v['reward_acc']:.0%}, margin {v['reward_margin']:.3f}"
    print(msg + f"; {rep['used']} pairs used, {rep['skipped_total']} skipped")
    return 0

