"""GPU throughput options for training and the FLOPs accounting behind the MFU figure.

Options (all off by default, none changes the model's parameters or their names):
- activation checkpointing per transformer block (recompute activations in backward),
- torch.compile per block (before FSDP2 wraps the blocks, as torch.compile + FSDP2 expects),
- the attention kernel: PyTorch SDPA (its FlashAttention-2 kernel is chosen on CUDA for BF16 causal
  attention without a mask, GQA included), SDPA restricted to the flash kernel (fails loudly instead of
  silently falling back), or the `flash-attn` package's `flash_attn_func` when installed.

MFU (model FLOPs utilization) = achieved model FLOPs per second / peak FLOPs per second, with the
model FLOPs per trained token counted as in PaLM (Chowdhery et al. 2022, appendix B):
    6 * N  +  12 * n_layer * n_head * head_dim * seq_len
where N is every parameter that takes part in a matrix product (all but the input embedding table,
which is a lookup), 6 = 2 (multiply-add) x 3 (forward + two backward products), and the second term
is attention's QK^T and AV products, counted without the causal half (the usual convention).
Recomputation (activation checkpointing) is not counted: MFU measures useful work only.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from geb.errors import GebError

# Dense BF16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "H800": 989.4, "GH200": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "A10G": 70.0,
}


def flops_per_token(cfg, seq_len: int | None) -> float:
    """Model FLOPs to train on one token (forward + backward), PaLM-style."""
    n = cfg.params_per_token()
    attn = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len if seq_len else 0
    return 6.0 * n + attn


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak BF16 FLOP/s of one device, or None when unknown (CPUs: pass --peak-tflops to get an MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def apply_activation_checkpointing(model) -> None:
    """Recompute each block's activations in backward instead of storing them (saves memory at
    roughly one extra forward of compute). Parameter names are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        if getattr(block, "_geb_checkpointed", False):
            continue
        inner = block.forward

        @functools.wraps(inner)
        def fwd(*args, _inner=inner, **kw):
            if not torch.is_grad_enabled():
                return _inner(*args, **kw)
            return checkpoint(_inner, *args, use_reentrant=False, **kw)

        block.forward = fwd
        block._geb_checkpointed = True


def compile_blocks(model) -> None:
    """torch.compile each transformer block in place (one compiled graph is shared by identical blocks)."""
    for block in model.layers:
        block.compile()


def check_attention(impl: str, device: torch.device) -> None:
    if impl not in ("sdpa", "sdpa-flash", "flash-attn"):
        raise GebError(f"attn must be sdpa, sdpa-flash or flash-attn, got {impl!r}")
    if impl != "sdpa" and device.type != "cuda":
        raise GebError(f"--attn {impl} needs a CUDA device (this run is on {device.type})")
    if impl == "flash-attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise GebError("--attn flash-attn needs the flash-attn package (pip install flash-attn "
                           "--no-build-isolation); --attn sdpa uses PyTorch's own FlashAttention-2 kernel") from None


def use_flash_attn_package(model) -> None:
    """Route training attention (no cache, no mask) through flash_attn_func; inference paths unchanged.

    Each Attention module's class is swapped for a subclass that only overrides forward, so parameters,
    their names and checkpoints are untouched.
    """
    from flash_attn import flash_attn_func

    from geb.model import Attention, apply_rope

    class FlashAttnAttention(Attention):
        def forward(self, x, cos, sin, cache, attn_mask):
            if cache is not None or attn_mask is not None or cos.shape[0] != 1:
                return super().forward(x, cos, sin, cache, attn_mask)
            b, t, _ = x.shape
            c = self.cfg
            q = self.wq(x).view(b, t, c.n_head, c.head_dim).transpose(1, 2)
            k = self.wk(x).view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
            v = self.wv(x).view(b, t, c.n_kv_head, c.head_dim)
            q = apply_rope(q, cos, sin, c.rope_style).transpose(1, 2)
            k = apply_rope(k, cos, sin, c.rope_style).transpose(1, 2)
            # flash_attn_func takes [B, T, H, D] and handles grouped KV heads itself.
            y = flash_attn_func(q, k, v.to(q.dtype), causal=True)
            return self.wo(y.reshape(b, t, c.q_dim))

    for block in model.layers:
        block.attn.__class__ = FlashAttnAttention


def attention_context(impl: str):
    """A context manager for the training forward/backward that pins the SDPA kernel when asked."""
    if impl != "sdpa-flash":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def prepare(model, c, device: torch.device) -> None:
    """Apply the throughput options of TrainConfig `c` to an unwrapped model, before DDP/FSDP."""
    check_attention(c.attn, device)
    if device.type == "cuda":
        # FP32 matrix products that remain (outside autocast) may use TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if c.attn == "flash-attn":
        use_flash_attn_package(model)
    if c.activation_checkpointing:
        apply_activation_checkpointing(model)
    if c.compile:
        compile_blocks(model)


class Meter:
    """Tokens/s per device and MFU over the steps between two log lines (CUDA-synchronised)."""

    def __init__(self, cfg, seq_len: int | None, device: torch.device, world: int, peak_tflops: float | None):
        self.fpt = flops_per_token(cfg, seq_len)
        self.peak = peak_flops(device, peak_tflops)
        self.device, self.world = device, world
        self.t0 = self._now()
        self.tokens = 0

    def _now(self) -> float:
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict:
        now = self._now()
        dt = max(now - self.t0, 1e-9)
        tok_s = self.tokens / dt
        per_dev = tok_s / self.world
        out = {"tok_s": tok_s, "tok_s_device": per_dev,
               "mfu": per_dev * self.fpt / self.peak if self.peak else None}
        if self.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.t0, self.tokens = now, 0
        return out


__all__ = ["flops_per_token", "peak_flops", "apply_activation_checkpointing", "compile_blocks",
           "use_flash_attn_package", "attention_context", "prepare", "Meter", "PEAK_BF16_TFLOPS"]
