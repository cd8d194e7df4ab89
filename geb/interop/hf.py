"""Hugging Face format both ways: `export_hf` writes a LlamaForCausalLM folder that transformers (and vLLM)
load with no custom code; `import_hf` reads a Llama-architecture folder (safetensors, tied or untied,
any head counts) into a geb folder.

A geb block is a Llama block exactly: RMSNorm → attention with RoPE (rotate-half) and grouped KV heads
→ RMSNorm → SwiGLU, no biases. An "interleaved" geb model is exported with its wq/wk rows permuted to
rotate-half; partial rotary (rope_dims) has no Llama equivalent and is refused. The export needs no
transformers (plain safetensors + JSON); import and the tests use it only to check.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from geb.common import read_json_object
from geb.config import ModelConfig
from geb.errors import GebError
from geb.interop.common import GebFolder, interleaved_to_half, read_sharded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# geb name (per layer) ↔ Hugging Face Llama name
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight", "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight", "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
}
_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


def hf_name(geb_name: str) -> str:
    if geb_name in _TOP:
        return _TOP[geb_name]
    _, i, rest = geb_name.split(".", 2)
    return f"model.layers.{i}.{_LAYER[rest]}"


def geb_name(name: str, n_layer: int, source: str) -> str:
    inv_top = {v: k for k, v in _TOP.items()}
    if name in inv_top:
        return inv_top[name]
    parts = name.split(".", 3)
    inv = {v: k for k, v in _LAYER.items()}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in inv:
        if int(parts[2]) >= n_layer:
            raise GebError(f"{source}: tensor '{name}' is beyond num_hidden_layers = {n_layer}")
        return f"layers.{parts[2]}.{inv[parts[3]]}"
    raise GebError(f"{source}: unknown tensor '{name}' (not part of LlamaForCausalLM/Qwen2ForCausalLM)")


def hf_config(cfg: ModelConfig, tok, dtype: str) -> dict:
    """config.json for a geb ModelConfig; `tok` (a geb Tokenizer) gives bos (document start) and eos."""
    # q/k/v biases without an o_proj bias are Qwen2's layout (Llama's attention_bias adds all four).
    arch = ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama")
    return {
        "architectures": [arch[0]], "model_type": arch[1],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0, "pretraining_tp": 1,
        # transformers 4.x reads rope_theta/rope_scaling, 5.x reads rope_parameters: write both.
        "rope_theta": cfg.rope_base, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "bos_token_id": tok.doc_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
        "torch_dtype": dtype, "use_cache": True,
    }


def export_hf(model_dir: str | Path, out: str | Path, dtype: str = "float32") -> dict:
    """Write a geb folder as a Hugging Face Llama folder (config, safetensors, tokenizer, generation config)."""
    from safetensors.torch import save_file

    from geb.common import AtomicFolder

    if dtype not in DTYPES:
        raise GebError(f"unknown dtype {dtype!r} (choose from: {', '.join(DTYPES)})")
    src = GebFolder(model_dir)
    c = src.cfg
    if c.rotary_dims != c.head_dim:
        raise GebError(f"{src.folder}: config field 'rope_dims' = {c.rope_dims} (partial rotary) has no Llama "
                       "equivalent in transformers; export to GGUF instead")
    from geb.tokenizer import Tokenizer

    tok = Tokenizer.load(src.folder)
    sd = {}
    for name in src.shapes:
        w = src.tensor(name)
        if c.rope_style == "interleaved" and name.endswith(("attn.wq.weight", "attn.wk.weight", "attn.wq.bias",
                                                            "attn.wk.bias")):
            heads = c.n_head if ".wq." in name else c.n_kv_head
            w = interleaved_to_half(w, heads, c.head_dim, c.head_dim)
        sd[hf_name(name)] = w.to(DTYPES[dtype]).contiguous()
    config = hf_config(c, tok, dtype)
    stops = tok.stop_ids
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": stops or config["eos_token_id"],
           "pad_token_id": config["pad_token_id"], "do_sample": True, "temperature": 0.7, "top_p": 0.9,
           "repetition_penalty": 1.05}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFolder(out, kind="hf") as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tok.save(tmp)  # tokenizer.json and tokenizer_config.json with the bos/eos config.json names
        readme = (f"# {src.folder.name}\n\nExported from a geb model folder ({c.num_params():,} parameters). "
                  "Load with `transformers.AutoModelForCausalLM.from_pretrained(path)`; the chat template is "
                  "in tokenizer_config.json.\n")
        (tmp / "README.md").write_text(readme)
    return {"path": str(out), "dtype": dtype, "tensors": len(sd), "parameters": c.num_params()}


# -- import ----------------------------------------------------------------------------------------------
def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    def load_st(f: Path):
        try:
            return load_file(str(f))
        except Exception as e:
            raise GebError(f"{f}: cannot read weights ({e}); the file may be truncated or corrupt") from None

    if (folder / "model.safetensors").is_file():
        return load_st(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return read_sharded(index, load_st)
    raise GebError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def hf_to_geb_config(hc: dict, source: str) -> ModelConfig:
    def need(k):
        if k not in hc:
            raise GebError(f"{source}: missing field '{k}'")
        return hc[k]

    arch = hc.get("model_type")
    if arch not in ("llama", "mistral", "qwen2"):
        raise GebError(f"{source}: field 'model_type' = {arch!r}: only llama, mistral and qwen2 models can be "
                       f"imported (geb has no {arch!r} blocks)")
    if hc.get("attention_bias") or hc.get("mlp_bias"):
        what = "attention_bias" if hc.get("attention_bias") else "mlp_bias"
        raise GebError(f"{source}: field '{what}' is true; geb supports biases only on q/k/v (Qwen2), not on "
                       "o_proj or the MLP")
    if hc.get("hidden_act", "silu") != "silu":
        raise GebError(f"{source}: field 'hidden_act' = {hc['hidden_act']!r}; geb uses SwiGLU (silu)")
    rp = hc.get("rope_parameters") or {}
    rs = hc.get("rope_scaling") or {}
    rtype = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if rtype != "default":
        raise GebError(f"{source}: field 'rope_scaling' type {rtype!r} is not supported")
    # Within the sliding window, windowed attention is full attention: cap the context there.
    window = hc.get("sliding_window") if arch == "mistral" or hc.get("use_sliding_window") else None
    max_len = hc.get("max_position_embeddings", 4096)
    if isinstance(window, int) and 0 < window < max_len:
        max_len = window
    if float(hc.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))) != 1.0:
        raise GebError(f"{source}: field 'partial_rotary_factor' != 1 is not supported for Llama imports")
    d, nh = need("hidden_size"), need("num_attention_heads")
    return ModelConfig(
        name=hc.get("_name_or_path") or "hf-import", vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"),
        d_model=d, n_head=nh, n_kv_head=hc.get("num_key_value_heads") or nh,
        head_dim=hc.get("head_dim") or d // nh, ffn_hidden=need("intermediate_size"),
        max_seq_len=max_len,
        rope_base=float(rp.get("rope_theta", hc.get("rope_theta", 10000.0))), rope_style="half",
        norm_eps=float(hc.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hc.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
    )


def _check_shapes(cfg: ModelConfig, sd: dict[str, torch.Tensor], weights: Path) -> None:
    """Weights that disagree with config.json are named by their Hugging Face name and file."""
    from geb.model import GEB

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GEB(cfg).state_dict().items()}
    for k, v in sd.items():
        if k in expected and tuple(v.shape) != expected[k]:
            raise GebError(f"{weights}: tensor '{hf_name(k)}' has shape {tuple(v.shape)}, but config.json "
                           f"implies {expected[k]}")
    missing = sorted(set(expected) - set(sd) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise GebError(f"{weights}: tensor '{hf_name(missing[0])}' is missing (config.json: "
                       f"{'qwen2 with q/k/v biases' if cfg.qkv_bias else 'no biases'}, "
                       f"num_hidden_layers = {cfg.n_layer})")


def import_hf(path: str | Path, out: str | Path, chat_format=None) -> Path:
    """Import a Hugging Face Llama folder (config.json, safetensors, tokenizer.json) into a geb folder."""
    from tokenizers import Tokenizer as HFTokenizer

    from geb.chat_format import resolve
    from geb.interop.common import write_geb_folder
    from geb.tokenizer import Tokenizer, token_text

    folder = Path(path)
    if not folder.is_dir():
        raise GebError(f"{folder}: Hugging Face model folder not found")
    cfg_json = read_json_object(folder / "config.json", "model config file")
    cfg = hf_to_geb_config(cfg_json, str(folder / "config.json"))
    raw = _read_hf_weights(folder)
    if cfg.tie_embeddings:
        raw.pop("lm_head.weight", None)  # some tied checkpoints still store the (shared) head
    weights = folder / ("model.safetensors" if (folder / "model.safetensors").is_file() else
                        "model.safetensors.index.json")
    for k in raw:
        if k.endswith(".bias") and not cfg.qkv_bias:
            raise GebError(f"{weights}: unexpected tensor '{k}': config.json's model_type "
                           f"{cfg_json.get('model_type')!r} has no biases (Qwen2 folders have q/k/v biases)")
    sd = {geb_name(k, cfg.n_layer, str(weights)): v.float() for k, v in raw.items()
          if not k.endswith("rotary_emb.inv_freq")}
    _check_shapes(cfg, sd, weights)
    tfile = folder / "tokenizer.json"
    if not tfile.is_file():
        raise GebError(f"{tfile}: not found (geb needs the fast tokenizer file)")
    try:
        hf_tok = HFTokenizer.from_file(str(tfile))
    except Exception as e:
        raise GebError(f"{tfile}: not a valid tokenizer.json ({e})") from None
    fmt = resolve(chat_format)
    # The folder's own chat template and bos/eos carry over; --chat-format replaces the template.
    tc_file = folder / "tokenizer_config.json"
    tc = read_json_object(tc_file, "tokenizer config") if tc_file.is_file() else {}
    template = tc.get("chat_template") if fmt is None else None
    if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise GebError(f"{tc_file}: field 'chat_template' must be a string or a list with a 'default' template")
    specials = {"bos": token_text(tc, "bos_token"), "eos": token_text(tc, "eos_token")}
    specials = {k: v for k, v in specials.items() if v is not None and hf_tok.token_to_id(v) is not None}
    try:
        tok = Tokenizer(hf_tok, source=str(tfile), chat_format=fmt, chat_template=template,
                        **(specials if fmt is None else {}))
    except GebError as e:
        if fmt is not None:
            raise
        raise GebError(f"{e}; choose a chat format with --chat-format (chatml, chatglm3, plain or a JSON file)") from None
    if tok.vocab_size > cfg.vocab_size:
        raise GebError(f"{tfile}: the tokenizer has {tok.vocab_size} tokens but config.json field 'vocab_size' "
                       f"(the rows of model.embed_tokens.weight) is {cfg.vocab_size}")
    meta = {"stage": "import", "parent": str(folder.resolve()), "format": "hf"}
    return write_geb_folder(out, cfg, sd, tok, meta, source=str(folder))
