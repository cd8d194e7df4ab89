"""GGUF export/import: bit-exact quantizers, RoPE layout, round trips, bad input, and llama.cpp parity."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from geb.errors import GebError  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")

BILINGUAL = ("GEB-1.3B was trained on 550B tokens in 2024. 北京是中国的首都，人口约2189万。"
             "Emoji 😀🎉 and rare CJK 𠀀𪚥 survive.\n\n  def f(x):\n\treturn x**2  # 代码")


def _save(folder, cfg, tokenizer, seed=0, scale=1.0):
    from geb.checkpoint import save_checkpoint
    from geb.model import GEB

    model = GEB(cfg)
    model.init_weights(seed=seed)
    if scale != 1.0:  # larger weights give peaked logits, so greedy choices are far from ties
        with torch.no_grad():
            for n, p in model.named_parameters():
                if not n.endswith("norm.weight"):
                    p.mul_(scale)
    save_checkpoint(folder, model, tokenizer, {"stage": "random", "parent": None})
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_quantizers_match_gguf_reference_bit_for_bit():
    from geb.interop.gguf import quantize_q4_0, quantize_q8_0

    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[0, :32] = 0  # all-zero block: scale 0
    w[1, :32] = 0.25
    w[1, 7] = -0.25  # magnitude ties: the first one sets the sign
    w[2] *= 1e4
    w[3, :32] = torch.arange(32) / 254.0  # values landing on .5 steps exercise round-half-away
    for ours, qtype in ((quantize_q8_0, gguf.GGMLQuantizationType.Q8_0),
                        (quantize_q4_0, gguf.GGMLQuantizationType.Q4_0)):
        ref = gguf.quants.quantize(w.numpy(), qtype)
        got = ours(w, chunk=1000)  # small chunks: the chunk loop is covered too
        assert got.dtype == np.uint8 and got.shape == ref.shape
        assert np.array_equal(got, ref), qtype.name


@pytest.mark.parametrize("rot", [0, 8])
def test_rope_permutation_equals_geb_interleaved_rope(tiny_cfg, rot):
    """half→interleaved row order + geb's own interleaved RoPE gives the rotate-half model's logits."""
    from geb.interop.common import half_to_interleaved, interleaved_to_half
    from geb.model import GEB

    cfg = tiny_cfg.replace(rope_dims=rot)
    half = GEB(cfg)
    half.init_weights(seed=3)
    inter = GEB(cfg.replace(rope_style="interleaved"))
    sd = dict(half.state_dict())
    r = cfg.rotary_dims
    for k in list(sd):
        if k.endswith("attn.wq.weight"):
            sd[k] = half_to_interleaved(sd[k], cfg.n_head, cfg.head_dim, r)
            assert torch.equal(interleaved_to_half(sd[k], cfg.n_head, cfg.head_dim, r), half.state_dict()[k])
        elif k.endswith("attn.wk.weight"):
            sd[k] = half_to_interleaved(sd[k], cfg.n_kv_head, cfg.head_dim, r)
    inter.load_state_dict(sd)
    ids = list(range(3, 40))
    a, b = _logits(half, ids), _logits(inter, ids)
    assert torch.allclose(a, b, atol=1e-5)
    plain = GEB(cfg.replace(rope_style="interleaved"))
    plain.load_state_dict(half.state_dict())  # without the permutation the logits must differ
    assert not torch.allclose(a, _logits(plain, ids), atol=1e-3)


@pytest.mark.parametrize("variant", ["untied", "tied-interleaved"])
def test_f32_round_trip_is_exact(tmp_path, tokenizer, tiny_cfg, variant):
    from geb.checkpoint import load_model
    from geb.interop.gguf import export_gguf, import_gguf

    cfg = tiny_cfg if variant == "untied" else tiny_cfg.replace(tie_embeddings=True, rope_style="interleaved")
    model = _save(tmp_path / "m", cfg, tokenizer)
    info = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    assert info["tensor_types"] == {"f32": 2 + 9 * cfg.n_layer + (0 if cfg.tie_embeddings else 1)}
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert ("output.weight" in names) == (not cfg.tie_embeddings)
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    back, tok, meta = load_model(tmp_path / "back")
    assert back.cfg.tie_embeddings == cfg.tie_embeddings and meta["format"] == "gguf"
    ids = tokenizer.encode(BILINGUAL)
    assert tok.encode(BILINGUAL) == ids
    assert tok.hash() == tokenizer.hash()
    a, b = _logits(model, ids), _logits(back, ids)
    # Bit-exact when no permutation happened; an interleaved model comes back rotate-half (same math).
    assert torch.equal(a, b) if cfg.rope_style == "half" else torch.allclose(a, b, atol=1e-5)


def test_metadata_and_quantized_exports(tmp_path, tokenizer, tiny_cfg):
    from geb.interop.common import half_to_interleaved
    from geb.interop.gguf import export_gguf, import_gguf

    cfg = tiny_cfg.replace(ffn_hidden=192)  # every row a multiple of 32: all matrices quantize
    model = _save(tmp_path / "m", cfg, tokenizer)
    ref_q = half_to_interleaved(model.layers[1].attn.wq.weight.detach(), cfg.n_head, cfg.head_dim, cfg.head_dim)
    errs = {}
    for kind, want, out_kind in (("bf16", "BF16", "BF16"), ("q8_0", "Q8_0", "Q8_0"), ("q4_0", "Q4_0", "Q8_0")):
        f = tmp_path / f"m-{kind}.gguf"
        export_gguf(tmp_path / "m", f, kind)
        r = gguf.GGUFReader(str(f))
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.1.attn_q.weight"] == want and types["output.weight"] == out_kind
        assert types["blk.0.attn_norm.weight"] == "F32"
        t = next(t for t in r.tensors if t.name == "blk.1.attn_q.weight")
        deq = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        errs[kind] = (deq - ref_q).abs().max().item()
        if kind == "q8_0":
            field = lambda k: r.get_field(k).contents()  # noqa: E731
            assert field("general.architecture") == "llama"
            assert field("llama.attention.head_count_kv") == cfg.n_kv_head
            assert field("llama.rope.dimension_count") == cfg.head_dim
            assert field("tokenizer.ggml.pre") == "qwen2"
            assert field("tokenizer.chat_template") == tokenizer_template(tokenizer)
            toks = field("tokenizer.ggml.tokens")
            assert len(toks) == cfg.vocab_size and toks[tokenizer.im_end_id] == "<|im_end|>"
            assert field("tokenizer.ggml.eos_token_id") == tokenizer.im_end_id
            assert field("general.file_type") == 7
    amax = ref_q.abs().max().item()
    assert errs["bf16"] < amax / 100 and errs["q8_0"] < amax / 100 and errs["q4_0"] < amax / 6
    assert errs["q4_0"] > errs["q8_0"] > errs["bf16"]
    export_gguf(tmp_path / "m", tmp_path / "e.gguf", "q4_0", output_type="bf16", embedding_type="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "e.gguf")).tensors}
    assert (types["token_embd.weight"], types["output.weight"], types["blk.0.ffn_up.weight"]) == ("Q8_0", "BF16", "Q4_0")
    import_gguf(tmp_path / "m-q4_0.gguf", tmp_path / "back")  # quantized files import too
    assert (tmp_path / "back" / "model.safetensors").is_file()


def tokenizer_template(tok) -> str:
    from geb.tokenizer import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def test_rows_not_multiple_of_32_fall_back_to_f32(tmp_path, tokenizer, tiny_cfg):
    from geb.interop.gguf import export_gguf

    assert tiny_cfg.ffn_hidden % 32  # geb-test's 176: ffn_down rows cannot be blocked
    _save(tmp_path / "m", tiny_cfg, tokenizer)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "Q8_0"


def test_bad_gguf_inputs_leave_no_folder(tmp_path, tokenizer, tiny_cfg, monkeypatch):
    import geb.interop.gguf as G

    _save(tmp_path / "m", tiny_cfg, tokenizer)
    good = tmp_path / "good.gguf"
    G.export_gguf(tmp_path / "m", good, "f32")

    def expect(path, pattern):
        out = tmp_path / "out"
        with pytest.raises(GebError, match=pattern):
            G.import_gguf(path, out)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    expect(trunc, "truncated")

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file(), w.close()
    expect(tmp_path / "gpt2.gguf", "general.architecture")

    plan = G._tensor_plan
    rename = lambda *a: [(g.replace("attn_q", "attn_qq"), *r) for g, *r in plan(*a)]  # noqa: E731
    monkeypatch.setattr(G, "_tensor_plan", rename)
    G.export_gguf(tmp_path / "m", tmp_path / "unknown.gguf", "f32")
    expect(tmp_path / "unknown.gguf", "blk.0.attn_qq.weight")
    monkeypatch.setattr(G, "_tensor_plan", lambda *a: [p for p in plan(*a) if p[0] != "blk.1.ffn_up.weight"])
    G.export_gguf(tmp_path / "m", tmp_path / "missing.gguf", "f32")
    expect(tmp_path / "missing.gguf", "layers.1.ffn.w_up.weight")
    monkeypatch.undo()

    # Export side: a config that disagrees with the tensors, and no half-written .gguf on failure.
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "m", bad)
    cfg = (bad / "config.json").read_text().replace('"ffn_hidden": 176', '"ffn_hidden": 160')
    (bad / "config.json").write_text(cfg)
    with pytest.raises(GebError, match="ffn.w_gate.weight"):
        G.export_gguf(bad, tmp_path / "bad.gguf", "f32")
    assert not list(tmp_path.glob("*bad.gguf*"))
    with pytest.raises(GebError, match="q5_0"):
        G.export_gguf(tmp_path / "m", tmp_path / "x.gguf", "q5_0")
    cfg = (tmp_path / "m" / "config.json").read_text().replace('"rope_dims": 0', '"rope_dims": 8')
    (bad / "config.json").write_text(cfg)
    with pytest.raises(GebError, match="rope_dims"):
        G.export_gguf(bad, tmp_path / "bad.gguf", "f32")
    assert not list(tmp_path.glob("*bad.gguf*"))


def test_cli_export_and_import(tmp_path, tiny_model_dir, geb_cli):
    out = tmp_path / "t.gguf"
    p = geb_cli("export", "gguf", "--model", tiny_model_dir, "--out", out, "--type", "q8_0", "--threads", "1")
    assert '"q8_0"' in p.stdout
    from geb.interop.gguf import export_gguf

    export_gguf(tiny_model_dir, tmp_path / "lib.gguf", "q8_0")  # the CLI writes what the library writes
    assert out.read_bytes() == (tmp_path / "lib.gguf").read_bytes()
    p = geb_cli("import", "gguf", tmp_path / "none.gguf", "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "none.gguf" in p.stderr and "Traceback" not in p.stderr


# -- llama.cpp itself (optional) -----------------------------------------------------------------------
def test_llama_cpp_tokenizes_and_generates_like_geb(tmp_path, tokenizer, tiny_cfg):
    llama_cpp = pytest.importorskip("llama_cpp")
    from geb.interop.gguf import export_gguf

    cfg = tiny_cfg.replace(n_layer=3)
    model = _save(tmp_path / "m", cfg, tokenizer, seed=7, scale=4.0)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    # An F32 KV cache (llama.cpp defaults to F16) makes the comparison tight.
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=cfg.max_seq_len, n_threads=1,
                          n_batch=cfg.max_seq_len, logits_all=True, verbose=False, type_k=0, type_v=0)
    ids = tokenizer.encode(BILINGUAL)
    assert llm.tokenize(BILINGUAL.encode(), add_bos=False, special=False) == ids
    for text in ("2024年3月15日，温度是-3.5°C。", "  multiple   spaces\n\n\nand tabs\t\t!", "日本語とEnglish混合テキスト"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text

    prompt = ids[:24]
    llm.reset()
    llm.eval(prompt)
    ref = _logits(model, prompt)
    got = torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32))
    assert (got - ref).abs().max().item() <= 1e-4

    seq, margins = list(prompt), []
    for _ in range(32):
        last = _logits(model, seq)[-1]
        top = torch.topk(last, 2).values
        margins.append((top[0] - top[1]).item())
        seq.append(int(last.argmax()))
    assert min(margins) > 1e-3  # the model's greedy choices are not near-ties: the comparison is meaningful
    llm.reset()
    out = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(t)
        if len(out) == 32:
            break
    llm.close()
    assert out == seq[len(prompt):]
