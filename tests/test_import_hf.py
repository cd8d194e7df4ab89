"""`geb import hf`: a tiny random LlamaForCausalLM made here comes into geb with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from geb.errors import GebError  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llama(tmp_path, tokenizer, *, tied, heads, kv, name="hf", shard=None, head_dim=None):
    torch.manual_seed(11)
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim or 48 // heads, max_position_embeddings=128,
        rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    folder = tmp_path / name
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kw)
    tokenizer.save(folder)
    return model, folder


@pytest.mark.parametrize("tied,heads,kv,head_dim", [(False, 4, 2, None), (True, 6, 6, None), (False, 3, 1, 24)])
def test_import_matches_transformers(tmp_path, tokenizer, tied, heads, kv, head_dim):
    from geb.checkpoint import load_model
    from geb.interop.hf import import_hf

    hf, folder = _llama(tmp_path, tokenizer, tied=tied, heads=heads, kv=kv, head_dim=head_dim)
    import_hf(folder, tmp_path / "geb")
    model, tok, meta = load_model(tmp_path / "geb")
    assert (model.cfg.n_head, model.cfg.n_kv_head, model.cfg.tie_embeddings) == (heads, kv, tied)
    assert model.cfg.rope_base == 500.0 and meta["format"] == "hf"
    ids = torch.tensor([tok.encode("Hello 北京 2024 😀, the model imports.")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_sharded_checkpoint_and_cli(tmp_path, tokenizer, geb_cli):
    from geb.checkpoint import load_model

    hf, folder = _llama(tmp_path, tokenizer, tied=False, heads=4, kv=2, shard="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    geb_cli("import", "hf", folder, "--out", tmp_path / "geb", "--threads", "1")
    model, _, _ = load_model(tmp_path / "geb")
    ids = torch.arange(5, 30)[None]
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_bad_hf_inputs_leave_no_folder(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    from geb.interop.hf import import_hf

    _, folder = _llama(tmp_path, tokenizer, tied=False, heads=4, kv=2)
    st = folder / "model.safetensors"
    good = load_file(str(st))
    out = tmp_path / "out"

    def expect(pattern):
        with pytest.raises(GebError, match=pattern):
            import_hf(folder, out)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    save_file({**good, "model.layers.0.self_attn.q_proj.bias": torch.zeros(48)}, str(st))
    expect(r"model\.layers\.0\.self_attn\.q_proj\.bias")
    save_file({k: v for k, v in good.items() if "layers.1.mlp.up_proj" not in k}, str(st))
    expect(r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing")
    save_file(good, str(st))
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    expect("truncated")
    save_file(good, str(st))
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "intermediate_size": 80}))
    expect(r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape")
    cfg_path.write_text(json.dumps({**cfg, "model_type": "gemma"}))
    expect("model_type")
    cfg_path.write_text(json.dumps({**cfg, "model_type": "qwen2"}))  # Qwen2 without its q/k/v biases
    expect(r"'model\.layers\.0\.self_attn\.[qkv]_proj\.bias' is missing.*q/k/v biases")
    cfg_path.write_text(json.dumps(cfg))
    import_hf(folder, out)  # and the restored folder imports
    assert out.is_dir()


def test_tokenizer_without_chatml_needs_and_follows_a_chat_format(tmp_path, tokenizer):
    """A foreign tokenizer: refused without --chat-format; with one, geb and transformers render alike."""
    from tokenizers import Tokenizer as HFTokenizer

    from geb.checkpoint import load_model
    from geb.interop.hf import export_hf, import_hf

    _, folder = _llama(tmp_path, tokenizer, tied=True, heads=4, kv=2)
    tj = json.loads((folder / "tokenizer.json").read_text())
    rename = {"<|endoftext|>": "</s>", "<|im_start|>": "<|user|>", "<|im_end|>": "<|assistant|>"}
    for t in tj["added_tokens"]:
        t["content"] = rename[t["content"]]
    tj["model"]["vocab"] = {rename.get(k, k): v for k, v in tj["model"]["vocab"].items()}
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(GebError, match="chat-format"):
        import_hf(folder, tmp_path / "geb")
    fmt = {"name": "roles", "message": "<|{role}|>\n{content}</s>", "generation": "<|assistant|>\n",
           "eos": "</s>", "stop": ["</s>"]}
    (tmp_path / "fmt.json").write_text(json.dumps(fmt))
    with pytest.raises(GebError, match="<|system|>"):  # the format names a token the tokenizer lacks
        from geb.tokenizer import Tokenizer

        Tokenizer(HFTokenizer.from_file(str(folder / "tokenizer.json")), chat_format=__import__(
            "geb.chat_format", fromlist=["x"]).ChatFormat.from_dict({**fmt, "stop": ["<|system|>"]}))
    import_hf(folder, tmp_path / "geb", chat_format=str(tmp_path / "fmt.json"))
    _, tok, _ = load_model(tmp_path / "geb")
    eos = tok._tok.token_to_id("</s>")
    assert tok.stop_ids == [eos] and tok.eos_id == eos
    msgs = [{"role": "user", "content": "你好 </s>"}, {"role": "assistant", "content": "Hi 2024!"}]
    ids, mask = tok.render_chat(msgs, add_generation_prompt=False)
    assert ids.count(eos) == 2  # the "</s>" typed by the user stayed text
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "Hi 2024!</s>"
    export_hf(tmp_path / "geb", tmp_path / "hf2")
    t2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    msgs[0]["content"] = "你好"  # transformers' template would parse an injected token; geb's never does
    for gen in (False, True):
        got = t2.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        got = list(got["input_ids"] if not isinstance(got, list) else got)
        assert got == tok.render_chat(msgs, add_generation_prompt=gen)[0]
