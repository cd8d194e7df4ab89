"""The options every `geb` subcommand declares, as data: the guard that refactors keep the CLI unchanged.

`python -m tests.cli_options` rewrites tests/data/cli_options.json from the current code; test_cli_options
compares against it. Each option is recorded with its flags, default, type, choices, action, nargs and
whether it is required; the comparison is per subcommand and ignores the order options are declared in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "data" / "cli_options.json"


def _describe(action: argparse.Action) -> dict:
    t = action.type
    return {
        "flags": sorted(action.option_strings) or [action.dest],
        "default": action.default if isinstance(action.default, (str, int, float, bool, type(None), list))
        else repr(action.default),
        "type": getattr(t, "__name__", repr(t)) if t is not None else None,
        "choices": list(action.choices) if action.choices is not None else None,
        "action": type(action).__name__,
        "nargs": action.nargs,
        "required": bool(action.required),
    }


def current_options() -> dict[str, list[dict]]:
    """subcommand → its options (help excluded), sorted by flags so declaration order does not matter."""
    from geb.cli import build_parser

    out: dict[str, list[dict]] = {}
    _walk(build_parser(load_all=True), "", out)
    del out[""]  # `geb` itself: only the subcommand choice
    return out


def _walk(parser: argparse.ArgumentParser, name: str, out: dict) -> None:
    """Record `parser` under `name` and every nested subcommand as 'NAME SUB' (e.g. 'eval mcq')."""
    opts = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            opts.append({"flags": [a.dest], "subcommands": sorted(a.choices), "required": bool(a.required)})
            for sub_name, sub in a.choices.items():
                _walk(sub, f"{name} {sub_name}".strip(), out)
        else:
            opts.append(_describe(a))
    out[name] = sorted(opts, key=lambda o: o["flags"])


def dump(options: dict[str, list[dict]]) -> str:
    """One option a line, so a diff of the snapshot reads as a diff of the CLI."""
    lines = ["{"]
    names = sorted(options)
    for i, name in enumerate(names):
        lines.append(f" {json.dumps(name)}: [")
        rows = [f"  {json.dumps(o, ensure_ascii=False)}" for o in options[name]]
        lines.append(",\n".join(rows))
        lines.append(" ]" + ("," if i < len(names) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(dump(current_options()))
    print(f"wrote {SNAPSHOT}")
