"""geb's native CPU decode core, bound through ctypes.

The core (geb/csrc, built at install time as the extension `geb._native`, see setup.py) runs one
whole decode step, every layer plus the final norm and the head for B sequences, in one call, on
its own persistent threads; its kernels are chosen at run time from cpuid (AVX512-BF16, AVX512-VNNI,
AVX-512, AVX-VNNI, AVX2 or portable C). This module describes a `Runtime`'s weights and a
`SlotCache` to it (`Decoder`), and exposes single products for tests and prefill (`matmul`,
`dequantize`).

`GEB_NATIVE=0` turns the core off (geb then runs its PyTorch path); `GEB_ISA=<variant>` forces a
variant this CPU runs (for tests of every variant, and for comparing them). Where the extension was
not built (no C compiler at install), `available()` is False and `why()` says so. Loading and those
switches live in geb/corelib.py (torch-free: the data pipeline uses the core's MinHash kernel too).
"""

from __future__ import annotations

import ctypes
import threading

import torch

from geb.errors import GebError

F32, BF16, Q8, Q4 = 0, 1, 2, 3
MATMUL_MAX_ROWS = 64


class GebMat(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("_pad", ctypes.c_int32), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("kp", ctypes.c_int64), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("s", ctypes.c_void_p),
                ("z", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class GebConfig(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "ffn_hidden",
                                               "vocab", "rotary_dims", "rope_interleaved")] + \
               [("norm_eps", ctypes.c_float), ("attn_scale", ctypes.c_float)]


class GebLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("wqkv", GebMat), ("wo", GebMat),
                ("wgu", GebMat), ("wdown", GebMat)]


class GebEmb(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("_pad", ctypes.c_int32), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p)]


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "geb_abi_version": ([], ctypes.c_int),
    "geb_isa_name": ([], ctypes.c_char_p),
    "geb_isa_supported": ([], ctypes.c_char_p),
    "geb_select_isa": ([ctypes.c_char_p], ctypes.c_int),
    "geb_set_threads": ([ctypes.c_int], None),
    "geb_get_threads": ([], ctypes.c_int),
    "geb_model_new": ([ctypes.POINTER(GebConfig)], _P),
    "geb_model_free": ([_P], None),
    "geb_model_set_layer": ([_P, _I64, ctypes.POINTER(GebLayer)], ctypes.c_int),
    "geb_model_set_io": ([_P, ctypes.POINTER(GebEmb), ctypes.POINTER(GebMat), _P, _P, _P, _I64], ctypes.c_int),
    "geb_model_set_cache": ([_P, _P, _P, _I64, _I64], ctypes.c_int),
    "geb_decode": ([_P, _I64, _P, _P, _P], ctypes.c_int),
    "geb_matmul": ([ctypes.POINTER(GebMat), _P, _I64, _P], ctypes.c_int),
    "geb_dequant": ([ctypes.POINTER(GebMat), _I64, _I64, _P], ctypes.c_int),
    "geb_quant_q8": ([_P, _I64, _I64, _P, _P, _P], None),
}

_lock = threading.Lock()
_state: dict = {}  # "lib": CDLL | None once tried, "why": the reason when None


def _load():
    from geb import corelib

    lib, why = corelib.load()
    if lib is None:
        return None, why
    try:
        corelib.bind(lib, _SIGNATURES)
    except AttributeError as e:
        return None, f"the native extension lacks a function ({e}); rebuild: pip install -e ."
    lib.geb_set_threads(max(1, torch.get_num_threads()))
    return lib, ""


def lib():
    """The loaded core, or None (see `why()`)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _load()
        return _state["lib"]


def available() -> bool:
    return lib() is not None


def why() -> str:
    """Why the core is unavailable ("" when it is available)."""
    lib()
    return _state.get("why", "")


def isa() -> str | None:
    """The kernel variant in use (e.g. 'avx2'), or None without the core."""
    L = lib()
    return L.geb_isa_name().decode() if L is not None else None


def supported_isas() -> list[str]:
    """Every variant this CPU runs, best first."""
    L = lib()
    return L.geb_isa_supported().decode().split(",") if L is not None else []


def select_isa(name: str) -> None:
    """Use kernel variant `name` from now on in this process (tests; GEB_ISA does it at start)."""
    L = _need()
    rc = L.geb_select_isa(name.encode())
    if rc != 0:
        raise GebError(f"kernel variant '{name}' is not available here; this CPU runs: {', '.join(supported_isas())}")


def set_threads(n: int) -> None:
    L = lib()
    if L is not None:
        L.geb_set_threads(max(1, int(n)))


def threads() -> int:
    L = lib()
    return L.geb_get_threads() if L is not None else 0


def describe() -> dict:
    """Which decode path runs here, for `geb info`, `geb bench` and the benchmark JSON."""
    if not available():
        return {"path": "torch", "isa": None, "why": why()}
    return {"path": "native", "isa": isa(), "supported": supported_isas(), "threads": threads(), "why": ""}


def _need():
    L = lib()
    if L is None:
        raise GebError(f"the native decode core is unavailable: {why()}")
    return L


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# -- weights ----------------------------------------------------------------------------------------
def mat(lin, keep: list, bias: torch.Tensor | None = None) -> GebMat:
    """The descriptor of a layer of geb.infer.quant (its tensors are appended to `keep`); `bias`, FP32
    [out_features], is added to every output row by the core."""
    d = lin.native_desc()
    if bias is not None:
        d = {**d, "bias": bias}
    for t in d.values():
        if isinstance(t, torch.Tensor):
            keep.append(t)
    return GebMat(kind=d["kind"], n=lin.out_features, k=lin.in_features, kp=d.get("kp", lin.in_features),
                  w=_ptr(d["w"]), scale=_ptr(d.get("scale")), s=_ptr(d.get("s")), z=_ptr(d.get("z")),
                  bias=_ptr(d.get("bias")))


def matmul(lin, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= 64) times a layer's weight through the decode kernels → FP32 [M, N]."""
    L = _need()
    keep: list = []
    m = mat(lin, keep)
    x = x.float().contiguous()
    if x.dim() != 2 or x.shape[1] != lin.in_features or not 1 <= x.shape[0] <= MATMUL_MAX_ROWS:
        raise ValueError(f"matmul: input {tuple(x.shape)} for a weight of {lin.in_features} inputs")
    y = torch.empty(x.shape[0], lin.out_features)
    if L.geb_matmul(ctypes.byref(m), x.data_ptr(), x.shape[0], y.data_ptr()) != 0:
        raise GebError("native matmul failed (out of memory?)")
    return y


def dequantize(lin, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows r0..r1 of a layer's weight as FP32 [r1 - r0, K], widened on the core's threads."""
    L = _need()
    keep: list = []
    m = mat(lin, keep)
    r1 = lin.out_features if r1 is None else r1
    out = torch.empty(r1 - r0, lin.in_features)
    if L.geb_dequant(ctypes.byref(m), r0, r1, out.data_ptr()) != 0:
        raise ValueError(f"dequantize: rows {r0}..{r1} of {lin.out_features}")
    return out


def quantize_activation(x: torch.Tensor, kp: int | None = None):
    """One row x [K] as the int8/int4 products see it: (int8 codes [kp], scales [G], sums [G]) per group
    of 32 inputs (G = ceil(kp / 32); kp defaults to K)."""
    L = _need()
    x = x.float().contiguous().view(-1)
    k = x.numel()
    kp = k if kp is None else kp
    g = -(-kp // 32)
    q = torch.zeros(g * 32, dtype=torch.int8)
    d, sx = torch.zeros(g + 8), torch.zeros(g + 8)
    L.geb_quant_q8(x.data_ptr(), k, kp, q.data_ptr(), d.data_ptr(), sx.data_ptr())
    return q[:kp], d[:g], sx[:g]


# -- a whole model ----------------------------------------------------------------------------------
class Decoder:
    """A runtime's weights and one SlotCache described to the core: `step()` is one decode step.

    Holds references to every tensor the core reads (weights, norms, RoPE tables, the cache), so they
    outlive the C side's pointers."""

    def __init__(self, rt, cache):
        L = _need()
        c = rt.cfg
        self._lib, self._keep = L, []
        cfg = GebConfig(n_layer=c.n_layer, d_model=c.d_model, n_head=c.n_head, n_kv_head=c.n_kv_head,
                        head_dim=c.head_dim, ffn_hidden=c.ffn_hidden, vocab=rt.head.out_features,
                        rotary_dims=c.rotary_dims, rope_interleaved=int(c.rope_style == "interleaved"),
                        norm_eps=c.norm_eps, attn_scale=rt.scale)
        self._h = L.geb_model_new(ctypes.byref(cfg))
        if not self._h:
            raise GebError("native decoder: out of memory")
        for i, layer in enumerate(rt.layers):
            norms = (layer.attn_norm.float().contiguous(), layer.ffn_norm.float().contiguous())
            self._keep += norms
            desc = GebLayer(attn_norm=norms[0].data_ptr(), ffn_norm=norms[1].data_ptr(),
                            wqkv=mat(layer.wqkv, self._keep, layer.qkv_bias), wo=mat(layer.wo, self._keep),
                            wgu=mat(layer.w_gateup, self._keep), wdown=mat(layer.w_down, self._keep))
            L.geb_model_set_layer(self._h, i, ctypes.byref(desc))
        emb = rt.emb
        kind = {"fp32": F32, "bf16": BF16, "int8": Q8}[emb.fmt]
        ew = emb.w.contiguous()
        es = emb.scale.float().contiguous() if emb.scale is not None else None
        cos, sin = rt.rope_cos.contiguous(), rt.rope_sin.contiguous()
        norm = rt.norm.float().contiguous()
        self._keep += [ew, es, cos, sin, norm]
        e = GebEmb(kind=kind, w=ew.data_ptr(), scale=_ptr(es))
        head = mat(rt.head, self._keep)
        L.geb_model_set_io(self._h, ctypes.byref(e), ctypes.byref(head), norm.data_ptr(), cos.data_ptr(),
                           sin.data_ptr(), cos.shape[0])
        for t in (cache.k, cache.v):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise GebError("native decoder: the KV cache must be contiguous FP32")
        self._cache = cache
        if L.geb_model_set_cache(self._h, cache.k.data_ptr(), cache.v.data_ptr(), cache.slots, cache.max_len) != 0:
            raise GebError("native decoder: cannot allocate its buffers (out of memory?)")
        self.vocab = rt.head.out_features
        self.threads = rt.threads

    def step(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Logits [B, V] of tokens [B] at positions (slot b gets tokens[b] at positions[b])."""
        b = tokens.numel()
        tok = tokens.to(torch.int64).contiguous().view(-1)
        pos = torch.tensor(positions, dtype=torch.int64)
        out = torch.empty(b, self.vocab)
        if self._lib.geb_get_threads() != self.threads:
            self._lib.geb_set_threads(self.threads)
        rc = self._lib.geb_decode(self._h, b, tok.data_ptr(), pos.data_ptr(), out.data_ptr())
        if rc != 0:
            what = {-1: f"batch of {b} for a cache of {self._cache.slots} slots", -2: "a token id outside the vocabulary",
                    -3: "a position past the cache or the RoPE table", -4: "out of memory"}.get(rc, f"code {rc}")
            raise GebError(f"native decode step failed: {what}")
        return out

    def __del__(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            self._lib.geb_model_free(h)


__all__ = ["available", "why", "isa", "supported_isas", "select_isa", "set_threads", "threads", "describe",
           "matmul", "dequantize", "quantize_activation", "Decoder", "mat", "GebMat"]
