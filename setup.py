"""Builds geb's native decode core (geb/csrc) as the extension module `geb._native` at install time.

Everything else about the package is in pyproject.toml. The kernels (geb/csrc/kernels.inc) are
compiled once per instruction set, each file with its own flags, and the core picks the best variant
the CPU runs from cpuid at run time: one build works on any x86-64 machine. A variant the compiler
cannot build is left out; a machine with no C compiler at all installs without the extension
(`optional=True`) and geb then runs its pure-PyTorch path (`geb info` says which path runs).
"""

from __future__ import annotations

import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "geb/csrc"
BASE = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fvisibility=default"]
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
X86 = platform.machine().lower() in ("x86_64", "amd64")
# variant name -> compiler flags (the names match isa_<name>.c and the core's dispatch table)
ISA_VARIANTS = {"generic": []}
if X86:
    ISA_VARIANTS.update({
        "avx2": AVX2,
        "avxvnni": AVX2 + ["-mavxvnni"],
        "avx512": AVX512,
        "avx512vnni": AVX512 + ["-mavx512vnni"],
        "avx512bf16": AVX512 + ["-mavx512vnni", "-mavx512bf16"],
    })
DEPENDS = [f"{CSRC}/geb_native.h", f"{CSRC}/kernels.inc"]


class BuildNative(build_ext):
    def build_extension(self, ext):
        if ext.name != "geb._native":
            return super().build_extension(ext)
        if self.compiler.compiler_type != "unix":
            raise RuntimeError("geb._native is built with gcc or clang only")
        objects, built = [], []
        for name, flags in ISA_VARIANTS.items():
            try:
                objects += self.compiler.compile([f"{CSRC}/isa_{name}.c"], output_dir=self.build_temp,
                                                 extra_postargs=BASE + flags, depends=DEPENDS)
                built.append(name)
            except Exception as e:  # an old compiler without this ISA's flags: leave the variant out
                if name == "generic":
                    raise
                print(f"geb._native: variant {name} not built ({e})", file=sys.stderr)
        ext.extra_objects = objects
        ext.define_macros = [(f"GEB_HAVE_{n.upper()}", "1") for n in built]
        super().build_extension(ext)


setup(
    ext_modules=[Extension("geb._native", sources=[f"{CSRC}/core.c", f"{CSRC}/text.c"], depends=DEPENDS,
                           extra_compile_args=BASE, libraries=["m"], optional=True)],
    cmdclass={"build_ext": BuildNative},
)
