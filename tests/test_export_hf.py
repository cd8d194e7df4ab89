"""`geb export hf`: transformers loads the folder with no custom code and agrees with geb."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from geb.errors import GebError  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ("GEB-1.3B 在 2024 年发布，训练了 550B tokens。 The capital of France is Paris!\n\n"
        "  def f(x):\n\treturn x**2 😀🎉 𠀀𪚥 ١٢٣ Ünïcödé")
CHAT = [{"role": "system", "content": "你是一个有用的助手。"}, {"role": "user", "content": "What is 2+2? 二加二？"},
        {"role": "assistant", "content": "4. 四。"}, {"role": "user", "content": "Thanks! 谢谢"}]


def _ids(x):
    return list(x["input_ids"] if not isinstance(x, list) else x)


@pytest.mark.parametrize("variant", ["untied-half", "tied-interleaved"])
def test_transformers_matches_geb(tmp_path, tokenizer, tiny_cfg, variant):
    from geb.checkpoint import save_checkpoint
    from geb.interop.hf import export_hf
    from geb.model import GEB

    cfg = tiny_cfg if variant == "untied-half" else tiny_cfg.replace(tie_embeddings=True, rope_style="interleaved",
                                                                     n_kv_head=1)
    model = GEB(cfg)
    model.init_weights(seed=5)
    save_checkpoint(tmp_path / "m", model, tokenizer, {"stage": "random"})
    export_hf(tmp_path / "m", tmp_path / "hf")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    ids = tokenizer.encode(TEXT)
    assert _ids(tok(TEXT, add_special_tokens=False)) == ids
    assert tok.decode(ids) == TEXT
    x = torch.tensor([ids[:100]])
    with torch.no_grad():
        a = hf(x).logits[0]
        b = model(x)[0]
    assert (a - b).abs().max().item() <= 1e-4
    for gen in (False, True):
        want, _ = tokenizer.render_chat(CHAT, add_generation_prompt=gen)
        assert _ids(tok.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=True)) == want


def test_partial_rotary_is_refused_and_nothing_written(tmp_path, tokenizer, tiny_cfg):
    from geb.checkpoint import save_checkpoint
    from geb.interop.hf import export_hf
    from geb.model import GEB

    save_checkpoint(tmp_path / "m", GEB(tiny_cfg.replace(rope_dims=8)), tokenizer, {"stage": "random"})
    with pytest.raises(GebError, match="rope_dims"):
        export_hf(tmp_path / "m", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_export_hf(tmp_path, tiny_model_dir, geb_cli):
    geb_cli("export", "hf", "--model", tiny_model_dir, "--out", tmp_path / "hf", "--dtype", "bfloat16", "--threads", "1")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert cfg.model_type == "llama" and cfg.num_key_value_heads == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
