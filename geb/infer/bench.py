"""Speed and quality measurements of the inference runtime: `geb bench`, the quickstart's report.

- `bench_format`: prefill tokens/s (one prompt), time to first token, decode tokens/s after the prompt
  and from an empty context, weight bytes and peak resident memory, for one format and thread count.
  `run_bench` runs each (format, threads) in a fresh spawned process, so peak memory is that
  format's own and one format's pages do not warm the next one's.
- `read_bandwidth`: the machine's memory read bandwidth, for the decode bound (bytes per token ÷
  bandwidth). A tiny C read loop when a C compiler is present (torch and numpy reductions understate
  bandwidth by up to 2x on this kind of machine), else torch's sum, marked as such.
- `perplexity` and `quick_report`: per-format perplexity against FP32 and speed, in seconds for a
  small model.
Speed is never asserted in tests; these functions print and return numbers.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from geb.config import ModelConfig
from geb.infer.runtime import Runtime, SlotCache, build_runtime
from geb.infer.folders import INT4_GROUP_SIZE


def random_runtime(cfg: ModelConfig, fmt: str, group_size: int = INT4_GROUP_SIZE, seed: int = 0) -> Runtime:
    """A runtime with GEB-initialised random weights, made one tensor at a time (never a full FP32 model)."""
    gen = torch.Generator().manual_seed(seed)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)
    c = cfg
    shapes = {"tok_emb.weight": (c.vocab_size, c.d_model), "lm_head.weight": (c.vocab_size, c.d_model),
              "norm.weight": (c.d_model,)}
    for i in range(c.n_layer):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (c.d_model,), p + "ffn_norm.weight": (c.d_model,),
                       p + "attn.wq.weight": (c.q_dim, c.d_model), p + "attn.wk.weight": (c.kv_dim, c.d_model),
                       p + "attn.wv.weight": (c.kv_dim, c.d_model), p + "attn.wo.weight": (c.d_model, c.q_dim),
                       p + "ffn.w_gate.weight": (c.ffn_hidden, c.d_model),
                       p + "ffn.w_up.weight": (c.ffn_hidden, c.d_model),
                       p + "ffn.w_down.weight": (c.d_model, c.ffn_hidden)})

    def get(name):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        s = out_std if name.endswith(("attn.wo.weight", "ffn.w_down.weight")) else std
        return torch.randn(shape, generator=gen) * s

    return build_runtime(cfg, get, fmt, group_size, info={"source": "random"})


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a process's current address space.

    Not ru_maxrss: a child started by fork+exec inherits its parent's peak there, so a bench child
    would report the memory of the parent that just wrote a weight file. 0 where /proc has no VmHWM.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_runtime(rt: Runtime, prompt_len: int = 512, new_tokens: int = 128, reps: int = 1, seed: int = 0,
                  batch: int = 0) -> dict:
    """Time prefill, first token and decode (at depth prompt_len and from empty) on one runtime; with
    batch > 1 also the aggregate tokens/s of `batch` sequences decoded together from an empty context
    (the server's case: one step for all)."""
    cfg = rt.cfg
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=gen)
    res: dict = {"prompt_len": prompt_len, "new_tokens": new_tokens, "threads": rt.threads}
    pre, ttft, dec_deep, dec_empty, dec_batch = [], [], [], [], []
    with rt.threads_scope():
        warm = SlotCache(cfg, 1, 16)  # first calls allocate and spin up thread pools
        tok = rt.prefill(prompt[:8], warm, 0).argmax().view(1)
        for _ in range(4):
            tok = rt.decode(tok, warm)[0].argmax().view(1)
        for _ in range(reps):
            cache = SlotCache(cfg, 1, prompt_len + new_tokens + 1)
            t0 = time.perf_counter()
            logits = rt.prefill(prompt, cache, 0)
            tok = logits.argmax().view(1)
            t1 = time.perf_counter()
            pre.append(prompt_len / (t1 - t0))
            ttft.append(t1 - t0)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                tok = rt.decode(tok, cache)[0].argmax().view(1)
            dec_deep.append(new_tokens / (time.perf_counter() - t0))
            cache = SlotCache(cfg, 1, new_tokens + 1)
            tok = torch.tensor([1])
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                tok = rt.decode(tok, cache)[0].argmax().view(1)
            dec_empty.append(new_tokens / (time.perf_counter() - t0))
            if batch > 1:
                cache = SlotCache(cfg, batch, new_tokens + 1)
                toks = torch.randint(0, cfg.vocab_size, (batch,), generator=gen)
                t0 = time.perf_counter()
                for _ in range(new_tokens):
                    toks = rt.decode(toks, cache).argmax(-1)
                dec_batch.append(batch * new_tokens / (time.perf_counter() - t0))
    if dec_batch:
        res.update({"batch": batch, "decode_batch_tok_s": statistics.median(dec_batch)})
    res.update({
        "prefill_tok_s": statistics.median(pre), "ttft_s": statistics.median(ttft),
        "decode_tok_s": statistics.median(dec_empty), "decode_at_depth_tok_s": statistics.median(dec_deep),
        "weight_bytes": rt.weight_bytes, "bytes_per_token": bytes_per_token(rt),
        "kv_cache_bytes": 2 * cfg.n_layer * cfg.n_kv_head * (prompt_len + new_tokens + 1) * cfg.head_dim * 4,
    })
    return res


def bytes_per_token(rt: Runtime) -> int:
    """Weight bytes read to decode one token: all but the embedding table, which is a row lookup."""
    return rt.weight_bytes - (0 if rt.head_shares_embedding else rt.emb.nbytes)


def bench_format(spec: dict) -> dict:
    """One (format, threads) measurement from a plain dict; runs in a child process under run_bench."""
    from geb.config import get_preset

    torch.set_num_threads(spec["threads"])
    base_rss = _current_rss_bytes()  # the interpreter and torch, before any weights
    t0 = time.perf_counter()
    if spec.get("model"):
        from geb.infer.folders import load_runtime

        rt, _, _ = load_runtime(spec["model"], spec["format"] if not spec.get("quantized") else None,
                                spec.get("group_size", INT4_GROUP_SIZE))
    else:
        rt = random_runtime(get_preset(spec["config"]), spec["format"], spec.get("group_size", INT4_GROUP_SIZE))
    load_s = time.perf_counter() - t0
    rt.set_threads(spec["threads"])
    res = bench_runtime(rt, spec["prompt_len"], spec["new_tokens"], spec.get("reps", 1))
    peak = peak_rss_bytes()
    res.update({"format": rt.fmt, "load_s": load_s, "peak_rss_bytes": peak, "base_rss_bytes": base_rss,
                "peak_over_weights_kv": (peak - base_rss) / (res["weight_bytes"] + res["kv_cache_bytes"]),
                "group_size": rt.info.get("group_size"), "head_format": rt.info.get("head_format"),
                "embedding_format": rt.info.get("embedding_format")})
    return res


WAIT_ENV = ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")


def wait_env(policy: str) -> dict[str, str]:
    """Environment for a process's thread pools, read once when torch and numpy load. PASSIVE also
    shortens OpenBLAS's idle spin (FP32 decode): 1.6x faster on the busy machine."""
    env = {"OMP_WAIT_POLICY": policy.upper()}
    if policy.upper() == "PASSIVE":
        env["OPENBLAS_THREAD_TIMEOUT"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4")
    return env


def run_bench(specs: list[dict], isolate: bool = True, log=print, omp_wait_policy: str | None = "PASSIVE") -> list[dict]:
    """Run each spec (see bench_format) in its own spawned process (or inline when isolate=False).

    `omp_wait_policy` is given to the children's OpenMP runtime (it is read once, when torch loads):
    PASSIVE lets idle torch workers sleep instead of spinning, which on a machine shared with other
    work was 3-8x faster at decode (spinning workers take the time slices the working thread needs).
    None leaves the environment as it is.
    """
    out = []
    for spec in specs:
        log(f"  {spec['format']:>5} threads={spec['threads']} ...")
        if isolate:
            import multiprocessing as mp

            saved = {k: os.environ.get(k) for k in WAIT_ENV}
            if omp_wait_policy:
                os.environ.update(wait_env(omp_wait_policy))
            try:
                with mp.get_context("spawn").Pool(1) as pool:
                    res = pool.apply(bench_format, (spec,))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        else:
            res = bench_format(spec)
        res["omp_wait_policy"] = (omp_wait_policy if isolate else None) or os.environ.get("OMP_WAIT_POLICY")
        out.append(res)
        log("        " + format_row(res))
    return out


def format_row(r: dict) -> str:
    return (f"{r['format']:>5} t{r['threads']}: prefill {r['prefill_tok_s']:8.1f} tok/s  ttft {r['ttft_s']:6.3f} s  "
            f"decode {r['decode_tok_s']:7.2f} tok/s  @{r['prompt_len']}: {r['decode_at_depth_tok_s']:7.2f} tok/s  "
            f"weights {r['weight_bytes'] / 2**20:8.1f} MiB  peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB"
            + (f" ({r['peak_over_weights_kv']:.2f}x weights+KV above the {r['base_rss_bytes'] / 2**20:.0f} MiB "
               "of torch itself)" if "peak_over_weights_kv" in r else ""))


_READ_LOOP = r"""
#include <stddef.h>
#include <stdint.h>
#include <immintrin.h>
double geb_read(const float *p, size_t n, int reps) {
    double total = 0;
    for (int r = 0; r < reps; r++) {
        float acc = 0;
        #pragma omp parallel for reduction(+:acc) schedule(static)
        for (size_t i = 0; i < n; i += 64) {
#ifdef __AVX512F__
            __m512 a = _mm512_load_ps(p + i), b = _mm512_load_ps(p + i + 16);
            __m512 c = _mm512_load_ps(p + i + 32), d = _mm512_load_ps(p + i + 48);
            acc += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
#elif defined(__AVX2__)
            /* xor of the bits: one-cycle chains, so the loop waits on memory, not on adds */
            const __m256i *q = (const __m256i *)(p + i);
            __m256i x0 = _mm256_xor_si256(_mm256_load_si256(q), _mm256_load_si256(q + 1));
            __m256i x1 = _mm256_xor_si256(_mm256_load_si256(q + 2), _mm256_load_si256(q + 3));
            x0 = _mm256_xor_si256(x0, _mm256_xor_si256(_mm256_load_si256(q + 4), _mm256_load_si256(q + 5)));
            x1 = _mm256_xor_si256(x1, _mm256_xor_si256(_mm256_load_si256(q + 6), _mm256_load_si256(q + 7)));
            acc += (float)_mm256_extract_epi32(_mm256_xor_si256(x0, x1), 0);
#else
            float s = 0; for (int j = 0; j < 64; j++) s += p[i + j]; acc += s;
#endif
        }
        total += acc;
    }
    return total;
}
"""


def read_bandwidth(threads: int, size_mb: int = 1024, reps: int = 5) -> dict:
    """Memory read bandwidth in GB/s with `threads` threads (median of reps)."""
    n = size_mb * 2**20 // 4 // 64 * 64
    buf = torch.ones(n + 16)
    off = (-buf.data_ptr() // 4) % 16  # 64-byte alignment for aligned loads
    x = buf[off : off + n]
    lib = _compile_read_loop()
    times = []
    if lib is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        fn = lib.geb_read
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.omp_set_num_threads(threads)
        fn(x.data_ptr(), n, 1)
        for _ in range(reps):
            times.append(_timed(lambda: fn(x.data_ptr(), n, 1)))
        method = "C read loop (AVX-512 or AVX2 when available, OpenMP)"
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        x.sum()
        for _ in range(reps):
            times.append(_timed(lambda: x.sum()))
        torch.set_num_threads(before)
        method = "torch sum (understates bandwidth)"
    return {"gb_s": n * 4 / statistics.median(times) / 1e9, "max_gb_s": n * 4 / min(times) / 1e9,
            "threads": threads, "method": method}


def _compile_read_loop():
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    d = Path(tempfile.gettempdir()) / f"geb-readloop-{os.getuid()}"
    tag = hashlib.sha256(_READ_LOOP.encode()).hexdigest()[:12]  # a changed loop is compiled anew
    so = d / f"readloop-{tag}.so"
    try:
        if not so.exists():
            d.mkdir(exist_ok=True)
            src = d / f"readloop-{tag}.{os.getpid()}.c"
            src.write_text(_READ_LOOP)
            tmp = d / f"readloop.{os.getpid()}.so"
            subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src),
                            "-o", str(tmp)], check=True, capture_output=True, timeout=120)
            src.unlink()
            os.replace(tmp, so)
        return ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from geb.cpu import describe as cpu_describe, physical_cores
    from geb.infer import native

    return {"cpu": model or platform.processor(), "physical_cores": physical_cores(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            # which decode path ran: geb's native core (and its kernel variant) or torch, and why
            "decode_path": native.describe(), "cpu_isa": cpu_describe()["isa_flags"]}


# -- quality and the quickstart's report ----------------------------------------------------------
def perplexity(rt: Runtime, ids: list[int], tok, window: int | None = None) -> float:
    """Perplexity of `ids` under the runtime (the first token predicted from the tokenizer's
    end-of-document id), in windows of at most `window` tokens: geb.scoring's one scorer."""
    from geb.infer.scoring import RuntimeScorer
    from geb.scoring import perplexity_of

    return perplexity_of(RuntimeScorer(rt, max_len=window, tok=tok), ids)


def quick_report(model_dir, formats=("fp32", "bf16", "int8", "int4"), prompt_len: int = 64, new_tokens: int = 32,
                 text: str | None = None, threads: int | None = None, group_size: int = 32) -> dict:
    """Speed (and, given held-out `text`, perplexity vs FP32) of a model folder in each format.

    Returns {"formats": {fmt: {prefill_tok_s, decode_tok_s, decode_at_depth_tok_s, ttft_s, weight_bytes,
    perplexity?, ppl_vs_fp32?}}, "threads": n}. A few seconds for a 6M-parameter model.
    """
    from geb.cpu import physical_cores
    from geb.infer.folders import load_runtime

    threads = threads or physical_cores()
    out: dict = {"model": str(model_dir), "threads": threads, "formats": {}}
    base_ppl = None
    for fmt in formats:
        rt, tok, _ = load_runtime(model_dir, fmt, group_size)
        rt.set_threads(threads)
        plen = max(1, min(prompt_len, rt.cfg.max_seq_len - new_tokens - 1))
        r = bench_runtime(rt, plen, new_tokens)
        row = {k: r[k] for k in ("prefill_tok_s", "decode_tok_s", "decode_at_depth_tok_s", "ttft_s", "weight_bytes")}
        if text:
            ppl = perplexity(rt, tok.encode(text), tok)
            row["perplexity"] = ppl
            if fmt == "fp32":
                base_ppl = ppl
            if base_ppl:
                row["ppl_vs_fp32"] = ppl / base_ppl - 1.0
        out["formats"][fmt] = row
    return out


def format_quick_report(rep: dict) -> str:
    lines = [f"speed of {rep['model']} ({rep['threads']} threads):"]
    for fmt, r in rep["formats"].items():
        s = (f"  {fmt:>5}: prefill {r['prefill_tok_s']:8.1f} tok/s, decode {r['decode_tok_s']:7.1f} tok/s, "
             f"weights {r['weight_bytes'] / 2**20:6.1f} MiB")
        if "perplexity" in r:
            s += f", perplexity {r['perplexity']:.3f}"
            if "ppl_vs_fp32" in r and fmt != "fp32":
                s += f" ({100 * r['ppl_vs_fp32']:+.2f}% vs fp32)"
        lines.append(s)
    return "\n".join(lines)
