"""Self-describing checkpoint folders: write atomically, load with clear errors.

A folder holds `model.safetensors`, `config.json` (ModelConfig), the tokenizer (`tokenizer.json`,
`tokenizer_config.json`), `meta.json` (stage, parent artifact, data hash, resolved settings, step,
tokens seen) and, for training stages, `train_state.pt` (optimizer, RNG and data position to resume).
Folders are written under a temporary name and renamed, so a crash never leaves a finished-looking
half checkpoint.

The folder is published by geb.common.AtomicFolder, which also guards the destination (only a geb
model folder is replaced). torch is imported inside the functions that need it, so reading a folder's
meta.json does not load torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from geb import __version__
from geb.common import CONFIG, META, AtomicFolder, now_iso
from geb.config import ModelConfig
from geb.errors import GebError

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"

if TYPE_CHECKING:
    import torch


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
