"""Checkpoint folders: save → load gives identical outputs; bad folders give errors naming the problem."""

import json
import shutil

import pytest
import torch

from geb.checkpoint import load_model, save_checkpoint
from geb.errors import GebError
from geb.model import GEB


def test_save_load_identical_outputs(tiny_model_dir, tiny_cfg):
    model, tok, meta = load_model(tiny_model_dir)
    ref = GEB(tiny_cfg)
    ref.init_weights(seed=0)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    assert meta["stage"] == "random" and "created" in meta


def test_tied_model_roundtrip(tmp_path, tokenizer, tiny_cfg):
    cfg = tiny_cfg.replace(tie_embeddings=True)
    m = GEB(cfg)
    save_checkpoint(tmp_path / "t", m, tokenizer, {"stage": "x"})
    m2, _, _ = load_model(tmp_path / "t")
    assert m2.lm_head.weight is m2.tok_emb.weight
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


def _copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_files(tmp_path, tiny_model_dir):
    with pytest.raises(GebError, match="not found"):
        load_model(tmp_path / "nope")
    d = _copy(tiny_model_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(GebError, match="missing model.safetensors"):
        load_model(d)


def test_truncated_weights(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(GebError, match="model.safetensors.*truncated"):
        load_model(d)


def test_config_that_does_not_match_weights(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["d_model"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GebError, match="shape"):
        load_model(d)
    cfg["d_model"] = 64
    cfg["n_layer"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GebError, match="missing tensor.*layers.2"):
        load_model(d)


def test_unknown_config_field(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layers_typo"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GebError, match="n_layers_typo"):
        load_model(d)


def test_tokenizer_vocab_mismatch(tmp_path, tiny_model_dir, tokenizer):
    from geb.tokenizer import Tokenizer

    d = _copy(tiny_model_dir, tmp_path)
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    big = Tokenizer.train([" ".join(words[i : i + 20]) for i in range(0, 3000, 20)] * 2, vocab_size=700, min_frequency=1)
    assert big.vocab_size > 512
    big.save(d)
    with pytest.raises(GebError, match="vocab_size"):
        load_model(d)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, tiny_model_dir, tiny_cfg, tokenizer):
    d = _copy(tiny_model_dir, tmp_path)
    before = (d / "model.safetensors").read_bytes()

    class Boom(GEB):
        def state_dict(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(d, Boom(tiny_cfg), tokenizer, {"stage": "x"})
    assert (d / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp")]
    load_model(d)
