"""GGUF export: speed per type, and parity with llama.cpp (tokens, logits, greedy continuation).

    python bench/gguf_export.py                          # geb-tiny shape, random weights, all types
    python bench/gguf_export.py --config geb-1.3b --types q8_0,q4_0 --no-llama
    python bench/gguf_export.py --model ckpt/sft/final

For each type: export wall and CPU seconds and file size. With llama-cpp-python installed: does
llama.cpp tokenize a bilingual text to geb's ids; max |logit difference| and argmax agreement against
geb's FP32 forward on the same prompt; for f32, is llama.cpp's greedy 32-token continuation geb's.
Random weights are scaled up so logits are peaked (greedy choices far from ties). Writes JSON under
bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = ("GEB-1.3B was released in 2024 with 1.3 billion parameters. 北京是中国的首都，人口约2189万。"
        "Emoji 😀🎉 and rare CJK 𠀀𪚥; code: def f(x): return x**2  # 代码\n")


def random_folder(preset: str, out: Path) -> Path:
    from geb.checkpoint import save_checkpoint
    from geb.config import get_preset
    from geb.model import GEB
    from geb.tokenizer import Tokenizer

    if (out / "model.safetensors").is_file():
        return out
    tok = Tokenizer.train([TEXT] * 50, vocab_size=400, min_frequency=1)
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = GEB(cfg)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:  # std 0.08: peaked logits, so greedy parity is meaningful
            sd[name] = (torch.randn(p.shape, generator=g) * 0.08).to(torch.bfloat16)
    save_checkpoint(out, model, tok, {"stage": "random", "parent": None}, state_dict=sd)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--config", default="geb-tiny")
    g.add_argument("--model")
    ap.add_argument("--types", default="f32,bf16,q8_0,q4_0")
    ap.add_argument("--workdir", default="/tmp/geb-bench-gguf")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "gguf_export.json"))
    a = ap.parse_args()

    from geb.checkpoint import load_model
    from geb.interop.gguf import export_gguf

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    folder = Path(a.model) if a.model else random_folder(a.config, work / a.config)
    torch.set_num_threads(a.threads)
    model, tok, _ = load_model(folder, dtype=torch.float32)
    ids = tok.encode(TEXT)[:48]
    with torch.inference_mode():
        ref = model(torch.tensor([ids]))[0]
    greedy, seq = [], list(ids)
    with torch.inference_mode():
        for _ in range(32):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            greedy.append(nxt)
            seq.append(nxt)
    del model

    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    res = {"date": datetime.date.today().isoformat(), "load_avg": os.getloadavg(), "model": str(folder),
           "config": a.model or a.config, "threads": a.threads, "types": {}}
    for t in a.types.split(","):
        f = work / f"{folder.name}-{t}.gguf"
        w0, c0 = time.time(), time.process_time()
        info = export_gguf(folder, f, t)
        r = {"export_wall_s": round(time.time() - w0, 2), "export_cpu_s": round(time.process_time() - c0, 2),
             "bytes": info["bytes"], "tensor_types": info["tensor_types"]}
        if llama_cpp is not None and not a.no_llama:
            llm = llama_cpp.Llama(model_path=str(f), n_ctx=256, n_threads=a.threads, n_batch=256, logits_all=True,
                                  verbose=False, type_k=0, type_v=0)
            r["tokens_equal"] = llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tok.encode(TEXT)
            llm.eval(ids)
            got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
            r["max_abs_logit_diff"] = round((got - ref).abs().max().item(), 6)
            r["argmax_agreement"] = round((got.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4)
            llm.reset()
            out = []
            for x in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
                out.append(x)
                if len(out) == 32:
                    break
            r["greedy32_equal"] = out == greedy
            llm.close()
        res["types"][t] = r
        print(t, json.dumps(r))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
