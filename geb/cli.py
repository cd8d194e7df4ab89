"""The one CLI: `geb <subcommand>`. Each subcommand lives in geb/commands/<name>.py with two functions,
`configure(parser)` and `run(args)`, imported only when that subcommand runs (so `geb --help` is fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name → (module, one-line help). Add a subcommand by adding a module and one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("geb.commands.info", "print a model config's parameter count and bytes per format"),
    "tokenizer": ("geb.commands.tokenizer", "train or evaluate the bilingual byte-level BPE tokenizer"),
    "data": ("geb.commands.data", "clean, filter, deduplicate and pack raw text"),
    "tokenize": ("geb.commands.tokenize", "pack text files into token shards for pretraining"),
    "pretrain": ("geb.commands.pretrain", "pretrain a model on packed token shards (resumable)"),
    "sft": ("geb.commands.sft", "supervised fine-tuning on chat conversations (JSONL)"),
    "dpo": ("geb.commands.dpo", "align a chat model with DPO on preference pairs (JSONL)"),
    "generate": ("geb.commands.generate", "generate text from a prompt with a model folder"),
    "chat": ("geb.commands.chat", "multi-turn chat in the terminal, streaming"),
    "eval": ("geb.commands.eval", "evaluate: MMLU/C-Eval/CMMLU, perplexity, toxicity, compare runs"),
    "serve": ("geb.commands.serve", "OpenAI-compatible HTTP server with a web chat page"),
    "quickstart": ("geb.commands.quickstart", "run the whole recipe on a built-in bilingual corpus"),
    "quantize": ("geb.commands.quantize", "quantize a model folder to bf16, int8 or int4"),
    "bench": ("geb.commands.bench", "measure inference speed and memory per format"),
    "export": ("geb.commands.export", "export to Hugging Face (transformers) or GGUF (llama.cpp)"),
    "import": ("geb.commands.importer", "import the released GEB-1.3B, a HF Llama or a GGUF file"),
}


def build_parser(load_all: bool = False, only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geb", description="Build and run lightweight bilingual language models.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if load_all or name == only:
            importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from geb.errors import GebError

    import os

    # Idle OpenMP threads sleep instead of spinning: on a machine whose cores are shared (a server, a
    # laptop), spinning workers steal the cores other thread pools need (`geb bench --omp-wait-policy
    # active` against the default passive measures the difference).
    # Only effective before torch loads, which no code path here has done yet; a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=name if name in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        rc = module.run(args)
    except GebError as e:
        print(f"geb {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"geb {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only folder, a missing file: one line, not a traceback
        print(f"geb {args.command}: error: {os_error_message(e)}", file=sys.stderr)
        return 1
    return int(rc or 0)


_WRITE_ERRNOS = {"ENOSPC", "EROFS", "EDQUOT", "EFBIG", "EISDIR", "ENOTEMPTY", "EXDEV"}


def os_error_message(e: OSError) -> str:
    """'cannot write PATH: No space left on device' from an OSError (its errno's meaning, not its repr)."""
    import errno
    import os

    meaning = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    if e.filename is None:
        return meaning
    path = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    verb = "cannot write" if errno.errorcode.get(e.errno or 0) in _WRITE_ERRNOS else "cannot access"
    return f"{verb} {path}: {meaning}"


if __name__ == "__main__":
    raise SystemExit(main())
