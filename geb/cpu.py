"""What this CPU is and does natively: model name, ISA flags, physical cores.

Every layer may import this (training picks its autocast dtype from it, inference its kernels and
thread count, benchmarks record it beside their figures). Linux reads /proc/cpuinfo; elsewhere the
answers fall back to "unknown" and no flags, which only ever selects the portable paths.
"""

from __future__ import annotations

import functools
import os
import platform


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                key, _, value = line.partition(":")
                out.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return out


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or "unknown"


def cpu_flags() -> frozenset[str]:
    """ISA flags as the kernel names them (avx2, fma, avx512f, avx512_vnni, avx512_bf16, amx_bf16, ...)."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def native_bf16() -> bool:
    """True where BF16 arithmetic is native (AVX512-BF16 or AMX-BF16): there BF16 matrix products beat
    FP32; elsewhere torch emulates them and they are several times slower than FP32."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads share a core's bandwidth and FPUs, so they
    rarely help)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":")[1].strip()))
        if cores:
            return max(1, min(len(cores), allowed))
    except OSError:
        pass
    return allowed


def describe() -> dict:
    """The CPU in a form benchmarks and `geb info` record beside their figures."""
    flags = cpu_flags()
    isa = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or f in ("sse4_2", "asimd", "sve"))
    return {"model": cpu_model(), "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "physical_cores": physical_cores(), "isa_flags": isa, "native_bf16": native_bf16()}
