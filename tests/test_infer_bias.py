"""Qwen2-style q/k/v biases in the inference engine: every format and both backends (PyTorch and the
native core, which adds a matrix's bias itself) give the model's logits and greedy tokens, and a
quantized folder keeps the biases."""

from __future__ import annotations

import pytest
import torch

from geb.infer.engine import Engine
from geb.infer.sampling import SamplingParams
from geb.infer.folders import load_runtime, quantize_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bias_model(tmp_path_factory, tokenizer, tiny_cfg):
    from geb.checkpoint import save_checkpoint
    from geb.model import GEB

    model = GEB(tiny_cfg.replace(qkv_bias=True))
    model.init_weights(seed=4)
    with torch.no_grad():  # biases large enough that dropping one changes the logits a lot
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 1.0)
    folder = tmp_path_factory.mktemp("bias") / "m"
    save_checkpoint(folder, model, tokenizer, {"stage": "random", "parent": None})
    return model.eval(), folder


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _backends():
    from geb.infer import native

    return ["torch"] + (["native"] if native.lib() is not None else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt,tol", [("fp32", 1e-4), ("bf16", 0.03), ("int8", 0.05), ("int4", 0.15)])
def test_biased_model_runs_in_every_format(bias_model, tokenizer, backend, fmt, tol):
    model, folder = bias_model
    ids = tokenizer.encode("北京是中国的首都。Paris is the capital of France.")
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
        model.cfg.qkv_bias = False  # the same weights without biases, to show the biases matter here
        try:
            from geb.model import GEB

            plain = GEB(model.cfg)
            plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("bias")})
        finally:
            model.cfg.qkv_bias = True
        assert _rel(plain(torch.tensor([ids]))[0], want) > 3 * tol
    rt, _, _ = load_runtime(folder, fmt, backend=backend)
    assert rt.backend == backend
    assert _rel(rt.forward_logits(ids), want) <= tol
    if fmt == "fp32":  # incremental decode (the step path, KV cache) against the model's greedy loop
        seq = list(ids)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        eng = Engine.from_folder(folder, format=fmt, backend=backend)
        # plain greedy, as the loop above: the default repetition penalty would re-rank near-ties
        out = eng.generate(tokenizer.decode(ids), SamplingParams(max_new_tokens=12, temperature=0,
                                                                 repetition_penalty=1.0))
        assert out.ids == seq[len(ids):]


def test_quantized_folder_keeps_the_biases(tmp_path, bias_model, tokenizer):
    _, folder = bias_model
    out = quantize_folder(folder, tmp_path / "q", "int8")
    mem, _, _ = load_runtime(folder, "int8")
    disk, _, _ = load_runtime(out)
    assert "layers.0.attn.wqkv.bias" in disk.state()
    ids = tokenizer.encode("Water boils at 100 degrees.")
    assert torch.equal(mem.forward_logits(ids), disk.forward_logits(ids))
