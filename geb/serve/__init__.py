"""Serving: an OpenAI-compatible HTTP API over the inference engine, and a web chat page.

geb/serve/protocol.py owns the request/response shapes of the OpenAI API and their validation,
geb/serve/scheduler.py the one engine thread that runs continuous batching for every client,
geb/serve/app.py the FastAPI application (routes, auth, limits, server-sent events) and
geb/serve/static/chat.html the page served at `/`. FastAPI and uvicorn (the `serve` extra) are
imported only by those modules, never here, so `serve_command` stays cheap for the quickstart.
"""

from __future__ import annotations

import shlex


def serve_command(model_dir: str, format: str | None = None, port: int = 8000, host: str = "127.0.0.1") -> str:
    """The shell command that serves `model_dir` (what the quickstart's report prints at its end)."""
    parts = ["geb", "serve", "--model", str(model_dir)]
    if format:
        parts += ["--format", format]
    if host != "127.0.0.1":
        parts += ["--host", host]
    if port != 8000:
        parts += ["--port", str(port)]
    return shlex.join(parts)
