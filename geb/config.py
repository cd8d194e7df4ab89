"""Model configuration: one dataclass for every geb model (and Llama-family imports), plus named presets.

The presets share GEB-1.3B's architecture and differ only in size, so the same code path is exercised
from unit tests up to the full model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from geb.common import read_json_object
from geb.errors import GebError

# The config.json field a quantized folder adds beside the model shape (geb.infer.folders owns its contents).
QUANTIZATION = "quantization"


@dataclass
class ModelConfig:
    vocab_size: int = 64896
    n_layer: int = 24
    d_model: int = 2048
    n_head: int = 16
    n_kv_head: int = 4
    head_dim: int = 128
    ffn_hidden: int = 5632
    max_seq_len: int = 4096
    rope_base: float = 10000.0
    # "half": rotate-half over pairs (i, i + d/2), as in Hugging Face Llama.
    # "interleaved": adjacent pairs (2i, 2i + 1), as in Meta's original Llama and ChatGLM.
    rope_style: str = "half"
    # How many leading dims of each head are rotated (ChatGLM rotates only half); 0 means all.
    rope_dims: int = 0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Biases on the q/k/v projections (Qwen2-family checkpoints); geb's own models have none.
    qkv_bias: bool = False
    name: str = "custom"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> GebError:
            return GebError(f"invalid model config ({self.name}): {msg}")

        for f in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "ffn_hidden", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(f"field '{f}' must be a positive integer, got {v!r}")
        if self.n_head % self.n_kv_head:
            raise bad(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.rope_style not in ("half", "interleaved"):
            raise bad(f"field 'rope_style' must be 'half' or 'interleaved', got {self.rope_style!r}")
        rd = self.rotary_dims
        if rd % 2 or rd > self.head_dim:
            raise bad(f"field 'rope_dims' ({self.rope_dims}) must be even and at most head_dim ({self.head_dim})")

    @property
    def rotary_dims(self) -> int:
        return self.rope_dims or self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    def num_params(self) -> int:
        """Exact parameter count of the model this config builds (no buffers)."""
        d = self.d_model
        per_layer = (
            d * self.q_dim  # query
            + 2 * d * self.kv_dim  # key, value
            + self.q_dim * d  # output projection
            + 3 * d * self.ffn_hidden  # gate, up, down
            + 2 * d  # two RMSNorm weights
            + (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0)
        )
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return emb + head + self.n_layer * per_layer + d

    def params_per_token(self) -> int:
        """Weights read per decoded token: everything but the embedding table (a lookup)."""
        n = self.num_params() - self.vocab_size * self.d_model
        if self.tie_embeddings:
            n += self.vocab_size * self.d_model  # the tied table is read whole as the output layer
        return n

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GebError(f"{source}: unknown model config field(s): {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise GebError(f"{source}: {e}") from None

    def save(self, path: str | Path, quantization: dict | None = None) -> None:
        """config.json; a quantized folder's also carries its `quantization` field (see load_with_quantization)."""
        d = self.to_dict() if quantization is None else {**self.to_dict(), QUANTIZATION: quantization}
        Path(path).write_text(json.dumps(d, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """The model shape in a config.json, full-precision or quantized folder alike."""
        return cls.load_with_quantization(path)[0]

    @classmethod
    def load_with_quantization(cls, path: str | Path) -> tuple["ModelConfig", dict | None]:
        """(config, the `quantization` field or None) of a config.json. The field is what `geb quantize`
        adds (geb.infer.folders writes and validates its contents); a full-precision folder has none."""
        d = read_json_object(path, "model config")
        q = d.pop(QUANTIZATION, None)
        return cls.from_dict(d, source=str(path)), q

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, ModelConfig] = {
    # The released GEB-1.3B shape: exactly 1,348,044,800 parameters.
    "geb-1.3b": ModelConfig(name="geb-1.3b"),
    # About 87M parameters: a CPU-trainable research size.
    "geb-small": ModelConfig(
        name="geb-small", vocab_size=16384, n_layer=10, d_model=768, n_head=12, n_kv_head=3,
        head_dim=64, ffn_hidden=2048, max_seq_len=2048,
    ),
    # About 6M parameters: the quickstart model.
    "geb-tiny": ModelConfig(
        name="geb-tiny", vocab_size=4096, n_layer=6, d_model=256, n_head=8, n_kv_head=2,
        head_dim=32, ffn_hidden=704, max_seq_len=512,
    ),
    # Well under 1M parameters: unit tests.
    "geb-test": ModelConfig(
        name="geb-test", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
        head_dim=16, ffn_hidden=176, max_seq_len=128,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise GebError(f"unknown config preset '{name}' (choose from: {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name])


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round a tokenizer's vocabulary up to a multiple (GEB pads 64,794 → 64,896 the same way)."""
    return ((n + multiple - 1) // multiple) * multiple
