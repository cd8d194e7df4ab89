"""`geb chat`: multi-turn chat in the terminal with streaming output. /reset clears, /quit exits."""

from __future__ import annotations

import sys

from geb.commands.common import add_engine, engine_from_args


def configure(p) -> None:
    p.add_argument("--system", help="system message")
    add_engine(p)


def run(args) -> int:
    from geb.errors import GebError

    eng, p = engine_from_args(args)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line})
        ids, _ = eng.tok.render_chat(history, add_generation_prompt=True)
        # Drop the oldest turns when the conversation outgrows the context.
        while len(ids) + 1 >= eng.cfg.max_seq_len and len(history) > len(base) + 1:
            history = base + history[len(base) + 2 :]
            ids, _ = eng.tok.render_chat(history, add_generation_prompt=True)
        sys.stdout.write("geb> ")
        try:
            out = []
            for piece in eng.stream(ids, p, out):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except GebError as e:
            sys.stdout.write(f"[error: {e}]")
            history.pop()
            out = []
        sys.stdout.write("\n")
        sys.stdout.flush()
        if out:
            history.append({"role": "assistant", "content": out[0].text})
    return 0
