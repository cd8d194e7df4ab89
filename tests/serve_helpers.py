"""Helpers for the serving tests: a random model folder with a longer context, and `geb serve` as a
subprocess on a free loopback port (stopped with SIGINT, its log shown when it fails)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_model(folder: Path, tokenizer, tiny_cfg, max_seq_len: int = 1024, seed: int = 0) -> Path:
    """A random geb-test model whose context is long enough for slow, cancellable generations."""
    from geb.checkpoint import save_checkpoint
    from geb.model import GEB

    torch.manual_seed(seed)
    model = GEB(tiny_cfg.replace(max_seq_len=max_seq_len))
    model.init_weights(seed=seed)
    save_checkpoint(folder, model, tokenizer, {"stage": "random", "parent": None})
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m geb serve --model DIR --port P ARGS` on 127.0.0.1, ready when /health says so."""

    def __init__(self, model_dir: Path, log: Path, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "geb", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--threads", "1", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("GEB_API_KEY", None)
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - open for the life of the server process
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 180) -> dict:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"geb serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"geb serve was not ready after {timeout}s:\n{self.log.read_text()}")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 60) -> dict:
        """Poll /health until no request is running or waiting (bounded; the caller asserts on the result)."""
        end = time.monotonic() + timeout
        h = self.health()
        while (h["running"] or h["waiting"]) and time.monotonic() < end:
            time.sleep(0.05)
            h = self.health()
        return h

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(model_dir: Path, log: Path, *args: str, api_key: str | None = None):
    """A ready Server for the `with` block, stopped after it whatever happens."""
    s = Server(model_dir, log, *args, api_key=api_key)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
