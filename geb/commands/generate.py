"""`geb generate`: complete a prompt (or, with --chat, answer it as a user message), streaming."""

from __future__ import annotations

import sys

from geb.commands.common import add_engine, engine_from_args


def configure(p) -> None:
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--system", help="system message (with --chat)")
    add_engine(p)


def run(args) -> int:
    eng, p = engine_from_args(args)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        ids, _ = eng.tok.render_chat(msgs, add_generation_prompt=True)
    else:
        ids = eng.tok.encode(args.prompt)
        sys.stdout.write(args.prompt)
    for piece in eng.stream(ids, p):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
