"""llama-bench for bench/llamacpp_vs_geb.py: built once from the llama.cpp that llama-cpp-python vendors,
run on one GGUF file, its JSON parsed; and peak resident memory read from /proc (VmHWM).

Build (`ensure_llama_bench`): the sdist of the *installed* llama-cpp-python version is fetched with
`pip download --no-deps --no-binary :all:` into `<workdir>/llama-bench/<version>/sdist`, unpacked, and
only the `llama-bench` target of its `vendor/llama.cpp` is built with cmake (Release, native CPU flags,
static libraries, `-DLLAMA_CURL=OFF`, 2 jobs). The binary stays in that folder and is rebuilt only
when it is missing, so the comparison runs the same llama.cpp source as the binding. cmake is taken
from the venv (the `llamacpp` extra lists it), else from PATH, else `pip install cmake` into the venv.
The sdist carries no git metadata, so the llama.cpp commit is read from the sdist's CHANGELOG ("update
llama.cpp to ggml-org/llama.cpp@<hash>" under the version's heading) and passed to cmake as
LLAMA_BUILD_COMMIT, which llama-bench then reports in its JSON as build_commit.

Peak memory: `ru_maxrss` of a child starts from its parent's peak on Linux (the forked copy of the
parent's address space carries its high-water mark through exec), so a parent that has just written a
5 GB weight file makes every child report 5 GB. VmHWM in /proc/<pid>/status belongs to the address
space that exec created, so it is the child's own peak: `geb.infer.bench.peak_rss_bytes()` reads it inside a measuring
child, and `run_polled()` polls it for llama-bench from outside while it runs (every 20 ms; VmHWM
only grows, and llama-bench reaches its peak when it maps the model and allocates its buffers, long
before it exits).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

from geb.infer.bench import peak_rss_bytes

BUILD_JOBS = 2
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF"]


# -- peak resident memory -------------------------------------------------------------------------
def run_polled(cmd: list[str], timeout: float, interval: float = 0.02) -> tuple[int, str, str, int]:
    """Run cmd to the end; returns (exit code, stdout, stderr, peak VmHWM seen while it ran)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        peak, deadline = 0, time.monotonic() + timeout
        while p.poll() is None:
            peak = max(peak, peak_rss_bytes(p.pid))
            if time.monotonic() > deadline:
                p.kill()
                p.wait()
                raise RuntimeError(f"{cmd[0]} ran past {timeout:.0f} s: {' '.join(cmd)}")
            time.sleep(interval)
        out.seek(0)
        err.seek(0)
        return p.returncode, out.read(), err.read(), peak


# -- build ----------------------------------------------------------------------------------------
def installed_version() -> str:
    return metadata.version("llama-cpp-python")


def _cmake(build: Path, log) -> str:
    """The cmake that configured an earlier (interrupted) build, else the venv's, else PATH's, else
    one installed from PyPI into this venv."""
    cache = build / "CMakeCache.txt"
    if cache.exists():
        m = re.search(r"^CMAKE_COMMAND:INTERNAL=(.+)$", cache.read_text(errors="replace"), re.M)
        if m and os.access(m.group(1), os.X_OK):
            return m.group(1)
    venv_cmake = Path(sys.executable).parent / "cmake"
    if venv_cmake.exists():
        return str(venv_cmake)
    if shutil.which("cmake"):
        return shutil.which("cmake")
    log("cmake not found: pip install 'cmake>=3.18,<5' into this environment ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake>=3.18,<5"], check=True)
    return str(venv_cmake)


def _changelog_commit(src: Path, version: str) -> str:
    """The llama.cpp commit that llama-cpp-python's CHANGELOG names for this version ("unknown" if none)."""
    try:
        text = (src / "CHANGELOG.md").read_text(errors="replace")
    except OSError:
        return "unknown"
    head = re.search(rf"^## \[{re.escape(version)}\]\s*$", text, re.M)
    if not head:
        return "unknown"
    section = text[head.end():]
    nxt = re.search(r"^## \[", section, re.M)
    section = section[:nxt.start()] if nxt else section
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return m.group(1) if m else "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_llama_bench(workdir: Path, log=print) -> dict:
    """Path of a llama-bench built from the installed llama-cpp-python's vendored llama.cpp, building it
    (several minutes on 2 cores) only if it is missing. Returns what identifies the build."""
    version = installed_version()
    home = Path(workdir) / "llama-bench" / version
    sdist_dir, src_root, build = home / "sdist", home / "src", home / "build"
    binary = build / "bin" / "llama-bench"
    sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        log(f"fetching the llama-cpp-python {version} source package into {sdist_dir} ...")
        sdist_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(sdist_dir)], check=True)
        sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download left no llama_cpp_python-*.tar.gz in {sdist_dir}")
    sdist = sdists[0]
    src = src_root / sdist.name[: -len(".tar.gz")]
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        log(f"unpacking {sdist.name} ...")
        tmp = home / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        shutil.rmtree(src_root, ignore_errors=True)
        os.replace(tmp, src_root)
    commit = _changelog_commit(src, version)
    flags = CMAKE_FLAGS + [f"-DLLAMA_BUILD_COMMIT={commit}"]
    if not binary.exists():
        cmake = _cmake(build, log)
        log(f"building llama-bench from {src / 'vendor' / 'llama.cpp'} with {cmake}, {BUILD_JOBS} jobs "
            f"(several minutes; log in {home / 'build.log'}) ...")
        t0 = time.time()
        with open(home / "build.log", "a") as blog:
            for step in ([cmake, "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build)] + flags,
                         [cmake, "--build", str(build), "--config", "Release", "--target", "llama-bench",
                          "-j", str(BUILD_JOBS)]):
                blog.write("$ " + " ".join(step) + "\n")
                blog.flush()
                if subprocess.run(step, stdout=blog, stderr=subprocess.STDOUT).returncode != 0:
                    raise RuntimeError(f"building llama-bench failed; see {home / 'build.log'}")
        if not binary.exists():
            raise RuntimeError(f"the build finished without {binary}; see {home / 'build.log'}")
        log(f"built llama-bench in {time.time() - t0:.0f} s")
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
    return {"path": str(binary), "llama_cpp_python": version, "llama_cpp_commit": commit, "sdist": sdist.name,
            "sdist_sha256": _sha256(sdist), "cmake_flags": flags,
            "supports_depth": bool(re.search(r"-d, --n-depth", help_text))}


# -- run ------------------------------------------------------------------------------------------
def run_llama_bench(info: dict, gguf: Path, threads: int, prompt_len: int, n_gen: int, reps: int = 1,
                    timeout: float = 3600) -> dict:
    """Prefill prompt_len, decode n_gen tokens from an empty context and after prompt_len tokens.

    Two invocations (a prefill at depth prompt_len would double the prefill work for nothing):
    `-p P -n G -d 0` gives pp<P> and tg<G>; `-p 0 -n G -d P` gives tg<G> at depth P. Without depth
    support (an old llama.cpp) decode at depth is left out (None)."""
    base = [info["path"], "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json"]
    calls = [["-p", str(prompt_len), "-n", str(n_gen)] + (["-d", "0"] if info["supports_depth"] else [])]
    if info["supports_depth"]:
        calls.append(["-p", "0", "-n", str(n_gen), "-d", str(prompt_len)])
    res = {"engine": "llama-bench", "threads": threads, "prefill_tok_s": None, "decode_tok_s": None,
           "decode_at_depth_tok_s": None, "peak_rss_bytes": 0, "file_bytes": os.path.getsize(gguf), "tests": []}
    for extra in calls:
        cmd = base + extra
        rc, out, err, peak = run_polled(cmd, timeout)
        if rc != 0:
            raise RuntimeError(f"llama-bench failed ({rc}): {' '.join(cmd)}\n{err[-3000:]}")
        res["peak_rss_bytes"] = max(res["peak_rss_bytes"], peak)
        tests = json.loads(out[out.index("["):]) if "[" in out else []
        if not tests:
            raise RuntimeError(f"llama-bench printed no results: {' '.join(cmd)}\n{out[-2000:]}\n{err[-2000:]}")
        for t in tests:
            depth = t.get("n_depth", 0)
            if t["n_prompt"] > 0 and t["n_gen"] == 0 and depth == 0:
                res["prefill_tok_s"] = t["avg_ts"]
            elif t["n_gen"] > 0 and t["n_prompt"] == 0:
                res["decode_tok_s" if depth == 0 else "decode_at_depth_tok_s"] = t["avg_ts"]
            res["tests"].append({k: t.get(k) for k in ("n_prompt", "n_gen", "n_depth", "n_threads", "avg_ts",
                                                       "stddev_ts", "samples_ts", "flash_attn", "n_batch",
                                                       "n_ubatch", "use_mmap", "type_k", "type_v", "test_time")})
        res.setdefault("build", {k: tests[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                                       "model_type", "model_size", "model_n_params")})
    return res
