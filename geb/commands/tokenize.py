"""`geb tokenize`: pack text files (JSONL `text` field, or .txt with blank-line-separated documents)
into token shards with a validation split. The data pipeline (`geb data run`) does this after cleaning;
this is the direct path for text that is already clean."""

from __future__ import annotations


def configure(p) -> None:
    from geb.commands.common import add_force

    p.add_argument("inputs", nargs="+", help="text files (.txt, .jsonl)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--out", required=True, help="output token folder")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text")
    add_force(p)


def run(args) -> int:
    from geb.commands.common import claim_output
    from geb.data.textfiles import pack_texts, read_texts
    from geb.tokenizer import Tokenizer

    claim_output(args.out, "tokens", args.force)
    tok = Tokenizer.load(args.tokenizer)
    docs = list(read_texts(args.inputs, text_field=args.text_field))
    meta = pack_texts(docs, tok, args.out, val_fraction=args.val_fraction, seed=args.seed,
                      tokenizer_dir=args.tokenizer)
    n = {k: sum(s["tokens"] for s in v) for k, v in meta["shards"].items()}
    print(f"wrote {args.out}: {meta['documents']} documents, tokens {n}")
    return 0
