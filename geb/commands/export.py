"""`geb export hf|gguf`: write a geb model folder for transformers or llama.cpp."""

from __future__ import annotations

import json


def configure(p) -> None:
    sub = p.add_subparsers(dest="format", metavar="<format>", required=True)
    h = sub.add_parser("hf", help="a Hugging Face Llama folder (transformers, vLLM; no custom code)")
    h.add_argument("--model", required=True, help="geb model folder")
    h.add_argument("--out", required=True, help="output folder")
    h.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weight dtype to write (default float32)")
    g = sub.add_parser("gguf", help="a llama-architecture GGUF file (llama.cpp, ollama)")
    g.add_argument("--model", required=True, help="geb model folder")
    g.add_argument("--out", required=True, help="output .gguf file")
    g.add_argument("--type", default="f32", choices=("f32", "f16", "bf16", "q8_0", "q4_0"),
                   help="weight format (default f32; norms always stay f32)")
    g.add_argument("--output-type", default=None, choices=("f32", "f16", "bf16", "q8_0", "q4_0"),
                   help="format of the output layer (default: as --type, but q8_0 for q4_0)")
    g.add_argument("--embedding-type", default=None, choices=("f32", "f16", "bf16", "q8_0", "q4_0"),
                   help="format of token_embd (default: as --type)")
    g.add_argument("--name", default=None, help="general.name in the file (default: the folder's name)")
    from geb.commands.common import add_force

    for q in (h, g):
        add_force(q)
        q.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")


def run(args) -> int:
    from geb.commands.common import apply_threads, claim_output

    apply_threads(args)
    claim_output(args.out, "gguf" if args.format == "gguf" else "hf", args.force)
    if args.format == "gguf":
        from geb.interop.gguf import export_gguf

        info = export_gguf(args.model, args.out, args.type, output_type=args.output_type,
                           embedding_type=args.embedding_type, name=args.name)
    else:
        from geb.interop.hf import export_hf

        info = export_hf(args.model, args.out, dtype=args.dtype)
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0
