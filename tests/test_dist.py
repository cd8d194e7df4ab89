"""Distributed training: a real 2-process torchrun (gloo, CPU) matches the single-process loss curve,
sharded checkpoints resume on another number of processes, and the GPU-path helpers keep the math."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist

from geb.config import get_preset
from geb.errors import GebError
from geb.model import GEB
from geb.train import dist, perf
from geb.train.loop import TrainConfig
from geb.train.pretrain import run_pretrain

from conftest import ROOT

# DDP averages each gradient as one process does (g0/2 + g1/2, exact in binary floating point) and
# clips with the same norm: its losses are identical to one process's, and the tests assert equality.
# FSDP2 sums the gradient norm shard by shard, in another order: the clip factor differs in the last
# bit, which Adam carries into the weights. FP32: losses within FSDP_RTOL (observed 3.6e-8). BF16: the
# first step (no update yet) is identical; later BF16 roundings of the weights amplify that last bit
# (observed 1.0e-5), so later losses are asserted within BF16_RTOL.
FSDP_RTOL = 1e-6
BF16_RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rank_micros_split_the_global_batch():
    envs = [dist.DistEnv(rank=r, world=4) for r in range(4)]
    assert [list(dist.rank_micros(8, e)) for e in envs] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(dist.rank_micros(3, dist.DistEnv())) == [0, 1, 2]
    with pytest.raises(GebError, match="cannot share equally"):
        dist.rank_micros(6, envs[0])


def test_mfu_flops_formula_matches_pytorchs_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_preset("geb-test")
    b, t = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=torch.Generator().manual_seed(0))
    model = GEB(cfg)
    # the math kernel decomposes attention into batched products that the counter sees
    with FlopCounterMode(display=False) as fc, sdpa_kernel([SDPBackend.MATH]):
        model(ids[:, :-1], ids[:, 1:]).backward()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert counts["aten.bmm"] == 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * t * (b * t)
    # the formula also counts the (tiny) norm weights as 6 FLOPs/token: agree within 1%
    assert fc.get_total_flops() == pytest.approx(perf.flops_per_token(cfg, t) * b * t, rel=0.01)
    assert perf.peak_flops(torch.device("cpu")) is None and perf.peak_flops(torch.device("cpu"), 2.0) == 2e12


def test_activation_checkpointing_keeps_loss_and_gradients():
    cfg = get_preset("geb-test")
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    out = []
    for ac in (False, True):
        m = GEB(cfg)
        m.init_weights(seed=5)
        if ac:
            perf.apply_activation_checkpointing(m)
        loss = m(ids[:, :-1], ids[:, 1:])
        loss.backward()
        out.append((float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters()}, list(m.state_dict())))
    assert out[0][0] == out[1][0] and out[0][2] == out[1][2]  # same loss, same parameter names
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][n], g, rtol=1e-5, atol=1e-7)
    with pytest.raises(GebError, match="needs a CUDA device"):
        perf.check_attention("sdpa-flash", torch.device("cpu"))


# batch 2 x grad-accum 2 = a global batch of 4 sequences; the cosine horizon is pinned to 6 steps so that
# a 3-step run continued to 6 follows the same schedule as one 6-step run.
ARGS = dict(batch_size=2, grad_accum=2, lr=3e-3, min_lr=3e-4, warmup_steps=2, decay_steps=6, eval_every=3,
            save_every=0, log_every=1, dtype="fp32", device="cpu", seed=7)


def _torchrun(*args, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "geb", "pretrain", "--threads", "1", *map(str, args)]
    p = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=600)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _flags(tokens_dir, **over):
    """`geb pretrain` flags for ARGS (with overrides) on the geb-test preset."""
    out = ["--data", tokens_dir, "--config", "geb-test", "--seq-len", 32]
    for k, v in {**ARGS, **over}.items():
        out += [f"--{k.replace('_', '-')}", v]
    return out


def _curve(folder):
    recs = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in recs if r["kind"] == "train"], [r["val_loss"] for r in recs if r["kind"] == "val"])


@pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(), reason="no gloo backend")
def test_two_processes_match_one_and_checkpoints_reshard(tmp_path, tokens_dir):
    from safetensors.torch import load_file

    from geb.checkpoint import load_model

    def single(out, steps, resume=False):
        if resume:
            return run_pretrain(tokens_dir, out, resume=True, quiet=True, overrides={"steps": steps})
        return run_pretrain(tokens_dir, out, preset="geb-test", seq_len=32, quiet=True,
                            train_config=TrainConfig(steps=steps, **ARGS))

    # reference: one process, 3 steps, then continued to 6
    single(tmp_path / "ref", 3)
    shutil.copytree(tmp_path / "ref", tmp_path / "ref3")
    # as if a save crashed between its two renames: the folder is gone, its staged successor complete
    os.replace(tmp_path / "ref", tmp_path / ".ref.stage")
    single(tmp_path / "ref", 6, resume=True)
    ref_loss, ref_val = _curve(tmp_path / "ref")
    assert len(ref_loss) == 6 and len(ref_val) == 2

    # FSDP2 on 2 processes for 3 steps, continued by ONE process from the sharded checkpoint
    _torchrun(*_flags(tokens_dir), "--steps", 3, "--parallel", "fsdp", "--out", tmp_path / "fsdp")
    meta = json.loads((tmp_path / "fsdp" / "meta.json").read_text())
    assert meta["settings"]["world_size"] == 2 and meta["settings"]["parallel"] == "fsdp"
    assert sorted(p.name for p in (tmp_path / "fsdp" / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    gathered = load_file(tmp_path / "fsdp" / "model.safetensors")
    (tmp_path / "fsdp" / "model.safetensors").unlink()
    dist.consolidate(tmp_path / "fsdp")  # the same weights, rebuilt from the shards alone
    rebuilt = load_file(tmp_path / "fsdp" / "model.safetensors")
    assert gathered.keys() == rebuilt.keys() and all(torch.equal(gathered[k], rebuilt[k]) for k in gathered)
    exported = dist.consolidate(tmp_path / "fsdp", tmp_path / "export")  # a plain model folder elsewhere
    model, tok, _ = load_model(exported)
    assert tok is not None and not (exported / "dcp").exists() and not (exported / "train_state.pt").exists()
    assert all(torch.equal(p, gathered[n]) for n, p in model.named_parameters())
    single(tmp_path / "fsdp", 6, resume=True)
    loss, val = _curve(tmp_path / "fsdp")
    assert loss == pytest.approx(ref_loss, rel=FSDP_RTOL) and val == pytest.approx(ref_val, rel=FSDP_RTOL)

    # DDP on 2 processes continuing the ONE-process checkpoint of step 3
    _torchrun("--data", tokens_dir, "--resume", tmp_path / "ref3", "--steps", 6, "--parallel", "ddp")
    loss, val = _curve(tmp_path / "ref3")
    assert loss == ref_loss and val == ref_val
    meta = json.loads((tmp_path / "ref3" / "meta.json").read_text())
    assert meta["settings"]["world_size"] == 2 and meta["settings"]["parallel"] == "ddp" and meta["step"] == 6
    a, b = load_model(tmp_path / "ref")[0], load_model(tmp_path / "ref3")[0]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(q, p), n  # DDP: the same weights, to the bit


@pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(), reason="no gloo backend")
def test_fsdp2_in_bf16_computes_what_one_process_computes(tmp_path, tokens_dir):
    """FSDP2's policy keeps the FP32 parameters (the embedding among them) and lets autocast cast, as
    one process does: the BF16 products see the same operands, and only the gradient norm's summation
    order differs (see BF16_RTOL)."""
    bf16 = {**ARGS, "dtype": "bf16"}
    run_pretrain(tokens_dir, tmp_path / "one", preset="geb-test", seq_len=32, quiet=True,
                 train_config=TrainConfig(steps=4, **bf16))
    _torchrun(*_flags(tokens_dir, dtype="bf16"), "--steps", 4, "--parallel", "fsdp", "--out", tmp_path / "fsdp")
    meta = json.loads((tmp_path / "fsdp" / "meta.json").read_text())
    assert meta["settings"]["parallel"] == "fsdp" and meta["settings"]["dtype_resolved"] == "bf16"
    (ref, ref_val), (loss, val) = _curve(tmp_path / "one"), _curve(tmp_path / "fsdp")
    assert len(ref) == 4 and loss[0] == ref[0]  # the same forward and loss, to the bit, before any update
    assert loss == pytest.approx(ref, rel=BF16_RTOL) and val == pytest.approx(ref_val, rel=BF16_RTOL)
