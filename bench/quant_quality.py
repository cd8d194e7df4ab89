"""Quantization quality, fairly: geb's formats against llama.cpp's from the same full-precision weights.

    python bench/quant_quality.py --model FOLDER [--tokens 4096] [--window 256] [--out bench/results/X.json]

From one full-precision geb folder: geb fp32 / bf16 / int8 / int4 (each also with `--clip`, the
quantize-time clipping search) through `geb quantize`'s own code, and llama.cpp F32 / Q8_0 / Q4_0 /
Q4_K_M: geb's exporter writes the F32 GGUF, llama.cpp's own quantizer (`llama_model_quantize`, its
default recipe per type, e.g. a 6-bit output matrix) writes the others.

Perplexity is computed the same way for both engines: the text is tokenized once by the model's
tokenizer; the first `--tokens` ids of each language are cut into consecutive windows of `--window`
tokens; each window is evaluated from an empty cache and scored on its own next-token predictions
(window-1 per window) by log-softmax in FP64 over the engine's logits; perplexity =
exp(total NLL / predicted tokens). llama.cpp receives the token ids themselves (no re-tokenization),
with all logits kept. Texts: the first files (sorted) of /work/shared/data/corpus/en/shakespeare and
/work/shared/data/corpus/zh (People's Daily), read from a fixed character offset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS = Path("/work/shared/data/corpus")
TEXTS = {"en": ("en/shakespeare", 20_000), "zh": ("zh/peoples_daily_199801_tagged.txt", 20_000)}


def read_text(lang: str, chars: int = 200_000, override: dict | None = None) -> str:
    if override and lang in override:  # a JSONL file's "text" fields from its end (a held-out tail), or plain text
        f = Path(override[lang])
        if f.suffix == ".jsonl":
            lines = f.read_text(encoding="utf-8").splitlines()[-300:]
            return "\n".join(json.loads(x)["text"] for x in lines if x.strip())[-chars:]
        return f.read_text(encoding="utf-8")[:chars]
    rel, skip = TEXTS[lang]
    p = CORPUS / rel
    f = sorted(x for x in p.iterdir() if x.suffix == ".txt")[0] if p.is_dir() else p
    return f.read_text(encoding="utf-8", errors="replace")[skip: skip + chars]


def windows(ids: list[int], n: int, window: int) -> list[list[int]]:
    ids = ids[:n]
    return [ids[i: i + window] for i in range(0, len(ids) - 1, window) if len(ids[i: i + window]) > 1]


def nll_sum(logits: np.ndarray, win: list[int]) -> float:
    lg = torch.from_numpy(np.asarray(logits, dtype=np.float64))[: len(win) - 1]
    return float(torch.nn.functional.cross_entropy(lg, torch.tensor(win[1:]), reduction="sum"))


def ppl_geb(rt, wins) -> float:
    nll = sum(nll_sum(rt.forward_logits(w).float().numpy(), w) for w in wins)
    return math.exp(nll / sum(len(w) - 1 for w in wins))


def ppl_llama(path: Path, wins, window: int, threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                logits_all=True, verbose=False)
    nll = 0.0
    for w in wins:
        llm.reset()
        llm.eval(w)
        nll += nll_sum(llm.scores[: len(w)], w)
    del llm
    return math.exp(nll / sum(len(w) - 1 for w in wins))


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {dst.name} failed ({rc})")


def gguf_types(path: Path) -> dict:
    import gguf

    counts: dict = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) > 1:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="full-precision geb model folder")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per language")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--text", action="append", default=[], metavar="LANG=FILE",
                    help="use FILE for en or zh instead of the shared corpus (.jsonl: last 300 'text' fields)")
    a = ap.parse_args(argv)

    import llama_cpp

    from geb.interop.gguf import export_gguf
    from geb.infer.folders import load_runtime, quantize_folder

    torch.set_num_threads(a.threads)
    base, tok, meta = load_runtime(a.model, "fp32")
    override = dict(t.split("=", 1) for t in a.text)
    wins = {lang: windows(tok.encode(read_text(lang, override=override)), a.tokens, a.window) for lang in TEXTS}
    del base
    rows: list[dict] = []

    def add(engine, fmt, fn, **extra):
        t0 = time.time()
        r = {"engine": engine, "format": fmt, **{lang: fn(w) for lang, w in wins.items()},
             "seconds": round(time.time() - t0, 1), **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    with tempfile.TemporaryDirectory(prefix="geb-qq-") as td:
        td = Path(td)
        for fmt, clip in (("fp32", False), ("bf16", False), ("int8", False), ("int8", True), ("int4", False),
                          ("int4", True)):
            if fmt == "fp32":
                rt, _, _ = load_runtime(a.model, "fp32")
            else:
                folder = quantize_folder(a.model, td / f"{fmt}-{clip}", fmt, clip=clip)
                rt, _, _ = load_runtime(folder)
            add("geb", fmt + (" --clip" if clip else ""), lambda w: ppl_geb(rt, w), weight_bytes=rt.weight_bytes)
            del rt
        f32 = td / "model-f32.gguf"
        export_gguf(a.model, f32, "f32")
        files = {"F32": f32}
        for name, ft in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
                         ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
            files[name] = td / f"model-{name}.gguf"
            llama_quantize(f32, files[name], ft)
        for name, path in files.items():
            add("llama.cpp", name, lambda w: ppl_llama(path, w, a.window, a.threads),
                file_bytes=path.stat().st_size, tensor_types=gguf_types(path))

    base = {lang: rows[0][lang] for lang in TEXTS}
    for r in rows:
        for lang in TEXTS:
            r[f"{lang}_vs_geb_fp32_pct"] = round(100 * (r[lang] / base[lang] - 1), 3)
    result = {"model": str(a.model), "model_stage": meta.get("stage"), "tokens_per_language": a.tokens,
              "window": a.window, "windows": {k: len(v) for k, v in wins.items()},
              "texts": {k: override.get(k) or f"{TEXTS[k][0]} from char {TEXTS[k][1]}" for k in TEXTS},
              "llama_cpp_python": llama_cpp.__version__, "rows": rows}
    print("\n| engine | format | en ppl | en vs fp32 | zh ppl | zh vs fp32 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['format']} | {r['en']:.3f} | {r['en_vs_geb_fp32_pct']:+.2f}% | "
              f"{r['zh']:.3f} | {r['zh_vs_geb_fp32_pct']:+.2f}% |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
