"""Perplexity and bits per byte of a model on a text file or a packed token folder (`geb eval ppl`).

A text file is one document: its tokens are scored after the document start (`Tokenizer.doc_id`), in windows of the
model's context (stride = context: lm-eval's disjoint rolling windows; a smaller stride gives each
window more context and a lower, slower estimate). A token folder's split is scored as the stream
the trainer sees (documents joined by the document separator, the same id). Bits per byte divide the total
negative log-likelihood (in bits) by the UTF-8 bytes of the text, so models with different
tokenizers can be compared; token perplexity cannot.
"""

from __future__ import annotations

import time
from pathlib import Path

from geb.common import atomic_write_json, now_iso
from geb.errors import GebError
from geb.infer.scoring import load_scorer
from geb.scoring import Scorer, bits_per_byte, perplexity_from


def _check_tokens(data, tok, model_vocab: int, folder: Path) -> None:
    """A token folder made with another tokenizer gives meaningless numbers: refuse it."""
    want = data.meta.get("tokenizer_hash")
    if want and want != tok.hash():
        raise GebError(f"{folder}: tokens were made with tokenizer {want}, the model's tokenizer is {tok.hash()}")
    if data.eos_id != tok.doc_id or data.vocab_size not in (tok.vocab_size, model_vocab):
        raise GebError(f"{folder}: token folder has vocab_size {data.vocab_size} and eos_id {data.eos_id}, the model's "
                       f"tokenizer has {tok.vocab_size} and {tok.doc_id} (made with a different tokenizer)")


def perplexity(model_dir=None, data=None, split: str = "val", max_tokens: int | None = None,
               stride: int | None = None, model=None, tokenizer=None, out=None) -> dict:
    """Score `data` (a UTF-8 text file or a token folder) and return the figures as a dict."""
    from geb import __version__

    if data is None:
        raise GebError("no data given (--data FILE or token folder)")
    path = Path(data)
    if model is None:
        if model_dir is None:
            raise GebError("no model given (--model)")
        scorer, tokenizer, _, _ = load_scorer(model_dir)
    else:
        scorer = Scorer(model, tokenizer)
    if stride is not None and stride <= 0:
        raise GebError("--stride must be positive")
    if max_tokens is not None and max_tokens <= 0:
        raise GebError("--max-tokens must be positive")
    t0 = time.perf_counter()
    if path.is_dir():
        from geb.data.tokens import TokenData

        td = TokenData(path)
        _check_tokens(td, tokenizer, scorer.cfg.vocab_size, path)
        if split not in td.splits():
            raise GebError(f"{path}: no split '{split}' (has: {', '.join(td.splits())})")
        arr = td.array(split)
        ids = [int(x) for x in arr[: max_tokens or arr.size]]
        if ids and ids[0] == tokenizer.doc_id:
            ids = ids[1:]
        n_bytes = len(tokenizer.decode(ids, skip_special=True).encode("utf-8"))
        source = {"kind": "tokens", "path": str(path), "split": split, "data_hash": td.data_hash}
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise GebError(f"{path}: not UTF-8 text ({e})") from None
        ids = tokenizer.encode(text, allow_special=False)
        if max_tokens:
            ids = ids[:max_tokens]
            text = tokenizer.decode(ids)
        n_bytes = len(text.encode("utf-8"))
        import hashlib

        source = {"kind": "text", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
    else:
        raise GebError(f"{path}: no such file or token folder")
    if not ids:
        raise GebError(f"{path}: no tokens to score (empty)")
    logprob, n = scorer.rolling(ids, stride=stride)
    seconds = time.perf_counter() - t0
    res = {
        "model": str(model_dir) if model_dir else None, "tokenizer_hash": tokenizer.hash(), "data": source,
        "tokens": n, "bytes": n_bytes, "nll_sum": -logprob, "nll_per_token": -logprob / n,
        "perplexity": perplexity_from(logprob, n), "bits_per_byte": bits_per_byte(logprob, n_bytes),
        "bytes_per_token": n_bytes / n, "context": scorer.max_len, "stride": stride or scorer.max_len,
        "seconds": round(seconds, 3), "tokens_per_s": round(n / max(seconds, 1e-9), 1),
        "date": now_iso(), "geb_version": __version__,
    }
    if out is not None:
        atomic_write_json(out, res, indent=2)
    return res
