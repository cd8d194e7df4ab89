"""geb vs llama.cpp on the same weights and machine, side by side: prefill, decode, time to first token.

    python bench/llamacpp_vs_geb.py                       # geb-1.3b shape, random weights, 4 formats
    python bench/llamacpp_vs_geb.py --config geb-tiny --formats int8,int4 --reps 3

Needs the optional extra `llamacpp` (llama-cpp-python, compiles llama.cpp on install) and `gguf`.
Steps: (1) random weights of the preset's shape are written once to a safetensors file in geb's names
(deterministic per tensor); (2) from that file, geb's quantized weight files (bf16, int8, int4) and
GGUF files (F32, BF16, Q8_0, Q4_0) are written once into --workdir; (3) each measurement runs in a
fresh process that maps one file, alternating geb and llama.cpp (the order flips every repetition), so
neighbours' noise hits both engines alike; medians are taken and ratios geb / llama.cpp printed and
written as JSON under bench/results/.

Format pairs: fp32↔F32, bf16↔BF16, int8↔Q8_0, int4↔Q4_0. geb's int4 keeps the lm head and the
embedding in int8, so the Q4_0 GGUF stores output.weight and token_embd.weight as Q8_0 too.
The GGUF writer here is minimal (llama architecture, a byte-level stand-in vocabulary: only token ids
are fed); the full exporter with the real tokenizer is geb.export.gguf (the export issue).
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
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    from geb.infer.weights import Lazy, write_aligned_safetensors

    tensors = {n: Lazy(torch.float32, s, lambda n=n, s=s: random_tensor(cfg, n, s, seed))
               for n, s in tensor_shapes(cfg).items()}
    tmp = path.with_suffix(".tmp")
    write_aligned_safetensors(tmp, tensors, {"format": "pt", "seed": str(seed)})
    os.replace(tmp, path)


def write_geb_quantized(cfg, src: Path, fmt: str, out: Path) -> None:
    from geb.infer.runtime import build_runtime
    from geb.infer.weights import LAYOUT, SafeTensorsMap, write_aligned_safetensors

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

    from geb.infer.weights import SafeTensorsMap

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
def child_geb(args) -> dict:
    from geb.infer.bench import bench_runtime, peak_rss_bytes
    from geb.infer.runtime import build_runtime
    from geb.infer.weights import SafeTensorsMap, read_config, runtime_from_quantized

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
    rt.set_threads(args.threads)
    r = bench_runtime(rt, args.prompt_len, args.new_tokens)
    return {"engine": "geb", "format": args.format, "load_s": load, "prefill_tok_s": r["prefill_tok_s"],
            "ttft_s": r["ttft_s"], "decode_tok_s": r["decode_tok_s"], "decode_at_depth_tok_s": r["decode_at_depth_tok_s"],
            "peak_rss_bytes": peak_rss_bytes(), "weight_bytes": r["weight_bytes"], "bytes_per_token": r["bytes_per_token"]}


def child_llama(args) -> dict:
    import resource

    from llama_cpp import Llama

    cfg = get_preset(args.config)
    n, m = args.prompt_len, args.new_tokens
    t0 = time.perf_counter()
    llm = Llama(model_path=args.file, n_ctx=n + m + 16, n_batch=512, n_ubatch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False, use_mmap=True)
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
    return {"engine": "llama.cpp", "format": args.format, "load_s": load, "prefill_tok_s": n / ttft, "ttft_s": ttft,
            "decode_tok_s": empty, "decode_at_depth_tok_s": deep,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "file_bytes": os.path.getsize(args.file)}


# -- driver ---------------------------------------------------------------------------------------
PHASES = ("prefill_tok_s", "decode_tok_s", "decode_at_depth_tok_s")


def run_child(engine: str, fmt: str, file: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--format", fmt, "--file", str(file), "--config", a.config,
           "--threads", str(a.threads), "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if engine == "geb" and a.omp_wait_policy != "inherit":
        from geb.infer.bench import wait_env

        env.update(wait_env(a.omp_wait_policy))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{engine} {fmt} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="geb-1.3b")
    ap.add_argument("--formats", default="fp32,bf16,int8,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions per format (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "inherit"],
                    help="OpenMP wait policy of geb's processes (llama.cpp has its own thread pool)")
    ap.add_argument("--workdir", default="/tmp/geb-bench", help="where weight files are written once and reused")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/llamacpp_vs_geb-<config>-<date>.json)")
    ap.add_argument("--child", choices=["geb", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        torch.set_num_threads(a.threads)
        print(json.dumps(child_geb(a) if a.child == "geb" else child_llama(a)))
        return 0

    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        print(f"needs the optional extras: pip install 'geb[llamacpp,export]' ({e})", file=sys.stderr)
        return 2
    cfg = get_preset(a.config)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    work = Path(a.workdir) / f"{a.config}-seed{a.seed}"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
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
    print(f"prepared in {time.time() - t_start:.0f} s; measuring (threads={a.threads}, prompt {a.prompt_len}, "
          f"{a.new_tokens} new tokens, {a.reps} alternating reps)", flush=True)
    runs: dict = {f: {"geb": [], "llama.cpp": []} for f in formats}
    for rep in range(a.reps):
        for fmt in formats:
            order = ["geb", "llama"] if rep % 2 == 0 else ["llama", "geb"]
            for eng in order:
                r = run_child(eng, fmt, files[fmt][0 if eng == "geb" else 1], a)
                runs[fmt][r["engine"]].append(r)
                print(f"  rep {rep} {fmt:>5} {r['engine']:>9}: prefill {r['prefill_tok_s']:7.1f}  decode "
                      f"{r['decode_tok_s']:6.2f}  @{a.prompt_len} {r['decode_at_depth_tok_s']:6.2f} tok/s  "
                      f"ttft {r['ttft_s']:.3f} s  rss {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    summary = {}
    print(f"\n{'format':>6} {'phase':>22} {'geb':>9} {'llama.cpp':>10} {'geb/llama':>10}")
    for fmt in formats:
        summary[fmt] = {}
        for ph in PHASES + ("ttft_s",):
            g = statistics.median(r[ph] for r in runs[fmt]["geb"])
            l = statistics.median(r[ph] for r in runs[fmt]["llama.cpp"])
            ratio = g / l if ph != "ttft_s" else l / g  # >1 means geb is better in every row
            summary[fmt][ph] = {"geb": g, "llama.cpp": l, "ratio": ratio}
            print(f"{fmt:>6} {ph:>22} {g:9.2f} {l:10.2f} {ratio:10.2f}")
        summary[fmt]["peak_rss_gib"] = {e: max(r["peak_rss_bytes"] for r in runs[fmt][k]) / 2**30
                                        for e, k in (("geb", "geb"), ("llama.cpp", "llama.cpp"))}
    from geb.infer.bench import machine_info

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/llamacpp_vs_geb.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "llama_cpp_python": llama_cpp.__version__,
              "settings": {k: getattr(a, k) for k in ("config", "formats", "threads", "prompt_len", "new_tokens", "reps",
                                                    "seed", "omp_wait_policy")},
              "note": "ratio = geb / llama.cpp for tokens/s, llama.cpp / geb for ttft_s (above 1: geb better)",
              "summary": summary, "runs": runs, "wall_s": time.time() - t_start}
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / (
        f"llamacpp_vs_geb-{a.config}-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {out} and {out.with_suffix('.md').name} ({time.time() - t_start:.0f} s)")
    return 0


def markdown(report: dict) -> str:
    """The summary as a table for docs/benchmarks.md."""
    st = report["settings"]
    m = report["machine"]
    lines = [f"{report['date'][:10]}, {m['cpu']} ({m['physical_cores']} cores), torch {m['torch']}, "
             f"llama-cpp-python {report['llama_cpp_python']}; `{report['command']}`; {st['threads']} threads, "
             f"prompt {st['prompt_len']}, {st['new_tokens']} new tokens, {st['reps']} alternating reps (median).",
             "", "Ratio geb / llama.cpp: above 1 is better for tok/s, below 1 is better for time and memory.", "",
             "| format | phase | geb | llama.cpp | geb / llama.cpp |", "|---|---|---|---|---|"]
    names = {"prefill_tok_s": "prefill tok/s", "decode_tok_s": "decode tok/s (empty context)",
             "decode_at_depth_tok_s": f"decode tok/s (after {st['prompt_len']})", "ttft_s": "time to first token, s"}
    for fmt, rows in report["summary"].items():
        for ph, name in names.items():
            r = rows[ph]
            ratio = r["geb"] / r["llama.cpp"]
            lines.append(f"| {fmt} ↔ {GGUF_TYPE[fmt]} | {name} | {r['geb']:.2f} | {r['llama.cpp']:.2f} | {ratio:.2f} |")
        rss = rows["peak_rss_gib"]
        lines.append(f"| {fmt} ↔ {GGUF_TYPE[fmt]} | peak RSS, GiB | {rss['geb']:.2f} | {rss['llama.cpp']:.2f} | "
                     f"{rss['geb'] / rss['llama.cpp']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
