"""Multiple-choice evaluation speed (items/s) with and without k-shot prefix KV-cache reuse, and of
quantized folders (scored through the CPU runtime) against the full-precision model.

Random-weight models in the geb-tiny / geb-small shapes (speed does not depend on what the weights
learned) and a byte-level BPE trained on the benchmark's own dev questions (so prompt lengths are
realistic); runs alternate between settings so that a neighbour's load hits both alike.

    python bench/eval_speed.py --data ../shared/data/cmmlu --benchmark cmmlu --out bench/results/eval_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--benchmark", default="cmmlu")
    ap.add_argument("--presets", default="geb-tiny,geb-small")
    ap.add_argument("--subjects", default="agronomy,chinese_history,college_law,high_school_physics")
    ap.add_argument("--limit", type=int, default=12, help="items per subject")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="int8,int4",
                    help="quantized formats also timed (prefix cache, batch 8), from the same random weights")
    ap.add_argument("--out", default="bench/results/eval_speed.json")
    args = ap.parse_args()

    from geb.checkpoint import save_checkpoint
    from geb.config import get_preset, pad_vocab
    from geb.eval.benchmarks import load_benchmark
    from geb.eval.mcq import evaluate
    from geb.infer.folders import quantize_folder
    from geb.model import GEB
    from geb.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    subjects = args.subjects.split(",")
    everything = load_benchmark(args.benchmark, args.data)
    texts = [it.question + " " + " ".join(it.choices) for s in everything.subjects for it in s.dev + s.items[:20]]
    tok = Tokenizer.train(texts, vocab_size=4096)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            cfg = get_preset(preset).replace(vocab_size=pad_vocab(tok.vocab_size))
            model = GEB(cfg)
            model.init_weights(seed=0)
            folder = Path(tmp) / preset
            save_checkpoint(folder, model, tok, {"stage": "random"})
            settings = [("prefix cache, batch 8", True, 8, folder), ("no prefix cache, batch 8", False, 8, folder),
                        ("prefix cache, batch 1", True, 1, folder)]
            for fmt in filter(None, args.formats.split(",")):
                settings.append((f"{fmt}, prefix cache, batch 8", True, 8,
                                 quantize_folder(folder, Path(tmp) / f"{preset}-{fmt}", fmt)))
            times = {name: [] for name, *_ in settings}
            last = {}
            for _, reuse, bs, src in settings:  # untimed warm-up: first-call costs (imports, allocator)
                evaluate(src, args.benchmark, args.data, shots=args.shots, limit=1, subjects=subjects[:1],
                         reuse_prefix=reuse, batch_size=bs)
            for _ in range(args.rounds):
                for name, reuse, bs, src in settings:
                    t0 = time.perf_counter()
                    r = evaluate(src, args.benchmark, args.data, shots=args.shots, limit=args.limit,
                                 subjects=subjects, reuse_prefix=reuse, batch_size=bs)
                    times[name].append(time.perf_counter() - t0)
                    last[name] = r
            for name, *_ in settings:
                r = last[name]
                n = r["overall"]["n"]
                med = statistics.median(times[name])
                rows.append({"model": preset, "parameters": model.num_params(), "context": cfg.max_seq_len,
                             "setting": name, "items": n, "seconds_median": round(med, 3),
                             "items_per_s": round(n / med, 2), "truncated_items": r["truncation"]["items_with_fewer_shots"]})
                print(f"{preset:10s} {name:26s} {n / med:8.2f} items/s  ({n} items, median of {args.rounds})")
            base = next(x for x in rows if x["model"] == preset and x["setting"] == "no prefix cache, batch 8")
            cached = next(x for x in rows if x["model"] == preset and x["setting"] == "prefix cache, batch 8")
            print(f"{preset:10s} prefix-cache speed-up: {cached['items_per_s'] / base['items_per_s']:.2f}x")
            for x in rows:
                if x["model"] == preset and x["setting"].split(",")[0] in args.formats.split(","):
                    print(f"{preset:10s} {x['setting'].split(',')[0]} / fp32 items/s: "
                          f"{x['items_per_s'] / cached['items_per_s']:.2f}")
    import os

    from geb.cpu import describe

    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "cpu": describe(), "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
           "torch": torch.__version__, "threads": args.threads, "benchmark": args.benchmark, "shots": args.shots,
           "subjects": subjects, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
