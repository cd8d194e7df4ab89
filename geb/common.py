"""Process-wide helpers every layer may import: atomic file writes and timestamps.

A file written here appears whole or not at all: the bytes go to `.NAME.tmp-PID` beside it, are flushed
to disk, and the temporary is renamed over the destination (a rename within one folder is atomic on
POSIX and Windows). The temporary's name is the one geb.checkpoint.clean_stale recognises, so a writer
killed mid-write leaves nothing that a later run does not tidy away. Whole folders are published the
same way by geb.checkpoint.AtomicFolder. Hardware facts (physical cores, CPU flags) live in geb.cpu.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Callable


def now_iso() -> str:
    """The current UTC time as '2026-12-05T16:04:25+00:00': the `created`/`date` field of every artifact."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def temp_path(path: str | Path) -> Path:
    """The temporary a writer of `path` uses in this process (geb.checkpoint.clean_stale removes dead ones)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, mkdir: bool = True) -> Path:
    """Call `write(tmp)` to fill a temporary beside `path`, flush it to disk, rename it to `path`.

    On any failure (a full disk, an exception in `write`, Ctrl-C) the temporary is removed and `path`
    keeps what it held before."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, **kw) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), **kw)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8", **kw) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding=encoding), **kw)


def atomic_write_json(path: str | Path, obj, *, indent: int | None = 1, default=None, **kw) -> Path:
    """`obj` as UTF-8 JSON (non-ASCII kept readable), ending in a newline."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent, default=default) + "\n"
    return atomic_write_text(path, text, **kw)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
