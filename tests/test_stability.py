"""The four loss-spike measures: detection, batch replacement, rollback with skipped data, embedding
gradient shrink, LR presets and automatic LR cuts, and exact resume across a rollback."""

import json
import math

import numpy as np
import pytest
import torch

from geb.config import get_preset
from geb.data.textfiles import pack_texts
from geb.data.tokens import TokenData
from geb.errors import GebError
from geb.model import GEB
from geb.train.loop import TrainConfig, lr_at, train
from geb.train.pretrain import PretrainTask
from geb.train.stability import LARGE_RUN_PARAMS, SkipWindows, SpikeDetector, resolve

from conftest import SAMPLE_TEXT


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_detector_ignores_a_falling_noisy_loss_and_flags_jumps_and_non_finite():
    rng = np.random.default_rng(0)
    d = SpikeDetector(window=50, sigma=6.0, rel=0.1, min_history=10)
    losses = 6.0 * np.exp(-np.arange(200) / 60) + 2.0 + rng.normal(0, 0.05, 200)
    flagged = []
    for x in losses:
        if d.is_spike(float(x)):
            flagged.append(x)
        d.accept(float(x))
    assert flagged == []  # a steadily falling curve with noise is not a spike
    t = d.threshold()
    assert t is not None and losses[-1] < t
    assert d.is_spike(t + 0.01) and not d.is_spike(t - 0.01)
    assert d.is_spike(float("nan")) and d.is_spike(float("inf")) and d.is_spike(2.0, grad_norm=float("nan"))
    young = SpikeDetector(window=50, sigma=6.0, rel=0.1, min_history=10)
    for x in losses[:5]:
        young.accept(float(x))
    assert not young.is_spike(100.0) and young.is_spike(float("nan"))  # too little history: non-finite only


def test_skip_windows_move_the_cursor_past_overlapping_ranges():
    w = SkipWindows()
    w.add(10, 15)
    w.add(14, 20)
    w.add(30, 31)
    w.add(5, 5)  # empty: ignored
    assert [w.next_cursor(c) for c in (9, 10, 17, 20, 30)] == [9, 20, 20, 20, 31]
    assert w.skipped() == 11
    assert SkipWindows(w.windows).windows == w.windows


def test_resolution_of_auto_presets_and_alpha():
    c = TrainConfig(steps=1000, lr=4e-4, min_lr=4e-5, warmup_steps=100)
    big, small = resolve(c, LARGE_RUN_PARAMS, "pretrain"), resolve(c, LARGE_RUN_PARAMS - 1, "pretrain")
    assert big.stability and big.emb_grad_alpha == 0.1
    assert not small.stability and small.emb_grad_alpha == 1.0
    assert not resolve(c, LARGE_RUN_PARAMS, "sft").stability  # auto is a pretraining measure
    assert resolve(TrainConfig(stability="off", emb_grad_alpha=0.3), 10**10, "pretrain").emb_grad_alpha == 0.3
    p = resolve(TrainConfig(steps=1000, lr=4e-4, min_lr=4e-5, warmup_steps=100, lr_preset="small-batch"), 1, "pretrain")
    assert p.lr == pytest.approx(2e-4) and p.min_lr == pytest.approx(2e-5) and p.decay_steps == 600
    pc = TrainConfig(steps=1000, lr=p.lr, min_lr=p.min_lr, warmup_steps=100, decay_steps=p.decay_steps)
    assert lr_at(600, pc) == pytest.approx(2e-5) and lr_at(99, pc) == pytest.approx(2e-4)
    with pytest.raises(GebError, match="stability"):
        resolve(TrainConfig(stability="yes"), 1, "pretrain")
    with pytest.raises(GebError, match="emb_grad_alpha"):
        resolve(TrainConfig(emb_grad_alpha=0.0), 1, "pretrain")


class Spiky:
    """A pretraining task whose batches at `bad` cursors are uniform random tokens: a data-made spike."""

    def __init__(self, base: PretrainTask, bad, vocab: int):
        self.base, self.bad, self.vocab = base, set(bad), vocab
        self.tokens_per_batch = base.tokens_per_batch
        self.drawn: list[int] = []

    def batch(self, index, micro):
        self.drawn.append(index)
        b = self.base.batch(index, micro)
        if index in self.bad:
            g = torch.Generator().manual_seed(index)
            x = torch.randint(0, self.vocab, (b["ids"].shape[0], b["ids"].shape[1] + 1), generator=g)
            b = {"ids": x[:, :-1], "targets": x[:, 1:]}
        return b

    def loss(self, model, b):
        return self.base.loss(model, b)

    def val_batches(self):
        return self.base.val_batches()

    def describe(self):
        return self.base.describe()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("spk") / "data"
    pack_texts(SAMPLE_TEXT, tokenizer, d, val_fraction=0.1, seed=0)
    return TokenData(d)


def _run(tmp, data, tokenizer, tiny_cfg, bad, resume=False, stop_after=None, **kw):
    base = dict(steps=24, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=0, save_every=5,
                log_every=1, dtype="fp32", device="cpu", seed=7, stability="on", spike_min_history=5,
                spike_window=20, spike_retries=1, snapshot_every=4, skip_before=2, skip_after=3,
                lr_cut_after=2, lr_cut_factor=0.5)
    c = TrainConfig(**{**base, **kw})
    task = Spiky(PretrainTask(data, 32, c.batch_size, c.grad_accum, c.seed), bad, tiny_cfg.vocab_size)
    if resume:
        from geb.checkpoint import load_model

        model = load_model(tmp)[0]
    else:
        model = GEB(tiny_cfg)
        model.init_weights(seed=7)
    meta = train(model, task, c, tmp, tokenizer, {"stage": "pretrain"}, resume=resume, quiet=True, stop_after=stop_after)
    return meta, task, model


def _records(folder):
    keep = ("kind", "step", "loss", "lr", "grad_norm", "cursor", "action", "skip", "to_step", "lr_scale", "tokens")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


def test_spikes_are_replaced_rolled_back_skipped_and_cut_and_resume_is_exact(tmp_path, data, tokenizer, tiny_cfg):
    bad = [13, 19, 20]  # one isolated bad batch, then two in a row
    meta, task, model = _run(tmp_path / "a", data, tokenizer, tiny_cfg, bad)
    recs = _records(tmp_path / "a")
    spikes = [r for r in recs if r["kind"] == "spike"]
    acts = [(r["cursor"], r["action"]) for r in spikes]
    # 13: replaced by the next batch; 19: replaced, 20 spikes again -> rollback and a skip window
    assert (13, "replace_batch") in acts and (19, "replace_batch") in acts and (20, "rollback") in acts
    assert ("lr_cut" in [a for _, a in acts]) and meta["stability"]["lr_scale"] == 0.5
    rb = next(r for r in spikes if r["action"] == "rollback")
    lo, hi = rb["skip"]
    assert lo <= 19 and hi >= 21 + 3 and meta["stability"]["skip_windows"] == [rb["skip"]]
    # every bad batch was drawn, none was trained on: losses of train steps stay far below the spikes
    assert set(bad) <= set(task.drawn)
    trains = [r for r in recs if r["kind"] == "train"]
    assert max(r["loss"] for r in trains[5:]) < min(r["loss"] for r in spikes if r["action"] != "lr_cut")
    assert meta["step"] == 24 and meta["tokens_seen"] == 24 * 4 * 32 and trains[-1]["step"] == 24
    # the rollback went to the snapshot of step 16 and replayed the steps after it (logged twice)
    assert rb["to_step"] == 16 and rb["step"] == 19
    assert [sum(r["step"] == s for r in trains) for s in (16, 17, 18, 19)] == [1, 2, 2, 1]
    # after the cut the LR is half the schedule's
    c = TrainConfig(steps=24, lr=1e-2, min_lr=1e-3, warmup_steps=2)
    assert trains[-1]["lr"] == pytest.approx(0.5 * lr_at(23, c))
    # measure 3 is on with the others: the embedding gradient is shrunk by 0.1
    assert meta["settings"]["resolved"]["emb_grad_alpha"] == 0.1 and model.emb_grad_alpha == 0.1

    # a crash before the first spike (last checkpoint: step 10), then resume: same records, same weights
    r = _run(tmp_path / "b", data, tokenizer, tiny_cfg, bad, stop_after=13)[0]
    assert r["stopped"] and json.loads((tmp_path / "b" / "meta.json").read_text())["step"] == 10
    resumed = _run(tmp_path / "b", data, tokenizer, tiny_cfg, bad, resume=True)[0]
    assert _records(tmp_path / "b") == recs
    assert resumed["stability"] == meta["stability"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_without_the_measures_bad_batches_are_trained_on_and_nan_stops_the_run(tmp_path, data, tokenizer, tiny_cfg):
    meta, task, _ = _run(tmp_path / "off", data, tokenizer, tiny_cfg, [13], stability="off", steps=14)
    recs = _records(tmp_path / "off")
    assert not any(r["kind"] == "spike" for r in recs) and meta["stability"]["spikes"] == 0
    trains = {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}
    assert trains[14] > 2 * trains[13]  # the bad batch at cursor 13 is step 14's
    assert meta["settings"]["resolved"]["emb_grad_alpha"] == 1.0

    class Nan(Spiky):
        def loss(self, model, b):
            loss, m = super().loss(model, b)
            return (loss * math.nan if self.drawn[-1] == 3 else loss), m

    c = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=0, save_every=0, log_every=1,
                    dtype="fp32", device="cpu", stability="off")
    model = GEB(get_preset("geb-test").replace(vocab_size=tiny_cfg.vocab_size))
    with pytest.raises(GebError, match="loss became nan"):
        train(model, Nan(PretrainTask(data, 32, 4, 1, 0), [], 8), c, tmp_path / "nan", tokenizer, {}, quiet=True)


def test_live_snapshots_never_exceed_what_the_docs_say(tmp_path, data, tokenizer, tiny_cfg, monkeypatch):
    """docs/training.md, "Snapshots": `host` keeps at most two snapshots, `device` one; each holds 12
    bytes per parameter (FP32 weights and AdamW's two moments) plus AdamW's step counters, and a new
    one reuses the memory of the one it replaces instead of being built beside it."""
    import weakref

    from geb.train import stability

    live, seen = weakref.WeakSet(), {"count": 0, "bytes": 0}
    init, take = stability.Snapshot.__init__, stability.Stability.snapshot

    def counting_init(self, *a, **k):
        init(self, *a, **k)
        live.add(self)
        seen["count"] = max(seen["count"], len(live))

    def measured_take(self, params, opt, loop, reset=False):
        take(self, params, opt, loop, reset)
        seen["bytes"] = max(seen["bytes"], sum(s.nbytes() for s in live))
        seen["one"] = 12 * sum(p.numel() for p in params) + 4 * len(params)  # 4: AdamW's FP32 step counter

    monkeypatch.setattr(stability.Snapshot, "__init__", counting_init)
    monkeypatch.setattr(stability.Stability, "snapshot", measured_take)
    records = {}
    for where, docs_limit in (("host", 2), ("device", 1)):
        seen.update(count=0, bytes=0)
        meta = _run(tmp_path / where, data, tokenizer, tiny_cfg, [13, 19, 20], snapshot_memory=where)[0]
        assert meta["stability"]["rollbacks"] == 1  # snapshots were taken, replaced, released and restored
        assert seen["count"] == docs_limit
        assert seen["bytes"] == docs_limit * seen["one"]
        records[where] = _records(tmp_path / where)
    # here the one device snapshot is the one the host pair would roll back to: the same run
    assert records["device"] == records["host"]
    with pytest.raises(GebError, match="snapshot_memory"):
        stability.Stability(TrainConfig(snapshot_memory="gpu"), True)
