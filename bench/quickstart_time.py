"""Wall time of `geb quickstart` (the README's one command) on this machine, with its report figures.

Runs the command in a fresh temporary folder as a new user would (subprocess, this checkout first on
PYTHONPATH), times it end to end, and saves the wall time, the per-stage seconds, the training dtype
`--dtype auto` chose (and why), the report's figures, the CPU model and flags, and the 1-minute load
average every 10 s (the machine may be shared: say so beside any figure taken from this file).

With `--limit-s` a run still going at the limit is stopped, and what it did is saved instead
(`finished: false`): the seconds of each finished stage and the pretraining tokens/s at every logged
step, with the load average then, and the pretraining time those rates imply for all its steps.

    python bench/quickstart_time.py --out bench/results/quickstart_time.json [--limit-s 1200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lscpu() -> dict:
    """Model name and flags as `lscpu` prints them (falls back to /proc/cpuinfo)."""
    out = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU family", "Model", "CPU(s)", "Flags"):
                out[k.strip()] = v.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    if "Flags" in out:
        flags = set(out["Flags"].split())
        out["Flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/quickstart_time.json")
    ap.add_argument("--small", action="store_true", help="time `geb quickstart --small` instead (a check of this script)")
    ap.add_argument("--limit-s", type=float, default=None, help="stop the run here and save what it did")
    args = ap.parse_args()

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load = []  # every 10 s: seconds since start, 1-minute load average, last pretraining step logged
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quickstart_out"
        cmd = [sys.executable, "-m", "geb", "quickstart", "--out", str(out)] + (["--small"] if args.small else [])
        log = open(Path(tmp) / "stdout.txt", "w+")
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            load.append({"t": round(time.time() - t0), "load": round(os.getloadavg()[0], 2),
                         "step": _last_step(out / "ckpt" / "pretrain" / "metrics.jsonl")})
            if args.limit_s and time.time() - t0 > args.limit_s:
                proc.terminate()
                proc.wait()
                break
            time.sleep(10)
        wall = time.time() - t0
        log.seek(0)
        stdout = log.read()
        finished = proc.returncode == 0
        if proc.returncode != 0 and not args.limit_s:
            sys.exit(f"geb quickstart failed (exit {proc.returncode}):\n{stdout[-4000:]}")
        report = json.loads((out / "report.json").read_text()) if finished else None
        steps = [json.loads(l) for l in (out / "ckpt" / "pretrain" / "metrics.jsonl").read_text().splitlines()
                 ] if (out / "ckpt" / "pretrain" / "metrics.jsonl").is_file() else []
    stages = {m[1]: float(m[2]) for m in re.finditer(r"(\w+) done in ([0-9.]+)s", stdout)}
    train = [r for r in steps if r.get("kind") == "train" and r["step"] > 1]  # step 1 includes warm-up
    pre_steps = 40 if args.small else 450
    tok_per_step = train[0]["tokens"] // train[0]["step"] if train else None
    rates = [r["tok_s"] for r in train]
    result = {
        "command": " ".join(["geb", "quickstart"] + (["--small"] if args.small else [])),
        "finished": finished,
        "wall_seconds": round(wall, 1),
        "report_total_seconds": report["total_seconds"] if report else None,
        "stage_seconds": report["stage_seconds"] if report else stages,
        "pretrain_log": [{"step": r["step"], "tok_s": round(r["tok_s"], 1),
                          "loadavg_1min": next((x["load"] for x in load if (x["step"] or 0) >= r["step"]), None)}
                         for r in train],
        "pretrain_tok_s_max": round(max(rates), 1) if rates else None,
        "pretrain_seconds_at_max_rate": round(pre_steps * tok_per_step / max(rates), 1) if rates else None,
        "pretrain_seconds_at_median_rate": round(pre_steps * tok_per_step / statistics.median(rates), 1) if rates else None,
        "dtype": report["results"]["pretrain"].get("dtype") if report else _dtype_line(stdout),
        "dtype_reason": report["results"]["pretrain"].get("dtype_reason") if report else None,
        "figures": report["results"] if report else None,
        "cpu": lscpu(),
        "python": platform.python_version(),
        "loadavg_1min": load,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stdout_tail": stdout[-3000:],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"geb quickstart: {'finished' if finished else 'stopped'} after {wall:.0f} s "
          f"({result['cpu'].get('Model name')}, dtype {result['dtype']}); stages {result['stage_seconds']}; "
          f"pretraining at most {result['pretrain_tok_s_max']} tokens/s; saved {args.out}")


def _last_step(metrics: Path):
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    steps = [json.loads(l)["step"] for l in lines if l.strip().endswith("}")]
    return max(steps) if steps else None


def _dtype_line(stdout: str):
    m = re.search(r"dtype[^\n]*", stdout)
    return m[0][:200] if m else None


if __name__ == "__main__":
    main()
