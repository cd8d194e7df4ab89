"""Argument helpers shared by several subcommands (threads, device, sampling)."""

from __future__ import annotations

from geb.cpu import physical_cores  # noqa: F401  (re-exported for the subcommands)


def add_threads(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")


def apply_threads(args) -> int:
    import torch

    n = args.threads or physical_cores()
    torch.set_num_threads(n)
    return n


def add_sampling(p) -> None:
    from geb.infer.sampling import SamplingParams

    d = SamplingParams()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from_args(args):
    from geb.infer.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=list(args.stop),
    )


def add_engine(p) -> None:
    """--model, --format, sampling and --threads: what every generating command takes."""
    p.add_argument("--model", required=True, help="model folder (full precision or quantized)")
    p.add_argument("--format", choices=["fp32", "bf16", "int8", "int4"], default=None,
                   help="run a full-precision folder in this format (default: fp32, or a quantized folder's own)")
    add_sampling(p)
    add_threads(p)


def engine_from_args(args):
    """(Engine, SamplingParams) for the arguments add_engine declared."""
    from geb.infer.engine import Engine

    apply_threads(args)
    return Engine.from_folder(args.model, format=args.format), sampling_from_args(args)


def add_force(p) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace an existing output that geb did not write (or of another kind): deleted, "
                        "after saying what it holds (default: refuse)")


def claim_output(path, kind: str, force: bool) -> None:
    """Refuse (or, with --force, delete) an existing output that is not a geb artifact of `kind`,
    before any work starts. Under torchrun only rank 0 looks: the others would race its deletion."""
    import os

    from geb.checkpoint import check_destination

    if path is not None and os.environ.get("RANK", "0") == "0":
        check_destination(path, kind, force=force)
