"""The model: parameter counts per preset, KV-cached decode equals a full forward, meta-device build."""

import pytest
import torch

from geb.config import PRESETS, ModelConfig, get_preset
from geb.errors import GebError
from geb.model import GEB, KVCache


def test_geb_1_3b_has_the_released_parameter_count():
    cfg = get_preset("geb-1.3b")
    assert cfg.num_params() == 1_348_044_800
    with torch.device("meta"):
        m = GEB(cfg)
    assert m.num_params() == 1_348_044_800
    assert (cfg.n_layer, cfg.d_model, cfg.ffn_hidden, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (24, 2048, 5632, 16, 4, 128)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "geb-1.3b"])
def test_presets_count_matches_module(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        m = GEB(cfg)
    assert m.num_params() == cfg.num_params()
    # same architecture family: GQA, untied, no biases
    assert not any(n.endswith("bias") for n, _ in m.named_parameters())
    assert m.lm_head.weight is not m.tok_emb.weight


def test_small_presets_sizes():
    assert 1e6 < get_preset("geb-tiny").num_params() < 1e7
    assert 5e7 <= get_preset("geb-small").num_params() <= 1e8


def test_tied_llama_style_config():
    cfg = get_preset("geb-test").replace(tie_embeddings=True, rope_base=500000.0, n_kv_head=1)
    m = GEB(cfg)
    assert m.lm_head.weight is m.tok_emb.weight
    assert m.num_params() == cfg.num_params()


def test_bad_config_is_rejected():
    with pytest.raises(GebError, match="n_kv_head"):
        ModelConfig(n_head=6, n_kv_head=4)
    with pytest.raises(GebError, match="rope_style"):
        ModelConfig(rope_style="spiral")


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_cached_decode_equals_full_forward(style):
    torch.manual_seed(0)
    cfg = get_preset("geb-test").replace(rope_style=style, rope_dims=8 if style == "interleaved" else 0)
    m = GEB(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(cfg, 2, 32)
        parts = [m(ids[:, :10], cache=cache)]  # prefill
        parts.append(m(ids[:, 10:15], cache=cache))  # chunked prefill on a warm cache
        for i in range(15, 24):
            parts.append(m(ids[:, i : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


def test_rope_changes_with_position():
    torch.manual_seed(0)
    m = GEB(get_preset("geb-test")).eval()
    ids = torch.tensor([[5, 5, 5, 5]])
    with torch.no_grad():
        out = m(ids)
    # identical tokens at different positions must see different contexts/positions
    assert not torch.allclose(out[0, 1], out[0, 3])


def test_embedding_gradient_shrink_scales_only_the_embedding_gradient():
    torch.manual_seed(0)
    cfg = get_preset("geb-test")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    grads = {}
    for alpha in (1.0, 0.1):
        m = GEB(cfg)
        m.init_weights(seed=3)
        m.emb_grad_alpha = alpha
        loss = m(ids[:, :-1], ids[:, 1:])
        loss.backward()
        grads[alpha] = (float(loss.detach()), m.tok_emb.weight.grad.clone(), m.lm_head.weight.grad.clone())
    assert grads[1.0][0] == pytest.approx(grads[0.1][0], abs=1e-6)  # forward unchanged
    torch.testing.assert_close(grads[0.1][1], grads[1.0][1] * 0.1, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(grads[0.1][2], grads[1.0][2])


def test_loss_ignores_masked_targets():
    torch.manual_seed(0)
    cfg = get_preset("geb-test")
    m = GEB(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    tgt = torch.randint(0, cfg.vocab_size, (1, 8))
    masked = tgt.clone()
    masked[0, :4] = -100
    with torch.no_grad():
        logits = m(ids)
        direct = torch.nn.functional.cross_entropy(logits[0, 4:], tgt[0, 4:])
        assert float(m(ids, masked)) == pytest.approx(float(direct), rel=1e-5)


def test_meta_device_model_can_be_materialized():
    cfg = get_preset("geb-test")
    with torch.device("meta"):
        m = GEB(cfg)
    assert m.tok_emb.weight.is_meta
    m.to_empty(device="cpu")
    m.init_weights(seed=5)
    ref = GEB(cfg)
    ref.init_weights(seed=5)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(m(ids), ref(ids))
    assert torch.isfinite(m(ids)).all()
