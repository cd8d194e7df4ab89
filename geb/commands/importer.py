"""`geb import geb|hf|gguf`: bring the released GEB-1.3B, a Hugging Face Llama or a GGUF file into a geb folder.

(The module is named `importer` because `import` is a Python keyword.)
"""

from __future__ import annotations

import json


def configure(p) -> None:
    sub = p.add_subparsers(dest="format", metavar="<format>", required=True)
    g = sub.add_parser("geb", help="the released GEB-1.3B checkpoint (Megatron/ChatGLM names, SentencePiece)")
    g.add_argument("path", help="folder with config.json, pytorch_model.bin (or shards + index) and tokenizer.model")
    g.add_argument("--out", help="output geb folder (optional with --verify)")
    g.add_argument("--kv-order", choices=("interleaved", "split"), default=None,
                   help="row order of key_value: K,V of head 0 then head 1... (interleaved, the default without "
                        "--verify) or all K then all V; with --verify a given order is not searched")
    g.add_argument("--mlp-order", choices=("gate-up", "up-gate"), default=None,
                   help="which half of dense_h_to_4h is the gate (gate-up, the default without --verify: gate "
                        "first); with --verify a given order is not searched")
    g.add_argument("--rope", choices=("half", "interleaved", "chatglm"), default=None,
                   help="RoPE convention: rotate-half over the whole head (half, the default without --verify), "
                        "adjacent pairs, or ChatGLM (adjacent pairs over the first half of each head); with "
                        "--verify a given convention is not searched")
    g.add_argument("--verify", action="store_true",
                   help="score a built-in bilingual text under every layout the flags above leave open, report "
                        "perplexities, and refuse (exit 2) unless the best is sane and clearly beats the runner-up")
    g.add_argument("--chat-format", default=None,
                   help="chat prompt format: a preset (chatml, chatglm3, plain) or a JSON file; the released "
                        "model's own format is not known (default: chatglm3)")
    g.add_argument("--special-tokens", default=None,
                   help="comma-separated special tokens appended after the SentencePiece vocabulary when the "
                        "model file lacks them (default: [MASK],[gMASK],[sMASK],<sop>,<eop>,<eod>,<|system|>,"
                        "<|user|>,<|assistant|>,<|observation|>)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="weight dtype of the geb folder (default bfloat16, as released)")
    h = sub.add_parser("hf", help="a Hugging Face LlamaForCausalLM folder (safetensors)")
    h.add_argument("path")
    h.add_argument("--out", required=True)
    h.add_argument("--chat-format", default=None, help="chat format preset or JSON file (default: from the tokenizer)")
    f = sub.add_parser("gguf", help="a llama-architecture GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1 ...)")
    f.add_argument("path")
    f.add_argument("--out", required=True)
    from geb.commands.common import add_force

    for q in (g, h, f):
        add_force(q)
        q.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")


def run(args) -> int:
    from geb.commands.common import apply_threads, claim_output
    from geb.errors import GebError

    apply_threads(args)
    claim_output(args.out, "model", args.force)
    if args.format == "gguf":
        from geb.interop.gguf import import_gguf

        out = import_gguf(args.path, args.out)
    elif args.format == "hf":
        from geb.interop.hf import import_hf

        out = import_hf(args.path, args.out, chat_format=args.chat_format)
    else:
        from geb.interop.geb_release import (CONVENTION_FIELDS, Conventions, chosen_conventions,
                                            import_geb_release, verify_conventions)

        given = {f: getattr(args, f) for f in CONVENTION_FIELDS if getattr(args, f) is not None}
        specials = args.special_tokens.split(",") if args.special_tokens else None
        if args.verify:
            searched = [f for f in CONVENTION_FIELDS if f not in given]
            print("layout search: given " + (", ".join(f"{k}={v}" for k, v in given.items()) or "none")
                  + "; searched " + (", ".join(searched) or "none"))
            report = verify_conventions(args.path, given=given, special_tokens=specials, log=print)
            print(json.dumps(report, indent=2, ensure_ascii=False))
            conv = chosen_conventions(report)  # GebError (exit 2) when not sane or not clearly the best
            print("chosen layout: " + ", ".join(
                f"{f}={getattr(conv, f)} ({'given' if f in given else 'searched'})" for f in CONVENTION_FIELDS))
            if not args.out:
                return 0
        else:
            conv = Conventions(**given)
            print("layout: " + ", ".join(
                f"{f}={getattr(conv, f)} ({'given' if f in given else 'default'})" for f in CONVENTION_FIELDS))
        if not args.out:
            raise GebError("--out is required (unless --verify alone)")
        out = import_geb_release(args.path, args.out, conv, chat_format=args.chat_format,
                                 special_tokens=specials, dtype=args.dtype)
    print(f"wrote {out}")
    return 0
