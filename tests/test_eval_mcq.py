"""Multiple-choice evaluation: exact log-likelihoods, prefix KV-cache reuse, protocols, truncation,
results files, and the CLI."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from geb.errors import GebError
from geb.eval import prompts
from geb.eval.benchmarks import Item, Subject, load_benchmark
from geb.eval.mcq import evaluate
from geb.scoring import Row, Scorer

_ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "data" for p in (_ROOT.parent, _ROOT.parent.parent) if (p / "shared").is_dir()),
              _ROOT.parent / "shared" / "data")

FACTS = [
    ("The capital of France is", "Paris", "Rome", "Oslo", "Lima"),
    ("Water boils at", "100 C", "50 C", "10 C", "0 C"),
    ("北京是", "首都", "河流", "猫", "湖"),
    ("熊猫生活在", "四川", "海里", "沙漠", "月球"),
    ("3 + 4 =", "7", "8", "9", "6"),
]


def write_ceval(root: Path, subjects: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """C-Eval-format files: {subject: (dev rows, val rows)} of short bilingual questions."""
    rng = random.Random(seed)
    for subj, (n_dev, n_val) in subjects.items():
        for split, n in (("dev", n_dev), ("val", n_val)):
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{subj}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
                for i in range(n):
                    q, right, *wrong = rng.choice(FACTS)
                    opts = [right, *wrong]
                    rng.shuffle(opts)
                    w.writerow([i, f"{q} ({i})", *opts, "ABCD"[opts.index(right)], ""])
    return root


def write_mmlu(root: Path, subjects: dict[str, tuple[int, int]], seed: int = 1) -> Path:
    rng = random.Random(seed)
    for subj, (n_dev, n_test) in subjects.items():
        for split, n in (("dev", n_dev), ("test", n_test)):
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{subj}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                for i in range(n):
                    q, right, *wrong = rng.choice(FACTS[:2] + FACTS[4:])
                    opts = [right, *wrong]
                    rng.shuffle(opts)
                    w.writerow([f" {q} [{i}] ", *opts, "ABCD"[opts.index(right)]])
    return root


def sharp_copy(src: Path, dst: Path, max_seq_len: int | None = None, scale: float = 8.0) -> Path:
    """The tiny random model with its weights scaled up, so that context visibly changes its
    predictions (at init scale a 2-layer model is almost a bigram model, which would let a wrong
    cache or window pass unnoticed); optionally with a longer context (RoPE depends only on config)."""
    from geb.checkpoint import load_model, save_checkpoint

    model, tok, _ = load_model(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(scale)
    if max_seq_len:
        model.cfg = model.cfg.replace(max_seq_len=max_seq_len)
    save_checkpoint(dst, model, tok, {"stage": "random", "parent": str(src)})
    return dst


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    return sharp_copy(tiny_model_dir, tmp_path_factory.mktemp("eval") / "sharp-1k", max_seq_len=1024)


@pytest.fixture(scope="module")
def loaded(long_model_dir):
    from geb.checkpoint import load_model

    model, tok, _ = load_model(long_model_dir)
    return model, tok


def _manual_logprob(model, tok, ctx: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont[:-1]]))[0].float()
    logits[:, tok.vocab_size:] = float("-inf")
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_scorer_loglikelihood_is_exact_and_prefix_cache_changes_nothing(loaded):
    model, tok = loaded
    sc = Scorer(model, tok, batch_size=3)
    ctx, cont = sc.encode_pair("The capital of France is Paris. Water boils at", " 100 degrees")
    assert ctx + cont == tok.encode("The capital of France is Paris. Water boils at 100 degrees")
    got = sc.loglikelihood([(ctx, cont)])[0][0]
    assert got == pytest.approx(_manual_logprob(model, tok, ctx, cont), abs=1e-4)
    # the model is context-sensitive, so a cache or window bug cannot hide
    other = sc.loglikelihood([sc.encode_pair("熊猫生活在四川。The capital of France is", " Paris")])[0][0]
    assert abs(other - sc.loglikelihood([sc.encode_pair("Water boils. The capital of France is", " Paris")])[0][0]) > 0.05
    # rows continuing a shared prefix: with the prefix in a KV cache == the full sequence without it
    prefix = tok.encode("北京是中国的首都。")
    rows = [Row(tok.encode(t), []) for t in ("熊猫生活在", " In 2024, 3 cats", "水", "def add(a, b):")]
    for r in rows:
        r.targets = [(len(r.ids) - 1, [5]), (len(r.ids) - 2, [r.ids[-1], 7])] if len(r.ids) > 1 else [(0, [9])]
    cached = sc.score_rows(rows, prefix=prefix)
    full = sc.score_rows([Row(prefix + r.ids, [(p + len(prefix), t) for p, t in r.targets]) for r in rows])
    assert sc.prefix_forwards == 1
    for a, b in zip(cached, full):
        for (la, ga), (lb, gb) in zip(a, b):
            assert la == pytest.approx(lb, abs=1e-4) and ga == gb


def test_prefix_reuse_gives_identical_results(tmp_path, long_model_dir):
    data = write_ceval(tmp_path / "ce", {"law": (3, 5), "computer_network": (3, 3)})
    a = evaluate(long_model_dir, "ceval", data, shots=3, batch_size=4, keep_predictions=True)
    b = evaluate(long_model_dir, "ceval", data, shots=3, reuse_prefix=False, keep_predictions=True)
    assert a["speed"]["prefix_forwards"] == 2 and b["speed"]["prefix_forwards"] == 0
    assert a["truncation"]["items_with_fewer_shots"] == 0 and a["speed"]["prefix_mismatch"] == 0
    for pa, pb in zip(a["predictions"], b["predictions"]):
        assert pa["id"] == pb["id"] and pa["pred"] == pb["pred"]
        assert pa["logprobs"] == pytest.approx(pb["logprobs"], abs=1e-4)
        assert pa["pred"] == "ABCD"[max(range(4), key=lambda j: pa["logprobs"][j])]


def test_protocol_layouts():
    subj = Subject("computer_network", "Computer Network", "计算机网络", ["STEM"])
    shot = Item(" 1+1=? ", ("1", "2", "3", "4"), "B", "x:2")
    it = Item("2+2=?", ("4", "5", "6", "7"), "A", "x:3")
    pre, q = prompts.context("lm-eval", "ceval", subj, [shot], it)
    assert pre == "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案： B\n\n"
    assert q == "2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案："
    assert prompts.continuations("lm-eval", "ceval") == (" A", " B", " C", " D")
    pre, q = prompts.context("original", "ceval", subj, [shot], it)
    assert pre.startswith("以下是中国关于计算机网络考试的单项选择题") and pre.endswith("\n答案：B\n\n")
    assert prompts.continuations("original", "ceval") == ("A", "B", "C", "D")
    cm = Subject("agronomy", "Agronomy", "农学", ["Other"])
    pre, q = prompts.context("original", "cmmlu", cm, [shot], it)
    assert pre == "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n题目： 1+1=? \nA. 1\nB. 2\nC. 3\nD. 4\n答案是：B\n\n"
    assert q.startswith("题目：2+2=?") and q.endswith("\n答案是：")
    mm = Subject("abstract_algebra", "Abstract Algebra", "抽象代数", ["STEM"])
    pre, q = prompts.context("original", "mmlu", mm, [shot], it)
    assert pre == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                   " 1+1=? \nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n")
    assert prompts.question("cot", "ceval", it).endswith("答案：让我们一步一步思考，")
    assert prompts.question("cot", "mmlu", it).endswith("Answer: Let's think step by step.")


@pytest.mark.parametrize("text,letter", [
    ("让我们一步一步思考，1+1=2，所以答案是B。", "B"),
    ("首先排除A，答案：C", "C"),
    ("A is wrong and B is wrong. The answer is (D).", "D"),
    ("Let's think. Answer: A", "A"),
    ("故选 B", "B"),
    ("B是正确的", "B"),
    ("I am not sure about this question.", None),
    ("A or B, hard to say", None),
    ("Only C fits.", "C"),
])
def test_cot_answer_extraction(text, letter):
    assert prompts.extract_answer(text) == letter


def test_oldest_shots_are_dropped_when_the_prompt_is_too_long(tmp_path, tiny_model_dir):
    data = write_ceval(tmp_path / "ce", {"law": (5, 4)})
    r = evaluate(tiny_model_dir, "ceval", data, shots=5, keep_predictions=True)  # a 128-token context
    t = r["truncation"]
    assert 0 < t["items_with_fewer_shots"] <= 4 and t["shots_dropped"] >= t["items_with_fewer_shots"]
    assert any("oldest shots were dropped" in n for n in r["notes"])
    # which shots are kept: the planner keeps the newest ones and the prompt fits the context
    from geb.checkpoint import load_model
    from geb.eval.mcq import _plan_subject

    model, tok, _ = load_model(tiny_model_dir)
    sc = Scorer(model, tok)
    subj = load_benchmark("ceval", data).subjects[0]
    stats = dict.fromkeys(("items_with_fewer_shots", "shots_dropped", "items_left_truncated", "prefix_mismatch",
                           "prefix_hits", "prefix_cached_tokens"), 0)
    groups = _plan_subject(sc, "lm-eval", "ceval", subj, subj.dev, subj.items, (" A", " B", " C", " D"), stats)
    for k, members in groups.items():
        assert k < 5
        for i, ctx, cs in members:
            text = tok.decode(ctx)
            kept = subj.dev[5 - k:]
            assert all(prompts.question("lm-eval", "ceval", s) in text for s in kept)
            if k:
                assert prompts.question("lm-eval", "ceval", subj.dev[0]) not in text
            assert len(ctx) + max(map(len, cs)) <= sc.max_len + 1 or k == 0


def test_results_files_are_consistent(tmp_path, long_model_dir):
    data = write_ceval(tmp_path / "ce", {"law": (2, 5), "marxism": (2, 4), "computer_network": (2, 3),
                                         "physician": (2, 0)})
    with open(data / "val" / "law_val.csv", "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(["99", "broken", "a", "b", "c", "d", "X", ""])
    out = tmp_path / "run"
    r = evaluate(long_model_dir, "ceval", data, shots=2, out_dir=out, name="tiny")
    saved = json.loads((out / "results.json").read_text())
    assert saved["overall"] == r["overall"] and saved["protocol"] == "lm-eval" and saved["shots"] == 2
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 == r["overall"]["n"]
    by_subj = {}
    for p in preds:
        by_subj.setdefault(p["subject"], []).append(p["pred"] == p["answer"])
    for s, v in by_subj.items():
        assert r["subjects"][s]["correct"] == sum(v) and r["subjects"][s]["n"] == len(v)
    cats = {"law": "Humanities", "marxism": "Social Science", "computer_network": "STEM"}
    for s, c in cats.items():
        assert r["categories"][c]["micro"] == pytest.approx(sum(by_subj[s]) / len(by_subj[s]))
    assert r["overall"]["micro"] == pytest.approx(sum(sum(v) for v in by_subj.values()) / 12)
    assert r["overall"]["macro"] == pytest.approx(sum(sum(v) / len(v) for v in by_subj.values()) / 3)
    assert r["headline"]["accuracy"] == r["overall"]["micro"]
    assert r["skipped"]["malformed_rows"] == 1 and "law_val.csv:7" in r["skipped"]["rows"][0]
    assert r["skipped"]["empty_subjects"] == ["physician"]
    assert r["data"]["hash"] and r["model"]["tokenizer_hash"] and r["date"]
    md = (out / "results.md").read_text()
    assert "| Model | STEM | Social Science | Humanities |" in md and "| Law | 法学 | Humanities | 5 |" in md
    png = (out / "categories.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(tmp_path.glob(".run.tmp*"))


def test_cot_protocol_generates_and_counts_unanswered(tmp_path, tiny_model_dir):
    data = write_ceval(tmp_path / "ce", {"law": (2, 2)})
    r = evaluate(tiny_model_dir, "ceval", data, protocol="cot", max_new_tokens=6, keep_predictions=True)
    assert r["shots"] == 0 and any("zero-shot" in n for n in r["notes"])
    assert r["cot"]["unanswered"] == sum(p["pred"] is None for p in r["predictions"])
    assert all(isinstance(p["generation"], str) for p in r["predictions"])
    assert r["overall"]["correct"] == sum(p["pred"] == p["answer"] for p in r["predictions"])


def test_bad_arguments(tmp_path, tiny_model_dir):
    data = write_ceval(tmp_path / "ce", {"law": (1, 1)})
    with pytest.raises(GebError, match="unknown protocol"):
        evaluate(tiny_model_dir, "ceval", data, protocol="helm")
    with pytest.raises(GebError, match="--limit"):
        evaluate(tiny_model_dir, "ceval", data, limit=0)
    with pytest.raises(GebError, match="model folder not found"):
        evaluate(tmp_path / "nomodel", "ceval", data)


def test_cli_mcq_and_compare(tmp_path, long_model_dir, geb_cli, capsys):
    from geb.cli import main

    data = write_mmlu(tmp_path / "mm", {"abstract_algebra": (2, 3), "philosophy": (2, 3)})
    p = geb_cli("eval", "mcq", "--benchmark", "mmlu", "--data", data, "--model", long_model_dir, "--shots", "2",
                "--protocol", "original", "--out", tmp_path / "original", "--name", "tiny-original", "--threads", "1")
    assert "MMLU original 2-shot" in p.stdout and (tmp_path / "original" / "results.json").is_file()
    evaluate(long_model_dir, "mmlu", data, shots=2, out_dir=tmp_path / "lm-eval", name="tiny-lm-eval")
    assert main(["eval", "compare", str(tmp_path / "lm-eval"), str(tmp_path / "original"), "--out",
                 str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "tiny-lm-eval" in out and "tiny-original" in out and "MMLU (lm-eval, 2-shot)" in out
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5000
    rc = main(["eval", "mcq", "--benchmark", "cmmlu", "--data", str(tmp_path / "none"), "--model", str(long_model_dir),
               "--threads", "1"])  # the one_thread fixture restores it
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "Traceback" not in err


@pytest.mark.skipif(not (SHARED / "cmmlu").is_dir() or not (SHARED / "mmlu").is_dir(), reason="shared data absent")
@pytest.mark.parametrize("bench,subjects", [("cmmlu", ["agronomy", "chinese_history"]),
                                            ("mmlu", ["abstract_algebra", "philosophy"])])
def test_real_benchmark_smoke(bench, subjects, tiny_model_dir, tmp_path):
    r = evaluate(tiny_model_dir, bench, SHARED / bench, shots=5, limit=2, subjects=subjects, out_dir=tmp_path / "r")
    assert r["overall"]["n"] == 4 and set(r["subjects"]) == set(subjects)
    if bench == "cmmlu":
        assert set(r["categories"]) == {"Other", "Humanities", "China specific"}
    else:
        assert set(r["categories"]) == {"STEM", "Humanities"}
    # 5-shot real prompts do not fit a 128-token context: reported, never silent
    assert r["truncation"]["items_with_fewer_shots"] == 4 and r["notes"]


def test_quantized_folders_are_scored_through_the_engine(tmp_path, long_model_dir, loaded):
    from geb.infer.scoring import RuntimeScorer
    from geb.infer.engine import Engine
    from geb.infer.folders import quantize_folder

    model, tok = loaded
    # the engine path computes the same log-probs as the model path (fp32 runtime)
    eng = Engine(model, tok)
    rs, sc = RuntimeScorer(eng), Scorer(model, tok)
    pairs = [sc.encode_pair("The capital of France is", c) for c in (" Paris", " Rome and Oslo")]
    assert [x[0] for x in rs.loglikelihood(pairs)] == pytest.approx([x[0] for x in sc.loglikelihood(pairs)], abs=1e-3)
    ids = tok.encode("北京是中国的首都。" * 40)
    assert rs.rolling(ids)[0] == pytest.approx(sc.rolling(ids)[0], rel=1e-4)
    # rows continuing a cached prefix, read at the last position only or at earlier ones
    prefix = tok.encode("北京是中国的首都。The capital of France is Paris.")
    rows = [Row(tok.encode(t), []) for t in (" In 2024, 3 cats", " 熊猫生活在四川", " def add(a, b):")]
    rows[0].targets = [(len(rows[0].ids) - 1, [5]), (len(rows[0].ids) - 1, [9])]
    rows[1].targets = [(1, rows[1].ids[2:4])]
    rows[2].targets = [(len(rows[2].ids) - 2, [rows[2].ids[-1], 7])]
    for got, want in zip(rs.score_rows(rows, prefix=prefix), sc.score_rows(rows, prefix=prefix)):
        for (la, ga), (lb, gb) in zip(got, want):
            assert la == pytest.approx(lb, abs=1e-3) and ga == gb
    assert rs.prefix_forwards == 1
    # int8 rows batched through one multi-row prefill score exactly as one at a time (the core's integer
    # kernels compute each row alike), and groups close at the row and token limits
    rs8 = RuntimeScorer(Engine(model, tok, format="int8"), batch_size=2)
    one = RuntimeScorer(Engine(model, tok, format="int8"), batch_size=1)
    assert [len(g) for g in rs8._groups(rows)] == [2, 1]
    rs8.max_batch_tokens = len(rows[0].ids) + len(rows[1].ids) - 1
    assert [len(g) for g in rs8._groups(rows)] == [1, 2]
    want = one.score_rows(rows, prefix=prefix)
    got = rs8.score_rows(rows, prefix=prefix)
    if rs8.rt.backend == "native":
        assert got == want
    else:
        assert [x[0] for r in got for x in r] == pytest.approx([x[0] for r in want for x in r], abs=1e-3)
    # an int8 folder: evaluated, recorded as such, close to full precision
    data = write_ceval(tmp_path / "ce", {"law": (2, 4)})
    q = quantize_folder(long_model_dir, tmp_path / "int8", "int8")
    a = evaluate(q, "ceval", data, shots=2, keep_predictions=True)
    b = evaluate(long_model_dir, "ceval", data, shots=2, keep_predictions=True)
    assert a["model"]["format"] == "int8" and b["model"]["format"] == "fp32"
    for pa, pb in zip(a["predictions"], b["predictions"]):
        assert pa["logprobs"] == pytest.approx(pb["logprobs"], abs=0.3)  # int8 rounding (0.1 seen)


def test_prefix_cache_hits_when_the_boundary_tokenizes_differently(tiny_model_dir):
    """A BPE that merges the k-shot prefix's last tokens with the question's first (GPT-2-style
    "\\n\\n" merges) must still reuse the shared tokens before the boundary, with exact results."""
    from geb.checkpoint import load_model
    from geb.eval.mcq import _score_group

    model, tok, _ = load_model(tiny_model_dir)
    sc = Scorer(model, tok, batch_size=3)
    shots = tok.encode("Q: 1+1? A: 2. Q: the sky is? A: blue. Q: water is? A: wet.")
    conts = [tok.encode(c) for c in (" A", " B", " C", " D")]
    # the prefix as tokenized alone ends in an id no question starts with: an exact-prefix test misses
    prefix_ids = shots + [tok.encode("\n\n")[-1]]
    members = [(i, shots + tok.encode(q), conts) for i, q in enumerate(["Q: fire is?", "Q: ice is? A:", "Q: 北京?"])]
    members.append((3, tok.encode("Something else entirely, no shots"), conts))
    stats = dict.fromkeys(("items_left_truncated", "prefix_mismatch", "prefix_hits", "prefix_cached_tokens"), 0)
    got = _score_group(sc, prefix_ids, members, True, stats)
    assert stats["prefix_hits"] == 3 and stats["prefix_mismatch"] == 1
    assert stats["prefix_cached_tokens"] == 3 * len(shots) and sc.prefix_forwards == 1
    plain_stats = dict.fromkeys(stats, 0)
    want = _score_group(sc, prefix_ids, members, False, plain_stats)
    assert plain_stats["prefix_hits"] == 0 and sc.prefix_forwards == 1
    for i in range(4):
        assert got[i] == pytest.approx(want[i], abs=1e-4)


def test_the_data_filter_and_the_quantization_report_share_the_scorer(long_model_dir, loaded):
    import math

    from geb.data.reference_lm import GebModelScorer
    from geb.scoring import perplexity_of
    from geb.infer.bench import perplexity
    from geb.infer.folders import load_runtime

    model, tok = loaded
    text = "北京是中国的首都。The capital of France is Paris. " * 30
    ids = tok.encode(text)
    sc = Scorer(model, tok)
    # by hand: every token predicted from the ones before it, the first from the end-of-document id
    seq = [tok.doc_id] + ids
    with torch.no_grad():
        nll = 0.0
        for k in range(0, len(ids), model.cfg.max_seq_len):
            tgt = torch.tensor(ids[k:k + model.cfg.max_seq_len])
            logits = model(torch.tensor([seq[k:k + len(tgt)]]))[0].float()
            logits[:, tok.vocab_size:] = float("-inf")
            nll += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
    want = math.exp(nll / len(ids))
    assert perplexity_of(sc, ids) == pytest.approx(want, rel=1e-4)
    rt, rtok, _ = load_runtime(long_model_dir, "fp32")
    assert perplexity(rt, ids, rtok) == pytest.approx(want, rel=1e-4)
    # the filter scores the document and its end
    assert GebModelScorer(long_model_dir).perplexity(text) == pytest.approx(
        perplexity_of(sc, ids + [tok.doc_id]), rel=1e-4)


def test_evaluate_is_load_score_report_over_one_options_object(tmp_path, tiny_model_dir):
    from geb.eval.mcq import EvalOptions, load, report, score

    data = write_ceval(tmp_path / "ce", {"law": (2, 3)})
    opts = EvalOptions(shots=2, limit=2)
    a = evaluate(tiny_model_dir, "ceval", data, opts, keep_predictions=True)
    b = evaluate(tiny_model_dir, "ceval", data, shots=2, limit=2, keep_predictions=True)
    m = load(tiny_model_dir)
    bench = load_benchmark("ceval", data)
    s = score(m, bench, opts)
    c = report(m, bench, opts, s)
    assert a["overall"]["n"] == 2 and a["shots"] == 2 and c["overall"] == a["overall"] == b["overall"]
    for pa, ps in zip(a["predictions"], s.predictions, strict=True):
        assert pa["id"] == ps["id"] and pa["logprobs"] == pytest.approx(ps["logprobs"], abs=1e-5)
    with pytest.raises(GebError, match="not both"):
        evaluate(tiny_model_dir, "ceval", data, opts, shots=3)
    with pytest.raises(GebError, match="--shots"):
        evaluate(tiny_model_dir, "ceval", data, shots=-1)
