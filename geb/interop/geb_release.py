"""Import the released GEB-1.3B checkpoint (Megatron/ChatGLM-style names, BF16 `pytorch_model.bin`, a
SentencePiece `tokenizer.model`) into a geb folder, and `verify_conventions` to find its layout.

The weights are read with `torch.load(weights_only=True, mmap=True)`: tensors only, never arbitrary
pickled objects, and without reading the whole file into memory.

Three conventions of the release could not be read from its code, so each is an option
(`Conventions`):
- `kv_order`: rows of `self_attention.key_value.weight`. "interleaved" (expected, Megatron-DeepSpeed):
  per KV head, that head's K rows then its V rows. "split": all K rows, then all V rows.
- `mlp_order`: halves of `mlp.dense_h_to_4h.weight`. "gate-up" (expected): the first half goes through
  SiLU; "up-gate": the second does.
- `rope`: "half" (expected): rotate-half over the whole head, as Hugging Face Llama and geb.
  "interleaved": adjacent pairs over the whole head (Meta Llama). "chatglm": adjacent pairs over the
  first half of each head only (ChatGLM2/3); geb then keeps rope_dims = head_dim / 2.
Every convention is turned into geb's rotate-half layout by reordering rows (exact), so the imported
folder exports to transformers or GGUF like any other (except partial rotary; see docs/interop.md).
`verify_conventions` scores a built-in bilingual text under every combination the caller did not fix
(12 when none is given), and `chosen_conventions` accepts the best only when its perplexity is sane and
at least MIN_MARGIN times lower than the runner-up's.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from geb.common import read_json_object
from geb.config import ModelConfig
from geb.errors import GebError
from geb.interop.common import interleaved_to_half, read_sharded

KV_ORDERS = ("interleaved", "split")
MLP_ORDERS = ("gate-up", "up-gate")
ROPES = ("half", "interleaved", "chatglm")
CONVENTION_FIELDS = ("kv_order", "mlp_order", "rope")
# --verify accepts the best layout only when the runner-up's perplexity is at least this many times higher.
# A tie gives exactly 1.0 (e.g. kv_order with one KV head: both orders are the same tensor). The synthetic
# releases of tests/test_import_geb.py (small models that learned the text, with a known layout) beat the
# runner-up by at least twice this (asserted), so 1.5 refuses ties and near-ties without refusing those.
MIN_MARGIN = 1.5
DEFAULT_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<eod>",
                    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

# Scored by --verify: ordinary English and Chinese prose (written for geb), a few hundred tokens.
VERIFY_TEXT = (
    "The sun rises in the east and sets in the west. Water freezes at zero degrees Celsius and boils at "
    "one hundred degrees at sea level. Paris is the capital of France, and London is the capital of the "
    "United Kingdom. Many people enjoy reading books, listening to music and walking in the park on "
    "weekends. Children go to school to learn mathematics, history, science and languages.\n"
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。长江是中国最长的河流，全长约六千三百公里。"
    "春天来了，天气渐渐变暖，公园里的花都开了。很多人喜欢在周末和家人朋友一起吃饭、聊天、看电影。"
    "学生们每天早上去学校上课，学习语文、数学和英语。中国有悠久的历史和灿烂的文化。\n"
)


@dataclass(frozen=True)
class Conventions:
    kv_order: str = "interleaved"
    mlp_order: str = "gate-up"
    rope: str = "half"

    def __post_init__(self) -> None:
        for f, allowed in (("kv_order", KV_ORDERS), ("mlp_order", MLP_ORDERS), ("rope", ROPES)):
            if getattr(self, f) not in allowed:
                raise GebError(f"convention '{f}' must be one of {', '.join(allowed)}, got {getattr(self, f)!r}")


# -- config ------------------------------------------------------------------------------------------------
def release_config(raw: dict, source: str) -> ModelConfig:
    """Megatron/ChatGLM-style config.json → geb ModelConfig (rotate-half over whole heads; see Conventions)."""
    def need(*keys):
        for k in keys:
            if k in raw:
                return raw[k]
        raise GebError(f"{source}: missing field '{keys[0]}'")

    for flag, bad, why in (("add_bias_linear", True, "geb's blocks have no biases"),
                           ("add_qkv_bias", True, "geb's attention has no biases"),
                           ("rmsnorm", False, "geb uses RMSNorm"),
                           ("apply_residual_connection_post_layernorm", True, "geb is pre-norm"),
                           ("post_layer_norm", False, "geb has a final norm")):
        if raw.get(flag) is bad:
            raise GebError(f"{source}: field '{flag}' is {str(bad).lower()}, but {why}")
    d = need("hidden_size")
    heads = need("num_attention_heads")
    kv = raw.get("num_key_value_heads") or raw.get("multi_query_group_num") or heads
    base = float(raw.get("rope_theta", raw.get("rotary_base", 10000.0))) * float(raw.get("rope_ratio", 1.0))
    try:
        return ModelConfig(
            name=str(raw.get("model_name") or raw.get("_name_or_path") or "geb-1.3b-release"),
            vocab_size=need("padded_vocab_size", "vocab_size"), n_layer=need("num_layers", "num_hidden_layers"),
            d_model=d, n_head=heads, n_kv_head=kv, head_dim=raw.get("kv_channels") or d // heads,
            ffn_hidden=need("ffn_hidden_size"), max_seq_len=raw.get("seq_length", 4096), rope_base=base,
            norm_eps=float(raw.get("layernorm_epsilon", 1e-5)),
            tie_embeddings=raw.get("untie_embeddings_and_output_weights") is False,  # map_release decides
        )
    except GebError as e:
        raise GebError(f"{source}: {e}") from None


# -- weights ------------------------------------------------------------------------------------------------
def _torch_load(f: Path) -> dict:
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for forbidden objects, RuntimeError for truncated zips
        raise GebError(f"{f}: cannot load as a weights-only PyTorch file ({type(e).__name__}: {e}); "
                       "it may be truncated, or hold more than tensors") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict) and not any(
            isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["model"]  # Megatron-style {"model": state_dict, ...}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GebError(f"{f}: expected a state dict of tensors")
    return obj


def read_release_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json"
    if index.is_file():
        return read_sharded(index, _torch_load)
    if single.is_file():
        return _torch_load(single)
    raise GebError(f"{folder}: no pytorch_model.bin or pytorch_model.bin.index.json")


_ALIASES = {
    "tok_emb.weight": ["transformer.embedding.word_embeddings.weight", "transformer.word_embeddings.weight"],
    "norm.weight": ["transformer.encoder.final_layernorm.weight", "transformer.final_layernorm.weight"],
    "lm_head.weight": ["transformer.output_layer.weight", "output_layer.weight", "lm_head.weight"],
}
_IGNORED = ("rotary_pos_emb.inv_freq", "rotary_emb.inv_freq")


def map_release(raw: dict[str, torch.Tensor], base: ModelConfig, conv: Conventions, source: str,
                dtype: torch.dtype | None = None, untie: bool | None = None):
    """Release tensors → (geb config, geb state dict) under the given conventions.

    `untie` is config.json's untie_embeddings_and_output_weights: True requires an output layer; when
    absent, a missing output layer means the embedding is tied.
    """
    c = base.replace(rope_dims=base.head_dim // 2 if conv.rope == "chatglm" else 0)
    hd, qd, kvd = c.head_dim, c.q_dim, c.kv_dim
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...], why: str) -> torch.Tensor:
        if name not in raw:
            raise GebError(f"{source}: missing tensor '{name}'")
        t = raw[name]
        if tuple(t.shape) != shape:
            raise GebError(f"{source}: tensor '{name}' has shape {tuple(t.shape)}, config.json expects {shape} ({why})")
        used.add(name)
        return t if dtype is None else t.to(dtype)

    def first(names: list[str]) -> str | None:
        return next((n for n in names if n in raw), None)

    def rope(w: torch.Tensor, heads: int) -> torch.Tensor:
        if conv.rope == "half":
            return w
        return interleaved_to_half(w, heads, hd, hd if conv.rope == "interleaved" else hd // 2)

    d, V, F = c.d_model, c.vocab_size, c.ffn_hidden
    sd: dict[str, torch.Tensor] = {}
    emb = first(_ALIASES["tok_emb.weight"]) or _ALIASES["tok_emb.weight"][0]
    sd["tok_emb.weight"] = take(emb, (V, d), "padded_vocab_size, hidden_size")
    for i in range(c.n_layer):
        p = f"transformer.encoder.layers.{i}."
        if p + "input_layernorm.weight" not in raw and any(k.startswith(f"transformer.layers.{i}.") for k in raw):
            p = f"transformer.layers.{i}."
        g = f"layers.{i}."
        sd[g + "attn_norm.weight"] = take(p + "input_layernorm.weight", (d,), "hidden_size")
        if p + "self_attention.query_key_value.weight" in raw:  # fused Q, K, V (ChatGLM-style)
            qkv = take(p + "self_attention.query_key_value.weight", (qd + 2 * kvd, d),
                       "num_attention_heads, num_key_value_heads, kv_channels")
            q, kv = qkv[:qd], qkv[qd:]
        else:
            q = take(p + "self_attention.query.weight", (qd, d), "num_attention_heads * kv_channels, hidden_size")
            kv = take(p + "self_attention.key_value.weight", (2 * kvd, d),
                      "2 * num_key_value_heads * kv_channels, hidden_size")
        if conv.kv_order == "interleaved":
            kv4 = kv.reshape(c.n_kv_head, 2, hd, d)
            k, v = kv4[:, 0].reshape(kvd, d), kv4[:, 1].reshape(kvd, d)
        else:
            k, v = kv[:kvd], kv[kvd:]
        sd[g + "attn.wq.weight"] = rope(q, c.n_head)
        sd[g + "attn.wk.weight"] = rope(k, c.n_kv_head)
        sd[g + "attn.wv.weight"] = v
        sd[g + "attn.wo.weight"] = take(p + "self_attention.dense.weight", (d, qd), "hidden_size, q dim")
        sd[g + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight", (d,), "hidden_size")
        h4 = take(p + "mlp.dense_h_to_4h.weight", (2 * F, d), "2 * ffn_hidden_size, hidden_size")
        a, b = h4[:F], h4[F:]
        sd[g + "ffn.w_gate.weight"], sd[g + "ffn.w_up.weight"] = (a, b) if conv.mlp_order == "gate-up" else (b, a)
        sd[g + "ffn.w_down.weight"] = take(p + "mlp.dense_4h_to_h.weight", (d, F), "hidden_size, ffn_hidden_size")
    norm = first(_ALIASES["norm.weight"]) or _ALIASES["norm.weight"][0]
    sd["norm.weight"] = take(norm, (d,), "hidden_size")
    head = first(_ALIASES["lm_head.weight"])
    if head is not None:
        if untie is False:
            raise GebError(f"{source}: tensor '{head}' is present but config.json field "
                           "'untie_embeddings_and_output_weights' is false")
        sd["lm_head.weight"] = take(head, (V, d), "padded_vocab_size, hidden_size")
        c = c.replace(tie_embeddings=False)
    elif untie:
        raise GebError(f"{source}: missing tensor '{_ALIASES['lm_head.weight'][0]}' "
                       "(config.json field 'untie_embeddings_and_output_weights' is true)")
    else:
        c = c.replace(tie_embeddings=True)
    extra = sorted(k for k in raw if k not in used and not k.endswith(_IGNORED))
    if extra:
        raise GebError(f"{source}: unknown tensor '{extra[0]}'" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                       + f"; not part of the GEB-1.3B layout with {c.n_layer} layers")
    return c, sd


# -- tokenizer ----------------------------------------------------------------------------------------------
def release_tokenizer(folder: Path, vocab_size: int, special_tokens: list[str] | None, chat_format):
    from geb.chat_format import resolve
    from geb.interop.spm import spm_to_tokenizer
    from geb.tokenizer import Tokenizer

    f = folder / "tokenizer.model"
    hf, info = spm_to_tokenizer(f, DEFAULT_SPECIALS if special_tokens is None else special_tokens)
    n = hf.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise GebError(f"{f}: {n} tokens (with special tokens) do not fit padded_vocab_size = {vocab_size}")
    fmt = resolve(chat_format if chat_format is not None else "chatglm3")
    return Tokenizer(hf, source=str(f), chat_format=fmt), info


# -- import and verify --------------------------------------------------------------------------------------
def _open(path: str | Path):
    folder = Path(path)
    if not folder.is_dir():
        raise GebError(f"{folder}: release folder not found")
    cfg_raw = read_json_object(folder / "config.json", "model config file")
    base = release_config(cfg_raw, str(folder / "config.json"))
    return folder, cfg_raw, base


def import_geb_release(path: str | Path, out: str | Path, conv: Conventions = Conventions(), *, chat_format=None,
                       special_tokens: list[str] | None = None, dtype: str = "bfloat16") -> Path:
    """Convert the released GEB-1.3B (or a checkpoint in its layout) into a geb folder."""
    from geb.interop.common import write_geb_folder

    if dtype not in ("bfloat16", "float32"):
        raise GebError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    folder, cfg_raw, base = _open(path)
    tok, tok_info = release_tokenizer(folder, base.vocab_size, special_tokens, chat_format)
    raw = read_release_weights(folder)
    cfg, sd = map_release(raw, base, conv, str(folder), dtype=getattr(torch, dtype),
                          untie=cfg_raw.get("untie_embeddings_and_output_weights"))
    meta = {"stage": "import", "format": "geb-release", "parent": str(folder.resolve()),
            "conventions": asdict(conv), "release_config": cfg_raw, "tokenizer": tok_info,
            "chat_format": tok.chat_format.to_dict(),
            "note": "the released model's chat prompt format is not known; the chat format is a configurable guess"}
    # The SentencePiece model travels along: GGUF export writes llama.cpp's own SentencePiece vocabulary from it.
    return write_geb_folder(out, cfg, sd, tok, meta, source=str(folder),
                            extra_files={"tokenizer.model": (folder / "tokenizer.model").read_bytes()})


def verify_conventions(path: str | Path, *, given: dict[str, str] | None = None,
                       special_tokens: list[str] | None = None, text: str | None = None,
                       max_tokens: int = 256, log=None) -> dict:
    """Perplexity of a bilingual text under every convention not fixed by `given` (field → value).

    Fields in `given` are not searched: they restrict the candidates instead of being overridden.
    """
    from geb.model import GEB
    from geb.scoring import Scorer, perplexity_of

    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = sorted(set(given) - set(CONVENTION_FIELDS))
    if unknown:
        raise GebError(f"unknown convention field '{unknown[0]}' (known: {', '.join(CONVENTION_FIELDS)})")
    Conventions(**given)  # validates the given values
    folder, cfg_raw, base = _open(path)
    tok, _ = release_tokenizer(folder, base.vocab_size, special_tokens, "plain")
    ids = tok.encode(text or VERIFY_TEXT, allow_special=False)[: min(max_tokens, base.max_seq_len) + 1]
    if len(ids) < 8:
        raise GebError("the verification text is too short")
    raw = read_release_weights(folder)
    # BF16 keeps a 1.3B model's copy small and fast on CPU; small models score in FP32.
    dtype = torch.bfloat16 if base.num_params() > 200_000_000 else torch.float32
    choices = [(given[f],) if f in given else allowed
               for f, allowed in zip(CONVENTION_FIELDS, (KV_ORDERS, MLP_ORDERS, ROPES))]
    results = []
    for kv, mlp, rope in itertools.product(*choices):
        conv = Conventions(kv, mlp, rope)
        cfg, sd = map_release(raw, base, conv, str(folder), dtype=dtype,
                              untie=cfg_raw.get("untie_embeddings_and_output_weights"))
        with torch.device("meta"):
            model = GEB(cfg)
        model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=False, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        model.reset_rope()
        # tokens 2..n given the first (the released model's document start is its own, not geb's)
        ppl = perplexity_of(Scorer(model, tok), ids[1:], start=ids[0])
        results.append({**asdict(conv), "perplexity": round(ppl, 3)})
        if log:
            log(f"  kv={kv:<11} mlp={mlp:<7} rope={rope:<11} perplexity {ppl:12.3f}")
        del model, sd
    results.sort(key=lambda r: r["perplexity"])
    best = results[0]
    runner_up = results[1] if len(results) > 1 else None
    margin = runner_up["perplexity"] / best["perplexity"] if runner_up else None
    sane = best["perplexity"] < min(200.0, 0.05 * tok.vocab_size)
    clear = margin is None or margin >= MIN_MARGIN
    if not sane:
        advice = ("no convention gives a sane perplexity: the checkpoint may not be in the expected layout "
                  "(or --special-tokens / the tokenizer do not match)")
    elif not clear:
        advice = (f"the best layout is not clearly better than the runner-up (ratio {margin:.3f} < {MIN_MARGIN}): "
                  "name the conventions you know (--kv-order, --mlp-order, --rope)")
    else:
        advice = "use the best convention"
    return {"tokens": len(ids), "given": given, "searched": [f for f in CONVENTION_FIELDS if f not in given],
            "results": results, "best": {k: best[k] for k in CONVENTION_FIELDS},
            "runner_up": {k: runner_up[k] for k in CONVENTION_FIELDS} if runner_up else None,
            "margin": None if margin is None else round(margin, 3), "min_margin": MIN_MARGIN,
            "sane": sane, "clear": clear, "advice": advice}


def _layout(r: dict) -> str:
    return " ".join(f"{k}={r[k]}" for k in CONVENTION_FIELDS)


def chosen_conventions(report: dict) -> Conventions:
    """The best layout of a `verify_conventions` report, or a GebError saying why it cannot be trusted."""
    res = report["results"]
    top = "; ".join(f"{_layout(r)}: perplexity {r['perplexity']}" for r in res[:2])
    if not report["sane"]:
        raise GebError(f"no layout gives a sane perplexity (best two: {top}), so nothing was chosen; the "
                       "checkpoint may not be in the GEB-1.3B layout, or the tokenizer / --special-tokens do not "
                       "match. To import anyway, run without --verify and name the conventions "
                       "(--kv-order, --mlp-order, --rope)")
    if not report["clear"]:
        raise GebError(f"the best layout is not clearly better than the runner-up: {top} (ratio "
                       f"{report['margin']}, at least {report['min_margin']} needed), so nothing was chosen; "
                       "name the conventions you know (--kv-order, --mlp-order, --rope) to narrow the search")
    return Conventions(**report["best"])
