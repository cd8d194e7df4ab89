"""Loading geb's compiled core, the extension module `geb._native` (geb/csrc, built by setup.py), through ctypes.

Torch-free, so that the data pipeline's worker processes can call the core's MinHash kernel without
importing torch; the decode runtime binds its own functions in geb/infer/native.py through `load()`.

`GEB_NATIVE=0` turns the core off (callers then take their pure-Python/PyTorch paths); `GEB_ISA=<variant>`
forces a kernel variant this CPU runs. Where the extension was not built (no C compiler at install),
`load()` returns None and the reason.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading

from geb.errors import GebError

ABI_VERSION = 3  # geb_native.h's GEB_ABI_VERSION: a build from another version of geb is refused

_lock = threading.Lock()
_state: dict = {}  # "lib": CDLL | None once tried, "why": the reason when None


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("GEB_NATIVE", "1") == "0":
        return None, "disabled by GEB_NATIVE=0"
    spec = importlib.util.find_spec("geb._native")
    if spec is None or not spec.origin:
        return None, ("the native extension geb._native is not built (install geb with a C compiler present: "
                      "pip install -e . builds it)")
    try:
        lib = ctypes.CDLL(spec.origin)
        bind(lib, {"geb_abi_version": ([], ctypes.c_int), "geb_select_isa": ([ctypes.c_char_p], ctypes.c_int),
                   "geb_isa_supported": ([], ctypes.c_char_p)})
    except (OSError, AttributeError) as e:
        return None, f"cannot load {spec.origin}: {e}"
    if lib.geb_abi_version() != ABI_VERSION:
        return None, f"{spec.origin} is from another version of geb (rebuild: pip install -e .)"
    want = os.environ.get("GEB_ISA", "").strip().lower()
    if want:
        rc = lib.geb_select_isa(want.encode())
        if rc != 0:
            have = lib.geb_isa_supported().decode()
            what = "is not a kernel variant" if rc == -1 else "needs instructions this CPU lacks"
            raise GebError(f"GEB_ISA={want} {what}; this CPU runs: {have}")
    return lib, ""


def load() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded core, "") or (None, why it is unavailable); loaded once per process."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _load()
        return _state["lib"], _state["why"]


def bind(lib: ctypes.CDLL, signatures: dict) -> None:
    """Set argtypes/restype of each function `name: (argtypes, restype)` (AttributeError if one is missing)."""
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
