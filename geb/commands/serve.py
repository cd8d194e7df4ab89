"""`geb serve`: an OpenAI-compatible HTTP server (and a web chat page at /) for a model folder."""

from __future__ import annotations

import os

from geb.commands.common import add_threads, apply_threads


def configure(p) -> None:
    p.add_argument("--model", required=True, help="model folder (full precision or quantized)")
    p.add_argument("--format", choices=["int4", "int8", "bf16", "fp32"], default=None,
                   help="weight format to run a full-precision folder in (default: fp32; a quantized folder "
                        "runs in its own format)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GEB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GEB_API_KEY; none: open)")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the folder's name)")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="sequences decoded together in one batch (each holds a KV cache slot)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests queued beyond the running ones before answering 429 (default 4 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most new tokens per request (default: min(512, context - 1))")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: context - 1)")
    add_threads(p)


def run(args) -> int:
    from geb.checkpoint import check_folder
    from geb.errors import GebError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise GebError(f"geb serve needs the 'serve' extra ({e.name} is missing): pip install 'geb[serve]'") from None
    from geb.serve.app import ServerSettings, run_server

    check_folder(args.model)
    threads = apply_threads(args)
    settings = ServerSettings(model=args.model, format=args.format, model_name=args.model_name, api_key=args.api_key,
                              max_concurrency=args.max_concurrency, max_waiting=args.max_waiting,
                              max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, threads=threads)
    run_server(settings, args.host, args.port)
    return 0
