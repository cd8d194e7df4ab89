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
    from geb.infer.quant import FORMATS

    p.add_argument("--model", required=True, help="model folder (full precision or quantized)")
    p.add_argument("--format", choices=list(FORMATS), default=None,
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

    from geb.common import check_destination

    if path is not None and os.environ.get("RANK", "0") == "0":
        check_destination(path, kind, force=force)


# -- flags generated from a settings dataclass (TrainConfig) -----------------------------------------
GROUP_TITLES = {"schedule": "schedule", "stability": "loss-spike measures (GEB-1.3B Figure 1; see docs/training.md)",
                "scale": "scale (torchrun, GPUs)"}
_TYPES = {"int": int, "float": float, "str": None}


def config_fields(cls, names=None) -> list:
    """The fields of dataclass `cls` that have a flag (help metadata), in `names` when given."""
    import dataclasses

    fs = [f for f in dataclasses.fields(cls) if f.metadata.get("help") is not None]
    return fs if names is None else [f for f in fs if f.name in names]


def add_config_args(p, cls, names=None, *, defaults: dict | None = None, groups: bool = False,
                    helps: dict | None = None) -> list[str]:
    """One flag per field of `cls` (name → --kebab-name; type, choices and help from the field).

    With `defaults` None every flag defaults to None, so the command can tell which settings were given
    (and the help states the dataclass default); otherwise the flags default to the dataclass's values,
    overridden per stage by `defaults`. With `groups`, flags are listed under their field's group;
    `helps` replaces a field's help text for this command.
    Returns the field names, for settings_from_args."""
    given_only = defaults is None
    made: dict[str, object] = {}
    out = []
    for f in config_fields(cls, names):
        m = f.metadata
        target = p
        if groups and m.get("group"):
            if m["group"] not in made:
                made[m["group"]] = p.add_argument_group(GROUP_TITLES.get(m["group"], m["group"]))
            target = made[m["group"]]
        default = f.default if given_only else (defaults or {}).get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        helptext = (helps or {}).get(f.name, m["help"])
        if given_only and m.get("flag_default", True) and f.type != "bool":
            helptext = f"{helptext} (default {f.default})" if helptext else f"default {f.default}"
        if f.type == "bool":
            if f.default:  # a setting that is on: the flag turns it off
                target.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                    default=None if given_only else default, help=helptext)
            else:
                target.add_argument(flag, action="store_true", default=None if given_only else default,
                                    help=helptext)
        else:
            typ = _TYPES[f.type.split("|")[0].strip()]
            target.add_argument(flag, type=typ, choices=m.get("choices"), default=None if given_only else default,
                                help=helptext or None)
        out.append(f.name)
    return out


def settings_from_args(args, names) -> dict:
    """{name: value} of the settings flags add_config_args declared that were given (not None)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


# -- the options `geb sft` and `geb dpo` share -----------------------------------------------------------
# TrainConfig settings both fine-tuning commands take, and what they change in the stage's defaults
_STAGE_KEYS = ("batch_size", "grad_accum", "lr", "min_lr", "decay_steps", "weight_decay", "grad_clip", "dtype",
               "device", "seed", "eval_every", "eval_batches", "save_every", "log_every")
_STAGE_CLI_DEFAULTS = {"batch_size": 8, "eval_every": 50}


def add_train_args(p, stage_defaults: dict, *, epochs: float, unit: str) -> None:
    """Options shared by `geb sft` and `geb dpo`: the stage's TrainConfig defaults (`stage_defaults`,
    e.g. geb.train.sft.SFT_DEFAULTS), `epochs` passes over the data, batches counted in `unit`."""
    from geb.train.chatdata import ON_BAD
    from geb.train.loop import TrainConfig

    p.add_argument("--out", help="output checkpoint folder")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint "
                   "(give the same --data; --steps may extend it)")
    p.add_argument("--val-data", help="validation JSONL (same format as --data)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="without --val-data: hold out this fraction of --data for validation")
    p.add_argument("--on-bad", choices=ON_BAD, default="error",
                   help="a bad record (unknown role, empty turn, too long, ...) is an error, or is skipped "
                        "and counted in the log and meta.json (default: error)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=None, help=f"passes over the data (default {epochs:g})")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    wg = p.add_mutually_exclusive_group()
    wg.add_argument("--warmup-ratio", type=float, default=None, help="warmup as a fraction of the steps (default 0.05)")
    wg.add_argument("--warmup-steps", type=int, default=None)
    add_config_args(p, TrainConfig, _STAGE_KEYS, defaults={**_STAGE_CLI_DEFAULTS, **stage_defaults},
                    helps={"batch_size": f"{unit} per micro-batch", "lr": f"peak learning rate (default {stage_defaults['lr']:g})",
                           "min_lr": "cosine floor", "eval_every": "steps between validation passes"})
    p.add_argument("--quiet", action="store_true")
    add_force(p)
    p.set_defaults(_default_epochs=epochs)
    add_threads(p)


def start_stage(args, model_what: str) -> tuple[str, dict]:
    """Threads applied, then (the output folder, run_sft/run_dpo's keyword arguments) from the shared
    options; `model_what` names the checkpoint --model gives, for the error when neither it nor --resume is."""
    from geb.errors import GebError

    apply_threads(args)
    kw = stage_kwargs(args)
    if not args.resume and not args.model:
        raise GebError(f"give --model DIR ({model_what}) or --resume DIR")
    return args.resume or args.out, kw


def stage_kwargs(args) -> dict:
    """The keyword arguments run_sft/run_dpo take from the shared options."""
    from geb.errors import GebError
    from geb.train.loop import TrainConfig

    if args.resume:
        return {"resume": True, "overrides": {"steps": args.steps} if args.steps else None}
    if not args.out:
        raise GebError("give --out DIR (or --resume DIR)")
    claim_output(args.out, "model", args.force)
    c = TrainConfig(steps=args.steps or 1, warmup_steps=args.warmup_steps or 0,
                    **{k: getattr(args, k) for k in _STAGE_KEYS})
    epochs = None if args.steps else (args.epochs if args.epochs is not None else args._default_epochs)
    warmup_ratio = None if args.warmup_steps is not None else (args.warmup_ratio if args.warmup_ratio is not None else 0.05)
    return {"train_config": c, "epochs": epochs, "warmup_ratio": warmup_ratio, "val_fraction": args.val_fraction,
            "on_bad": args.on_bad}
