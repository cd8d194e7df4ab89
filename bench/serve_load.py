"""Serving load: aggregate generated tokens/s and per-request latency at 1, 4, 8, 16 concurrent clients.

    python bench/serve_load.py --model out/ckpt/sft                  # a model folder
    python bench/serve_load.py --random geb-small --format int8      # random weights of a preset's shape
    python bench/serve_load.py --random geb-1.3b --format int4 --max-tokens 32

Each client streams chat completions back to back (greedy, `ignore_eos`, so every request generates
exactly --max-tokens tokens) against `geb serve` on loopback. Two servers run the same load side by
side: continuous batching (--max-concurrency = the most clients) and one request at a time
(--max-concurrency 1, the rest queued), alternating which goes first and the order of the levels
each round, so a neighbour's noise hits both alike; medians over rounds are reported with the
ratio batched / one-at-a-time. `--compare-url` adds any other OpenAI-compatible server (e.g.
llama-cpp-python's `python -m llama_cpp.server`) to the rotation. Random models are written once
under --workdir as quantized folders (made tensor by tensor, never a full FP32 model in memory).
Results: a table on stdout and JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the capital of France is Paris water boils at one hundred degrees 北京 是 中国 的 首都 长城 很 长 "  # noqa: SIM905
         "熊猫 生活 在 四川 cats and dogs live on Maple Street 春眠 不觉晓 处处 闻 啼鸟").split()


def random_model(preset: str, fmt: str, workdir: Path) -> Path:
    """A quantized folder of the preset's shape with random weights and a small bilingual tokenizer."""
    from geb.config import get_preset
    from geb.infer.bench import random_runtime
    from geb.infer.folders import save_quantized
    from geb.tokenizer import Tokenizer

    out = workdir / f"{preset}-random-{fmt}"
    if (out / "config.json").is_file():
        return out
    text = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tok = Tokenizer.train(text, vocab_size=400, min_frequency=1)  # ids beyond it are masked as padding
    cfg = get_preset(preset)
    print(f"writing random {preset} weights as {fmt} to {out} ...", file=sys.stderr, flush=True)
    rt = random_runtime(cfg, fmt)
    save_quantized(out, rt, tok, {"parent": None, "note": f"random weights of {preset}'s shape (benchmark)"})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `geb serve` subprocess (or an already running server at `url`)."""

    def __init__(self, label: str, url: str | None = None, model_dir: Path | None = None, args: list[str] = (),
                 log: Path | None = None):
        self.label, self.proc = label, None
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            self.log = open(log or os.devnull, "w")  # noqa: SIM115 - open while the server runs
            self.proc = subprocess.Popen([sys.executable, "-m", "geb", "serve", "--model", str(model_dir),
                                          "--port", str(port), *args], env=env, stdout=self.log,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = url.rstrip("/").removesuffix("/v1")

    def wait(self, timeout: float = 900) -> dict:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"{self.label}: server exited with {self.proc.returncode}")
            try:
                h = httpx.get(self.url + "/health", timeout=5)  # geb: 503 while loading
                r = httpx.get(self.url + "/v1/models", timeout=5)
                if r.status_code == 200 and h.status_code in (200, 404):
                    self.model = r.json()["data"][0]["id"]
                    return h.json() if h.status_code == 200 else {}
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.label}: not ready after {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def one_request(client, served: Served, prompt: str, max_tokens: int) -> dict:
    body = {"model": served.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", served.url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            if first is None and any(c.get("delta", {}).get("content") for c in obj.get("choices", [])):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"latency_s": end - t0, "ttft_s": first - t0, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else None}


def run_level(served: Served, clients: int, per_client: int, max_tokens: int, prompt_words: int, seed: int) -> dict:
    import httpx

    results: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_loop(c: int):
        with httpx.Client(timeout=600) as client:
            start.wait()
            for k in range(per_client):
                i = seed + c * per_client + k  # a different prompt for every request
                words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(prompt_words)]
                res = one_request(client, served, f"{i}: " + " ".join(words), max_tokens)
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r["latency_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    dec = [r["decode_tok_s"] for r in results if r["decode_tok_s"]]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall, "latency_p50_s": statistics.median(lat),
            "latency_p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in results),
            "per_request_decode_tok_s": statistics.median(dec) if dec else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model folder to serve")
    src.add_argument("--random", metavar="PRESET", help="random weights of a preset's shape (e.g. geb-small)")
    ap.add_argument("--format", default=None, help="int4|int8|bf16|fp32 (random models default to int8)")
    ap.add_argument("--levels", default="1,4,8,16", help="concurrent clients per level (comma list)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2, help="alternating repetitions (medians are reported)")
    ap.add_argument("--threads", type=int, default=None, help="server threads (default: physical cores)")
    ap.add_argument("--no-serial", action="store_true", help="skip the one-request-at-a-time server")
    ap.add_argument("--compare-url", help="another OpenAI-compatible server to load alike (e.g. llama_cpp.server)")
    ap.add_argument("--workdir", default="/tmp/geb-serve-bench")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/serve_load-<model>.json)")
    args = ap.parse_args()

    levels = [int(x) for x in args.levels.split(",")]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.random:
        fmt = args.format or "int8"
        model_dir, serve_fmt, name = random_model(args.random, fmt, workdir), [], f"{args.random}-{fmt}"
    else:
        model_dir = Path(args.model)
        serve_fmt = ["--format", args.format] if args.format else []
        name = f"{model_dir.name}-{args.format or 'stored'}"
    common = [*serve_fmt, "--max-tokens", str(args.max_tokens), "--max-prompt-tokens", "256",
              "--max-waiting", str(4 * max(levels))]
    if args.threads:
        common += ["--threads", str(args.threads)]
    servers = [Served("batched", model_dir=model_dir, args=[*common, "--max-concurrency", str(max(levels))],
                      log=workdir / "batched.log")]
    if not args.no_serial:
        servers.append(Served("one-at-a-time", model_dir=model_dir, args=[*common, "--max-concurrency", "1"],
                              log=workdir / "serial.log"))
    if args.compare_url:
        servers.append(Served("compare", url=args.compare_url))
    try:
        info = {s.label: s.wait() for s in servers}
        for s in servers:  # warm-up: first calls allocate and start thread pools
            run_level(s, 1, 1, 4, args.prompt_words, seed=10_000)
        runs: dict[str, dict[int, list[dict]]] = {s.label: {c: [] for c in levels} for s in servers}
        for r in range(args.rounds):
            order = levels if r % 2 == 0 else levels[::-1]
            for c in order:
                for s in (servers if (r + c) % 2 == 0 else servers[::-1]):
                    res = run_level(s, c, args.requests_per_client, args.max_tokens, args.prompt_words, seed=r * 1000)
                    runs[s.label][c].append(res)
                    print(f"round {r} {s.label:>13} {c:>2} clients: {res['agg_tok_s']:7.1f} tok/s, "
                          f"p50 latency {res['latency_p50_s']:.2f}s", file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop()

    def med(label, c, key):
        vals = [x[key] for x in runs[label][c] if x[key] is not None]
        return statistics.median(vals) if vals else None

    table = []
    for c in levels:
        row = {"clients": c}
        for s in servers:
            row[s.label] = {k: med(s.label, c, k) for k in ("agg_tok_s", "latency_p50_s", "latency_p95_s",
                                                            "ttft_p50_s", "per_request_decode_tok_s")}
        if "one-at-a-time" in row:
            row["batched_over_serial"] = row["batched"]["agg_tok_s"] / row["one-at-a-time"]["agg_tok_s"]
        table.append(row)
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": "python bench/serve_load.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_avg_1m_at_end": os.getloadavg()[0]},
              "model": name, "settings": vars(args), "servers": info, "table": table, "runs": runs}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve_load-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    cols = [s.label for s in servers]
    print(f"\n{name}: {args.max_tokens} tokens per request, {args.requests_per_client} requests per client, "
          f"medians of {args.rounds} rounds\n")
    head = "| clients | " + " | ".join(f"{c} tok/s | {c} p50 latency s | {c} p50 TTFT s" for c in cols)
    print(head + (" | batched / one-at-a-time |" if "one-at-a-time" in cols else " |"))
    print("|" + "---|" * (1 + 3 * len(cols) + ("one-at-a-time" in cols)))
    for row in table:
        cells = [f"{row['clients']}"]
        for c in cols:
            v = row[c]
            cells += [f"{v['agg_tok_s']:.1f}", f"{v['latency_p50_s']:.2f}", f"{v['ttft_p50_s']:.2f}"]
        if "batched_over_serial" in row:
            cells.append(f"{row['batched_over_serial']:.2f}x")
        print("| " + " | ".join(cells) + " |")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
