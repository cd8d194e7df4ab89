"""Imports point one way: the CLI (geb/cli.py, geb/commands/) imports the library, never the reverse.
Read from the source with ast, so an import inside a function counts as much as one at the top."""

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
