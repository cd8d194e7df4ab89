"""GGUF for llama.cpp: `export_gguf` writes a llama-architecture file with the tokenizer and chat template
in its metadata; `import_gguf` reads llama- and qwen2-architecture files of every type llama.cpp writes for them
(F32/F16/BF16, Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, the K-quants Q2_K..Q6_K and IQ4_NL, its fallback for rows that
are not a multiple of 256) back into a geb folder, dequantized to FP32 by `gguf.quants`.

Choices (see docs/interop.md):
- geb's rotate-half RoPE is turned into llama.cpp's adjacent-pair (NORM) layout by permuting the rows
  of wq/wk per head, as llama.cpp's own converter does; an "interleaved" geb model is already in it.
- The tokenizer is written as `gpt2` (byte-level BPE) with `tokenizer.ggml.pre = "qwen2"`, llama.cpp's
  implementation of the split pattern geb's tokenizer uses, so both produce the same ids.
- Q8_0/Q4_0 blocks are computed with torch in cache-sized chunks and are bit-identical to ggml's
  reference quantizers and to `gguf.quants`, whose numpy path is an order of magnitude slower
  (`python bench/gguf_export.py` measures the export rate). 1-D tensors (norms) stay F32. With q4_0 the output layer is written as Q8_0 (llama.cpp
  uses Q6_K there, which the gguf package cannot write); override with `output_type`.
- The file is streamed tensor by tensor into a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from geb.common import check_destination, temp_path, with_path
from geb.errors import GebError
from geb.interop.common import GebFolder, half_to_interleaved

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QK = 32  # values per Q8_0 / Q4_0 block


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GebError("GGUF support needs the 'gguf' package: pip install 'geb[export]' (or pip install gguf)") from None
    return gguf


# -- quantizers (bit-exact with ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref) ------------------
def _round_away(x: torch.Tensor) -> torch.Tensor:
    # C roundf (half away from zero), computed without the x + 0.5 rounding trap.
    a = x.abs()
    f = a.floor()
    return (f + (2 * (a - f)).floor()) * x.sign()


def quantize_q8_0(w: torch.Tensor, chunk: int = 1 << 18) -> np.ndarray:
    """[rows, cols] float → [rows, cols / 32 * 34] uint8 (per block: FP16 scale, 32 int8)."""
    rows, cols = w.shape
    out = torch.empty(rows, cols // QK, 2 + QK, dtype=torch.uint8)
    step = max(1, chunk // cols)
    for r in range(0, rows, step):
        b = w[r : r + step].float().reshape(-1, QK)
        d = b.abs().amax(1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _round_away(b * inv).to(torch.int8)
        o = out[r : r + step].view(-1, 2 + QK)
        o[:, :2] = d.half().view(torch.uint8)
        o[:, 2:] = q.view(torch.uint8)
    return out.reshape(rows, -1).numpy()


def quantize_q4_0(w: torch.Tensor, chunk: int = 1 << 18) -> np.ndarray:
    """[rows, cols] float → [rows, cols / 32 * 18] uint8 (per block: FP16 scale, 16 bytes of nibbles)."""
    rows, cols = w.shape
    out = torch.empty(rows, cols // QK, 2 + QK // 2, dtype=torch.uint8)
    step = max(1, chunk // cols)
    for r in range(0, rows, step):
        b = w[r : r + step].float().reshape(-1, QK)
        mx = b.gather(1, b.abs().argmax(1, keepdim=True))  # signed value of largest magnitude (first)
        d = mx / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(b * inv + 8.5).clamp_(0, 15).to(torch.uint8)
        o = out[r : r + step].view(-1, 2 + QK // 2)
        o[:, :2] = d.half().view(torch.uint8)
        o[:, 2:] = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)
    return out.reshape(rows, -1).numpy()


def _encode(w: torch.Tensor, kind: str, gguf) -> tuple[np.ndarray, object]:
    """A tensor in one of TYPES → (array to write, GGMLQuantizationType)."""
    Q = gguf.GGMLQuantizationType
    if kind == "f32":
        return w.float().contiguous().numpy(), Q.F32
    if kind == "f16":
        return w.half().contiguous().numpy(), Q.F16
    if kind == "bf16":
        return w.bfloat16().contiguous().view(torch.uint8).numpy().reshape(w.shape[0], -1), Q.BF16
    if kind == "q8_0":
        return quantize_q8_0(w), Q.Q8_0
    if kind == "q4_0":
        return quantize_q4_0(w), Q.Q4_0
    raise AssertionError(kind)


# -- tokenizer metadata -------------------------------------------------------------------------------
def _pre_tokenizer_name(tj: dict, source: str) -> str:
    """The llama.cpp pre-tokenizer that reproduces this tokenizer.json's pre-tokenization exactly."""
    from geb.tokenizer import SPLIT_PATTERN

    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == SPLIT_PATTERN \
            and parts[0].get("behavior") == "Isolated" and not parts[1].get("use_regex", True):
        return "qwen2"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise GebError(f"{source}: GGUF export supports byte-level BPE tokenizers with geb's (Qwen2), GPT-2 or "
                   f"SmolLM pre-tokenization; this one has {kinds}")


def _bpe_vocab(writer, tj: dict, vocab_size: int, source: str, gguf) -> tuple[dict[str, int], dict]:
    """geb's byte-level BPE → llama.cpp's `gpt2` tokenizer with the matching pre-tokenizer."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise GebError(f"{source}: GGUF export needs a byte-level BPE tokenizer, found model type {model.get('type')!r}")
    pre = _pre_tokenizer_name(tj, source)
    vocab: dict[str, int] = dict(model["vocab"])
    special: dict[int, bool] = {}
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        special[t["id"]] = bool(t.get("special"))
    by_id = {i: tok for tok, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise GebError(f"{source}: token id {max(by_id)} does not fit the model's {vocab_size} embedding rows")
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # embedding rows beyond the tokenizer (vocabulary padding)
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL if i not in special else (T.CONTROL if special[i] else T.USER_DEFINED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    return vocab, {"model": "gpt2", "pre": pre, "tokens": len(by_id), "merges": len(merges)}


def _spm_vocab(writer, spm_path: Path, tj: dict, vocab_size: int, gguf) -> tuple[dict[str, int], dict]:
    """A SentencePiece BPE model (the GEB-1.3B vocabulary) → llama.cpp's own `llama` tokenizer, which
    reproduces SentencePiece from the pieces' scores; special tokens appended after it become CONTROL."""
    from geb.interop.spm import load_proto

    m = load_proto(spm_path)
    if m.trainer_spec.model_type != 2:
        raise GebError(f"{spm_path}: only SentencePiece BPE models can be written for llama.cpp (this one is unigram)")
    T = gguf.TokenType
    tokens = [p.piece for p in m.pieces]
    scores = [p.score for p in m.pieces]
    types = [p.type or 1 for p in m.pieces]
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    extra = sorted(i for i in added if i >= len(tokens))
    if extra and extra[-1] >= vocab_size:
        raise GebError(f"{spm_path}: token id {extra[-1]} does not fit the model's {vocab_size} embedding rows")
    for i in range(len(tokens), vocab_size):
        t = added.get(i)
        tokens.append(t["content"] if t else f"[PAD{i}]")
        scores.append(0.0)
        types.append((T.CONTROL if t.get("special") else T.USER_DEFINED) if t else T.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool(m.normalizer_spec.add_dummy_prefix))
    if m.trainer_spec.unk_id >= 0:
        writer.add_unk_token_id(m.trainer_spec.unk_id)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    info = {"model": "llama", "tokens": len(m.pieces) + len(extra)}
    ns = m.normalizer_spec
    if ns.precompiled_charsmap or ns.remove_extra_whitespaces:
        # llama.cpp's SentencePiece tokenizer has no normalizer: e.g. nmt_nfkc maps "，" to "," first.
        info["warning"] = (f"the SentencePiece model normalizes text ({ns.name or 'charsmap'}"
                           f"{', remove_extra_whitespaces' if ns.remove_extra_whitespaces else ''}); llama.cpp does "
                           "not, so text that normalization changes (full-width punctuation such as '，', runs of "
                           "spaces) tokenizes differently there: normalize prompts first")
    return vocab, info


def add_tokenizer(writer, src: GebFolder, vocab_size: int, gguf) -> dict:
    source = str(src.folder / "tokenizer.json")
    tj = src.tokenizer_json()
    tc = src.tokenizer_config()
    spm_path = src.folder / "tokenizer.model"
    if spm_path.is_file():
        vocab, info = _spm_vocab(writer, spm_path, tj, vocab_size, gguf)
    else:
        vocab, info = _bpe_vocab(writer, tj, vocab_size, source, gguf)
    # bos (document start), eos (end of turn) and the chat template: the folder's one definition.
    from geb.tokenizer import Tokenizer

    tok = Tokenizer.load(src.folder)
    text = {"bos": tok.id_to_token(tok.doc_id) if tok.doc_id is not None else None,
            "eos": tok.id_to_token(tok.eos_id) if tok.eos_id is not None else None,
            "pad": tok.id_to_token(tok.pad_id) if tok.pad_id is not None else None}
    ids = {k: vocab[t] for k, t in text.items() if t is not None and t in vocab}
    if "bos" not in ids and "pad" in ids:
        ids["bos"] = ids["pad"]  # llama.cpp wants some BOS id; add_bos_token is false
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id)):
        if key in ids:
            add(ids[key])
    if "eos" in ids:
        writer.add_eot_token_id(ids["eos"])
    writer.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    writer.add_chat_template(tok.chat_template)
    return info


# -- export ---------------------------------------------------------------------------------------------
def _tensor_plan(src: GebFolder, kind: str, output_kind: str, embedding_kind: str | None = None):
    """(gguf name, geb name, type, transform) for every tensor, in file order."""
    c = src.cfg
    rot = c.rotary_dims
    perm_q = perm_k = None
    if c.rope_style == "half":
        perm_q = lambda w: half_to_interleaved(w, c.n_head, c.head_dim, rot)  # noqa: E731
        perm_k = lambda w: half_to_interleaved(w, c.n_kv_head, c.head_dim, rot)  # noqa: E731
    plan = [("token_embd.weight", "tok_emb.weight", embedding_kind or kind, None)]
    for i in range(c.n_layer):
        p, b = f"layers.{i}.", f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", p + "attn_norm.weight", "f32", None),
            (b + "attn_q.weight", p + "attn.wq.weight", kind, perm_q),
            (b + "attn_k.weight", p + "attn.wk.weight", kind, perm_k),
            (b + "attn_v.weight", p + "attn.wv.weight", kind, None),
            (b + "attn_output.weight", p + "attn.wo.weight", kind, None),
            (b + "ffn_norm.weight", p + "ffn_norm.weight", "f32", None),
            (b + "ffn_gate.weight", p + "ffn.w_gate.weight", kind, None),
            (b + "ffn_up.weight", p + "ffn.w_up.weight", kind, None),
            (b + "ffn_down.weight", p + "ffn.w_down.weight", kind, None),
        ]
        if c.qkv_bias:  # llama.cpp's llama graph adds optional attn_q/k/v biases (Qwen2-style checkpoints)
            plan += [(b + "attn_q.bias", p + "attn.wq.bias", "f32", perm_q),
                     (b + "attn_k.bias", p + "attn.wk.bias", "f32", perm_k),
                     (b + "attn_v.bias", p + "attn.wv.bias", "f32", None)]
    plan.append(("output_norm.weight", "norm.weight", "f32", None))
    if not c.tie_embeddings:  # llama.cpp uses token_embd as the output layer when output.weight is absent
        plan.append(("output.weight", "lm_head.weight", output_kind, None))
    return plan


def _fits(kind: str, shape: tuple[int, ...]) -> str:
    # Block formats need rows that are a multiple of 32 values; llama.cpp's converter falls back too.
    if kind in ("q8_0", "q4_0") and (len(shape) < 2 or shape[-1] % QK):
        return "f32"
    return kind


def _export_kinds(type: str, output_type: str | None, embedding_type: str | None) -> tuple[str, str, str]:
    """(matrices, output.weight, token_embd.weight) GGUF types, checked against TYPES."""
    kind = type.lower()
    if kind not in TYPES:
        raise GebError(f"unknown GGUF type {type!r} (choose from: {', '.join(TYPES)})")
    output_kind = (output_type or ("q8_0" if kind == "q4_0" else kind)).lower()
    embedding_kind = (embedding_type or kind).lower()
    for what, k in (("output", output_kind), ("embedding", embedding_kind)):
        if k not in TYPES:
            raise GebError(f"unknown GGUF {what} type {k!r} (choose from: {', '.join(TYPES)})")
    return kind, output_kind, embedding_kind


def _write_metadata(writer, src: GebFolder, kind: str, name: str | None, gguf) -> dict:
    """The llama-architecture hyperparameters and the tokenizer; returns what add_tokenizer reports."""
    c = src.cfg
    writer.add_name(name or src.meta.get("name") or src.folder.name)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.ffn_hidden)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.rotary_dims)
    writer.add_rope_freq_base(float(c.rope_base))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return add_tokenizer(writer, src, c.vocab_size, gguf)


def _write_tensor_infos(writer, src: GebFolder, plan: list, gguf) -> None:
    """Every tensor's name, shape, type and byte size, written ahead of the data as GGUF requires."""
    Q = gguf.GGMLQuantizationType
    qt = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
    for gname, gebname, k, _ in plan:
        shape = src.shapes[gebname]
        block, size = gguf.GGML_QUANT_SIZES[qt[k]]
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * size
        writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qt[k])


def _write_tensors(writer, src: GebFolder, plan: list, gguf, log=None) -> dict[str, int]:
    """Convert and write each tensor in plan order, one in memory at a time; returns {type: count}."""
    counts: dict[str, int] = {}
    for gname, gebname, k, transform in plan:
        w = src.tensor(gebname)
        if transform is not None:
            w = transform(w)
        arr, _ = _encode(w, k, gguf)
        writer.write_tensor_data(arr)
        counts[k] = counts.get(k, 0) + 1
        if log:
            log(f"{gname}: {k}")
    return counts


def export_gguf(model_dir: str | Path, out_path: str | Path, type: str = "f32", *, output_type: str | None = None,
                embedding_type: str | None = None, name: str | None = None, log=None) -> dict:
    """Write a geb folder as a llama-architecture GGUF file; returns a summary (types used, bytes).

    type: f32|f16|bf16|q8_0|q4_0 for the matrices; output_type for output.weight (default: type, but
    q8_0 when type is q4_0); embedding_type for token_embd.weight (default: type).
    """
    gguf = _gguf()
    kind, output_kind, embedding_kind = _export_kinds(type, output_type, embedding_type)
    src = GebFolder(model_dir)
    c = src.cfg
    if c.rotary_dims != c.head_dim:
        # llama.cpp refuses to load a llama-architecture file whose rope.dimension_count < head size.
        raise GebError(f"{src.folder}: config field 'rope_dims' = {c.rope_dims} (partial rotary, ChatGLM-style) "
                       "cannot be written as a llama-architecture GGUF; llama.cpp rotates whole heads")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise GebError(f"{out_path}: is a folder; give the .gguf file to write")
    check_destination(out_path, "gguf")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out_path)

    plan = [(g, n, _fits(k, src.shapes[n]), f) for g, n, k, f in _tensor_plan(src, kind, output_kind, embedding_kind)]
    writer = gguf.GGUFWriter(str(tmp), "llama")
    threads = torch.get_num_threads()
    try:
        tok_info = _write_metadata(writer, src, kind, name, gguf)
        _write_tensor_infos(writer, src, plan, gguf)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # One torch thread: the quantizers are chains of small elementwise ops on cache-sized chunks,
        # where OpenMP workers spin at every op boundary and several threads run slower than one on a
        # shared machine (`python bench/gguf_export.py` reports wall and CPU seconds).
        torch.set_num_threads(1)
        counts = _write_tensors(writer, src, plan, gguf, log)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails again
            writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise with_path(e, out_path, tmp) from None
        raise
    finally:
        torch.set_num_threads(threads)
    return {"path": str(out_path), "type": kind, "output_type": output_kind, "tensor_types": counts,
            "bytes": out_path.stat().st_size, "tokenizer": tok_info}


# -- import -----------------------------------------------------------------------------------------------
# llama.cpp pre-tokenizer name → the `tokenizers` pre-tokenizer that reproduces it.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str, source: str):
    from tokenizers import Regex, pre_tokenizers as pt

    from geb.tokenizer import SPLIT_PATTERN

    split = {"qwen2": SPLIT_PATTERN, "llama-bpe": _LLAMA3_PATTERN}
    if pre in split:
        return pt.Sequence([pt.Split(Regex(split[pre]), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    raise GebError(f"{source}: field 'tokenizer.ggml.pre' = {pre!r} is not supported "
                   f"(supported: qwen2, gpt2, smollm, llama-bpe)")


class _Fields:
    def __init__(self, reader, source: str):
        self.r, self.source = reader, source

    def get(self, key: str, default=None, required: bool = False):
        f = self.r.get_field(key)
        if f is None:
            if required:
                raise GebError(f"{self.source}: missing metadata field '{key}'")
            return default
        try:
            return f.contents()
        except Exception as e:
            raise GebError(f"{self.source}: cannot read metadata field '{key}' ({e})") from None

    def int(self, key: str, default=None, required: bool = False):
        v = self.get(key, default, required)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise GebError(f"{self.source}: field '{key}' varies per layer ({v[:4]}...), which geb does not support")
            v = v[0]
        if v is not None and (not isinstance(v, (int, np.integer)) or v <= 0):
            raise GebError(f"{self.source}: field '{key}' must be a positive integer, got {v!r}")
        return None if v is None else int(v)


def gguf_tokenizer(fields: _Fields, source: str):
    """Rebuild a `tokenizers` byte-level BPE from a GGUF's tokenizer.ggml.* fields."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

    model = fields.get("tokenizer.ggml.model", required=True)
    if model != "gpt2":
        raise GebError(f"{source}: field 'tokenizer.ggml.model' = {model!r}: only byte-level BPE ('gpt2') "
                       "tokenizers can be imported")
    tokens = fields.get("tokenizer.ggml.tokens", required=True)
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = fields.get("tokenizer.ggml.merges", required=True)
    if len(types) != len(tokens):
        raise GebError(f"{source}: 'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens")
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    # Trailing UNUSED rows are vocabulary padding, not tokens; UNUSED rows between real tokens are kept so
    # that ids stay dense (the engine masks logits from the tokenizer's size on).
    last = max((i for i, ty in enumerate(types) if ty != 5), default=-1)
    vocab = {}
    for i, t in enumerate(tokens[: last + 1]):
        vocab.setdefault(t, i)
    pairs = []
    for n, m in enumerate(merges):
        a, sep, b = m.partition(" ")
        if not sep:
            raise GebError(f"{source}: 'tokenizer.ggml.merges' entry {n} ({m!r}) is not 'left right'")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = _pre_tokenizer(pre, source)
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    return tok, len(tokens)


_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "attn_q.weight": "attn.wq.weight", "attn_k.weight": "attn.wk.weight",
    "attn_v.weight": "attn.wv.weight", "attn_output.weight": "attn.wo.weight", "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "ffn.w_gate.weight", "ffn_up.weight": "ffn.w_up.weight", "ffn_down.weight": "ffn.w_down.weight",
    "attn_q.bias": "attn.wq.bias", "attn_k.bias": "attn.wk.bias", "attn_v.bias": "attn.wv.bias",
}
# GGUF architectures geb reads: llama's q/k rows are in llama.cpp's adjacent-pair RoPE order (permuted
# back on import); qwen2 files keep Hugging Face's rotate-half order (llama.cpp runs them with NEOX RoPE).
ARCHITECTURES = {"llama": True, "qwen2": False}
_TOP_NAMES = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}


def _geb_name(name: str, n_layer: int, source: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        if int(parts[1]) >= n_layer:
            raise GebError(f"{source}: tensor '{name}' is beyond llama.block_count = {n_layer}")
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise GebError(f"{source}: unknown tensor '{name}' (not part of the llama/qwen2 architectures geb imports)")


def _gguf_specials(f: _Fields, hf_tok, source: str) -> dict:
    """The model's own chat template and bos/eos tokens (by id in the GGUF) as Tokenizer arguments."""
    out = {"chat_template": f.get("tokenizer.chat_template")}
    for key, arg in (("tokenizer.ggml.bos_token_id", "bos"), ("tokenizer.ggml.eos_token_id", "eos")):
        i = f.get(key)
        if i is None:
            continue
        text = hf_tok.id_to_token(int(i))
        if text is None:
            raise GebError(f"{source}: field '{key}' = {i} is not a token id of 'tokenizer.ggml.tokens'")
        out[arg] = text
    return out


def read_gguf(path: str | Path):
    """Read a llama- or qwen2-architecture GGUF → (ModelConfig, state dict in geb names (FP32), tokenizer, info)."""
    gguf = _gguf()
    from geb.config import ModelConfig
    from geb.tokenizer import Tokenizer

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise GebError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # ValueError for bad magic/version, IndexError/struct errors on truncation
        raise GebError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated") from None
    f = _Fields(reader, source)
    arch = f.get("general.architecture", required=True)
    if arch not in ARCHITECTURES:
        raise GebError(f"{path}: field 'general.architecture' = {arch!r}: only llama and qwen2 GGUF files can be "
                       f"imported (geb has no {arch!r} blocks)")
    a = arch
    scaling = f.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GebError(f"{path}: field '{a}.rope.scaling.type' = {scaling!r}: RoPE scaling is not supported")
    d = f.int(f"{a}.embedding_length", required=True)
    n_head = f.int(f"{a}.attention.head_count", required=True)
    n_kv = f.int(f"{a}.attention.head_count_kv", n_head)
    head_dim = f.int(f"{a}.attention.key_length", d // n_head)
    if f.int(f"{a}.attention.value_length", head_dim) != head_dim:
        raise GebError(f"{path}: field '{a}.attention.value_length' differs from key_length; geb needs them equal")
    rot = f.int(f"{a}.rope.dimension_count", head_dim)
    if not ARCHITECTURES[arch] and rot != head_dim:
        raise GebError(f"{path}: field '{a}.rope.dimension_count' = {rot}: partial rotary is not supported for {a}")
    hf_tok, n_tokens = gguf_tokenizer(f, source)
    tokenizer = Tokenizer(hf_tok, source=source, **_gguf_specials(f, hf_tok, source))
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GebError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = int(tensors["token_embd.weight"].shape[-1])
    cfg = ModelConfig(
        name=str(f.get("general.name") or path.stem), vocab_size=vocab,
        n_layer=f.int(f"{a}.block_count", required=True), d_model=d, n_head=n_head, n_kv_head=n_kv,
        head_dim=head_dim, ffn_hidden=f.int(f"{a}.feed_forward_length", required=True),
        max_seq_len=f.int(f"{a}.context_length", 4096), rope_base=float(f.get(f"{a}.rope.freq_base", 10000.0)),
        rope_style="half", rope_dims=0 if rot == head_dim else rot,
        norm_eps=float(f.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors, qkv_bias="blk.0.attn_q.bias" in tensors,
    )
    if n_tokens > vocab:
        raise GebError(f"{path}: {n_tokens} tokens in 'tokenizer.ggml.tokens' but token_embd.weight has {vocab} rows")
    from geb.interop.common import interleaved_to_half

    sd: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        gname = _geb_name(name, cfg.n_layer, source)
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GebError(f"{path}: tensor '{name}' has type {t.tensor_type.name}, which cannot be dequantized") from None
        except Exception as e:
            raise GebError(f"{path}: cannot read tensor '{name}' ({e}); the file may be truncated") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy (the reader memory-maps)
        want = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml lists dims fastest first
        if tuple(w.shape) != want:
            w = w.reshape(want)
        if not ARCHITECTURES[arch]:
            pass
        elif gname.endswith(("attn.wq.weight", "attn.wq.bias")) and w.shape[0] == n_head * head_dim:
            w = interleaved_to_half(w, n_head, head_dim, rot)
        elif gname.endswith(("attn.wk.weight", "attn.wk.bias")) and w.shape[0] == n_kv * head_dim:
            w = interleaved_to_half(w, n_kv, head_dim, rot)
        sd[gname] = w
    info = {"architecture": arch, "file_type": f.get("general.file_type"),
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
            "tokenizer_pre": f.get("tokenizer.ggml.pre", "gpt2")}
    return cfg, sd, tokenizer, info


def import_gguf(path: str | Path, out: str | Path) -> Path:
    """Import a llama-architecture GGUF file into a geb folder (weights dequantized to FP32)."""
    from geb.interop.common import write_geb_folder

    cfg, sd, tokenizer, info = read_gguf(path)
    meta = {"stage": "import", "parent": str(Path(path).resolve()), "format": "gguf", **info}
    return write_geb_folder(out, cfg, sd, tokenizer, meta, source=str(path))
