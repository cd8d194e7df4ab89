"""Imports point one way: serve → infer → model; train → model; eval may import infer; the CLI
(geb/cli.py, geb/commands/) imports the library and nothing imports it. Read from the source with ast,
so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

GEB = Path(__file__).resolve().parent.parent / "geb"


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def commands_importers(root: Path = GEB) -> list[str]:
    """'path:line imports NAME' for every module outside the CLI that imports geb.commands."""
    bad = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root.parent).as_posix()
        if rel == "geb/cli.py" or rel.startswith("geb/commands/"):
            continue
        for line, name in _imports(ast.parse(f.read_text(encoding="utf-8"), filename=rel)):
            if name == "geb.commands" or name.startswith("geb.commands."):
                bad.append(f"{rel}:{line} imports {name}")
    return bad


# what each layer may not import (geb.commands is covered by commands_importers for every module)
ABOVE = {
    # the model level: what inference, training and evaluation all stand on
    **{f"geb/{m}.py": ("geb.infer", "geb.serve", "geb.train", "geb.eval", "geb.data", "geb.interop", "geb.quickstart")
       for m in ("model", "config", "scoring", "tokenizer", "chat_format", "errors", "common", "cpu", "corelib")},
    "geb/infer/": ("geb.eval", "geb.serve", "geb.train", "geb.interop", "geb.quickstart"),
    "geb/serve/": ("geb.eval", "geb.train", "geb.interop", "geb.quickstart"),
    "geb/train/": ("geb.infer", "geb.eval", "geb.serve", "geb.interop", "geb.quickstart"),
    "geb/eval/": ("geb.serve", "geb.train", "geb.interop", "geb.quickstart"),
}


def upward_imports(root: Path = GEB) -> list[str]:
    """'path:line imports NAME' for every import of a layer above the importing module's (ABOVE)."""
    bad = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root.parent).as_posix()
        banned = [b for prefix, names in ABOVE.items() for b in names
                  if rel == prefix or (prefix.endswith("/") and rel.startswith(prefix))]
        for line, name in _imports(ast.parse(f.read_text(encoding="utf-8"), filename=rel)):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{rel}:{line} imports {name}")
    return bad


def test_no_layer_imports_one_above_it():
    assert upward_imports() == []


def test_the_layer_check_sees_inference_importing_evaluation(tmp_path):
    # the one-way rule must be able to fail: inference reaching up into evaluation, lazily or not
    (tmp_path / "geb" / "infer").mkdir(parents=True)
    (tmp_path / "geb" / "eval").mkdir()
    (tmp_path / "geb" / "eval" / "mcq.py").write_text("from geb.infer.scoring import load_scorer\n")  # allowed
    (tmp_path / "geb" / "infer" / "bench.py").write_text("def f():\n    from geb.eval.scoring import perplexity_of\n")
    (tmp_path / "geb" / "scoring.py").write_text("import geb.infer.runtime\n")
    assert upward_imports(tmp_path / "geb") == [
        "geb/infer/bench.py:2 imports geb.eval.scoring", "geb/infer/bench.py:2 imports geb.eval.scoring.perplexity_of",
        "geb/scoring.py:1 imports geb.infer.runtime"]


def test_nothing_outside_the_cli_imports_geb_commands():
    assert commands_importers() == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    # the guard above must be able to fail: a library module importing a subcommand lazily is caught
    pkg = tmp_path / "geb"
    (pkg / "commands").mkdir(parents=True)
    (pkg / "cli.py").write_text("import geb.commands.info\n")  # the CLI may
    (pkg / "lib.py").write_text("def f():\n    from geb.commands.common import physical_cores\n")
    (pkg / "other.py").write_text("from geb import commands\n")
    assert commands_importers(pkg) == ["geb/lib.py:2 imports geb.commands.common",
                                       "geb/lib.py:2 imports geb.commands.common.physical_cores",
                                       "geb/other.py:1 imports geb.commands"]
