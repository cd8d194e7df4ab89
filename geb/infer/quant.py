"""Linear layers in each inference format (fp32, bf16, int8, int4) and the quantizers that make them.

Every layer takes and returns FP32 activations [M, K] → [M, N]; what happens inside is the format's:
- fp32: the weight as is. At a handful of rows (decode) the product goes to numpy's OpenBLAS, whose
  matrix-vector routine uses every core, where torch's MKL path stays on one thread at batch 1.
- bf16: BF16 weight and activations, FP32 out.
- int8: weight-only, symmetric per output channel (scale = absmax / 127, kept in BF16), run by
  `torch._weight_int8pack_mm` with BF16 activations (with FP32 activations that kernel is ~10x slower).
- int4: weight-only, asymmetric per group of `group_size` input columns, run by
  `torch._weight_int4pack_mm_for_cpu`; the kernel's convention is w = (q - 8) * scale + zero with
  q in 0..15, scale and zero in BF16 laid out [K / group, N, 2].

Each layer knows how to list its tensors for a safetensors file (`state`) and to rebuild itself from
them (`from_state`), so `geb quantize` writes exactly what the engine runs. int4 weights are stored
as plain nibbles (column 2j in the low half of byte j) and packed into the kernel's own layout at load,
because that layout is torch-internal.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geb.errors import GebError

FORMATS = ("fp32", "bf16", "int8", "int4")
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel accepts
NUMPY_MAX_ROWS = 8  # up to this many rows fp32 goes through numpy (matrix-vector territory)
# From this many rows (prefill) quantized weights are widened to BF16 for one GEMM: widening costs a
# fixed pass over the weight, the packed kernels cost per row (measured on one 5632x2048 matrix:
# widening int8 ~11 ms, int4 ~75 ms; per row int8/int4 kernels ~1 ms against ~0.35 ms in BF16).
INT8_DEQUANT_MIN_ROWS = 16
INT4_DEQUANT_MIN_ROWS = 128
DEQUANT_BLOCK = 2048  # output rows widened at a time: bounds the temporary BF16 copy (~8 MiB at K=2048)
# Single-row int8 products quantize the activation too (Int8Linear._dynamic); False: weight-only always.
INT8_DYNAMIC_DECODE = True
# Up to this many rows BF16 products use geb's native kernel when it is available (geb.infer.native).
NATIVE_BF16_MAX_ROWS = 2
# int4 layers use geb's native VNNI kernel when it is available (Int4VnniLinear); False: torch's always.
INT4_NATIVE = True
# Smaller int4 matrices stay on torch's kernel: below about a million weights the native call's fixed cost
# (activation quantization, ctypes, thread hand-off) outweighs its faster products (geb-tiny decoded
# 241 tok/s with it against 332 without).
INT4_NATIVE_MIN_WEIGHTS = 1 << 20


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise GebError(f"unknown format '{fmt}' (choose from: {', '.join(FORMATS)})")
    return fmt


class Linear:
    """Base: y = x @ W.T for FP32 x [M, K]; subclasses hold W in their format."""

    fmt = ""
    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state("").values())


class F32Linear(Linear):
    fmt = "fp32"

    def __init__(self, w: torch.Tensor):
        self.w = w if w.dtype == torch.float32 and w.is_contiguous() else w.float().contiguous()
        self.out_features, self.in_features = self.w.shape
        self._np = self.w.numpy()

    def __call__(self, x):
        if x.shape[0] <= NUMPY_MAX_ROWS:
            xn = x.numpy()
            if x.shape[0] == 1:
                return torch.from_numpy(np.matmul(self._np, xn[0]))[None]
            return torch.from_numpy(np.matmul(xn, self._np.T))
        return F.linear(x, self.w)

    def state(self, prefix):
        return {prefix + "weight": self.w}


class BF16Linear(Linear):
    """BF16 weights. With geb's native kernels (geb.infer.native) the plain weight serves every path:
    up to NATIVE_BF16_MAX_ROWS rows through the native AVX512-BF16 kernel, more through `F.linear`
    (measured on one 11264x2048 matrix, 2 threads: 1 row 1.10 ms native / 1.98 packed / 2.50 plain;
    2 rows 1.24 / 2.02 / 2.43; 4-16 rows plain 2.4-3.6 against packed 1.4-2.4; a 512-row prefill
    plain 61 ms against packed 95). Without them the weight is pre-packed once into oneDNN's blocked
    layout, the fastest of torch's kernels at a few rows."""

    fmt = "bf16"

    def __init__(self, w: torch.Tensor):
        from geb.infer import native

        w = w.to(torch.bfloat16).contiguous()
        self.out_features, self.in_features = w.shape
        self.native = native.kernels()
        self.packed = None if self.native is not None else _onednn_pack(w)
        self.w = w if self.packed is None else None  # a packed copy replaces the plain one

    def __call__(self, x):
        if self.native is not None and x.shape[0] <= NATIVE_BF16_MAX_ROWS:
            return self.native.bf16_matmul(self.w, x)
        xb = x.to(torch.bfloat16)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(xb, self.packed, None, "none", [], "").float()
        return F.linear(xb, self.w).float()

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

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise GebError(f"int8 layer: expected int8 [N, K] and scales [N], got {q.dtype} {tuple(q.shape)} "
                           f"and {tuple(scale.shape)}")
        self.q, self.scale = q, scale.to(torch.bfloat16)
        self._scale_f32 = self.scale.float()
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_float(cls, w):
        return cls(*quantize_int8(w))

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None])

    def __call__(self, x):
        xb = x.to(torch.bfloat16)
        if x.shape[0] >= INT8_DEQUANT_MIN_ROWS:  # prefill: widen to BF16 block by block, one GEMM each
            out = torch.empty(x.shape[0], self.out_features)
            for n0 in range(0, self.out_features, DEQUANT_BLOCK):
                n1 = min(n0 + DEQUANT_BLOCK, self.out_features)
                out[:, n0:n1] = F.linear(xb, torch.mul(self.q[n0:n1], self.scale[n0:n1, None]))
            return out
        if x.shape[0] == 1 and INT8_DYNAMIC_DECODE:
            return self._dynamic(x)
        return torch._weight_int8pack_mm(xb, self.q, self.scale).float()

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """One row (single-sequence decode): quantize the activation row to int8 too (symmetric, one
        scale per row, as llama.cpp quantizes activations for Q8_0, there per block of 32) and run
        torch's int8 x int8 -> int32 GEMM on the weight as stored: faster than the weight-only kernel at
        one row (bench/decode_kernels.py), slower from two rows on."""
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
        xq = torch.round(x / s).to(torch.int8)
        return torch._int_mm(xq, self.q.t()).float().mul_(s).mul_(self._scale_f32)

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
PACK_ROWS = 1024  # rows packed at a time: torch's packer wants int32 codes (4 bytes per weight)


def _pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """Plain nibbles → torch's CPU int4 layout. Whole 64-row blocks pack independently, so big
    matrices go in slices of PACK_ROWS rows (a bounded int32 temporary instead of 8x the weight)."""
    n = nibbles.shape[0]
    if n % 64 or n <= PACK_ROWS:
        return torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles), 1)
    parts = [torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles[i : i + PACK_ROWS]), 1)
             for i in range(0, n, PACK_ROWS)]
    return torch.cat(parts, 0)


class Int4Linear(Linear):
    fmt = "int4"

    def __init__(self, nibbles: torch.Tensor, scale_zero: torch.Tensor, group_size: int, in_features: int,
                 keep_nibbles: bool = True):
        n, half = nibbles.shape
        kp = half * 2
        if nibbles.dtype != torch.uint8 or scale_zero.shape != (kp // group_size, n, 2) or kp % group_size:
            raise GebError(f"int4 layer: nibbles {nibbles.dtype} {tuple(nibbles.shape)} and scales "
                           f"{tuple(scale_zero.shape)} do not fit group size {group_size}")
        self.sz, self.group_size = scale_zero.to(torch.bfloat16), group_size
        self.out_features, self.in_features = n, in_features
        self.padded_in = kp  # inputs are zero-padded up to a whole group
        self.packed = _pack_int4(nibbles)
        # The packed layout of whole 64-row blocks is known (see _codes); other shapes keep the nibbles.
        self._nibbles = nibbles if keep_nibbles or n % 64 else None

    @classmethod
    def from_float(cls, w, group_size: int = 32):
        n, k = w.shape
        kp = -(-k // group_size) * group_size
        if kp != k:  # pad input columns with zeros: they add nothing whatever their code
            w = F.pad(w.float(), (0, kp - k))
        return cls(*quantize_int4(w, group_size), group_size=group_size, in_features=k)

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
        if x.shape[0] >= INT4_DEQUANT_MIN_ROWS:  # prefill: widen to BF16 block by block, one GEMM each
            if self._nibbles is not None:
                return F.linear(xb, self._dequant_padded(torch.bfloat16)).float()
            out = torch.empty(x.shape[0], self.out_features)
            for n0 in range(0, self.out_features, DEQUANT_BLOCK):
                n1 = min(n0 + DEQUANT_BLOCK, self.out_features)
                out[:, n0:n1] = torch.matmul(xb, self._dequant_t_bf16(n0, n1))
            return out
        return torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.sz).float()

    def state(self, prefix):
        return {prefix + "qweight": self.nibbles, prefix + "scales_zeros": self.sz}

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.sz.numel() * 2


class Int4VnniLinear(Linear):
    """int4 held for geb's native kernel (geb.infer.native): the same stored format as Int4Linear
    (`state` writes the same nibbles and scales), laid out for AVX512-VNNI. One row (decode) quantizes
    the activation to int8 per group of 32 inputs and multiplies bytes, 64 per instruction, as
    llama.cpp's Q4_0 x Q8_0 does: 0.50 against 0.80 ms for torch's int4 kernel on the 11264x2048
    matrix (2 threads, bench/decode_kernels.py). A few rows run one by one; from INT4_DEQUANT_MIN_ROWS rows the weight is
    widened to BF16 block by block for a GEMM. Group size 32, padded input size a multiple of 128."""

    fmt = "int4"
    copies_scales = True  # s and z are its own copies: a loader may drop the file's scales

    def __init__(self, nibbles: torch.Tensor, scale_zero: torch.Tensor, group_size: int, in_features: int, kernels):
        from geb.infer.native import int4_vnni_layout

        n, half = nibbles.shape
        kp = half * 2
        if (nibbles.dtype != torch.uint8 or group_size != 32 or kp % 128
                or scale_zero.shape != (kp // group_size, n, 2)):
            raise GebError(f"int4 (VNNI) layer: nibbles {nibbles.dtype} {tuple(nibbles.shape)} and scales "
                           f"{tuple(scale_zero.shape)} with group size {group_size}")
        self.q = torch.empty(n, half, dtype=torch.uint8)
        for r0 in range(0, n, 1024):  # in slices: whole-matrix temporaries would raise the loading peak
            nib = nibbles[r0 : r0 + 1024]
            self.q[r0 : r0 + 1024] = int4_vnni_layout(torch.stack([nib & 15, nib >> 4], -1).view(nib.shape[0], kp))
        sz = scale_zero.to(torch.bfloat16)
        self.s, self.z = sz[..., 0].T.contiguous(), sz[..., 1].T.contiguous()  # [N, K/32]
        self.group_size, self.out_features, self.in_features, self.padded_in = group_size, n, in_features, kp
        self.native = kernels

    def _codes(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        q = self.q[n0:n1].view(-1, self.padded_in // 64, 32)
        return torch.stack([q & 15, q >> 4], 2).view(q.shape[0], self.padded_in)

    def _dequant(self, n0: int, n1: int, dtype) -> torch.Tensor:
        s, z = self.s[n0:n1].to(dtype), self.z[n0:n1].to(dtype)
        q = self._codes(n0, n1).view(n1 - n0, -1, self.group_size).to(dtype)
        return torch.addcmul((z - 8.0 * s)[..., None], q, s[..., None]).view(n1 - n0, self.padded_in)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self._dequant(0, self.out_features, dtype)[:, : self.in_features]

    def __call__(self, x):
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        if x.shape[0] >= INT4_DEQUANT_MIN_ROWS:  # prefill: widen to BF16 block by block, one GEMM each
            xb = x.to(torch.bfloat16)
            out = torch.empty(x.shape[0], self.out_features)
            for n0 in range(0, self.out_features, DEQUANT_BLOCK):
                n1 = min(n0 + DEQUANT_BLOCK, self.out_features)
                out[:, n0:n1] = F.linear(xb, self._dequant(n0, n1, torch.bfloat16))
            return out
        x = x.float().contiguous()
        return torch.cat([self.native.int4_matvec(self.q, self.s, self.z, x[i : i + 1]) for i in range(x.shape[0])])

    def state(self, prefix):
        codes = self._codes()
        nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        return {prefix + "qweight": nibbles, prefix + "scales_zeros": torch.stack([self.s.T, self.z.T], -1).contiguous()}

    @property
    def nbytes(self) -> int:
        return self.q.numel() + (self.s.numel() + self.z.numel()) * 2


def int4_linear(nibbles: torch.Tensor, scale_zero: torch.Tensor, group_size: int, in_features: int,
                keep_nibbles: bool = True) -> Linear:
    """An int4 layer on geb's native VNNI kernel where it is available and the shape fits (group 32,
    padded input a multiple of 128, at least INT4_NATIVE_MIN_WEIGHTS weights), else on torch's kernel."""
    from geb.infer import native

    kern = native.kernels() if INT4_NATIVE else None
    big = nibbles.shape[0] * nibbles.shape[1] * 2 >= INT4_NATIVE_MIN_WEIGHTS
    if kern is not None and big and group_size == 32 and (nibbles.shape[1] * 2) % 128 == 0:
        return Int4VnniLinear(nibbles, scale_zero, group_size, in_features, kern)
    return Int4Linear(nibbles, scale_zero, group_size=group_size, in_features=in_features, keep_nibbles=keep_nibbles)


def make_linear(w: torch.Tensor, fmt: str, group_size: int = 32) -> Linear:
    """Build a layer of format `fmt` from a full-precision weight [N, K]."""
    if fmt == "fp32":
        return F32Linear(w)
    if fmt == "bf16":
        return BF16Linear(w)
    if fmt == "int8":
        return Int8Linear.from_float(w)
    if fmt == "int4":
        n, k = w.shape
        kp = -(-k // group_size) * group_size
        padded = F.pad(w.float(), (0, kp - k)) if kp != k else w  # zero columns add nothing
        return int4_linear(*quantize_int4(padded, group_size), group_size=group_size, in_features=k)
    raise GebError(f"unknown format '{fmt}'")


def linear_from_state(get, prefix: str, fmt: str, shape: tuple[int, int], group_size: int = 32,
                      keep_nibbles: bool = True) -> Linear:
    """Rebuild a layer from stored tensors; `get(name, dtype, shape)` fetches and checks one tensor."""
    n, k = shape
    if fmt == "fp32":
        return F32Linear(get(prefix + "weight", torch.float32, (n, k)))
    if fmt == "bf16":
        return BF16Linear(get(prefix + "weight", torch.bfloat16, (n, k)))
    if fmt == "int8":
        return Int8Linear(get(prefix + "qweight", torch.int8, (n, k)), get(prefix + "scales", torch.bfloat16, (n,)))
    if fmt == "int4":
        kp = -(-k // group_size) * group_size
        return int4_linear(get(prefix + "qweight", torch.uint8, (n, kp // 2)),
                           get(prefix + "scales_zeros", torch.bfloat16, (kp // group_size, n, 2)),
                           group_size=group_size, in_features=k, keep_nibbles=keep_nibbles)
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
