"""Exact resume after a real SIGKILL: a `geb pretrain` subprocess whose data holds bad batches (so the
spike measures replace batches, roll back and skip a data window) is killed mid-run and resumed; the
resumed run logs exactly the losses, data order and skip windows of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from geb.data.tokens import TokenData, TokenWriter
from geb.train.loop import TrainConfig
from geb.train.pretrain import PretrainTask, run_pretrain

from conftest import ROOT, SAMPLE_TEXT

SEQ, BATCH, SEED = 32, 4, 7
BAD = (13, 19, 20)  # data cursors whose batches are random tokens: one isolated, then two in a row
SETTINGS = dict(steps=30, batch_size=BATCH, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=10, save_every=5,
                log_every=1, dtype="fp32", device="cpu", seed=SEED, stability="on", spike_min_history=5,
                spike_window=20, spike_retries=1, snapshot_every=4, skip_before=2, skip_after=3, lr_cut_after=2,
                lr_cut_factor=0.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(folder, train_ids, val_ids, tokenizer, tok_dir):
    w = TokenWriter(folder, tokenizer.vocab_size, tokenizer.doc_id,
                    extra_meta={"tokenizer": str(tok_dir), "tokenizer_hash": tokenizer.hash()})
    w.add(train_ids, "train")
    w.add(val_ids, "val")
    w.close()


@pytest.fixture(scope="module")
def spiky_data(tmp_path_factory, tokenizer):
    """A token folder in which the batches the loop draws at the BAD cursors are uniform random tokens."""
    root = tmp_path_factory.mktemp("kill")
    tokenizer.save(root / "tok")
    stream = [i for t in SAMPLE_TEXT * 3 for i in tokenizer.encode(t) + [tokenizer.doc_id]]
    val = [i for t in SAMPLE_TEXT[:16] for i in tokenizer.encode(t) + [tokenizer.doc_id]]
    _write(root / "clean", stream, val, tokenizer, root / "tok")
    # where the cursor -> window mapping puts the bad batches (the mapping depends only on the length)
    task = PretrainTask(TokenData(root / "clean"), SEQ, BATCH, 1, SEED)
    assert task.n_windows >= 50 * BATCH  # the whole run stays inside one epoch: bad windows are drawn once
    arr = np.asarray(stream, dtype=np.int64)
    rng = np.random.default_rng(0)
    for cur in BAD:
        for j in range(BATCH):
            s = task._window(cur * BATCH + j)
            arr[s : s + SEQ + 1] = rng.integers(0, tokenizer.vocab_size, SEQ + 1)
    _write(root / "data", arr[:-1].tolist(), val, tokenizer, root / "tok")  # the writer re-adds the final eos
    bad = PretrainTask(TokenData(root / "data"), SEQ, BATCH, 1, SEED)
    assert not torch.equal(bad.batch(BAD[0], 0)["ids"], task.batch(BAD[0], 0)["ids"])
    assert torch.equal(bad.batch(BAD[0] + 1, 0)["ids"], task.batch(BAD[0] + 1, 0)["ids"])
    return root / "data"


def _records(folder):
    keep = ("kind", "step", "loss", "lr", "grad_norm", "cursor", "action", "skip", "to_step", "lr_scale", "tokens",
            "val_loss")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


def _steps_logged(path) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:  # the folder is being swapped by a checkpoint save
        return 0
    steps = [json.loads(l)["step"] for l in lines if l.strip() and '"kind": "train"' in l]
    return max(steps, default=0)


def test_sigkill_mid_run_then_resume_gives_the_same_run(tmp_path, spiky_data):
    ref = run_pretrain(spiky_data, tmp_path / "ref", preset="geb-test", seq_len=SEQ, quiet=True,
                       train_config=TrainConfig(**SETTINGS))
    ref_recs = _records(tmp_path / "ref")
    actions = [r["action"] for r in ref_recs if r["kind"] == "spike"]
    assert "replace_batch" in actions and "rollback" in actions and "lr_cut" in actions
    assert ref["stability"]["skip_windows"] and ref["step"] == 30

    out = tmp_path / "killed"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "geb", "pretrain", "--data", str(spiky_data), "--out", str(out),
                             "--config", "geb-test", f"--seq-len={SEQ}", "--threads=1", "--quiet", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # kill once the run is past the rollback (step 19) and a later checkpoint: the resumed run must
    # carry the skip window and the LR cut over from the checkpoint
    deadline = time.time() + 600
    while _steps_logged(out / "metrics.jsonl") < 23:
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    at = json.loads((out / "meta.json").read_text())["step"]
    assert 20 <= at < 30  # the last checkpoint before the kill; the run was not finished

    resumed = run_pretrain(spiky_data, out, resume=True, quiet=True)
    assert _records(out) == ref_recs
    assert resumed["stability"] == ref["stability"] and resumed["last_val_loss"] == ref["last_val_loss"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
