"""`geb info`: parameter count and size per format for a preset or a model folder."""

from __future__ import annotations

import json


def configure(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="preset name (geb-1.3b, geb-small, geb-tiny, geb-test)")
    g.add_argument("--model", help="model folder")
    p.add_argument("--json", action="store_true", help="print JSON")


def describe(cfg) -> dict:
    n = cfg.num_params()
    return {
        "name": cfg.name, "parameters": n, "params_read_per_token": cfg.params_per_token(),
        "bytes": {"fp32": 4 * n, "bf16": 2 * n},
        "config": cfg.to_dict(),
    }


def run(args) -> int:
    from geb.config import ModelConfig, get_preset

    cfg = get_preset(args.config) if args.config else ModelConfig.load(f"{args.model}/config.json")
    info = describe(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['name']}: {info['parameters']:,} parameters")
        for k, v in info["bytes"].items():
            print(f"  {k:>9}: {v / 2**30:.2f} GiB")
        print(f"decode path here: {decode_path()}")
    return 0


def decode_path() -> str:
    """Which decode path this machine runs: geb's native core with its kernel variant, or torch and why."""
    from geb.cpu import cpu_model
    from geb.infer import native

    d = native.describe()
    if d["path"] == "native":
        return f"native core, {d['isa']} kernels (this CPU runs: {', '.join(d['supported'])}; {cpu_model()})"
    return f"PyTorch ({d['why']})"
