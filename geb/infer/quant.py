"""Linear layers in each inference format (fp32, bf16, int8, int4) and the quantizers that make them.

Every layer takes and returns FP32 activations [M, K] → [M, N]; what happens inside depends on the
format and on the backend the runtime chose (geb.infer.runtime):
- native (geb's decode core, geb.infer.native, wherever it was built): weights stay in the core's
  layouts (FP32; BF16; int8 per output row; int4 in the core's nibble layout). int8 and int4 products
  run on the core's integer kernels at every row count (activations quantized to int8 per group of 32,
  as llama.cpp does for Q8_0/Q4_0): a row's result is then the same whether it is multiplied alone, in
  a prefill of any length or beside other requests' rows, and prefill matches what decode computes.
  FP32 and BF16 run a few rows on the core's kernels and more rows (prefill) as one GEMM, BF16 widened
  block by block to FP32 where this CPU has no native BF16 products (torch emulates them, slowly).
- torch (no native core): fp32 through numpy's OpenBLAS at a few rows (its matrix-vector routine
  uses every core); bf16 pre-packed for oneDNN; int8 `torch._weight_int8pack_mm` (one row: the
  activation quantized too, `torch._int_mm`); int4 `torch._weight_int4pack_mm_for_cpu`.

Quantized formats: int8 is symmetric per output channel (scale = absmax / 127, kept in BF16); int4 is
asymmetric per group of `group_size` input columns, w = (q - 8) * scale + zero with q in 0..15 and
scale, zero in BF16 laid out [K / group, N, 2] (torch's kernel convention). Each layer lists its
tensors for a safetensors file (`state`) in that stored format whatever its in-memory layout, and is
rebuilt from them (`linear_from_state`), so `geb quantize` writes exactly what the engine runs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geb import cpu
from geb.errors import GebError

FORMATS = ("fp32", "bf16", "int8", "int4")
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel accepts
INT4_GROUP_SIZE = 32  # the default: inputs per int4 scale/zero pair (the core's own activation group)
NUMPY_MAX_ROWS = 8  # torch backend: up to this many rows fp32 goes through numpy (matrix-vector territory)
# From this many rows (prefill) weights are widened block by block for one GEMM each: widening costs a
# fixed pass over the weight, the row kernels cost per row.
WIDEN_MIN_ROWS = 16
INT4_TORCH_WIDEN_MIN_ROWS = 128  # torch's int4 kernel is cheaper per row than its widening
DEQUANT_BLOCK = 1024  # output rows widened at a time: bounds the temporary copy (8 MiB FP32 at K=2048)
BACKENDS = ("auto", "native", "torch")


def native_backend(backend: str) -> bool:
    """Whether layers are built for geb's native core: 'auto' where it is available, 'native' (an error
    where it is not), 'torch' never."""
    from geb.infer import native

    if backend not in BACKENDS:
        raise GebError(f"unknown backend '{backend}' (choose from: {', '.join(BACKENDS)})")
    if backend == "torch":
        return False
    if native.available():
        return True
    if backend == "native":
        raise GebError(f"the native decode core is unavailable: {native.why()}")
    return False


def _widen_dtype() -> torch.dtype:
    """What prefill widens quantized weights to: BF16 where this CPU multiplies it natively."""
    return torch.bfloat16 if cpu.native_bf16() else torch.float32


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise GebError(f"unknown format '{fmt}' (choose from: {', '.join(FORMATS)})")
    return fmt


class Linear:
    """Base: y = x @ W.T for FP32 x [M, K]; subclasses hold W in their format.

    `native` layers (built for geb's decode core) describe their tensors to it with `native_desc()`
    and run products on its kernels (int8 and int4 at every row count, FP32 and BF16 at a few rows);
    `_widened(x)` is the many-row path of the others: weight widened block by block, one GEMM each."""

    fmt = ""
    native = False
    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def native_desc(self) -> dict:
        raise NotImplementedError

    def widen_block(self, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
        """Output rows n0..n1 of the weight as `dtype` [n1 - n0, K]."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state("").values())

    def _native_rows(self, x: torch.Tensor) -> torch.Tensor:
        from geb.infer import native

        x = x.float()
        if x.shape[0] <= native.MATMUL_MAX_ROWS:
            return native.matmul(self, x)
        return torch.cat([native.matmul(self, x[i : i + native.MATMUL_MAX_ROWS])
                          for i in range(0, x.shape[0], native.MATMUL_MAX_ROWS)])

    def _widened(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Prefill: widen the weight DEQUANT_BLOCK rows at a time and run one GEMM per block."""
        dtype = dtype or _widen_dtype()
        xw = x.to(dtype)
        out = torch.empty(x.shape[0], self.out_features)
        for n0 in range(0, self.out_features, DEQUANT_BLOCK):
            n1 = min(n0 + DEQUANT_BLOCK, self.out_features)
            out[:, n0:n1] = F.linear(xw, self.widen_block(n0, n1, dtype))
        return out

    def _native_widen(self, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
        from geb.infer import native

        w = native.dequantize(self, n0, n1)
        return w if dtype == torch.float32 else w.to(dtype)


class F32Linear(Linear):
    fmt = "fp32"

    def __init__(self, w: torch.Tensor, native: bool = False):
        self.w = w if w.dtype == torch.float32 and w.is_contiguous() else w.float().contiguous()
        self.out_features, self.in_features = self.w.shape
        self.native = native
        self._np = None if native else self.w.numpy()

    def __call__(self, x):
        if self.native and x.shape[0] < WIDEN_MIN_ROWS:
            return self._native_rows(x)
        if not self.native and x.shape[0] <= NUMPY_MAX_ROWS:
            xn = x.numpy()
            if x.shape[0] == 1:
                return torch.from_numpy(np.matmul(self._np, xn[0]))[None]
            return torch.from_numpy(np.matmul(xn, self._np.T))
        return F.linear(x, self.w)

    def native_desc(self):
        from geb.infer.native import F32

        return {"kind": F32, "w": self.w}

    def widen_block(self, n0, n1, dtype):
        return self.w[n0:n1].to(dtype)

    def state(self, prefix):
        return {prefix + "weight": self.w}


class BF16Linear(Linear):
    """BF16 weights. Native: the plain weight serves the core and prefill (a BF16 GEMM where BF16 is
    native, else FP32 blocks). Torch: pre-packed once into oneDNN's blocked layout, the fastest of
    torch's kernels at a few rows (bench/results/decode_kernels.json, from a since-retired script)."""

    fmt = "bf16"

    def __init__(self, w: torch.Tensor, native: bool = False):
        w = w.to(torch.bfloat16).contiguous()
        self.out_features, self.in_features = w.shape
        self.native = native
        self.packed = None if native else _onednn_pack(w)
        self.w = w if self.packed is None else None  # a packed copy replaces the plain one

    def __call__(self, x):
        if self.native:
            if x.shape[0] < WIDEN_MIN_ROWS:
                return self._native_rows(x)
            if not cpu.native_bf16():
                return self._widened(x, torch.float32)
        xb = x.to(torch.bfloat16)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(xb, self.packed, None, "none", [], "").float()
        return F.linear(xb, self.w).float()

    def native_desc(self):
        from geb.infer.native import BF16

        return {"kind": BF16, "w": self.w}

    def widen_block(self, n0, n1, dtype):
        return self._native_widen(n0, n1, dtype)

    def state(self, prefix):
        return {prefix + "weight": self.w if self.w is not None else self.packed.to_dense()}

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * 2


def _onednn_pack(w: torch.Tensor):
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, 1)
    except (RuntimeError, AttributeError):
        return None


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [N, K], scale bf16 [N]); w ≈ q * scale."""
    w = w.float()
    scale = (w.abs().amax(1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(Linear):
    fmt = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, native: bool = False):
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise GebError(f"int8 layer: expected int8 [N, K] and scales [N], got {q.dtype} {tuple(q.shape)} "
                           f"and {tuple(scale.shape)}")
        self.q, self.scale = q, scale.to(torch.bfloat16)
        self._scale_f32 = self.scale.float()
        self.out_features, self.in_features = q.shape
        self.native = native

    @classmethod
    def from_float(cls, w, native: bool = False):
        return cls(*quantize_int8(w), native=native)

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None])

    def widen_block(self, n0, n1, dtype):
        if self.native and dtype == torch.float32:
            return self._native_widen(n0, n1, dtype)
        return torch.mul(self.q[n0:n1], self.scale[n0:n1, None]).to(dtype)

    def __call__(self, x):
        if self.native:  # every row count: see the module docstring
            return self._native_rows(x)
        if x.shape[0] >= WIDEN_MIN_ROWS:
            return self._widened(x)
        if x.shape[0] == 1:
            return self._dynamic(x)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale).float()

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """Torch backend, one row: quantize the activation row to int8 too (symmetric, one scale per
        row) and run torch's int8 x int8 -> int32 GEMM on the weight as stored: faster than the
        weight-only kernel at one row (bench/results/decode_kernels.json), slower from two rows on."""
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
        xq = torch.round(x / s).to(torch.int8)
        return torch._int_mm(xq, self.q.t()).float().mul_(s).mul_(self._scale_f32)

    def native_desc(self):
        from geb.infer.native import Q8

        return {"kind": Q8, "w": self.q, "scale": self._scale_f32}

    def state(self, prefix):
        return {prefix + "qweight": self.q, prefix + "scales": self.scale}


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: (nibbles uint8 [N, K/2], scale_zero bf16 [K/g, N, 2]).

    w ≈ (q - 8) * scale + zero per group of `group_size` consecutive input columns; scale and zero are
    rounded to BF16 before q is chosen, so q is the best code for the values the kernel will use.
    """
    n, k = w.shape
    if group_size not in INT4_GROUPS:
        raise GebError(f"int4 group size must be one of {INT4_GROUPS}, got {group_size}")
    if k % group_size:
        raise GebError(f"int4: input size {k} is not a multiple of the group size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16).float()
    zero = (lo + 8.0 * scale).to(torch.bfloat16).float()
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8.0).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    nibbles = q[:, 0::2] | (q[:, 1::2] << 4)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return nibbles.contiguous(), sz


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] → int32 codes [N, K] (low nibble = even column)."""
    n, half = nibbles.shape
    out = torch.empty(n, half * 2, dtype=torch.int32)
    out[:, 0::2] = nibbles & 15
    out[:, 1::2] = nibbles >> 4
    return out


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
PACK_ROWS = 1024  # rows packed (or laid out) at a time: bounds the temporaries of loading


def _pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """Plain nibbles → torch's CPU int4 layout. Whole 64-row blocks pack independently, so big
    matrices go in slices of PACK_ROWS rows (a bounded int32 temporary instead of 8x the weight)."""
    n = nibbles.shape[0]
    if n % 64 or n <= PACK_ROWS:
        return torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles), 1)
    parts = [torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles[i : i + PACK_ROWS]), 1)
             for i in range(0, n, PACK_ROWS)]
    return torch.cat(parts, 0)


def _check_int4(nibbles: torch.Tensor, scale_zero: torch.Tensor, group_size: int) -> tuple[int, int]:
    n, half = nibbles.shape
    kp = half * 2
    if (nibbles.dtype != torch.uint8 or group_size not in INT4_GROUPS or kp % group_size
            or scale_zero.shape != (kp // group_size, n, 2)):
        raise GebError(f"int4 layer: nibbles {nibbles.dtype} {tuple(nibbles.shape)} and scales "
                       f"{tuple(scale_zero.shape)} do not fit group size {group_size}")
    return n, kp


_LAYOUT_KNOWN: list[bool] = []


def _torch_int4_layout_known() -> bool:
    """Whether torch's CPU int4 packing on this CPU is the 64-row-block layout Int4Linear._codes reads
    (it depends on the CPU's vector width); checked once on a small matrix."""
    if not _LAYOUT_KNOWN:
        codes = torch.arange(64 * 64, dtype=torch.int32).view(64, 64) % 16
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        blk = packed.view(1, 64, 32)
        got = torch.cat([(blk & 15).transpose(1, 2), (blk >> 4).transpose(1, 2)], 1).reshape(64, 64)
        _LAYOUT_KNOWN.append(packed.numel() == 64 * 32 and torch.equal(got.int(), codes))
    return _LAYOUT_KNOWN[0]


class Int4Linear(Linear):
    """int4 on torch's kernel (torch backend): the nibbles packed into torch's CPU layout at load."""

    fmt = "int4"

    def __init__(self, nibbles: torch.Tensor, scale_zero: torch.Tensor, group_size: int, in_features: int,
                 keep_nibbles: bool = True):
        n, kp = _check_int4(nibbles, scale_zero, group_size)
        self.sz, self.group_size = scale_zero.to(torch.bfloat16), group_size
        self.out_features, self.in_features = n, in_features
        self.padded_in = kp  # inputs are zero-padded up to a whole group
        self.packed = _pack_int4(nibbles)
        # Where torch packs whole 64-row blocks in the layout _codes reads (its AVX-512 kernels), the
        # nibbles can go; other shapes, and CPUs whose kernels use another layout, keep them.
        self._nibbles = nibbles if keep_nibbles or n % 64 or not _torch_int4_layout_known() else None

    def _codes(self) -> torch.Tensor:
        """uint8 codes [N, K] (0..15)."""
        n, kp = self.out_features, self.padded_in
        if self._nibbles is not None:
            nib = self._nibbles
            return torch.stack([nib & 15, nib >> 4], -1).view(n, kp)
        # torch's CPU layout: per block of 64 rows, for each input k, 32 bytes: row j low, row j+32 high
        blk = self.packed.view(n // 64, kp, 32)
        out = torch.empty(n // 64, 2, 32, kp, dtype=torch.uint8)
        out[:, 0] = (blk & 15).transpose(1, 2)
        out[:, 1] = (blk >> 4).transpose(1, 2)
        return out.view(n, kp)

    @property
    def nibbles(self) -> torch.Tensor:
        if self._nibbles is not None:
            return self._nibbles
        q = self._codes()
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The weight [N, K] the kernel multiplies by: (q - 8) * scale + zero."""
        w = self._dequant_padded(dtype)
        return w if self.padded_in == self.in_features else w[:, : self.in_features]

    def _dequant_padded(self, dtype) -> torch.Tensor:
        n, g = self.out_features, self.padded_in // self.group_size
        s = self.sz[..., 0].T.float()[..., None]
        z = (self.sz[..., 1].T.float() - 8.0 * self.sz[..., 0].T.float())[..., None]
        q = self._codes().view(n, g, self.group_size)
        return torch.addcmul(z.to(dtype), q.to(dtype), s.to(dtype)).reshape(n, -1)

    def _dequant_t_bf16(self, n0: int, n1: int) -> torch.Tensor:
        """BF16 W.T [K_padded, n1 - n0] for output rows n0:n1 (multiples of 64) straight from torch's
        packed layout: nibbles of 8 bytes are split at once as int64, rows move in 32-byte runs."""
        kp, gs = self.padded_in, self.group_size
        nb, n = (n1 - n0) // 64, n1 - n0
        p64 = self.packed.view(-1, kp * 32)[n0 // 64 : n1 // 64].reshape(-1).view(torch.int64)
        lo = (p64 & _LOW_NIBBLES).view(torch.uint8).view(nb, kp, 32)
        hi = ((p64 >> 4) & _LOW_NIBBLES).view(torch.uint8).view(nb, kp, 32)
        qt = torch.stack([lo.transpose(0, 1), hi.transpose(0, 1)], 2)  # [kp, nb, 2, 32] = [kp, n]
        sc = self.sz[:, n0:n1]
        s = sc[..., 0][:, None, :]
        z = (sc[..., 1].float() - 8.0 * sc[..., 0].float()).to(torch.bfloat16)[:, None, :]
        return torch.addcmul(z, qt.view(kp // gs, gs, n), s).view(kp, n)

    def __call__(self, x):
        xb = x.to(torch.bfloat16)
        if self.padded_in != self.in_features:
            xb = F.pad(xb, (0, self.padded_in - self.in_features))
        if x.shape[0] >= INT4_TORCH_WIDEN_MIN_ROWS:  # prefill: widen block by block, one GEMM each
            dtype = _widen_dtype()
            xw = xb if dtype == torch.bfloat16 else F.pad(x.float(), (0, self.padded_in - self.in_features))
            if self._nibbles is not None:
                return F.linear(xw, self._dequant_padded(dtype)).float()
            out = torch.empty(x.shape[0], self.out_features)
            for n0 in range(0, self.out_features, DEQUANT_BLOCK):
                n1 = min(n0 + DEQUANT_BLOCK, self.out_features)
                out[:, n0:n1] = torch.matmul(xw, self._dequant_t_bf16(n0, n1).to(dtype))
            return out
        return torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.sz).float()

    def state(self, prefix):
        return {prefix + "qweight": self.nibbles, prefix + "scales_zeros": self.sz}

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.sz.numel() * 2


def native_int4_layout(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15, K % 64 == 0) → the core's layout [N, K/2]: per 64 inputs of a row, 32
    bytes, byte i holding input i in its low nibble and input 32 + i in its high one."""
    n, k = codes.shape
    c = codes.view(n, k // 64, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


class Int4NativeLinear(Linear):
    """int4 held for geb's native core: the same stored format as Int4Linear (`state` writes the same
    nibbles and scales), laid out for the core's kernels at load: inputs padded to a multiple of 64
    (zero codes, zero scales) and scales repeated per group of 32 inputs whatever the stored group
    size. The core multiplies activations quantized to int8 per group of 32 by the codes."""

    fmt = "int4"
    native = True
    copies_scales = True  # s and z are its own copies: a loader may drop the file's scales

    def __init__(self, nibbles: torch.Tensor, scale_zero: torch.Tensor, group_size: int, in_features: int):
        n, kp = _check_int4(nibbles, scale_zero, group_size)
        k64 = -(-kp // 64) * 64
        self.q = torch.empty(n, k64 // 2, dtype=torch.uint8)
        for r0 in range(0, n, PACK_ROWS):  # in slices: whole-matrix temporaries would raise the loading peak
            nib = nibbles[r0 : r0 + PACK_ROWS]
            codes = torch.stack([nib & 15, nib >> 4], -1).view(nib.shape[0], kp)
            self.q[r0 : r0 + PACK_ROWS] = native_int4_layout(F.pad(codes, (0, k64 - kp)))
        sz = scale_zero.to(torch.bfloat16)
        rep, pad = group_size // 32, (k64 - kp) // 32
        self.s = F.pad(sz[..., 0].T.repeat_interleave(rep, 1), (0, pad)).contiguous()  # [N, k64 / 32]
        self.z = F.pad(sz[..., 1].T.repeat_interleave(rep, 1), (0, pad)).contiguous()
        self.group_size, self.out_features, self.in_features = group_size, n, in_features
        self.padded_in, self.native_in = kp, k64

    def _codes(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        q = self.q[n0:n1].view(-1, self.native_in // 64, 32)
        return torch.stack([q & 15, q >> 4], 2).view(q.shape[0], self.native_in)

    def widen_block(self, n0, n1, dtype):
        return self._native_widen(n0, n1, dtype)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.widen_block(0, self.out_features, dtype)

    def __call__(self, x):
        return self._native_rows(x)  # every row count: see the module docstring

    def native_desc(self):
        from geb.infer.native import Q4

        return {"kind": Q4, "w": self.q, "s": self.s, "z": self.z, "kp": self.native_in}

    def state(self, prefix):
        kp, every = self.padded_in, self.group_size // 32
        codes = self._codes()[:, :kp]
        nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        s, z = self.s[:, : kp // 32 : every], self.z[:, : kp // 32 : every]
        return {prefix + "qweight": nibbles, prefix + "scales_zeros": torch.stack([s.T, z.T], -1).contiguous()}

    @property
    def nbytes(self) -> int:
        return self.q.numel() + (self.s.numel() + self.z.numel()) * 2


def int4_linear(nibbles: torch.Tensor, scale_zero: torch.Tensor, group_size: int, in_features: int,
                native: bool = False, keep_nibbles: bool = True) -> Linear:
    if native:
        return Int4NativeLinear(nibbles, scale_zero, group_size, in_features)
    return Int4Linear(nibbles, scale_zero, group_size=group_size, in_features=in_features, keep_nibbles=keep_nibbles)


def make_linear(w: torch.Tensor, fmt: str, group_size: int = INT4_GROUP_SIZE, native: bool = False) -> Linear:
    """Build a layer of format `fmt` from a full-precision weight [N, K] (for the native core or torch)."""
    if fmt == "fp32":
        return F32Linear(w, native)
    if fmt == "bf16":
        return BF16Linear(w, native)
    if fmt == "int8":
        return Int8Linear.from_float(w, native)
    if fmt == "int4":
        n, k = w.shape
        kp = -(-k // group_size) * group_size
        padded = F.pad(w.float(), (0, kp - k)) if kp != k else w  # zero columns add nothing
        return int4_linear(*quantize_int4(padded, group_size), group_size=group_size, in_features=k, native=native)
    raise GebError(f"unknown format '{fmt}'")


def linear_from_state(get, prefix: str, fmt: str, shape: tuple[int, int], group_size: int = INT4_GROUP_SIZE,
                      keep_nibbles: bool = True, native: bool = False) -> Linear:
    """Rebuild a layer from stored tensors; `get(name, dtype, shape)` fetches and checks one tensor."""
    n, k = shape
    if fmt == "fp32":
        return F32Linear(get(prefix + "weight", torch.float32, (n, k)), native)
    if fmt == "bf16":
        return BF16Linear(get(prefix + "weight", torch.bfloat16, (n, k)), native)
    if fmt == "int8":
        return Int8Linear(get(prefix + "qweight", torch.int8, (n, k)), get(prefix + "scales", torch.bfloat16, (n,)),
                          native)
    if fmt == "int4":
        kp = -(-k // group_size) * group_size
        return int4_linear(get(prefix + "qweight", torch.uint8, (n, kp // 2)),
                           get(prefix + "scales_zeros", torch.bfloat16, (kp // group_size, n, 2)),
                           group_size=group_size, in_features=k, native=native, keep_nibbles=keep_nibbles)
    raise GebError(f"unknown format '{fmt}'")


class Embedding:
    """Token embedding lookup in fp32, bf16 or int8 (per-row scales); returns FP32 rows."""

    def __init__(self, fmt: str, w: torch.Tensor, scale: torch.Tensor | None = None):
        self.fmt, self.w, self.scale = fmt, w, scale

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: str) -> "Embedding":
        if fmt == "int8":
            return cls("int8", *quantize_int8(w))
        return cls(fmt, w.to(torch.bfloat16 if fmt == "bf16" else torch.float32).contiguous())

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.w[ids].float()
        if self.scale is not None:
            rows = rows * self.scale[ids].float()[..., None]
        return rows

    def state(self, prefix):
        if self.fmt == "int8":
            return {prefix + "qweight": self.w, prefix + "scales": self.scale}
        return {prefix + "weight": self.w}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state("").values())
