"""`geb import geb`: tiny checkpoints written here in the released GEB-1.3B layout (Megatron/ChatGLM names,
BF16 shards + index, a SentencePiece model trained here) import with the right math in every layout
variant the importer accepts, and --verify finds the layout a trained model was written in, keeps the
conventions it is given, and refuses when the answer is not clear."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")

from geb.errors import GebError  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "GEB-1.3B 在 2024 年发布。 The capital of France is Paris! 北京是中国的首都。 1234 😀 𠀀"


# -- writing the release layout (independently of geb.interop) -------------------------------------------------
def _perm_from_half(heads: int, hd: int, rope: str) -> torch.Tensor:
    """Index p with release_rows = geb_rows[p], for geb's rotate-half rows → the release's rope layout."""
    rot = {"half": hd, "interleaved": hd, "chatglm": hd // 2}[rope]
    idx = []
    for h in range(heads):
        row = list(range(hd))
        if rope != "half":  # adjacent pairs: release dim 2i+c holds geb dim i + c*rot/2
            row[:rot] = [i + c * rot // 2 for i in range(rot // 2) for c in (0, 1)]
        idx += [h * hd + r for r in row]
    return torch.tensor(idx)


def write_release(folder, model, sp_bytes, *, kv_order="interleaved", mlp_order="gate-up", rope="half",
                  shards=2, output="untied", fused=False, legacy_names=False, wrapper=False, config=None):
    """Save `model` in the release layout. output: "untied" (an output layer, config says untied), "tied"
    (none, config says tied) or "missing" (none, config silent). fused: one query_key_value tensor.
    legacy_names: `transformer.layers.N.`, `transformer.word_embeddings`, `transformer.final_layernorm`.
    wrapper: one pytorch_model.bin holding {"model": state_dict, "iteration": 7}. config: fields to add
    to config.json (None deletes one)."""
    c = model.cfg
    hd = c.head_dim
    layers = "transformer.layers." if legacy_names else "transformer.encoder.layers."
    emb = "transformer.word_embeddings.weight" if legacy_names else "transformer.embedding.word_embeddings.weight"
    sd = {emb: model.tok_emb.weight}
    for i, blk in enumerate(model.layers):
        p = f"{layers}{i}."
        wk = blk.attn.wk.weight[_perm_from_half(c.n_kv_head, hd, rope)]
        wv = blk.attn.wv.weight
        if kv_order == "interleaved":
            kv = torch.cat([torch.cat([wk[h * hd:(h + 1) * hd], wv[h * hd:(h + 1) * hd]]) for h in range(c.n_kv_head)])
        else:
            kv = torch.cat([wk, wv])
        q = blk.attn.wq.weight[_perm_from_half(c.n_head, hd, rope)]
        if fused:
            sd[p + "self_attention.query_key_value.weight"] = torch.cat([q, kv])
        else:
            sd[p + "self_attention.query.weight"] = q
            sd[p + "self_attention.key_value.weight"] = kv
        gate, up = blk.ffn.w_gate.weight, blk.ffn.w_up.weight
        sd.update({
            p + "input_layernorm.weight": blk.attn_norm.weight,
            p + "self_attention.dense.weight": blk.attn.wo.weight,
            p + "post_attention_layernorm.weight": blk.ffn_norm.weight,
            p + "mlp.dense_h_to_4h.weight": torch.cat([gate, up] if mlp_order == "gate-up" else [up, gate]),
            p + "mlp.dense_4h_to_h.weight": blk.ffn.w_down.weight,
        })
    sd["transformer.final_layernorm.weight" if legacy_names else "transformer.encoder.final_layernorm.weight"] = \
        model.norm.weight
    if output == "untied":
        sd["transformer.output_layer.weight"] = model.lm_head.weight
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}
    folder.mkdir(parents=True)
    if wrapper:
        torch.save({"model": sd, "iteration": 7}, folder / "pytorch_model.bin")
    else:
        names = list(sd)
        wm = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: sd[k] for k in part}, folder / fname)
            wm.update({k: fname for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg = {
        "num_layers": c.n_layer, "padded_vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "ffn_hidden_size": c.ffn_hidden, "kv_channels": hd, "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head, "layernorm_epsilon": c.norm_eps, "seq_length": c.max_seq_len,
        "add_bias_linear": False, "add_qkv_bias": False, "rmsnorm": True, "torch_dtype": "bfloat16",
    }
    if output != "missing":
        cfg["untie_embeddings_and_output_weights"] = output == "untied"
    for k, v in (config or {}).items():
        cfg.pop(k) if v is None else cfg.__setitem__(k, v)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.model").write_bytes(sp_bytes)
    return sd


def _bf16_round(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model():
    from conftest import SAMPLE_TEXT
    from geb.interop.geb_release import VERIFY_TEXT

    lines = SAMPLE_TEXT[:8] + VERIFY_TEXT.splitlines() + [TEXT]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 20), model_writer=buf, vocab_size=700,
                                   model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return buf.getvalue()


@pytest.fixture(scope="module")
def release_cfg(sp_model):
    from geb.config import get_preset, pad_vocab
    from geb.interop.geb_release import DEFAULT_SPECIALS

    n = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size() + len(DEFAULT_SPECIALS)
    return get_preset("geb-test").replace(vocab_size=pad_vocab(n), ffn_hidden=96)


def _train(cfg, sp_model, steps=120):
    """A tiny model that has learned the --verify text (so only its true layout reads it well).

    It starts from weights 12x geb's initial ones (std 0.24): pre-activations of order 1, as in a real
    trained model, so SiLU and attention are far from linear. From geb's small initial weights a model
    that learns the text by heart stays nearly linear, and swapping gate and up, or one RoPE variant for
    another, gives nearly the same function: no layout would then be clearly better than the next."""
    from geb.interop.geb_release import VERIFY_TEXT
    from geb.model import GEB

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    ids = torch.tensor(sp.encode(VERIFY_TEXT))
    torch.manual_seed(0)
    model = GEB(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):  # one torch thread (the module's one_torch_thread fixture)
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _bf16_round(model.eval())


@pytest.fixture(scope="module")
def trained(sp_model, release_cfg):
    """Learned the --verify text, with ChatGLM-style partial RoPE and 2 KV heads."""
    return _train(release_cfg.replace(rope_dims=release_cfg.head_dim // 2), sp_model)


@pytest.fixture(scope="module")
def trained_mqa(sp_model, release_cfg):
    """Learned the --verify text, RoPE over the whole head and one KV head (multi-query attention): with
    one KV head both key_value orders are the same tensor, so --verify cannot tell them apart."""
    return _train(release_cfg.replace(n_kv_head=1), sp_model)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


# -- tests ------------------------------------------------------------------------------------------------------
def test_mapping_math_for_the_expected_layout(tmp_path, sp_model, release_cfg):
    from geb.checkpoint import load_model
    from geb.interop.geb_release import Conventions, import_geb_release
    from geb.model import GEB

    model = GEB(release_cfg)
    model.init_weights(seed=1)
    with torch.no_grad():
        for blk in model.layers:  # distinct norms, so a swapped norm would show
            blk.attn_norm.weight.uniform_(0.5, 1.5)
            blk.ffn_norm.weight.uniform_(0.5, 1.5)
    _bf16_round(model)
    sd = write_release(tmp_path / "rel", model, sp_model)
    assert sd["transformer.encoder.layers.0.self_attention.key_value.weight"].shape == (2 * release_cfg.kv_dim, 64)
    assert sd["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"].dtype == torch.bfloat16
    import_geb_release(tmp_path / "rel", tmp_path / "geb", Conventions(), dtype="float32")
    back, tok, meta = load_model(tmp_path / "geb")
    assert meta["conventions"] == {"kv_order": "interleaved", "mlp_order": "gate-up", "rope": "half"}
    assert back.cfg.rope_dims == 0 and not back.cfg.tie_embeddings
    ids = tok.encode(TEXT)
    assert torch.allclose(_logits(back, ids), _logits(model, ids), atol=1e-5)
    # a wrong convention must change the result (the options are not no-ops)
    import_geb_release(tmp_path / "rel", tmp_path / "wrong", Conventions(kv_order="split"), dtype="float32")
    wrong, _, _ = load_model(tmp_path / "wrong")
    assert not torch.allclose(_logits(wrong, ids), _logits(model, ids), atol=1e-3)


def test_tokenizer_matches_sentencepiece_and_carries_specials(tmp_path, sp_model, trained):
    from geb.checkpoint import load_model
    from geb.interop.geb_release import DEFAULT_SPECIALS, Conventions, import_geb_release

    write_release(tmp_path / "rel", trained, sp_model, kv_order="split", mlp_order="up-gate", rope="chatglm")
    import_geb_release(tmp_path / "rel", tmp_path / "geb", Conventions("split", "up-gate", "chatglm"))
    model, tok, meta = load_model(tmp_path / "geb")
    assert model.cfg.rope_dims == model.cfg.head_dim // 2
    assert next(model.parameters()).dtype == torch.bfloat16  # stored as released
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    for text in (TEXT, "长江是中国最长的河流，全长约六千三百公里。", "  two  spaces\nand\ttabs ", " leading space", "ｆｕｌｌ　ｗｉｄｔｈ"):
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    n = sp.get_piece_size()
    assert [tok._tok.token_to_id(s) for s in DEFAULT_SPECIALS] == list(range(n, n + len(DEFAULT_SPECIALS)))
    assert meta["chat_format"]["name"] == "chatglm3"
    ids, mask = tok.render_chat([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi"}])
    sid = tok._tok.token_to_id
    assert ids[:3] == [sid("[gMASK]"), sid("<sop>"), sid("<|user|>")]
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=True).strip() == "Hi"
    assert tok.stop_ids == [sid("<|user|>"), sid("<|observation|>"), sid("<eod>")]
    # the imported weights reproduce the trained model (BF16 storage, FP32 compute)
    ids = tok.encode(TEXT)
    assert torch.allclose(_logits(model.float(), ids), _logits(trained, ids), atol=1e-4)


# Each variant: (write_release keywords, the model's config changes, Conventions, the rope_base expected).
VARIANTS = {
    "rope-interleaved": (dict(rope="interleaved", kv_order="split"), {}, ("split", "gate-up", "interleaved"), 1e4),
    "fused-query_key_value": (dict(fused=True, rope="chatglm"), {"rope_dims": 8}, ("interleaved", "gate-up", "chatglm"), 1e4),
    "legacy-transformer.layers": (dict(legacy_names=True, mlp_order="up-gate"), {}, ("interleaved", "up-gate", "half"), 1e4),
    "model-wrapper": (dict(wrapper=True), {}, ("interleaved", "gate-up", "half"), 1e4),
    "tied-output": (dict(output="tied"), {"tie_embeddings": True}, ("interleaved", "gate-up", "half"), 1e4),
    "missing-output": (dict(output="missing"), {"tie_embeddings": True}, ("interleaved", "gate-up", "half"), 1e4),
    "rope_ratio": (dict(config={"rope_ratio": 50}), {"rope_base": 5e5}, ("interleaved", "gate-up", "half"), 5e5),
    "rotary_base": (dict(config={"rotary_base": 2e4}), {"rope_base": 2e4}, ("interleaved", "gate-up", "half"), 2e4),
    "rope_theta-and-ratio": (dict(config={"rope_theta": 2e4, "rope_ratio": 3}), {"rope_base": 6e4},
                             ("interleaved", "gate-up", "half"), 6e4),
    "multi_query_group_num": (dict(config={"num_key_value_heads": None, "multi_query_group_num": 1}),
                              {"n_kv_head": 1}, ("split", "gate-up", "half"), 1e4),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mapping_math_for_each_layout_variant(tmp_path, sp_model, release_cfg, variant):
    """Every branch of the reader: written here in that variant, imported with the true conventions, the
    model gives the original's logits and the config the original's shape (tied, rope base, KV heads)."""
    from geb.checkpoint import load_model
    from geb.interop.geb_release import Conventions, import_geb_release
    from geb.model import GEB

    kw, changes, conv, base = VARIANTS[variant]
    model = GEB(release_cfg.replace(**changes))
    model.init_weights(seed=2)
    with torch.no_grad():
        for blk in model.layers:
            blk.attn_norm.weight.uniform_(0.5, 1.5)
    _bf16_round(model)
    sd = write_release(tmp_path / "rel", model, sp_model, **kw)
    assert ("transformer.output_layer.weight" in sd) == (kw.get("output", "untied") == "untied")
    import_geb_release(tmp_path / "rel", tmp_path / "geb", Conventions(*conv), dtype="float32")
    back, tok, meta = load_model(tmp_path / "geb")
    c = model.cfg
    assert (back.cfg.tie_embeddings, back.cfg.n_kv_head, back.cfg.rope_base, back.cfg.rope_dims) == \
        (c.tie_embeddings, c.n_kv_head, base, c.rope_dims)
    assert meta["conventions"] == dict(zip(("kv_order", "mlp_order", "rope"), conv))
    ids = tok.encode(TEXT)
    assert torch.allclose(_logits(back, ids), _logits(model, ids), atol=1e-5)


def test_output_layer_and_config_must_agree(tmp_path, sp_model, release_cfg):
    from geb.interop.geb_release import import_geb_release
    from geb.model import GEB

    model = GEB(release_cfg)
    write_release(tmp_path / "a", model, sp_model, output="untied", config={"untie_embeddings_and_output_weights": False})
    with pytest.raises(GebError, match=r"'transformer\.output_layer\.weight' is present but .*untie_embeddings_and_output_weights' is false"):
        import_geb_release(tmp_path / "a", tmp_path / "out")
    write_release(tmp_path / "b", model, sp_model, output="missing", config={"untie_embeddings_and_output_weights": True})
    with pytest.raises(GebError, match=r"missing tensor 'transformer\.output_layer\.weight' .*is true"):
        import_geb_release(tmp_path / "b", tmp_path / "out")
    assert not (tmp_path / "out").exists()


LAYOUT = ("kv_order", "mlp_order", "rope")


def test_verify_finds_the_layout(tmp_path, sp_model, trained):
    from geb.interop.geb_release import MIN_MARGIN, Conventions, chosen_conventions, verify_conventions

    write_release(tmp_path / "rel", trained, sp_model, kv_order="split", mlp_order="up-gate", rope="chatglm")
    rep = verify_conventions(tmp_path / "rel")
    assert rep["best"] == {"kv_order": "split", "mlp_order": "up-gate", "rope": "chatglm"}
    assert rep["given"] == {} and rep["searched"] == list(LAYOUT) and len(rep["results"]) == 12
    assert rep["sane"] and rep["clear"] and rep["margin"] >= 2 * MIN_MARGIN  # room to spare (docs/interop.md)
    assert chosen_conventions(rep) == Conventions("split", "up-gate", "chatglm")
    best = rep["results"][0]["perplexity"]
    # A 2-layer model that memorised the text still tells a wrong K/V split apart by far.
    assert all(r["perplexity"] > 5 * best for r in rep["results"] if r["kv_order"] != "split")


def test_verify_finds_interleaved_rope_when_the_kv_order_is_given(tmp_path, sp_model, trained_mqa):
    """Full-head adjacent-pair RoPE and one KV head named by multi_query_group_num; the given kv_order is
    kept and only the other two conventions are searched."""
    from geb.interop.geb_release import MIN_MARGIN, chosen_conventions, verify_conventions

    write_release(tmp_path / "rel", trained_mqa, sp_model, mlp_order="up-gate", rope="interleaved",
                  config={"num_key_value_heads": None, "multi_query_group_num": 1})
    rep = verify_conventions(tmp_path / "rel", given={"kv_order": "split"})
    assert rep["given"] == {"kv_order": "split"} and rep["searched"] == ["mlp_order", "rope"]
    assert len(rep["results"]) == 6 and {r["kv_order"] for r in rep["results"]} == {"split"}
    assert rep["best"] == {"kv_order": "split", "mlp_order": "up-gate", "rope": "interleaved"}
    assert rep["sane"] and rep["margin"] >= 2 * MIN_MARGIN
    assert chosen_conventions(rep).rope == "interleaved"


def test_verify_refuses_a_tie_and_keeps_given_flags(tmp_path, sp_model, trained_mqa, geb_cli):
    """With one KV head both kv orders score exactly the same: --verify must not pick one (exit 2, the two
    best layouts and their perplexities in the message); naming --kv-order settles it, and the named order
    is the one imported."""
    from geb.interop.geb_release import MIN_MARGIN, chosen_conventions, verify_conventions

    rel = tmp_path / "rel"
    write_release(rel, trained_mqa, sp_model, rope="interleaved", config={"num_key_value_heads": None,
                                                                         "multi_query_group_num": 1})
    rep = verify_conventions(rel)
    first, second = rep["results"][:2]
    assert rep["sane"] and not rep["clear"] and rep["margin"] == 1.0 < MIN_MARGIN
    assert {first["kv_order"], second["kv_order"]} == {"interleaved", "split"}
    assert (first["mlp_order"], first["rope"]) == (second["mlp_order"], second["rope"]) == ("gate-up", "interleaved")
    with pytest.raises(GebError, match="not clearly better than the runner-up"):
        chosen_conventions(rep)

    p = geb_cli("import", "geb", rel, "--verify", "--out", tmp_path / "geb", "--threads", "1", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and not (tmp_path / "geb").exists()
    for r in (first, second):
        layout = f"kv_order={r['kv_order']} mlp_order={r['mlp_order']} rope={r['rope']}: perplexity {r['perplexity']}"
        assert layout in p.stderr, p.stderr

    p = geb_cli("import", "geb", rel, "--verify", "--kv-order", "split", "--out", tmp_path / "geb", "--threads", "1")
    assert "layout search: given kv_order=split; searched mlp_order, rope" in p.stdout
    assert "chosen layout: kv_order=split (given), mlp_order=gate-up (searched), rope=interleaved (searched)" in p.stdout
    meta = json.loads((tmp_path / "geb" / "meta.json").read_text())
    assert meta["conventions"] == {"kv_order": "split", "mlp_order": "gate-up", "rope": "interleaved"}


def test_explicit_flags_are_never_overridden(tmp_path, sp_model, trained, geb_cli):
    """A wrong --mlp-order restricts the search to that order: the true order (up-gate) is never tried,
    and the import keeps the given one, saying so; without --verify the flags are used as given."""
    rel = tmp_path / "rel"
    write_release(rel, trained, sp_model, kv_order="split", mlp_order="up-gate", rope="chatglm")
    p = geb_cli("import", "geb", rel, "--verify", "--mlp-order", "gate-up", "--out", tmp_path / "a", "--threads", "1")
    assert "layout search: given mlp_order=gate-up; searched kv_order, rope" in p.stdout
    assert p.stdout.count("mlp=gate-up") == 6 and "mlp=up-gate" not in p.stdout
    assert "chosen layout: kv_order=split (searched), mlp_order=gate-up (given), rope=chatglm (searched)" in p.stdout
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["conventions"] == \
        {"kv_order": "split", "mlp_order": "gate-up", "rope": "chatglm"}
    p = geb_cli("import", "geb", rel, "--rope", "chatglm", "--out", tmp_path / "b", "--threads", "1")
    assert "layout: kv_order=interleaved (default), mlp_order=gate-up (default), rope=chatglm (given)" in p.stdout
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["conventions"] == \
        {"kv_order": "interleaved", "mlp_order": "gate-up", "rope": "chatglm"}


def test_verify_refuses_when_no_layout_is_sane(tmp_path, sp_model, release_cfg, geb_cli):
    """An untrained model reads the text badly under every layout: exit 2, nothing imported."""
    from geb.model import GEB

    model = GEB(release_cfg)
    model.init_weights(seed=3)
    write_release(tmp_path / "rel", _bf16_round(model), sp_model)
    p = geb_cli("import", "geb", tmp_path / "rel", "--verify", "--out", tmp_path / "geb", "--threads", "1",
                check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and not (tmp_path / "geb").exists()
    assert "no layout gives a sane perplexity (best two: kv_order=" in p.stderr
    rep = json.loads(p.stdout[p.stdout.index("{"):p.stdout.rindex("}") + 1])
    assert not rep["sane"] and len(rep["results"]) == 12


def test_cli_verify_then_import(tmp_path, sp_model, trained, geb_cli):
    write_release(tmp_path / "rel", trained, sp_model, kv_order="interleaved", mlp_order="gate-up", rope="chatglm")
    p = geb_cli("import", "geb", tmp_path / "rel", "--verify", "--out", tmp_path / "geb", "--chat-format", "plain",
                "--threads", "1")
    assert "layout search: given none; searched kv_order, mlp_order, rope" in p.stdout
    assert ("chosen layout: kv_order=interleaved (searched), mlp_order=gate-up (searched), rope=chatglm (searched)"
            in p.stdout)
    assert (tmp_path / "geb" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "geb" / "meta.json").read_text())
    assert meta["conventions"] == {"kv_order": "interleaved", "mlp_order": "gate-up", "rope": "chatglm"}
    assert meta["chat_format"]["name"] == "plain"


def test_bad_release_inputs_leave_no_folder(tmp_path, sp_model, release_cfg):
    from geb.interop.geb_release import import_geb_release
    from geb.model import GEB

    model = GEB(release_cfg)
    rel = tmp_path / "rel"
    write_release(rel, model, sp_model, shards=1)
    shard = rel / "pytorch_model-00001-of-00001.bin"
    good = torch.load(shard, weights_only=True)
    out = tmp_path / "out"

    def expect(pattern):
        with pytest.raises(GebError, match=pattern):
            import_geb_release(rel, out)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    torch.save({**good, "transformer.encoder.layers.0.self_attention.query.bias": torch.zeros(64)}, shard)
    expect(r"unknown tensor 'transformer\.encoder\.layers\.0\.self_attention\.query\.bias'")
    torch.save({k: v for k, v in good.items() if "layers.1.mlp.dense_4h_to_h" not in k}, shard)
    expect(r"transformer\.encoder\.layers\.1\.mlp\.dense_4h_to_h\.weight")  # listed in the index, missing
    (rel / "pytorch_model.bin.index.json").unlink()
    torch.save({k: v for k, v in good.items() if "layers.1.mlp.dense_4h_to_h" not in k}, rel / "pytorch_model.bin")
    expect(r"missing tensor 'transformer\.encoder\.layers\.1\.mlp\.dense_4h_to_h\.weight'")
    torch.save(good, rel / "pytorch_model.bin")
    data = (rel / "pytorch_model.bin").read_bytes()
    (rel / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    expect("truncated")
    torch.save({**good, "evil": shutil.rmtree}, rel / "pytorch_model.bin")  # not a tensor: refused unread
    expect("weights-only")
    torch.save(good, rel / "pytorch_model.bin")
    cfg = json.loads((rel / "config.json").read_text())
    (rel / "config.json").write_text(json.dumps({**cfg, "ffn_hidden_size": 80}))
    expect(r"dense_h_to_4h\.weight' has shape \(192, 64\), config\.json expects \(160, 64\)")
    (rel / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "num_layers"}))
    expect("'num_layers'")
    (rel / "config.json").write_text(json.dumps({**cfg, "add_qkv_bias": True}))
    expect("add_qkv_bias")
    (rel / "config.json").write_text(json.dumps(cfg))
    (rel / "tokenizer.model").write_bytes(sp_model[:100])
    expect("tokenizer.model")
    (rel / "tokenizer.model").write_bytes(sp_model)
    import_geb_release(rel, out)
    assert out.is_dir()


def test_imported_release_exports_to_gguf_with_sentencepiece_vocab(tmp_path, sp_model, release_cfg):
    """The imported folder keeps tokenizer.model; GGUF export writes llama.cpp's SentencePiece vocab."""
    gguf = pytest.importorskip("gguf")
    from geb.checkpoint import load_model
    from geb.interop.geb_release import import_geb_release
    from geb.interop.gguf import export_gguf
    from geb.model import GEB

    model = GEB(release_cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked logits
    _bf16_round(model)
    write_release(tmp_path / "rel", model, sp_model)
    import_geb_release(tmp_path / "rel", tmp_path / "geb", dtype="float32")
    assert (tmp_path / "geb" / "tokenizer.model").read_bytes() == sp_model
    info = export_gguf(tmp_path / "geb", tmp_path / "m.gguf", "f32")
    assert "nmt_nfkc" in info["tokenizer"]["warning"]  # the test's model normalizes; llama.cpp cannot
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = lambda k: r.get_field(k).contents()  # noqa: E731
    _, tok, _ = load_model(tmp_path / "geb")
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    n = sp.get_piece_size()
    assert field("tokenizer.ggml.model") == "llama" and len(field("tokenizer.ggml.scores")) == release_cfg.vocab_size
    types = field("tokenizer.ggml.token_type")
    assert types[n] == 3 and field("tokenizer.ggml.tokens")[n] == "[MASK]" and types[-1] == 5
    # eos = end of a turn (the chat format's first stop), bos = document start (its end-of-document token)
    assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.eot_token_id") == tok._tok.token_to_id("<|user|>")
    assert field("tokenizer.ggml.bos_token_id") == tok.doc_id == tok._tok.token_to_id("<eod>")

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, n_threads=1, n_batch=128,
                          logits_all=True, verbose=False, type_k=0, type_v=0)
    for text in (TEXT, "长江是中国最长的河流。全长约六千三百公里", "The sun rises in the east 1234"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text
    ids = sp.encode(TEXT)
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    llm.close()
    assert (got - _logits(model, ids)).abs().max().item() <= 1e-4


def test_imported_release_in_transformers(tmp_path, sp_model, release_cfg):
    """The converted SentencePiece tokenizer and the chat format work in transformers too."""
    transformers = pytest.importorskip("transformers")
    from geb.checkpoint import load_model
    from geb.interop.geb_release import import_geb_release
    from geb.interop.hf import export_hf
    from geb.model import GEB

    write_release(tmp_path / "rel", _bf16_round(GEB(release_cfg)), sp_model)
    import_geb_release(tmp_path / "rel", tmp_path / "geb")
    export_hf(tmp_path / "geb", tmp_path / "hf")
    _, tok, _ = load_model(tmp_path / "geb")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    for text in (TEXT, "长江是中国最长的河流，全长约六千三百公里。", " leading and  double  spaces"):
        assert list(hf(text, add_special_tokens=False)["input_ids"]) == sp.encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi 2024"}]
    got = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert list(got["input_ids"] if not isinstance(got, list) else got) == tok.render_chat(msgs, True)[0]
