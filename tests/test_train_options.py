"""Training options that must not change the math or must fail early: the auto dtype follows what the
CPU computes natively, attention kernels refuse impossible combinations before any kernel runs, the GPU
peak table is looked up by exact product name, and --compile / activation checkpointing train to the
same losses as eager on CPU."""

import json

import pytest
import torch

import geb.cpu
from geb.errors import GebError
from geb.train import perf
from geb.train.loop import TrainConfig, choose_dtype
from geb.train.pretrain import run_pretrain


pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # never touched: only its name and capability are asked, monkeypatched


# -- --dtype auto ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,want", [
    ({"avx2", "fma"}, torch.float32),                                 # AMD Zen 3, older Intel
    ({"avx512f", "avx512_vnni"}, torch.float32),                      # AVX-512 without its BF16 part
    ({"avx512f", "avx512_vnni", "avx512_bf16"}, torch.bfloat16),      # AMD Zen 4/5, Cooper Lake
    ({"avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),            # Sapphire Rapids
])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, flags, want):
    monkeypatch.setattr(geb.cpu, "cpu_flags", lambda: frozenset(flags))
    dtype, why = choose_dtype("auto", CPU)
    assert dtype == want
    assert ("no native BF16" in why) == (want == torch.float32) and why.startswith("auto:")
    # explicit choices are kept, and an emulated BF16 says so
    assert choose_dtype("fp32", CPU) == (torch.float32, "--dtype fp32")
    dtype, why = choose_dtype("bf16", CPU)
    assert dtype == torch.bfloat16 and ("emulates" in why) == (want == torch.float32)


@pytest.mark.parametrize("supported", [True, False])
def test_auto_dtype_on_cuda_follows_the_gpu(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(geb.cpu, "cpu_flags", lambda: frozenset())  # the CPU plays no part
    assert choose_dtype("auto", CUDA)[0] == (torch.bfloat16 if supported else torch.float32)


def _cfg(**kw):
    base = dict(steps=4, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=0, save_every=0,
                log_every=1, dtype="fp32", device="cpu", seed=7)
    return TrainConfig(**{**base, **kw})


def _losses(folder):
    return [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.mark.parametrize("native", [False, True])
def test_the_chosen_dtype_and_why_are_logged_and_in_meta(tmp_path, tokens_dir, monkeypatch, capsys, native):
    flags = {"avx2", "avx512f", "avx512_bf16"} if native else {"avx2", "fma"}
    monkeypatch.setattr(geb.cpu, "cpu_flags", lambda: frozenset(flags))
    meta = run_pretrain(tokens_dir, tmp_path / "ck", preset="geb-test", seq_len=32, quiet=False,
                        train_config=_cfg(steps=2, dtype="auto"))
    s = meta["settings"]
    assert s["train"]["dtype"] == "auto" and s["device"] == "cpu"
    assert s["dtype_resolved"] == ("bf16" if native else "fp32")
    assert s["dtype_reason"] == choose_dtype("auto", CPU)[1]
    assert f"training on cpu in {s['dtype_resolved']} ({s['dtype_reason']})" in capsys.readouterr().err


# -- attention kernels: a clear error before any kernel runs --------------------------------------------
def _fake_gpu(monkeypatch, name="NVIDIA H100 80GB HBM3", capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)


@pytest.mark.parametrize("impl", ["sdpa-flash", "flash-attn"])
def test_flash_attention_refuses_cpu_fp32_old_gpus_and_odd_heads(monkeypatch, impl, tiny_cfg):
    with pytest.raises(GebError, match="needs a CUDA device"):
        perf.check_attention(impl, CPU, torch.bfloat16)
    _fake_gpu(monkeypatch)
    with pytest.raises(GebError, match="BF16 or FP16 only.*--dtype bf16"):
        perf.check_attention(impl, CUDA, torch.float32)
    with pytest.raises(GebError, match="head_dim a multiple of 8"):
        perf.check_attention(impl, CUDA, torch.bfloat16, tiny_cfg.replace(head_dim=12))
    _fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    with pytest.raises(GebError, match="compute capability 8.0 or newer.*7.5"):
        perf.check_attention(impl, CUDA, torch.bfloat16)
    perf.check_attention("sdpa", CPU, torch.float32)  # the default runs everywhere


def test_sdpa_flash_on_cpu_fails_before_training_starts(tmp_path, tokens_dir, monkeypatch):
    from geb.model import GEB

    def no_forward(*a, **k):
        raise AssertionError("the model ran before the attention check")

    monkeypatch.setattr(GEB, "forward", no_forward)
    with pytest.raises(GebError, match="--attn sdpa-flash needs a CUDA device"):
        run_pretrain(tokens_dir, tmp_path / "ck", preset="geb-test", seq_len=32, quiet=True,
                     train_config=_cfg(attn="sdpa-flash"))
    assert not (tmp_path / "ck").exists()


# -- peak FLOPs by exact product name --------------------------------------------------------------------
@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA H800", 989.4), ("NVIDIA H800 PCIe", 756.5),
    ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A800-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05), ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0),
])
def test_known_gpus_are_looked_up_by_exact_product(monkeypatch, name, tflops):
    _fake_gpu(monkeypatch, name)
    assert perf.peak_flops(CUDA) == pytest.approx(tflops * 1e12)
    assert perf.peak_note(CUDA) is None


@pytest.mark.parametrize("name", ["NVIDIA B200", "NVIDIA GeForce RTX 4090", "NVIDIA A10G", "NVIDIA H20",
                                  "NVIDIA H100 NVL 2", "NVIDIA L40S-48Q", "AMD Instinct MI300X"])
def test_unknown_gpus_get_no_guess_and_are_asked_for_peak_tflops(monkeypatch, name):
    _fake_gpu(monkeypatch, name)
    assert perf.gpu_product(name) is None and perf.peak_flops(CUDA) is None
    assert "--peak-tflops" in perf.peak_note(CUDA) and name in perf.peak_note(CUDA)
    assert perf.peak_flops(CUDA, 1000.0) == 1e15 and perf.peak_note(CUDA, 1000.0) is None
    assert perf.peak_note(CPU) is None  # CPUs have no table: no MFU unless asked, and no nagging


# -- --compile and activation checkpointing train like eager -----------------------------------------
# Activation checkpointing recomputes the same FP32 operations in the same order: identical losses.
# torch.compile fuses elementwise work into generated C++ loops whose FP32 rounding differs from
# eager's: after 4 AdamW steps the losses differed by at most 8.4e-8 (relative) on an AVX2 CPU.
COMPILE_RTOL = 1e-6


@pytest.fixture(scope="module")
def eager_losses(tmp_path_factory, tokens_dir):
    out = tmp_path_factory.mktemp("eager") / "ck"
    run_pretrain(tokens_dir, out, preset="geb-test", seq_len=32, quiet=True, train_config=_cfg())
    return _losses(out)


def test_activation_checkpointing_trains_to_identical_losses(tmp_path, tokens_dir, eager_losses):
    run_pretrain(tokens_dir, tmp_path / "ac", preset="geb-test", seq_len=32, quiet=True,
                 train_config=_cfg(activation_checkpointing=True))
    assert _losses(tmp_path / "ac") == eager_losses and len(eager_losses) == 4


def test_compile_trains_to_the_eager_losses(tmp_path, tokens_dir, eager_losses):
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    run_pretrain(tokens_dir, tmp_path / "co", preset="geb-test", seq_len=32, quiet=True,
                 train_config=_cfg(compile=True))
    got = _losses(tmp_path / "co")
    assert got == pytest.approx(eager_losses, rel=COMPILE_RTOL)
