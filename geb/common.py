"""Process-wide helpers every layer may import: atomic file and folder writes, destination checks, timestamps.

A file written here appears whole or not at all: the bytes go to `.NAME.tmp-PID` beside it, are flushed
to disk, and the temporary is renamed over the destination (a rename within one folder is atomic on
POSIX and Windows). Whole folders are published the same way by `AtomicFolder`. The temporary's name is
the one `clean_stale` recognises, so a writer killed mid-write leaves nothing that a later run does not
tidy away.

Every writer of an artifact (model folder, token folder, data-run folder, HF export, GGUF file, evaluation
run) goes through `check_destination`: an existing destination is replaced only when it is a geb
artifact of the same kind (or empty); anything else is refused unless `force`, which says what it
deletes. Temporary names of an earlier crashed writer (`.NAME.tmp-PID`, `.NAME.old-PID`) are cleaned
there too. Hardware facts (physical cores, CPU flags) live in geb.cpu.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from geb import __version__
from geb.errors import GebError

# The files by which a folder says what it is (geb.checkpoint names a model folder's other files).
CONFIG = "config.json"
META = "meta.json"
MARKER = ".geb-artifact"  # {"kind": ...}: written into every folder AtomicFolder publishes with a kind
TOKENS_FORMAT = "geb-tokens-v1"  # meta.json's format of a token folder (geb.data.tokens)


def now_iso() -> str:
    """The current UTC time as '2026-12-05T16:04:25+00:00': the `created`/`date` field of every artifact."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def temp_path(path: str | Path) -> Path:
    """The temporary a writer of `path` uses in this process (clean_stale removes dead writers' ones)."""
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


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in `path`, or a GebError naming the file: missing ("WHAT not found"), not UTF-8
    JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise GebError(f"{path}: {what} not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GebError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise GebError(f"{path}: expected a JSON object")
    return d


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- destinations and whole folders --------------------------------------------------------------------------------
KINDS = {"model": "geb model folder", "tokens": "geb token folder", "data": "geb data-run folder",
         "hf": "geb Hugging Face export folder", "gguf": "GGUF file", "eval": "geb evaluation run folder",
         "result": "geb result file (JSON)"}
# what a training run writes into --out before its first checkpoint (a run killed that early)
_RUN_LOGS = {"metrics.jsonl", "loss.png"}
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)$")


def _json_obj(f: Path) -> dict:
    try:
        obj = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def artifact_kind(path: str | Path) -> str | None:
    """The kind of geb artifact at `path` (a key of KINDS), or None when geb did not write it."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        # figures a command wrote as one JSON file (`geb eval ppl --out`) carry the geb version
        return "result" if p.suffix == ".json" and "geb_version" in _json_obj(p) else None
    if not p.is_dir():
        return None
    kind = _json_obj(p / MARKER).get("kind")
    if kind in KINDS:
        return kind
    meta = _json_obj(p / META)
    if meta.get("format") == TOKENS_FORMAT:
        return "tokens"
    if "geb_version" in meta and (p / CONFIG).is_file():
        return "model"
    if _json_obj(p / CONFIG).get("stage") == "data" or (p / "work" / "run.json").is_file():
        return "data"
    # evaluation runs written before they carried the marker (geb eval mcq / toxicity)
    if ((p / "results.json").is_file() and (p / "predictions.jsonl").is_file()) or \
            ((p / "toxicity.json").is_file() and (p / "samples.jsonl").is_file()):
        return "eval"
    names = {c.name for c in p.iterdir() if not c.name.startswith(".")}
    if names and names <= _RUN_LOGS:
        return "model"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: str | Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `final` whose writer process is gone.

    A writer killed between its two renames leaves `final` missing and the previous artifact in
    `.NAME.old-PID`: that one is put back instead. Returns what was removed or restored."""
    final = Path(final)
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        return []
    done = []
    for p in sorted(parent.iterdir()):
        m = _TEMP.match(p.name)
        if not m or m["name"] != final.name or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        if m["what"] == "old" and not final.exists():
            os.replace(p, final)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


def _describe(path: Path) -> str:
    if not path.is_dir():
        return f"a file of {path.stat().st_size:,} bytes"
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.relpath(os.path.join(root, n), path) for n in names]
        if len(files) > 1000:
            break
    shown = ", ".join(sorted(files)[:5]) + (" ..." if len(files) > 5 else "")
    return f"{len(files)}{'+' if len(files) > 1000 else ''} file(s): {shown}" if files else "empty sub-folders"


def check_destination(path: str | Path, kind: str, force: bool = False, log=print) -> Path:
    """Make sure writing a `kind` artifact to `path` loses nothing that geb did not write.

    Nothing there, an empty folder, or a geb artifact of the same kind: fine (the writer replaces it
    atomically). Anything else is refused with a GebError, unless `force`: then this says what it
    deletes and deletes it. Stale temporary siblings of a crashed writer are cleaned first."""
    path = Path(path)
    clean_stale(path)
    if not path.exists() and not path.is_symlink():
        return path
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return path
    found = artifact_kind(path)
    if found == kind:
        return path
    what = _describe(path)
    is_a = f"a {KINDS[found]}, not a {KINDS[kind]}" if found else f"not a {KINDS[kind]}"
    if not force:
        raise GebError(f"{path}: already exists and is {is_a} (it holds {what}); nothing was written. "
                       f"Choose another output, or add --force to delete it")
    log(f"--force: deleting {path} ({what})")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    return path


def with_path(e: OSError, path: str | Path, temp: str | Path | None = None) -> OSError:
    """`e` naming `path`: a failed write() on an open file (ENOSPC) carries no file name, and a name
    inside the writer's temporary folder `temp` means nothing to the user."""
    name = e.filename
    if name is None or (temp is not None and str(name).startswith(str(temp))):
        return OSError(e.errno, e.strerror or (os.strerror(e.errno) if e.errno else str(e)), str(path))
    return e


class AtomicFolder:
    """Context manager: yields a temporary folder, renamed to `final` on success, removed on failure.

    With a `kind` (a key of KINDS) the destination is checked first (check_destination: only an
    artifact of that kind is replaced) and a marker naming the kind is written into the folder."""

    def __init__(self, final: str | Path, kind: str | None = None):
        self.final = Path(final)
        self.kind = kind
        self.tmp = temp_path(self.final)

    def __enter__(self) -> Path:
        if self.kind is not None:
            check_destination(self.final, self.kind)
        else:
            clean_stale(self.final)
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        except OSError as e:
            raise with_path(e, self.final, self.tmp) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                err = with_path(exc, self.final, self.tmp)
                if err is not exc:
                    raise err from None
            return
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        try:
            if self.kind is not None:
                (self.tmp / MARKER).write_text(json.dumps({"kind": self.kind, "geb_version": __version__}) + "\n")
            if self.final.exists():
                os.replace(self.final, old)
            os.replace(self.tmp, self.final)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if old.exists() and not self.final.exists():
                os.replace(old, self.final)
            raise with_path(e, self.final, self.tmp) from None
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
