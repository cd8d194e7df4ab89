"""`geb quantize`: write a bf16, int8 or int4 copy of a model folder that the engine loads in place."""

from __future__ import annotations


def configure(p) -> None:
    from geb.commands.common import add_force, add_threads
    from geb.infer.quant import FORMATS, INT4_GROUPS
    from geb.infer.folders import INT4_GROUP_SIZE

    p.add_argument("--model", required=True, help="full-precision model folder")
    p.add_argument("--format", required=True, choices=[f for f in FORMATS if f != "fp32"])
    p.add_argument("--group-size", type=int, default=INT4_GROUP_SIZE,
                   help=f"int4 group size: {', '.join(map(str, INT4_GROUPS))} (default {INT4_GROUP_SIZE})")
    p.add_argument("--clip", action="store_true",
                   help="int8/int4: per-group clipping search at quantize time (same stored layout and speed)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--eval-text", help="optional held-out text file: print perplexity vs fp32")
    add_force(p)
    add_threads(p)


def run(args) -> int:
    from pathlib import Path

    from geb.commands.common import apply_threads, claim_output
    from geb.errors import GebError
    from geb.infer.folders import load_runtime, quantize_folder

    apply_threads(args)
    claim_output(args.out, "model", args.force)
    out = quantize_folder(args.model, args.out, args.format, args.group_size, clip=args.clip)
    rt, tok, meta = load_runtime(out)
    print(f"wrote {out} ({args.format}, {rt.weight_bytes / 2**20:.1f} MiB of weights)")
    if args.eval_text:
        from geb.infer.bench import perplexity

        f = Path(args.eval_text)
        if not f.is_file():
            raise GebError(f"{f}: eval text not found")
        ids = tok.encode(f.read_text(encoding="utf-8"))
        base, _, _ = load_runtime(args.model, "fp32")
        p0, p1 = perplexity(base, ids, tok), perplexity(rt, ids, tok)
        print(f"perplexity on {f.name} ({len(ids)} tokens): fp32 {p0:.4f}, {args.format} {p1:.4f} "
              f"({100 * (p1 / p0 - 1):+.2f}%)")
    return 0
