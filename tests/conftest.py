"""Shared fixtures: a small bilingual tokenizer, a tiny random model folder, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

SAMPLE_TEXT = [
    "The capital of France is Paris. Paris is known for the Eiffel Tower.",
    "Water boils at 100 degrees Celsius at sea level.",
    "北京是中国的首都。长城是世界上最长的城墙。",
    "水在海平面上一百摄氏度沸腾。熊猫生活在四川的山里。",
    "In 2024, 3 cats and 12 dogs lived on Maple Street.",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "def add(a, b):\n    return a + b  # code too",
    "Emoji 😀🎉 and rare CJK 𠀀𪚥 survive byte-level BPE.",
] * 20


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: a second OpenMP worker only spins (10-30x slower on a busy 2-core machine,
    measured). For a whole module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`), its
    module-scoped fixtures included; restores the previous setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    from geb.tokenizer import Tokenizer

    return Tokenizer.train(SAMPLE_TEXT, vocab_size=500, min_frequency=1)


@pytest.fixture(scope="session")
def tiny_cfg(tokenizer):
    from geb.config import get_preset, pad_vocab

    return get_preset("geb-test").replace(vocab_size=pad_vocab(tokenizer.vocab_size))


def save_random_model(folder: Path, cfg, tokenizer) -> Path:
    """A random GEB model of `cfg` (seed 0) saved as a checkpoint folder with `tokenizer`."""
    from geb.checkpoint import save_checkpoint
    from geb.model import GEB

    torch.manual_seed(0)
    model = GEB(cfg)
    model.init_weights(seed=0)
    save_checkpoint(folder, model, tokenizer, {"stage": "random", "parent": None})
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer, tiny_cfg):
    """A saved random geb-test model with the session tokenizer (read-only: copy before changing)."""
    return save_random_model(tmp_path_factory.mktemp("models") / "tiny", tiny_cfg, tokenizer)


@pytest.fixture(scope="session")
def tokens_dir(tmp_path_factory, tokenizer):
    """SAMPLE_TEXT packed into token shards with the session tokenizer (read-only)."""
    from geb.data.textfiles import pack_texts

    root = tmp_path_factory.mktemp("tok")
    tokenizer.save(root / "tokenizer")
    d = root / "data"
    pack_texts(SAMPLE_TEXT, tokenizer, d, val_fraction=0.1, seed=0, tokenizer_dir=root / "tokenizer")
    return d


def run_geb(*args: str, cwd: Path | None = None, timeout: float = 600, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m geb ARGS` in a subprocess with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "geb", *map(str, args)], cwd=cwd, env=env, text=True,
                       capture_output=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"geb {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def geb_cli():
    return run_geb
