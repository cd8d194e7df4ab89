"""Self-describing checkpoint folders: write atomically, load with clear errors.

A folder holds `model.safetensors`, `config.json` (ModelConfig), the tokenizer (`tokenizer.json`,
`tokenizer_config.json`), `meta.json` (stage, parent artifact, data hash, resolved settings, step,
tokens seen) and, for training stages, `train_state.pt` (optimizer, RNG and data position to resume).
Folders are written under a temporary name and renamed, so a crash never leaves a finished-looking
half checkpoint.

Every writer of an artifact (model folder, token folder, data-run folder, HF export, GGUF file) goes
through `check_destination`: an existing destination is replaced only when it is a geb artifact of the
same kind (or empty); anything else is refused unless `force`, which says what it deletes. Temporary
names of an earlier crashed writer (`.NAME.tmp-PID`, `.NAME.old-PID`) are cleaned there too.

torch is imported inside the functions that need it: the data pipeline uses AtomicFolder and
check_destination without loading torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from geb import __version__
from geb.common import now_iso  # noqa: F401  (geb.checkpoint.now_iso: the artifacts' timestamp)
from geb.config import ModelConfig
from geb.errors import GebError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"
TRAIN_STATE = "train_state.pt"
MARKER = ".geb-artifact"  # {"kind": ...}: written into every folder AtomicFolder publishes with a kind

if TYPE_CHECKING:
    import torch


# -- destinations ------------------------------------------------------------------------------------
KINDS = {"model": "geb model folder", "tokens": "geb token folder", "data": "geb data-run folder",
         "hf": "geb Hugging Face export folder", "gguf": "GGUF file", "eval": "geb evaluation run folder"}
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
    from geb.data.tokens import FORMAT as TOKENS_FORMAT

    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            return "gguf" if f.read(4) == b"GGUF" else None
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
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")

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


def _contiguous_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    seen = {}
    for k, v in model.state_dict().items():
        # Tied weights appear twice; safetensors refuses shared storage, so keep the first name.
        key = v.data_ptr()
        if key in seen and v.numel():
            continue
        seen[key] = k
        sd[k] = v.detach().contiguous().cpu()
    return sd


def save_checkpoint(folder: str | Path, model, tokenizer, meta: dict, train_state: dict | None = None,
                    state_dict: dict | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a complete checkpoint folder atomically and return its path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    meta = {"geb_version": __version__, "created": now_iso(), **meta}
    with AtomicFolder(folder, kind="model") as tmp:
        save_file(state_dict if state_dict is not None else _contiguous_state(model), str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        model.cfg.save(tmp / CONFIG)
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")
        if train_state is not None:
            import io

            import torch

            # serialised in memory, written by Python: a full disk is then an OSError naming the file
            # (torch.save's own writer reports "enforce fail at inline_container.cc")
            buf = io.BytesIO()
            torch.save(train_state, buf)
            (tmp / TRAIN_STATE).write_bytes(buf.getbuffer())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return folder


def read_meta(folder: str | Path) -> dict:
    f = Path(folder) / META
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise GebError(f"{f}: not valid JSON ({e})") from None


def check_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise GebError(f"{folder}: model folder not found")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise GebError(f"{folder}: missing {name} (not a geb checkpoint folder)")
    return folder


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncated files
        raise GebError(f"{path}: cannot read weights ({e}); the file may be truncated or corrupt") from None


def check_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Names and shapes of sd must match model exactly; the error names the first offenders."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model.cfg, "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise GebError(f"{source}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise GebError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise GebError(f"{source}: tensor '{k}' has shape {tuple(sd[k].shape)}, config expects {tuple(shape)}")


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               load_tokenizer: bool = True):
    """Load (model, tokenizer, meta) from a checkpoint folder, validating every piece."""
    import torch

    from geb.model import GEB
    from geb.tokenizer import Tokenizer

    folder = check_folder(folder)
    cfg, q = ModelConfig.load_with_quantization(folder / CONFIG)
    if q:
        raise GebError(f"{folder}: a quantized checkpoint ({q.get('format')}); "
                       "load it through geb.infer (every inference command accepts it)")
    with torch.device("meta"):
        model = GEB(cfg)
    sd = read_weights(folder / WEIGHTS)
    check_state_dict(sd, model, str(folder / WEIGHTS))
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.reset_rope()
    tok = None
    if load_tokenizer:
        tok = Tokenizer.load(folder)
        if tok.vocab_size > cfg.vocab_size:
            raise GebError(f"{folder}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                           f"{cfg.vocab_size} (tokenizer and weights do not belong together)")
    return model, tok, read_meta(folder)


def load_train_state(folder: str | Path) -> dict:
    f = Path(folder) / TRAIN_STATE
    if not f.is_file():
        raise GebError(f"{folder}: no {TRAIN_STATE}; this checkpoint cannot be resumed")
    import torch

    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:
        raise GebError(f"{f}: cannot read training state ({e})") from None
