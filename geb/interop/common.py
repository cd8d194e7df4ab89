"""Shared pieces of every import/export path: reading a geb folder lazily, RoPE layout permutations,
tokenizer files, and writing an imported model as a validated geb folder (atomically).
"""

from __future__ import annotations

from pathlib import Path

import torch

from geb.common import read_json_object
from geb.config import ModelConfig
from geb.errors import GebError


# -- reading a geb folder ---------------------------------------------------------------------------
class GebFolder:
    """A geb checkpoint folder opened for export: config, tokenizer files and tensors read one at a time.

    Tensors are memory-mapped (safetensors), so exporting a 1.3B model holds one tensor in memory at a
    time, never the whole model.
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        from geb.checkpoint import CONFIG, WEIGHTS, check_folder, read_meta

        self.folder = check_folder(folder)
        self.cfg, q = ModelConfig.load_with_quantization(self.folder / CONFIG)
        if q:
            raise GebError(f"{self.folder}: a quantized geb checkpoint ({q.get('format')}); "
                           "export the full-precision folder it was made from")
        self.meta = read_meta(self.folder)
        self.weights = self.folder / WEIGHTS
        try:
            self._f = safe_open(str(self.weights), framework="pt")
            self.names = set(self._f.keys())
        except Exception as e:
            raise GebError(f"{self.weights}: cannot read weights ({e}); the file may be truncated or corrupt") from None
        self._check_names()

    def _check_names(self) -> None:
        from geb.model import GEB

        with torch.device("meta"):
            model = GEB(self.cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if self.cfg.tie_embeddings:
            expected.pop("lm_head.weight")
        names = self.names - ({"lm_head.weight"} if self.cfg.tie_embeddings else set())
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            what = f"missing {', '.join(missing[:5])}" if missing else f"unexpected {', '.join(unexpected[:5])}"
            raise GebError(f"{self.weights}: tensors do not match config.json: {what}")
        for k, shape in expected.items():
            got = tuple(self._f.get_slice(k).get_shape())
            if got != shape:
                raise GebError(f"{self.weights}: tensor '{k}' has shape {got}, config.json expects {shape}")
        self.shapes = expected

    def tensor(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and self.cfg.tie_embeddings:
            name = "tok_emb.weight"
        try:
            return self._f.get_tensor(name)
        except Exception as e:
            raise GebError(f"{self.weights}: cannot read tensor '{name}' ({e}); the file may be truncated") from None

    def tokenizer_json(self) -> dict:
        return read_json_object(self.folder / "tokenizer.json", "tokenizer file")

    def tokenizer_config(self) -> dict:
        f = self.folder / "tokenizer_config.json"
        return read_json_object(f, "tokenizer config file") if f.is_file() else {}


# -- RoPE layouts ------------------------------------------------------------------------------------
# geb's "half" layout pairs dims (i, i + R/2) of each head's first R rotary dims (Hugging Face Llama);
# "interleaved" pairs (2i, 2i + 1) (Meta's Llama, llama.cpp's NORM rope, ChatGLM). Reordering the rows of
# wq and wk per head converts one into the other; q·k is unchanged because q and k get the same order.

def read_sharded(index: Path, load) -> dict:
    """Every tensor of a sharded checkpoint: `index` names its shards in 'weight_map' (the Hugging Face
    layout for safetensors and PyTorch files alike); `load(path)` reads one shard into a dict."""
    wm = read_json_object(index, "weights index file").get("weight_map")
    if not isinstance(wm, dict):
        raise GebError(f"{index}: missing field 'weight_map'")
    sd: dict = {}
    for shard in sorted(set(wm.values())):
        if not (index.parent / shard).is_file():
            raise GebError(f"{index}: shard '{shard}' not found")
        sd.update(load(index.parent / shard))
    missing = sorted(set(wm) - set(sd))
    if missing:
        raise GebError(f"{index}: tensor '{missing[0]}' is listed but not in its shard")
    return sd

def half_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int, rot: int) -> torch.Tensor:
    """Rows of a [n_heads * head_dim, in] projection from rotate-half to adjacent-pair order."""
    w3 = w.reshape(n_heads, head_dim, -1)
    r = w3[:, :rot].reshape(n_heads, 2, rot // 2, -1).transpose(1, 2).reshape(n_heads, rot, -1)
    return torch.cat([r, w3[:, rot:]], dim=1).reshape(w.shape)


def interleaved_to_half(w: torch.Tensor, n_heads: int, head_dim: int, rot: int) -> torch.Tensor:
    """Inverse of half_to_interleaved."""
    w3 = w.reshape(n_heads, head_dim, -1)
    r = w3[:, :rot].reshape(n_heads, rot // 2, 2, -1).transpose(1, 2).reshape(n_heads, rot, -1)
    return torch.cat([r, w3[:, rot:]], dim=1).reshape(w.shape)


# -- writing a geb folder ----------------------------------------------------------------------------
class _TokenizerWithFiles:
    """Passes a tokenizer to save_checkpoint and writes extra tokenizer files beside it, inside the same
    atomic folder (e.g. the source SentencePiece model, which GGUF export uses for llama.cpp's vocab)."""

    def __init__(self, tokenizer, files: dict[str, bytes]):
        self.tokenizer, self.files = tokenizer, files

    def save(self, folder) -> None:
        self.tokenizer.save(folder)
        for name, data in self.files.items():
            (Path(folder) / name).write_bytes(data)


def write_geb_folder(out: str | Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], tokenizer, meta: dict,
                     source: str, extra_files: dict[str, bytes] | None = None) -> Path:
    """Validate names/shapes against cfg and the tokenizer against the vocabulary, then save atomically."""
    from geb.checkpoint import check_state_dict, save_checkpoint
    from geb.model import GEB

    with torch.device("meta"):
        model = GEB(cfg)
    if cfg.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    check_state_dict(sd, model, source)
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise GebError(f"{source}: tensor '{k}' holds NaN or infinite values")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise GebError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding has only "
                       f"{cfg.vocab_size} rows")
    sd = {k: v.contiguous() for k, v in sd.items()}
    if extra_files:
        tokenizer = _TokenizerWithFiles(tokenizer, extra_files)
    return save_checkpoint(out, model, tokenizer, meta, state_dict=sd)
