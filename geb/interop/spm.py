"""SentencePiece `tokenizer.model` → a `tokenizers.Tokenizer` with the same ids (the GEB-1.3B vocabulary).

The model file is read as its protobuf (pieces, scores, types, trainer and normalizer settings), never
executed. BPE models become a `tokenizers` BPE whose merges are ranked by the merged piece's score (how
SentencePiece's BPE picks merges); Unigram models become a `tokenizers` Unigram. Byte fallback, the
dummy "▁" prefix and the precompiled normalization map carry over. Text sections around special tokens
each get the dummy prefix (as when a chat format encodes its pieces one by one): plain text gets
SentencePiece's ids exactly, but "x<sym>y" with a user-defined piece gives "▁x <sym> ▁y" where
SentencePiece gives "▁x <sym> y" (`tokenizers` cannot prepend only at the very start of the text). Control and
user-defined pieces become added tokens; special tokens the file lacks (ChatGLM3 adds its own in code,
after the SentencePiece vocabulary) are appended with the next ids.
"""

from __future__ import annotations

from pathlib import Path

from geb.errors import GebError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def load_proto(path: str | Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise GebError(f"reading a SentencePiece model needs 'sentencepiece' and 'protobuf' ({e}): "
                       "pip install 'geb[export]'") from None
    path = Path(path)
    if not path.is_file():
        raise GebError(f"{path}: SentencePiece model not found")
    m = pb.ModelProto()
    try:
        m.ParseFromString(path.read_bytes())
    except Exception as e:
        raise GebError(f"{path}: not a SentencePiece model ({type(e).__name__}: {e}); it may be truncated") from None
    if not m.pieces:
        raise GebError(f"{path}: SentencePiece model has no pieces (truncated or not a tokenizer.model)")
    return m


def _bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """All (left, right) splits of every piece into two pieces, best merged-piece score first."""
    found = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in vocab and b in vocab:
                found.append((-scores[piece], pid, vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def spm_to_tokenizer(path: str | Path, extra_specials: list[str] | None = None):
    """→ (tokenizers.Tokenizer, info dict: pieces, appended specials, model type, ...)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    m = load_proto(path)
    ts, ns = m.trainer_spec, m.normalizer_spec
    pieces = [(p.piece, p.score, p.type or NORMAL) for p in m.pieces]
    vocab = {}
    for i, (p, _, _) in enumerate(pieces):
        vocab.setdefault(p, i)
    unk = next((i for i, (_, _, t) in enumerate(pieces) if t == UNKNOWN), None)
    model_type = {1: "unigram", 2: "bpe"}.get(ts.model_type or 1)
    if model_type is None:
        raise GebError(f"{path}: SentencePiece model type {ts.model_type} (word/char) is not supported")
    if model_type == "bpe":
        scores = {p: s for p, s, _ in pieces}
        mergeable = {p: i for p, i in vocab.items() if pieces[i][2] in (NORMAL, USER_DEFINED)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(mergeable, scores),
                                   unk_token=pieces[unk][0] if unk is not None else None, fuse_unk=True,
                                   byte_fallback=bool(ts.byte_fallback)))
    else:
        tok = Tokenizer(models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk, byte_fallback=bool(ts.byte_fallback)))

    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    # No pre-tokenizer: SentencePiece segments the whole normalized string at once (word splitting only
    # constrains training), and a BPE over the whole string with score-ranked merges does the same.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if ns.add_dummy_prefix else []))
    # Control pieces (<s>, </s>, ...) are special; user-defined pieces are matched whole, as SentencePiece does.
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t == CONTROL])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == USER_DEFINED])
    appended, existing = [], []
    for s in extra_specials or []:
        if s in vocab:
            existing.append(s)
            tok.add_special_tokens([AddedToken(s, special=True, normalized=False)])
        else:
            appended.append(s)
    if appended:
        # add_special_tokens assigns the next free ids, in order: len(pieces), len(pieces) + 1, ...
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in appended])
        for k, s in enumerate(appended):
            if tok.token_to_id(s) != len(pieces) + k:
                raise GebError(f"{path}: could not place special token {s!r} at id {len(pieces) + k}")
    info = {"model_type": model_type, "pieces": len(pieces), "byte_fallback": bool(ts.byte_fallback),
            "add_dummy_prefix": bool(ns.add_dummy_prefix), "normalizer": ns.name or "",
            "specials_in_model": existing, "specials_appended": {s: len(pieces) + k for k, s in enumerate(appended)}}
    return tok, info
