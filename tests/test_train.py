"""Pretraining: the loss falls, resume continues the exact same loss curve, bad data is a clear error."""

import json

import pytest
import torch

from geb.data.textfiles import pack_texts
from geb.errors import GebError
from geb.train.loop import TrainConfig, lr_at
from geb.train.pretrain import run_pretrain

def _cfg(**kw):
    base = dict(steps=12, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=6, save_every=5,
                log_every=1, dtype="fp32", device="cpu", seed=7)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warmup_then_cosine_to_min():
    c = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(100, c) == pytest.approx(0.1)
    assert lr_at(55, c) == pytest.approx(0.55, abs=1e-6)
    fast = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=50)
    assert lr_at(50, fast) == pytest.approx(0.1) and lr_at(80, fast) == pytest.approx(0.1)


def test_pretrain_learns_and_writes_a_complete_folder(tmp_path, tokens_dir):
    meta = run_pretrain(tokens_dir, tmp_path / "ck", preset="geb-test", train_config=_cfg(steps=30), seq_len=32, quiet=True)
    recs = [json.loads(l) for l in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    assert train[-1] < train[0] * 0.6
    assert meta["step"] == 30 and meta["tokens_seen"] == 30 * 4 * 32
    assert meta["parent"] is None and meta["data_hash"] and meta["settings"]["train"]["lr"] == 3e-3
    for f in ("model.safetensors", "config.json", "tokenizer.json", "meta.json", "train_state.pt", "loss.png"):
        assert (tmp_path / "ck" / f).is_file(), f


def test_resume_gives_the_same_loss_curve(tmp_path, tokens_dir):
    full = run_pretrain(tokens_dir, tmp_path / "a", preset="geb-test", train_config=_cfg(), seq_len=32, quiet=True)
    # "crash" at step 8: the last checkpoint is step 5
    r = run_pretrain(tokens_dir, tmp_path / "b", preset="geb-test", train_config=_cfg(), seq_len=32, quiet=True, stop_after=8)
    assert r["stopped"]
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["step"] == 5
    resumed = run_pretrain(tokens_dir, tmp_path / "b", resume=True, quiet=True)

    def curve(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    assert curve(tmp_path / "a") == curve(tmp_path / "b")
    assert full["last_val_loss"] == resumed["last_val_loss"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_refuses_to_overwrite_and_bad_data(tmp_path, tokens_dir):
    run_pretrain(tokens_dir, tmp_path / "c", preset="geb-test", train_config=_cfg(steps=2), seq_len=32, quiet=True)
    with pytest.raises(GebError, match="already holds a checkpoint"):
        run_pretrain(tokens_dir, tmp_path / "c", preset="geb-test", train_config=_cfg(steps=2), seq_len=32, quiet=True)
    with pytest.raises(GebError, match="meta.json missing"):
        run_pretrain(tmp_path, tmp_path / "d", preset="geb-test", train_config=_cfg(steps=2), quiet=True)
    with pytest.raises(GebError, match="exceeds the model's context"):
        run_pretrain(tokens_dir, tmp_path / "e", preset="geb-test", train_config=_cfg(steps=2), seq_len=100000, quiet=True)


def test_the_training_loop_itself_refuses_a_folder_geb_did_not_write(tmp_path, tokens_dir):
    # the library call, without the CLI's claim_output in front of it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(GebError, match="not a geb model folder"):
        run_pretrain(tokens_dir, tmp_path / "mine", preset="geb-test", train_config=_cfg(steps=2), seq_len=32, quiet=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_too_little_data(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tok")
    pack_texts(["tiny", "doc"], tokenizer, tmp_path / "d", val_fraction=0.5, tokenizer_dir=tmp_path / "tok")
    with pytest.raises(GebError, match="fewer than one sequence"):
        run_pretrain(tmp_path / "d", tmp_path / "e", preset="geb-test", train_config=_cfg(steps=2), seq_len=64, quiet=True)


def test_empty_training_data(tmp_path, tokenizer):
    with pytest.raises(GebError, match="empty"):
        pack_texts([], tokenizer, tmp_path / "x")
