"""`geb bench`: prefill/decode speed, time to first token and peak memory per format and thread count."""

from __future__ import annotations


def configure(p) -> None:
    from geb.infer.quant import FORMATS
    from geb.infer.folders import INT4_GROUP_SIZE

    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model folder (full precision, or quantized: then its own format only)")
    g.add_argument("--config", help="preset name, with --random-weights (e.g. geb-1.3b)")
    p.add_argument("--random-weights", action="store_true", help="random weights of the preset's shape")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma list (default: all four)")
    p.add_argument("--threads", default=None,
                   help="thread count, or a comma list to compare (default: physical cores)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--group-size", type=int, default=INT4_GROUP_SIZE, help="int4 group size")
    p.add_argument("--reps", type=int, default=1, help="repetitions per measurement (median)")
    p.add_argument("--bandwidth", action="store_true", help="also measure memory read bandwidth (decode bound)")
    p.add_argument("--no-isolate", action="store_true", help="run all formats in this process (peak RSS is then shared)")
    p.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "inherit"],
                   help="OpenMP wait policy of the measuring processes (default passive: idle torch workers "
                        "sleep; inherit: leave OMP_WAIT_POLICY as it is)")
    p.add_argument("--json", dest="json_out", help="write results to this JSON file")


def run(args) -> int:
    import datetime
    import json
    import sys

    from geb.common import atomic_write_text
    from geb.cpu import physical_cores
    from geb.config import get_preset
    from geb.errors import GebError
    from geb.infer.bench import machine_info, read_bandwidth, run_bench
    from geb.infer.quant import check_format

    if args.config and not args.random_weights:
        raise GebError("--config needs --random-weights (or give --model)")
    try:
        threads = [int(t) for t in args.threads.split(",")] if args.threads else [physical_cores()]
    except ValueError:
        raise GebError(f"--threads must be a number or a comma list, got {args.threads!r}") from None
    formats = [check_format(f.strip()) for f in args.formats.split(",") if f.strip()]
    spec = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "group_size": args.group_size,
            "reps": args.reps}
    if args.model:
        from geb.infer.folders import read_config
        from geb.checkpoint import check_folder

        folder = check_folder(args.model)
        cfg, q = read_config(folder)
        spec["model"] = str(folder)
        if q:  # a quantized folder runs in its own format only
            formats = [q.get("format")]
            spec["quantized"] = True
    else:
        cfg = get_preset(args.config)
        spec["config"] = args.config
    if args.prompt_len + args.new_tokens + 1 > cfg.max_seq_len:
        raise GebError(f"--prompt-len + --new-tokens exceed the model's context ({cfg.max_seq_len})")
    print(f"geb bench: {args.model or args.config} ({cfg.num_params():,} parameters), formats {formats}, "
          f"threads {threads}, prompt {args.prompt_len}, new tokens {args.new_tokens}")
    specs = [{**spec, "format": f, "threads": t} for t in threads for f in formats]
    policy = None if args.omp_wait_policy == "inherit" else args.omp_wait_policy.upper()
    results = run_bench(specs, isolate=not args.no_isolate, omp_wait_policy=policy)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "geb " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "geb bench",
              "machine": machine_info(), "results": results}
    if args.bandwidth:
        bw = {t: read_bandwidth(t) for t in threads}
        report["bandwidth"] = bw
        for r in results:
            b = bw[r["threads"]]["gb_s"] * 1e9
            r["decode_bound_tok_s"] = b / r["bytes_per_token"]
            r["decode_of_bound"] = r["decode_tok_s"] / r["decode_bound_tok_s"]
        for t, b in bw.items():
            print(f"read bandwidth, {t} threads: {b['gb_s']:.1f} GB/s ({b['method']})")
        for r in results:
            print(f"  {r['format']:>5} t{r['threads']}: decode {100 * r['decode_of_bound']:.0f}% of the bandwidth bound "
                  f"({r['decode_bound_tok_s']:.1f} tok/s)")
    if args.json_out:
        out = atomic_write_text(args.json_out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
