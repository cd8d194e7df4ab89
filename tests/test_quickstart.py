"""The quickstart at test size: every stage runs on the built-in corpus and the report shows it."""

import json

import pytest

from geb.quickstart import QuickstartConfig, run_quickstart


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "out"
    summary = run_quickstart(QuickstartConfig.small_config(str(out)))
    return out, summary


def test_report_files_and_sections(report):
    out, summary = report
    md = (out / "report.md").read_text()
    for heading in ("Built-in corpus", "Tokenizer", "Pretraining", "Held-out questions", "SFT", "DPO",
                    "Evaluation", "Quantized CPU inference", "geb serve --model"):
        assert heading in md, heading
    assert json.loads((out / "report.json").read_text())["results"] == summary["results"]
    for f in ("ckpt/pretrain/loss.png", "ckpt/sft/loss.png", "ckpt/dpo/loss.png", "data/report.md",
              "samples/heldout_pretrain.jsonl", "eval/compare.png", "eval/dpo-ceval/results.json",
              "benchmarks/ceval/val", "ckpt/dpo-int4/config.json"):
        assert (out / f).exists(), f


def test_pretraining_dtype_is_the_auto_choice_and_reported(report):
    from geb.cpu import native_bf16

    out, summary = report
    r = summary["results"]["pretrain"]
    assert r["dtype"] == ("bf16" if native_bf16() else "fp32")  # --dtype auto: BF16 only where native
    meta = json.loads((out / "ckpt" / "pretrain" / "meta.json").read_text())
    assert meta["settings"]["dtype_resolved"] == r["dtype"] and meta["settings"]["dtype_reason"] == r["dtype_reason"]
    assert f"computed in {r['dtype']} ({r['dtype_reason']})" in (out / "report.md").read_text()


def test_pipeline_removed_noise_and_duplicates(report):
    r = report[1]["results"]["corpus"]
    assert r["clean_documents"] <= r["raw_documents"] - r["injected"]["exact_duplicates"]
    assert sum(r["bad_input"].values()) == 4  # the raw corpus carries four broken records


def test_model_learned_something(report):
    r = report[1]["results"]
    assert r["pretrain"]["val_loss"] < r["tokens"]["unigram_val_loss"] - 0.3
    assert r["pretrain"]["train_loss"] < r["pretrain"]["unigram_val_loss"]


def test_alignment_stages_ran_from_their_parents(report):
    out, summary = report
    sft = json.loads((out / "ckpt" / "sft" / "meta.json").read_text())
    dpo = json.loads((out / "ckpt" / "dpo" / "meta.json").read_text())
    assert sft["parent"].endswith("pretrain") and dpo["parent"].endswith("sft")
    assert summary["results"]["dpo"]["val_reward_accuracy"] > 0.5


def test_rerun_reuses_finished_stages(report):
    out, summary = report
    before = (out / "ckpt" / "pretrain" / "model.safetensors").stat().st_mtime_ns
    again = run_quickstart(QuickstartConfig.small_config(str(out)))
    assert (out / "ckpt" / "pretrain" / "model.safetensors").stat().st_mtime_ns == before
    assert again["results"]["pretrain"]["val_loss"] == summary["results"]["pretrain"]["val_loss"]


def test_quantized_formats_reported(report):
    q = report[1]["results"]["quantize"]["formats"]
    assert set(q) == {"fp32", "bf16", "int8", "int4"}
    assert abs(q["int8"]["ppl_vs_fp32"]) < 0.02
    assert q["int4"]["weight_bytes"] < q["int8"]["weight_bytes"] < q["fp32"]["weight_bytes"]
    for r in q.values():
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0


def test_eval_accuracies_are_the_scored_predictions(report):
    """Each reported accuracy is the share of that run's saved predictions that match the answer, and
    each run scored the checkpoint of its own stage."""
    out, summary = report
    ev = summary["results"]["eval"]
    assert set(ev) == {f"{s}_{b}" for s in ("pretrain", "sft", "dpo") for b in ("ceval", "mmlu")}
    letters = "ABCD"
    for key, acc in ev.items():
        stage, bench = key.split("_")
        run = out / "eval" / f"{stage}-{bench}"
        res = json.loads((run / "results.json").read_text())
        assert res["benchmark"] == bench and res["model"]["path"] == str(out / "ckpt" / stage)
        preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == res["overall"]["n"] > 0
        for p in preds:  # the prediction is the letter with the highest log-likelihood
            assert p["pred"] == letters[max(range(4), key=lambda j: p["logprobs"][j])]
        assert acc == sum(p["pred"] == p["answer"] for p in preds) / len(preds)


def test_heldout_scores_are_the_scorers_verdicts_on_the_samples(report):
    from geb import corpus

    out, summary = report
    h = summary["results"]["heldout"]
    rows = [json.loads(line) for line in (out / "samples" / "heldout_pretrain.jsonl").read_text().splitlines()]
    assert len(rows) == h["n"] and {r["form"] for r in rows} == {"qa", "cloze"}
    for r in rows:
        assert r["correct"] == corpus.answer_matches(r["output"], r["answer"])
    for key, acc in {**h["accuracy"], **h["by_form"]}.items():
        mine = [r for r in rows if key in (r["lang"], f"{r['lang']}/{r['form']}")]
        assert mine and acc == sum(r["correct"] for r in mine) / len(mine)
    assert h["overall"] == sum(r["correct"] for r in rows) / len(rows)


def test_untrained_baseline_is_measured(report):
    """The untrained figure is the scorer's verdict on the greedy outputs of pretraining's starting
    weights for the same prompts, not a constant."""
    from geb import corpus
    from geb.checkpoint import load_model
    from geb.infer.engine import Engine
    from geb.infer.sampling import SamplingParams

    out, summary = report
    h = summary["results"]["heldout"]
    base = [json.loads(line) for line in (out / "samples" / "heldout_untrained.jsonl").read_text().splitlines()]
    trained = [json.loads(line) for line in (out / "samples" / "heldout_pretrain.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in base] == [r["prompt"] for r in trained]
    assert h["untrained_overall"] == sum(r["correct"] for r in base) / len(base)
    assert all(r["correct"] == corpus.answer_matches(r["output"], r["answer"]) for r in base)
    model, tok, _ = load_model(out / "ckpt" / "pretrain")
    model.init_weights(seed=summary["config"]["seed"])
    eng = Engine(model, tok)
    p = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0, stop=["\n"])
    for r in base[:3]:
        assert eng.generate(r["prompt"], p).text == r["output"]
    assert [r["output"] for r in base] != [r["output"] for r in trained]
    assert f"answers {h['untrained_overall']:.0%} of the same prompts" in (out / "report.md").read_text()
