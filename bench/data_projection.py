"""Project the data pipeline's cost to 1 TB of raw text from bench/data_pipeline.py's measured step times.

Reads the benchmark's JSON (`step_seconds_w1_by_code`: each step's own work with one worker, median
seconds, on `input_mb` MB of raw zh/en text) and turns every step into core-seconds per raw MB, then
core-hours for `--tb` TB. The fixed cost of a run (imports, pools, per-task logging, the report) is
left out: it does not grow with the input. LSH buckets: a bucket whose signature files exceed
geb.data.minhash's in-memory limit goes through datatrove's streaming heap merge, so at corpus scale
its rate is the baseline side's (`--heap-side`, the code before the vectorized merge), when present.

Memory and disk of the MinHash stages follow from the record sizes (datatrove's formats): a signature
record is rows x 8 bytes + a 4-byte document index per document per band; a duplicate pair is 16 bytes;
the cluster stage's union-find holds one (file, doc) tuple key per document that is in a pair, whose
bytes per node are measured here with tracemalloc on a union-find of `--nodes` nodes built the way
datatrove's MinhashDedupCluster builds it. Documents per TB come from `--doc-bytes` (an assumption:
the benchmark's own documents are short reviews and whole plays), the share of documents in a
duplicate pair from `--dup-share` (an assumption, stated in the output).

    python bench/data_projection.py   # reads bench/results/data_pipeline.json, writes bench/results/data_projection.json
"""

from __future__ import annotations

import argparse
import json
import random
import tracemalloc
from pathlib import Path

from geb.common import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

# step label (report.json's timing.steps) → stage of the projection
STAGES = {
    "clean (read, rules, quality filters, write)": lambda k, rules: k in rules or k in ("read", "write clean"),
    "minhash signatures": lambda k, rules: k == "minhash signatures",
    "minhash buckets": lambda k, rules: k == "minhash buckets",
    "minhash cluster (1 task)": lambda k, rules: k == "minhash cluster",
    "minhash filter (read, filter, write)": lambda k, rules: k in ("read minhash_filter", "minhash filter", "write minhash"),
    "paragraph + sentence dedup signatures": lambda k, rules: k in ("para_dedup signatures", "sent_dedup signatures"),
    "paragraph + sentence dedup find (1 task each)": lambda k, rules: k in ("para_dedup find", "sent_dedup find"),
    "paragraph + sentence dedup filters (read, filter, write)": lambda k, rules: k.startswith(("read para", "read sent", "write para", "write sent"))
    or k in ("para_dedup filter", "sent_dedup filter"),
}


def union_find_bytes_per_node(nodes: int, seed: int = 0) -> float:
    """Bytes per node of datatrove's cluster union-find (dict of (file, doc) tuples → parent, sizes of roots)."""
    rng = random.Random(seed)
    keys = [(rng.randrange(1000), rng.randrange(1 << 31)) for _ in range(nodes)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    union_set, set_size = {}, {}
    for i in range(0, nodes - 1, 2):  # clusters of two: one root, one child (datatrove's union by size)
        a, b = (keys[i][0], keys[i][1]), (keys[i + 1][0], keys[i + 1][1])  # fresh tuples, as read from .dups
        union_set[a] = a
        union_set[b] = a
        set_size[a] = 2
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / nodes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=str(ROOT / "bench" / "results" / "data_pipeline.json"))
    ap.add_argument("--side", default="new", help="the code side of the bench whose step times are projected")
    ap.add_argument("--heap-side", default="baseline", help="side whose 'minhash buckets' rate is the streaming merge's")
    ap.add_argument("--tb", type=float, default=1.0)
    ap.add_argument("--doc-bytes", type=float, default=3000.0, help="mean raw document size (assumption)")
    ap.add_argument("--dup-share", type=float, default=0.3, help="share of documents in a near-duplicate pair (assumption)")
    ap.add_argument("--nodes", type=int, default=400_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_projection.json"))
    args = ap.parse_args()

    b = json.loads(Path(args.bench).read_text())
    steps = dict(b["step_seconds_w1_by_code"][args.side])
    heap = b["step_seconds_w1_by_code"].get(args.heap_side, {})
    if "minhash buckets" in heap:
        steps["minhash buckets"] = heap["minhash buckets"]
    rules = {s["step"] for s in b["steps"]}
    mb = b["input_mb"]
    total_mb = args.tb * 1e6
    per_stage = {}
    for name, pick in STAGES.items():
        sec = sum(v for k, v in steps.items() if pick(k, rules))
        per_stage[name] = {"core_s_per_mb": round(sec / mb, 4), "core_hours": round(sec / mb * total_mb / 3600, 1)}
    core_hours = round(sum(s["core_hours"] for s in per_stage.values()), 1)

    # MinHash records at the pipeline's settings (read from the bench's report settings when present)
    bands, rows = 80, 10
    docs = args.tb * 1e12 / args.doc_bytes
    sig_record = rows * 8 + 4
    dup_docs = docs * args.dup_share
    per_node = union_find_bytes_per_node(args.nodes)
    result = {
        "bench": {"file": str(Path(args.bench).relative_to(ROOT)) if Path(args.bench).is_relative_to(ROOT) else args.bench,
                  "command": b["command"], "date": b["date"], "input_mb": mb, "side": args.side,
                  "buckets_rate_from": args.heap_side if "minhash buckets" in heap else args.side,
                  "load_average_1min": b.get("load_average_1min")},
        "tb": args.tb, "per_stage": per_stage, "core_hours": core_hours,
        # the whole pipeline's MB per CPU second in each bench run (for runs made before the bench recorded it)
        "mb_per_cpu_second": {f"{r['code']} w{r['workers']}": round(mb / r["cpu_seconds"], 3)
                              for r in b["runs"] if not r.get("tiny")},
        "assumptions": {"doc_bytes": args.doc_bytes, "dup_share": args.dup_share,
                        "note": "every document reaches MinHash (an upper bound: the clean stage drops some first)"},
        "minhash": {"bands": bands, "rows": rows, "documents": docs,
                    "signature_record_bytes": sig_record,
                    "signature_bytes_total": docs * bands * sig_record,
                    "signature_bytes_per_bucket": docs * sig_record,
                    "buckets_in_memory_merge_bytes_per_bucket": 3 * docs * sig_record,
                    "dups_pair_bytes": 16, "dups_bytes_total_at_most": dup_docs * bands * 16,
                    "cluster_documents": dup_docs, "cluster_bytes_per_node_measured": round(per_node, 1),
                    "cluster_bytes": dup_docs * per_node},
        "command": "python bench/data_projection.py"
                   + "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("tb", args.tb), ("doc_bytes", args.doc_bytes),
                                                                         ("dup_share", args.dup_share)))}
    atomic_write_json(args.out, result, indent=2)
    m = result["minhash"]
    print(f"{args.tb:g} TB: {core_hours:,} core-hours")
    for k, v in per_stage.items():
        print(f"  {k}: {v['core_s_per_mb']} core-s/MB, {v['core_hours']:,} core-hours")
    print(f"{docs / 1e6:,.0f} M documents; signatures {m['signature_bytes_total'] / 1e12:.2f} TB on disk "
          f"({m['signature_bytes_per_bucket'] / 1e9:.1f} GB per bucket); cluster union-find "
          f"{m['cluster_bytes'] / 1e9:.1f} GB ({per_node:.0f} B per node x {dup_docs / 1e6:,.0f} M documents)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
