"""`geb tokenizer train|eval`: train the bilingual byte-level BPE; compare its efficiency on zh and en."""

from __future__ import annotations

import json


def configure(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on text files", description="train a byte-level BPE")
    t.add_argument("inputs", nargs="+", help="text files (.txt, .jsonl with a text field)")
    t.add_argument("--vocab-size", type=int, default=64896 - 102, help="vocabulary size before padding (GEB: 64,794 padded to 64,896)")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="output folder")
    e = sub.add_parser("eval", help="characters and bytes per token on Chinese and English text",
                       description="characters and bytes per token, per language")
    e.add_argument("--tokenizer", required=True, help="tokenizer or model folder")
    e.add_argument("--zh", nargs="+", default=[], help="Chinese text files")
    e.add_argument("--en", nargs="+", default=[], help="English text files")
    e.add_argument("--json", action="store_true")


def run(args) -> int:
    from geb.data.textfiles import read_texts
    from geb.errors import GebError
    from geb.tokenizer import Tokenizer, efficiency

    if args.action == "train":
        tok = Tokenizer.train(read_texts(args.inputs), vocab_size=args.vocab_size, min_frequency=args.min_frequency)
        tok.save(args.out)
        print(f"wrote {args.out}: {tok.vocab_size} tokens")
        return 0
    tok = Tokenizer.load(args.tokenizer)
    if not args.zh and not args.en:
        raise GebError("give --zh and/or --en text files to evaluate on")
    rows = {}
    for lang, files in (("zh", args.zh), ("en", args.en)):
        if files:
            rows[lang] = efficiency(tok, list(read_texts(files)))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'lang':<5}{'chars/token':>12}{'bytes/token':>12}{'tokens':>10}")
        for lang, r in rows.items():
            print(f"{lang:<5}{r['chars_per_token']:>12.3f}{r['bytes_per_token']:>12.3f}{r['tokens']:>10}")
    return 0
