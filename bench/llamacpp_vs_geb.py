"""geb vs llama.cpp on the same weights and machine, side by side: prefill, decode, time to first token.

    python bench/llamacpp_vs_geb.py                       # geb-1.3b shape, random weights, 4 formats, 1 and 2 threads
    python bench/llamacpp_vs_geb.py --config geb-tiny --formats int4 --reps 1 --threads 1
    python bench/llamacpp_vs_geb.py --smoke               # quick end-to-end check (geb-tiny), ...-smoke.json

Needs the optional extras `llamacpp` (llama-cpp-python, compiles llama.cpp on install; cmake) and `export`
(gguf). Two baselines: llama-cpp-python (the binding, driven token by token from Python as geb is) and
llama-bench, built once from the llama.cpp source that the installed llama-cpp-python's sdist vendors
(bench/_llamabench.py: several minutes on 2 cores the first time, then kept in --workdir).
Steps: (1) random weights of the preset's shape are written once to a safetensors file in geb's names
(deterministic per tensor); (2) from that file, geb's quantized weight files (bf16, int8, int4) and
GGUF files (F32, BF16, Q8_0, Q4_0) are written once into --workdir; (3) for each repetition, format and
thread count, geb, llama-cpp-python and llama-bench run one after another, each in a fresh process that
maps one file (the order rotates every repetition, so neighbours' noise hits all engines alike). Each
measures prefill of --prompt-len tokens, decode of --new-tokens tokens from an empty context, and
decode after --prompt-len tokens (llama-bench: pp<P>, tg<G>, tg<G> at -d <P>). Medians are taken and
ratios geb / the faster baseline printed and written as JSON (with the CPU model, its ISA flags, geb's
kernel path and the llama.cpp commit) and as markdown under bench/results/. Peak resident memory is
VmHWM from /proc (not ru_maxrss, which carries the parent's peak into a child).

Format pairs: fp32↔F32, bf16↔BF16, int8↔Q8_0, int4↔Q4_0. geb's int4 keeps the lm head and the
embedding in int8, so the Q4_0 GGUF stores output.weight and token_embd.weight as Q8_0 too.
The GGUF writer here is minimal (llama architecture, a byte-level stand-in vocabulary: only token ids
are fed); the full exporter with the real tokenizer is geb.interop.gguf (the export issue).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import zlib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _llamabench  # noqa: E402
from geb.infer.bench import peak_rss_bytes  # noqa: E402
from geb.config import get_preset  # noqa: E402

GGUF_TYPE = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}


# -- weights --------------------------------------------------------------------------------------
def tensor_shapes(cfg) -> dict[str, tuple]:
    c = cfg
    shapes = {"tok_emb.weight": (c.vocab_size, c.d_model)}
    for i in range(c.n_layer):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (c.d_model,), p + "attn.wq.weight": (c.q_dim, c.d_model),
                       p + "attn.wk.weight": (c.kv_dim, c.d_model), p + "attn.wv.weight": (c.kv_dim, c.d_model),
                       p + "attn.wo.weight": (c.d_model, c.q_dim), p + "ffn_norm.weight": (c.d_model,),
                       p + "ffn.w_gate.weight": (c.ffn_hidden, c.d_model),
                       p + "ffn.w_up.weight": (c.ffn_hidden, c.d_model),
                       p + "ffn.w_down.weight": (c.d_model, c.ffn_hidden)})
    shapes["norm.weight"] = (c.d_model,)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.d_model)
    return shapes


def random_tensor(cfg, name: str, shape, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("attn.wo.weight", "ffn.w_down.weight")) else 0.02
    return torch.randn(shape, generator=g) * std


def write_random_weights(cfg, path: Path, seed: int) -> None:
    from geb.infer.folders import Lazy, write_aligned_safetensors

    tensors = {n: Lazy(torch.float32, s, lambda n=n, s=s: random_tensor(cfg, n, s, seed))
               for n, s in tensor_shapes(cfg).items()}
    tmp = path.with_suffix(".tmp")
    write_aligned_safetensors(tmp, tensors, {"format": "pt", "seed": str(seed)})
    os.replace(tmp, path)


def write_geb_quantized(cfg, src: Path, fmt: str, out: Path) -> None:
    from geb.infer.runtime import build_runtime
    from geb.infer.folders import LAYOUT, SafeTensorsMap, write_aligned_safetensors

    st = SafeTensorsMap(src)
    rt = build_runtime(cfg, st.get, fmt, 32, release=st.release)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    write_aligned_safetensors(tmp / "model.safetensors", {k: v.contiguous() for k, v in rt.state().items()},
                              {"format": "pt"})
    q = {"format": fmt, "group_size": rt.info["group_size"], "layout": LAYOUT,
         "embedding_format": rt.info["embedding_format"], "head_format": rt.info["head_format"]}
    (tmp / "config.json").write_text(json.dumps({**cfg.to_dict(), "quantization": q}, indent=2))
    os.replace(tmp, out)


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """geb's rotate-half RoPE → llama.cpp's adjacent-pair RoPE: reorder each head's rows."""
    rows, k = w.shape
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, k).swapaxes(1, 2).reshape(rows, k)


def write_gguf(cfg, src: Path, fmt: str, out: Path) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q

    from geb.infer.folders import SafeTensorsMap

    st = SafeTensorsMap(src)
    main_t = {"fp32": Q.F32, "bf16": Q.BF16, "int8": Q.Q8_0, "int4": Q.Q4_0}[fmt]
    side_t = {"fp32": Q.F32, "bf16": Q.BF16, "int8": Q.Q8_0, "int4": Q.Q8_0}[fmt]
    c = cfg
    names = {"tok_emb.weight": ("token_embd.weight", side_t), "norm.weight": ("output_norm.weight", Q.F32),
             "lm_head.weight": ("output.weight", side_t)}
    part = {"attn_norm.weight": "attn_norm", "attn.wq.weight": "attn_q", "attn.wk.weight": "attn_k",
            "attn.wv.weight": "attn_v", "attn.wo.weight": "attn_output", "ffn_norm.weight": "ffn_norm",
            "ffn.w_gate.weight": "ffn_gate", "ffn.w_up.weight": "ffn_up", "ffn.w_down.weight": "ffn_down"}
    for i in range(c.n_layer):
        for k, v in part.items():
            names[f"layers.{i}.{k}"] = (f"blk.{i}.{v}.weight", Q.F32 if k.endswith("norm.weight") else main_t)
    order = [n for n in tensor_shapes(cfg)]

    def data(name):
        a = st.get(name).float().numpy()
        if name.endswith("attn.wq.weight"):
            a = _permute_rope(a, c.n_head)
        elif name.endswith("attn.wk.weight"):
            a = _permute_rope(a, c.n_kv_head)
        t = names[name][1]
        if t == Q.F32:
            return np.ascontiguousarray(a, dtype=np.float32)
        return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), t)

    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"geb random {c.name}")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.ffn_hidden)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.rotary_dims)
    w.add_rope_freq_base(c.rope_base)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type({"fp32": 0, "bf16": 32, "int8": 7, "int4": 2}[fmt])
    # A stand-in byte-level vocabulary (the bench feeds token ids, never text).
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_tokens = [chr(x) for x in cs]
    tokens = byte_tokens + ["ĠĠ"] + [f"<geb_{i}>" for i in range(c.vocab_size - 257)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    shapes = tensor_shapes(cfg)
    for name in order:
        gname, t = names[name]
        shape = shapes[name]
        if t == Q.F32:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:  # quantized types are described by their byte shape
            bshape = gguf.quants.quant_shape_to_byte_shape(shape, t)
            w.add_tensor_info(gname, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name in order:
        d = data(name)
        w.write_tensor_data(d if d.dtype == np.float32 else d.view(np.uint8))
        st.release(name)
    w.close()
    os.replace(tmp, out)


# -- one measurement (child process) --------------------------------------------------------------
def geb_kernel_path() -> dict:
    """Which of geb's decode paths this process runs: the native core's own description where it has
    one (geb.infer.native.describe()), else the PyTorch path."""
    from geb.infer import native

    describe = getattr(native, "describe", None)
    return describe() if callable(describe) else {"path": "torch"}


def child_geb(args) -> dict:
    from geb.infer.bench import bench_runtime
    from geb.infer.runtime import build_runtime
    from geb.infer.folders import SafeTensorsMap, read_config, runtime_from_quantized

    cfg = get_preset(args.config)
    t0 = time.perf_counter()
    if args.format == "fp32":
        st = SafeTensorsMap(Path(args.file))
        rt = build_runtime(cfg, st.get, "fp32", release=st.release)
    else:
        folder = Path(args.file)
        cfg, q = read_config(folder)
        rt = runtime_from_quantized(folder, cfg, q)
    load = time.perf_counter() - t0
    rt.set_threads(args.threads[0])
    r = bench_runtime(rt, args.prompt_len, args.new_tokens, batch=args.batch)
    return {"engine": "geb", "format": args.format, "threads": args.threads[0], "load_s": load,
            "prefill_tok_s": r["prefill_tok_s"], "ttft_s": r["ttft_s"], "decode_tok_s": r["decode_tok_s"],
            "decode_at_depth_tok_s": r["decode_at_depth_tok_s"], "peak_rss_bytes": peak_rss_bytes(),
            "batch": r.get("batch"), "decode_batch_tok_s": r.get("decode_batch_tok_s"),
            "weight_bytes": r["weight_bytes"], "bytes_per_token": r["bytes_per_token"], "kernel": geb_kernel_path()}


def child_llama(args) -> dict:
    from llama_cpp import Llama

    cfg = get_preset(args.config)
    n, m, threads = args.prompt_len, args.new_tokens, args.threads[0]
    t0 = time.perf_counter()
    llm = Llama(model_path=args.file, n_ctx=n + m + 16, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False, use_mmap=True)
    load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = rng.integers(300, cfg.vocab_size, n).tolist()

    n_vocab = llm.n_vocab()

    def argmax():  # logits of the last evaluated token (llama-cpp-python keeps no copy without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    llm.eval(prompt[:8])  # warm up, as geb's bench does
    for _ in range(4):
        llm.eval([argmax()])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = argmax()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(m):
        llm.eval([tok])
        tok = argmax()
    deep = m / (time.perf_counter() - t0)
    llm.reset()
    tok = 1
    t0 = time.perf_counter()
    for _ in range(m):
        llm.eval([tok])
        tok = argmax()
    empty = m / (time.perf_counter() - t0)
    return {"engine": "llama-cpp-python", "format": args.format, "threads": threads, "load_s": load,
            "prefill_tok_s": n / ttft, "ttft_s": ttft, "decode_tok_s": empty, "decode_at_depth_tok_s": deep,
            "peak_rss_bytes": peak_rss_bytes(), "file_bytes": os.path.getsize(args.file)}


# -- driver ---------------------------------------------------------------------------------------
PHASES = ("prefill_tok_s", "decode_tok_s", "decode_at_depth_tok_s")
ENGINES = ("geb", "llama-cpp-python", "llama-bench")
BASELINES = ENGINES[1:]


def run_child(engine: str, fmt: str, file: Path, threads: int, a) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--format", fmt, "--file", str(file), "--config", a.config,
           "--threads", str(threads), "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens),
           "--batch", str(a.batch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if engine == "geb" and a.omp_wait_policy != "inherit":
        from geb.infer.bench import wait_env

        env.update(wait_env(a.omp_wait_policy))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{engine} {fmt} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="geb-1.3b")
    ap.add_argument("--formats", default="fp32,bf16,int8,int4")
    ap.add_argument("--threads", type=_int_list, default=[1, 2], help="thread counts, e.g. 1,2 (default 1,2)")
    ap.add_argument("--prompt-len", type=int, default=512, help="prefill length and decode depth (clamped to "
                    "the preset's context)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per decode measurement")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions (median)")
    ap.add_argument("--batch", type=int, default=8, help="geb also decodes this many sequences in one step "
                    "(the server's case) and reports the aggregate tokens/s over one sequence's (0: skip)")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="llama-bench and/or llama-cpp-python")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "inherit"],
                    help="OpenMP wait policy of geb's processes (llama.cpp has its own thread pool)")
    ap.add_argument("--workdir", default="/tmp/geb-bench",
                    help="where weight files and the llama-bench build are kept and reused")
    ap.add_argument("--smoke", action="store_true", help="a quick end-to-end check: geb-tiny, int4, 1 thread, "
                    "1 rep, prompt 128, 16 new tokens; written as ...-smoke.json")
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/results/llamacpp_vs_geb-<config>-<date>[-smoke].json)")
    ap.add_argument("--child", choices=["geb", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.config, a.formats, a.threads, a.reps, a.prompt_len, a.new_tokens = "geb-tiny", "int4", [1], 1, 128, 16
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        torch.set_num_threads(a.threads[0])
        print(json.dumps(child_geb(a) if a.child == "geb" else child_llama(a)))
        return 0

    baselines = [b.strip() for b in a.baselines.split(",") if b.strip()]
    if not baselines or set(baselines) - set(BASELINES):
        print(f"--baselines takes {' and/or '.join(BASELINES)}, got {a.baselines!r}", file=sys.stderr)
        return 2
    try:
        import gguf  # noqa: F401
        if "llama-cpp-python" in baselines:
            import llama_cpp  # noqa: F401
        llama_version = _llamabench.installed_version()
    except (ImportError, PackageNotFoundError) as e:
        print(f"needs the optional extras: pip install 'geb[llamacpp,export]' ({e})", file=sys.stderr)
        return 2
    cfg = get_preset(a.config)
    if a.prompt_len + a.new_tokens + 1 > cfg.max_seq_len:
        a.prompt_len = cfg.max_seq_len - a.new_tokens - 1
        print(f"prompt length clamped to {a.prompt_len} ({a.config}'s context is {cfg.max_seq_len})", flush=True)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    work = Path(a.workdir) / f"{a.config}-seed{a.seed}"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    bench_info = _llamabench.ensure_llama_bench(Path(a.workdir)) if "llama-bench" in baselines else None
    if bench_info and not bench_info["supports_depth"]:
        print("this llama-bench has no -d (depth): its decode after the prompt is left out", flush=True)
    src = work / "random-fp32.safetensors"
    if not src.exists():
        print(f"writing random {a.config} weights to {src} ...", flush=True)
        write_random_weights(cfg, src, a.seed)
    files = {}
    for fmt in formats:
        g = src if fmt == "fp32" else work / f"geb-{fmt}"
        if not g.exists():
            print(f"writing geb {fmt} weights ...", flush=True)
            write_geb_quantized(cfg, src, fmt, g)
        l = work / f"model-{GGUF_TYPE[fmt]}.gguf"
        if not l.exists():
            print(f"writing GGUF {GGUF_TYPE[fmt]} ...", flush=True)
            write_gguf(cfg, src, fmt, l)
        files[fmt] = (g, l)
    t_measure = time.time()
    engines = ["geb"] + baselines
    print(f"prepared in {t_measure - t_start:.0f} s; measuring {', '.join(engines)} (threads {a.threads}, prompt "
          f"{a.prompt_len}, {a.new_tokens} new tokens, {a.reps} alternating reps)", flush=True)
    from geb.infer.bench import read_bandwidth

    bandwidth = {str(t): read_bandwidth(t) for t in a.threads}  # the bound for decode: weight bytes per token
    print("memory read bandwidth: " + ", ".join(f"{t} threads {b['gb_s']:.1f} GB/s" for t, b in bandwidth.items()),
          flush=True)
    runs: dict = {f: {str(t): {e: [] for e in engines} for t in a.threads} for f in formats}
    for rep in range(a.reps):
        for fmt in formats:
            for t in a.threads:
                # each engine takes each place in the order in turn, so drifting load hits all alike
                order = engines[rep % len(engines):] + engines[:rep % len(engines)]
                for eng in order:
                    if eng == "llama-bench":
                        r = _llamabench.run_llama_bench(bench_info, files[fmt][1], t, a.prompt_len, a.new_tokens)
                    else:
                        r = run_child("geb" if eng == "geb" else "llama", fmt, files[fmt][0 if eng == "geb" else 1],
                                      t, a)
                    runs[fmt][str(t)][eng].append(r)
                    print(f"  rep {rep} {fmt:>5} {t}t {eng:>16}: prefill {_fmt(r['prefill_tok_s'], 7, 1)}  decode "
                          f"{_fmt(r['decode_tok_s'])}  @{a.prompt_len} {_fmt(r['decode_at_depth_tok_s'])} tok/s  "
                          f"rss {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    summary = summarize(runs, engines, bandwidth)
    from geb.cpu import describe as cpu_describe
    from geb.infer.bench import machine_info

    kernels = [r["kernel"] for f in runs.values() for t in f.values() for r in t["geb"]]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "bench/llamacpp_vs_geb.py"] + sys.argv[1:]),
              "cpu": cpu_describe(), "machine": machine_info(),
              "geb_kernel": kernels[0] if kernels else None,
              "geb_kernel_all_same": all(k == kernels[0] for k in kernels),
              "llama_cpp_python": llama_version, "llama_bench": bench_info,
              "settings": {"config": a.config, "formats": formats, "threads": a.threads, "prompt_len": a.prompt_len,
                           "new_tokens": a.new_tokens, "reps": a.reps, "seed": a.seed, "baselines": baselines,
                           "omp_wait_policy": a.omp_wait_policy, "GEB_ISA": os.environ.get("GEB_ISA"),
                           "smoke": a.smoke},
              "note": "ratio = geb / the faster baseline (llama-bench, llama-cpp-python) for tokens/s; for ttft_s "
                      "llama-cpp-python / geb (llama-bench reports no ttft). Above 1: geb better. peak_rss from "
                      "VmHWM (/proc): geb and llama-cpp-python read their own, llama-bench's polled from outside",
              "bandwidth": bandwidth, "summary": summary, "runs": runs, "prepare_s": t_measure - t_start, "measure_s": time.time() - t_measure,
              "wall_s": time.time() - t_start}
    suffix = "-smoke" if a.smoke else ""
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / (
        f"llamacpp_vs_geb-{a.config}-{datetime.date.today().isoformat()}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {out} and {out.with_suffix('.md').name} (prepare {report['prepare_s']:.0f} s, "
          f"measure {report['measure_s']:.0f} s)")
    return 0


def _fmt(x, width: int = 6, digits: int = 2) -> str:
    return f"{x:{width}.{digits}f}" if x is not None else f"{'-':>{width}}"


def summarize(runs: dict, engines: list[str], bandwidth: dict | None = None) -> dict:
    """Medians per format, thread count, measure and engine; ratio geb / the faster baseline; geb's
    batched decode over its single-sequence decode; geb's decode over the memory-bandwidth bound."""
    summary: dict = {}
    for fmt, by_threads in runs.items():
        for t, by_engine in by_threads.items():
            row = summary.setdefault(fmt, {}).setdefault(t, {})
            for ph in PHASES:
                med = {}
                for e in engines:
                    vals = [r[ph] for r in by_engine[e] if r.get(ph) is not None]
                    med[e] = statistics.median(vals) if vals else None
                base = {e: v for e, v in med.items() if e != "geb" and v is not None}
                best = max(base, key=base.get) if base else None
                row[ph] = {**med, "best_baseline": best,
                           "ratio": med["geb"] / base[best] if best and med["geb"] is not None else None}
            if "llama-cpp-python" in engines:
                g = statistics.median(r["ttft_s"] for r in by_engine["geb"])
                b = statistics.median(r["ttft_s"] for r in by_engine["llama-cpp-python"])
                row["ttft_s"] = {"geb": g, "llama-cpp-python": b, "best_baseline": "llama-cpp-python", "ratio": b / g}
            row["peak_rss_gib"] = {e: max(r["peak_rss_bytes"] for r in by_engine[e]) / 2**30 for e in engines}
            geb = by_engine["geb"]
            single = row["decode_tok_s"]["geb"]
            batched = [r["decode_batch_tok_s"] for r in geb if r.get("decode_batch_tok_s")]
            if batched and single:
                row["batch"] = {"sequences": geb[0]["batch"], "geb_tok_s": statistics.median(batched),
                                "speedup": statistics.median(batched) / single}
            if bandwidth and t in bandwidth and single:
                bound = bandwidth[t]["gb_s"] * 1e9 / geb[0]["bytes_per_token"]
                row["bandwidth"] = {"gb_s": bandwidth[t]["gb_s"], "bytes_per_token": geb[0]["bytes_per_token"],
                                    "bound_tok_s": bound, "fraction": single / bound}
    return summary


def markdown(report: dict) -> str:
    """Two tables for docs/benchmarks.md: the ratios (geb / the faster baseline), then every median."""
    st, cpu = report["settings"], report["cpu"]
    lb = report["llama_bench"]
    build = f", llama-bench at llama.cpp {lb['llama_cpp_commit']}" if lb else ""
    lines = [f"{report['date'][:16].replace('T', ' ')} UTC, {cpu['model']} ({cpu['physical_cores']} cores; "
             f"{', '.join(cpu['isa_flags'])}), torch {report['machine']['torch']}, geb kernel path "
             f"{json.dumps(report['geb_kernel'])}, llama-cpp-python {report['llama_cpp_python']}{build}; "
             f"`{report['command']}`; prompt {st['prompt_len']}, {st['new_tokens']} new tokens, {st['reps']} "
             f"alternating reps (median).", "",
             "geb / the faster of " + " and ".join(st["baselines"]) + " (above 1: geb faster; the faster one in "
             "brackets: b = llama-bench, p = llama-cpp-python):", "",
             f"| format | threads | prefill {st['prompt_len']} | decode, empty context | "
             f"decode after {st['prompt_len']} |", "|---|---:|---:|---:|---:|"]
    tag = {"llama-bench": "b", "llama-cpp-python": "p", None: "-"}
    for fmt, by_threads in report["summary"].items():
        for t, row in by_threads.items():
            cells = [f"{_fmt(row[ph]['ratio'], 0)} ({tag[row[ph]['best_baseline']]})" for ph in PHASES]
            lines.append(f"| {fmt} ↔ {GGUF_TYPE[fmt]} | {t} | " + " | ".join(cells) + " |")
    engines = ["geb"] + st["baselines"]
    names = {"prefill_tok_s": "prefill tok/s", "decode_tok_s": "decode tok/s (empty context)",
             "decode_at_depth_tok_s": f"decode tok/s (after {st['prompt_len']})", "ttft_s": "time to first token, s",
             "peak_rss_gib": "peak RSS, GiB"}
    lines += ["", "| format | threads | measure | " + " | ".join(engines) + " | geb / best |",
              "|---|---:|---|" + "---:|" * (len(engines) + 1)]
    for fmt, by_threads in report["summary"].items():
        for t, row in by_threads.items():
            for key, name in names.items():
                if key not in row:
                    continue
                r = row[key]
                ratio = r.get("ratio")
                if key == "peak_rss_gib":  # below 1: geb uses less
                    others = [r[e] for e in st["baselines"] if r.get(e)]
                    ratio = r["geb"] / min(others) if others else None
                vals = " | ".join(_fmt(r.get(e), 0) for e in engines)
                lines.append(f"| {fmt} ↔ {GGUF_TYPE[fmt]} | {t} | {name} | {vals} | {_fmt(ratio, 0)} |")
    lines += ["", "Time to first token: llama-cpp-python / geb (llama-bench reports none). Peak RSS: geb / the "
              "smaller baseline (below 1: geb uses less)."]
    geb_rows = [(fmt, t, row) for fmt, by_t in report["summary"].items() for t, row in by_t.items()
                if "batch" in row or "bandwidth" in row]
    if geb_rows:
        lines += ["", "geb alone: batched decode (aggregate tokens/s of several sequences in one step, empty "
                  "context) over one sequence's, and single-sequence decode over the memory-bandwidth bound "
                  "(measured read bandwidth / weight bytes read per token):", "",
                  "| format | threads | sequences | batched tok/s | batched / one | read GB/s | bound tok/s | "
                  "decode / bound |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for fmt, t, row in geb_rows:
            b, w = row.get("batch", {}), row.get("bandwidth", {})
            lines.append(f"| {fmt} | {t} | {b.get('sequences', '-')} | {_fmt(b.get('geb_tok_s'), 0, 1)} | "
                         f"{_fmt(b.get('speedup'), 0)} | {_fmt(w.get('gb_s'), 0, 1)} | "
                         f"{_fmt(w.get('bound_tok_s'), 0)} | {_fmt(w.get('fraction'), 0)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
