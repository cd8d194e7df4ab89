"""The lm-eval bridge: geb's `lm-eval` protocol matches the harness's stock task configs, and on the
same local files and model geb's evaluator and lm-eval (through the bridge) agree on every item."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from geb.eval import prompts  # noqa: E402
from geb.eval.benchmarks import Item, Subject, subject_info  # noqa: E402
from geb.eval.mcq import evaluate  # noqa: E402
from test_eval_mcq import sharp_copy, write_ceval, write_mmlu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STOCK = Path(lm_eval.__file__).parent / "tasks"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return sharp_copy(tiny_model_dir, tmp_path_factory.mktemp("lmeval") / "sharp-1k", max_seq_len=1024)


@pytest.mark.parametrize("bench,pattern,doc", [
    ("mmlu", "mmlu/default/mmlu_*.yaml", {"question": " 1+1=? ", "choices": ["1", "2", "3", "4"], "answer": 1}),
    ("ceval", "ceval/ceval-valid_*.yaml", {"question": " 1+1=? ", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}),
    ("cmmlu", "cmmlu/cmmlu_*.yaml", {"Question": " 1+1=? ", "A": "1", "B": "2", "C": "3", "D": "4", "Answer": "B"}),
])
def test_lm_eval_protocol_matches_the_stock_task_configs(bench, pattern, doc):
    loader = pytest.importorskip("lm_eval.tasks._yaml_loader")
    from lm_eval.utils import apply_template

    files = sorted(glob.glob(str(STOCK / pattern)))
    if not files:
        pytest.skip(f"this lm-eval has no stock {bench} configs")
    item = Item(" 1+1=? ", ("1", "2", "3", "4"), "B", "x")
    checked = 0
    for f in files:
        cfg = loader.load_yaml(f, resolve_func=False)
        name = cfg["dataset_name"]
        en, zh, cats, known = subject_info(bench, name)
        assert known, f"{bench} subject {name} missing from subjects.json"
        subj = Subject(name, en, zh, cats)
        assert cfg["description"] == prompts.description("lm-eval", bench, subj)
        assert apply_template(cfg["doc_to_text"], doc) == prompts.question("lm-eval", bench, item)
        assert cfg["doc_to_choice"] == ["A", "B", "C", "D"]
        assert cfg.get("target_delimiter", " ") == " " and cfg.get("fewshot_delimiter", "\n\n") == "\n\n"
        assert cfg["fewshot_split"] == "dev" and cfg["fewshot_config"]["sampler"] == "first_n"
        checked += 1
    assert checked == {"mmlu": 57, "ceval": 52, "cmmlu": 67}[bench]


def test_parity_with_lm_eval_through_the_bridge(tmp_path, model_dir):
    """Same files, same model: the same answer on every item, the same prompt, the same log-likelihoods."""
    from geb.eval.lmeval import write_task_configs

    ce = write_ceval(tmp_path / "ce", {"law": (3, 5), "computer_network": (3, 4)})
    mm = write_mmlu(tmp_path / "mm", {"abstract_algebra": (3, 4), "philosophy": (3, 3)})
    shots = 2
    ours = {}
    for bench, data in (("ceval", ce), ("mmlu", mm)):
        r = evaluate(model_dir, bench, data, shots=shots, keep_predictions=True)
        assert r["truncation"] == {"items_with_fewer_shots": 0, "shots_dropped": 0, "items_left_truncated": 0}
        for p in r["predictions"]:
            ours[(bench, p["id"])] = p
        write_task_configs(bench, data, tmp_path / "tasks")
    # lm-eval's Python API with only the local tasks indexed (its CLI, `python -m geb.eval.lmeval`,
    # runs the same code but first indexes every stock task: ~30 s here)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from geb.eval.lmeval import GebLM

    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = simple_evaluate(model=GebLM(path=str(model_dir)), tasks=["geb_ceval", "geb_mmlu"], num_fewshot=shots,
                          task_manager=tm, log_samples=True,
                          random_seed=None, numpy_random_seed=None, torch_random_seed=None)  # leave global RNGs alone
    seen = 0
    for task, samples in out["samples"].items():
        bench = "ceval" if task.startswith("geb_ceval_") else "mmlu"
        for s in samples:
            g = ours[(bench, s["doc"]["id"])]
            lls = [float(x[0]) for x in s["filtered_resps"]]
            assert "ABCD"[lls.index(max(lls))] == g["pred"], s["doc"]["id"]
            assert float(s["acc"]) == float(g["pred"] == g["answer"])
            assert lls == pytest.approx(g["logprobs"], abs=2e-3)
            subj = s["doc"]["id"].split(":")[0].rsplit("_", 1)[0]
            ctx = s["arguments"][0][0] if isinstance(s["arguments"], list) else s["arguments"]["gen_args_0"]["arg_0"]
            assert ctx.startswith(prompts.description("lm-eval", bench, Subject(subj, *subject_info(bench, subj)[:3])))
            assert ctx.endswith(prompts.question("lm-eval", bench, Item(s["doc"]["question"], (
                s["doc"]["A"], s["doc"]["B"], s["doc"]["C"], s["doc"]["D"]), s["doc"]["answer"], "")))
            seen += 1
    assert seen == len(ours) == 16
    results = out["results"]
    for bench in ("ceval", "mmlu"):
        mine = [p for (b, _), p in ours.items() if b == bench]
        acc = sum(p["pred"] == p["answer"] for p in mine) / len(mine)
        assert results[f"geb_{bench}"]["acc,none"] == pytest.approx(acc)


def test_bridge_methods_in_process(model_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from geb.eval.lmeval import GebLM

    lm = GebLM(path=str(model_dir), max_length=64)
    tok, model = lm.tok, lm.scorer.model

    def req(kind, *args):
        return Instance(kind, {}, tuple(args), 0)

    # rolling log-likelihood == lm-eval's own windows, scored with full forwards
    text = "春眠不觉晓，处处闻啼鸟。The capital of France is Paris. " * 8
    ids = tok.encode(text)
    assert len(ids) > 2 * 64
    want = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tok.doc_id, 64, 1)):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0].float()[:, : tok.vocab_size], -1)
        want += float(sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))
    assert lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])[0] == pytest.approx(want, abs=1e-2)
    # an empty context is the end-of-document token; trailing spaces move to the continuation
    (a, _), (b, _) = lm.loglikelihood([req("loglikelihood", "", "Paris"), req("loglikelihood", "France is ", "Paris")])
    c = lm.scorer.loglikelihood([([tok.doc_id], tok.encode("Paris")), (tok.encode("France is"), tok.encode(" Paris"))])
    assert (a, b) == pytest.approx((c[0][0], c[1][0]), abs=1e-4)
    # generation stops at `until` and is greedy by default
    out = lm.generate_until([req("generate_until", "北京是", {"until": ["。"], "max_gen_toks": 12})])[0]
    assert "。" not in out
    from geb.infer.sampling import SamplingParams

    full = lm.engine.generate(tok.encode("北京是"), SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                  repetition_penalty=1.0)).text
    assert full.startswith(out)
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_registration_in_a_fresh_process():
    """`register()` (what `python -m geb.eval.lmeval` does first) makes `--model geb` resolvable;
    run in a subprocess so the test leaves lm-eval's registry in this process untouched."""
    import os
    import subprocess
    import sys

    code = ("from geb.eval.lmeval import GebLM, register; register(); register(); "
            "from lm_eval.api.registry import get_model; print(get_model('geb') is GebLM)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "True", p.stderr[-2000:]


def test_task_configs_of_two_benchmarks_in_one_folder_keep_their_own_data(tmp_path):
    """MMLU and C-Eval share subject names: their local data files must not overwrite each other."""
    import yaml

    from geb.eval.lmeval import write_task_configs

    ce = write_ceval(tmp_path / "ce", {"high_school_physics": (2, 3)})
    mm = write_mmlu(tmp_path / "mm", {"high_school_physics": (5, 4)})
    write_task_configs("ceval", ce, tmp_path / "tasks")
    write_task_configs("mmlu", mm, tmp_path / "tasks")
    for bench, split, n in (("ceval", "val", 3), ("ceval", "dev", 2), ("mmlu", "test", 4), ("mmlu", "dev", 5)):
        cfg = yaml.safe_load((tmp_path / "tasks" / f"geb_{bench}_high_school_physics.yaml").read_text(encoding="utf-8"))
        with open(cfg["dataset_kwargs"]["data_files"][split], encoding="utf-8") as f:
            assert len(f.readlines()) == n
