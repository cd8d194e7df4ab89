"""Optional native kernels for decode-time products that torch's CPU build does poorly.

`kernels.c` (one-to-eight-row BF16 products with AVX512-BF16; one-row int4 products with int8
activations and AVX512-VNNI) is compiled on first use with the system C compiler
(`cc -O3 -march=native`, about a second) into a cache folder (`$GEB_CACHE_DIR`, default
`~/.cache/geb/native`), keyed by the source, the compiler and the CPU's flags, written to a temporary
name and renamed. It is called through ctypes, which releases the GIL, so a row range per thread
runs in parallel: the calling thread takes one range and a small pool the others. Where there is no
compiler, the CPU lacks AVX512-BF16 or AVX512-VNNI, or `GEB_NATIVE=0`, `kernels()` returns None and
torch's kernels serve instead. `python bench/decode_kernels.py` times them against torch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_lock = threading.Lock()
_state: dict = {}  # "kernels": Kernels | None once tried, "why": reason when None


MAX_ROWS = 8  # the most activation rows one bf16_matmul call takes (kernels.c has one function per count)


class Kernels:
    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self._mm = lib.bf16_matmul_rows
        self._mm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 5
        self._mm.restype = ctypes.c_int
        self._i4 = lib.int4_matvec
        self._i4.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3
        self._i4.restype = None
        self._i4x = lib.int4_quantize_x
        self._i4x.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64]
        self._i4x.restype = None
        self.threads = max(1, torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._pool_pid = 0

    def set_threads(self, n: int) -> None:
        self.threads = max(1, int(n))

    def _workers(self) -> ThreadPoolExecutor | None:
        want = self.threads - 1
        if want <= 0:
            return None
        if self._pool is not None and self._pool_pid != os.getpid():
            self._pool = None  # a forked child: the parent's worker threads do not exist here
        if self._pool is None or self._pool_size != want:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool, self._pool_size = ThreadPoolExecutor(want, thread_name_prefix="geb-native"), want
            self._pool_pid = os.getpid()
        return self._pool

    def int4_matvec(self, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One FP32 row x [1, K] times an int4 weight in the layout of `int4_vnni_layout` (q [N, K/2]
        uint8, scales s and zeros z [N, K/32] BF16; K a multiple of 128) → FP32 [1, N]. The activation
        is quantized to int8 per group of 32 inputs (symmetric, absmax / 127), as llama.cpp does for Q8_0."""
        n, k = q.shape[0], q.shape[1] * 2
        if k % 128 or x.shape != (1, k) or s.shape != (n, k // 32) or z.shape != s.shape:
            raise ValueError(f"int4_matvec: weight {tuple(q.shape)}, scales {tuple(s.shape)}, input {tuple(x.shape)}")
        xf = x.reshape(k).float().contiguous()
        xr, dx, sx = torch.empty(k, dtype=torch.int8), torch.empty(k // 32), torch.empty(k // 32)
        self._i4x(xf.data_ptr(), xr.data_ptr(), dx.data_ptr(), sx.data_ptr(), k)
        y = torch.empty(1, n)
        ptrs = (q.data_ptr(), s.data_ptr(), z.data_ptr(), xr.data_ptr(), dx.data_ptr(), sx.data_ptr(), y.data_ptr())
        self._split(self._i4, n, lambda r0, r1: (*ptrs, k, r0, r1))
        return y

    def _split(self, fn, units: int, args_of) -> None:
        """Run fn over [0, units) in one contiguous range per thread (the calling thread takes the first)."""
        parts = min(self.threads, max(1, units // 256))  # a hand-off costs more than a few rows
        pool = self._workers() if parts > 1 else None
        if pool is None:
            parts = 1
        bounds = [units * i // parts for i in range(parts)] + [units]
        futures = [pool.submit(fn, *args_of(bounds[i], bounds[i + 1])) for i in range(1, parts)]
        fn(*args_of(bounds[0], bounds[1]))
        for f in futures:
            f.result()

    def bf16_matmul(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """w BF16 [N, K] contiguous, x [M, K] with M <= MAX_ROWS (any float dtype; rounded to BF16 as
        torch's BF16 path does) → FP32 [M, N]. Each weight row is read once for all M rows of x; the
        output rows are split between `threads` threads."""
        n, k = w.shape
        m = x.shape[0]
        if not 1 <= m <= MAX_ROWS or x.shape[1] != k or w.dtype != torch.bfloat16 or not w.is_contiguous():
            raise ValueError(f"bf16_matmul: weight {tuple(w.shape)} {w.dtype}, input {tuple(x.shape)}")
        xb = x.to(torch.bfloat16).contiguous()
        y = torch.empty(m, n)
        wp, xp, yp = w.data_ptr(), xb.data_ptr(), y.data_ptr()
        self._split(self._mm, n, lambda r0, r1: (wp, xp, yp, k, r0, r1, m, n))
        return y


def int4_vnni_layout(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15, K % 64 == 0) → the int4_matvec layout [N, K/2]: per 64 inputs of a row,
    32 bytes, byte i holding input i in its low nibble and input 32 + i in its high one."""
    n, k = codes.shape
    c = codes.view(n, k // 64, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def kernels() -> Kernels | None:
    """The compiled kernels, or None (see `why()`). Compiled once per process, cached on disk."""
    with _lock:
        if "kernels" not in _state:
            try:
                _state["kernels"] = _load()
            except _Unavailable as e:
                _state["kernels"], _state["why"] = None, str(e)
        return _state["kernels"]


def why() -> str:
    """Why `kernels()` is None ("" when it is not)."""
    kernels()
    return _state.get("why", "")


def set_threads(n: int) -> None:
    k = _state.get("kernels")
    if k is not None:
        k.set_threads(n)


class _Unavailable(Exception):
    pass


def _load() -> Kernels:
    if os.environ.get("GEB_NATIVE", "1") == "0":
        raise _Unavailable("disabled by GEB_NATIVE=0")
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise _Unavailable("no C compiler (cc) on PATH")
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *_FLAGS]).encode() + _cpu_flags().encode()).hexdigest()[:16]
    folder = Path(os.environ.get("GEB_CACHE_DIR", Path.home() / ".cache" / "geb")) / "native"
    so = folder / f"kernels-{key}.so"
    if not so.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            p = subprocess.run([cc, *_FLAGS, str(_SRC), "-o", tmp], capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                raise _Unavailable(f"compiling {_SRC.name} failed: {p.stderr.strip()[-300:]}")
            os.replace(tmp, so)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(so))
    lib.geb_native_ok.restype = ctypes.c_int
    if not lib.geb_native_ok():
        raise _Unavailable("this CPU or compiler has no AVX512-BF16")
    return Kernels(lib, so)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


__all__ = ["Kernels", "MAX_ROWS", "kernels", "why", "set_threads", "int4_vnni_layout"]
