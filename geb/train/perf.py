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

# Dense BF16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's data sheets (half their
# "with sparsity" figures where only those are printed), keyed by product.
# A product's figure depends on its form factor (an H100 PCIe runs at 756, an SXM at 989.4), so a
# name is looked up exactly, never by a partial match: an unknown GPU gets no MFU until --peak-tflops.
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5,
    "H200 SXM": 989.4, "H200 NVL": 835.5,
    "H800 SXM": 989.4, "H800 PCIe": 756.5,
    "GH200": 989.4,
    "A100": 312.0, "A800": 312.0,
    "L40S": 362.05, "L40": 181.05, "L4": 121.0, "A10": 125.0,
}

# torch.cuda.get_device_name() strings (after _normal_name) -> product. Several names per product:
# the driver reports memory size and form factor in varying spellings.
GPU_PRODUCTS = {
    "H100 80GB HBM3": "H100 SXM", "H100 SXM5 80GB": "H100 SXM", "H100 SXM": "H100 SXM",
    "H100 PCIE": "H100 PCIe", "H100 NVL": "H100 NVL",
    "H200": "H200 SXM", "H200 SXM": "H200 SXM", "H200 NVL": "H200 NVL",
    "H800": "H800 SXM", "H800 SXM": "H800 SXM", "H800 PCIE": "H800 PCIe",
    "GH200 480GB": "GH200", "GH200 144G HBM3E": "GH200", "GH200": "GH200",
    "A100 SXM4 40GB": "A100", "A100 SXM4 80GB": "A100", "A100 PCIE 40GB": "A100", "A100 80GB PCIE": "A100",
    "A100 PCIE 80GB": "A100",
    "A800 SXM4 80GB": "A800", "A800 80GB PCIE": "A800", "A800 PCIE 80GB": "A800", "A800 PCIE 40GB": "A800",
    "L40S": "L40S", "L40": "L40", "L4": "L4", "A10": "A10",
}


def _normal_name(name: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'A100 SXM4 80GB': no vendor prefix, '-'/'_' as spaces, upper case."""
    n = " ".join(name.replace("-", " ").replace("_", " ").split()).upper()
    return n[len("NVIDIA "):] if n.startswith("NVIDIA ") else n


def gpu_product(name: str) -> str | None:
    """The product a device name is (a key of PEAK_BF16_TFLOPS), or None when it is not one we know."""
    return GPU_PRODUCTS.get(_normal_name(name))


def flops_per_token(cfg, seq_len: int | None) -> float:
    """Model FLOPs to train on one token (forward + backward), PaLM-style."""
    n = cfg.params_per_token()
    attn = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len if seq_len else 0
    return 6.0 * n + attn


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak BF16 FLOP/s of one device, or None when unknown (CPUs and GPUs not in the table: pass
    --peak-tflops to get an MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    product = gpu_product(torch.cuda.get_device_name(device))
    return PEAK_BF16_TFLOPS[product] * 1e12 if product else None


def peak_note(device: torch.device, override_tflops: float | None = None) -> str | None:
    """A line for the log when a GPU's MFU cannot be reported (None when it can, or on a CPU)."""
    if override_tflops or device.type != "cuda" or peak_flops(device) is not None:
        return None
    return (f"no MFU: {torch.cuda.get_device_name(device)!r} is not in geb's table of GPU peaks; pass "
            "--peak-tflops X (its dense BF16 TFLOP/s from the data sheet) to log one")


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


def check_attention(impl: str, device: torch.device, amp_dtype: torch.dtype = torch.bfloat16, cfg=None) -> None:
    """Refuse an attention kernel that cannot run with this device, autocast dtype and model, before
    any kernel runs (FlashAttention: CUDA, compute capability 8.0+, BF16/FP16, head_dim a multiple of
    8 up to 256)."""
    if impl not in ("sdpa", "sdpa-flash", "flash-attn"):
        raise GebError(f"attn must be sdpa, sdpa-flash or flash-attn, got {impl!r}")
    if impl == "sdpa":
        return
    if device.type != "cuda":
        raise GebError(f"--attn {impl} needs a CUDA device (this run is on {device.type}); use --attn sdpa")
    if amp_dtype not in (torch.bfloat16, torch.float16):
        raise GebError(f"--attn {impl} runs FlashAttention, which computes in BF16 or FP16 only, but this run "
                       f"computes in {amp_dtype}; use --dtype bf16 (or --attn sdpa)")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise GebError(f"--attn {impl} needs a GPU of compute capability 8.0 or newer (Ampere, Hopper); "
                       f"{torch.cuda.get_device_name(device)} is {major}.{minor}; use --attn sdpa")
    if cfg is not None and (cfg.head_dim % 8 or cfg.head_dim > 256):
        raise GebError(f"--attn {impl} needs head_dim a multiple of 8 and at most 256; the model's is {cfg.head_dim}")
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


def prepare(model, c, device: torch.device, amp_dtype: torch.dtype) -> None:
    """Apply the throughput options of TrainConfig `c` to an unwrapped model, before DDP/FSDP."""
    check_attention(c.attn, device, amp_dtype, model.cfg)
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
        self.note = peak_note(device, peak_tflops)
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


__all__ = ["flops_per_token", "peak_flops", "peak_note", "gpu_product", "check_attention",
           "apply_activation_checkpointing", "compile_blocks", "use_flash_attn_package", "attention_context",
           "prepare", "Meter", "PEAK_BF16_TFLOPS", "GPU_PRODUCTS"]
