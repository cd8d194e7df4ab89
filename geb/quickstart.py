"""`geb quickstart`: the whole recipe at tiny scale on a built-in bilingual corpus, with a report.

Stages run in order, each writing its own folder under the output directory and a section of
`report.md`. A stage whose output is already complete is reused, so an interrupted quickstart
continues where it stopped. Sizes come from QuickstartConfig; `small=True` shrinks every stage for
the test suite.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from geb.common import atomic_write_json, atomic_write_text, now_iso


@dataclass
class QuickstartConfig:
    out: str = "quickstart_out"
    preset: str = "geb-tiny"
    vocab_size: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    pretrain_steps: int = 450
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    seed: int = 0
    # Each (fact, phrasing) pair stated this many times, in differently shuffled documents: with 1 the
    # 5M-parameter model memorises the documents instead of learning the facts (docs/corpus.md).
    corpus_repeats: int = 8
    # alignment (SFT then DPO); see docs/alignment.md
    sft_epochs: float = 6
    sft_lr: float = 1e-3
    sft_seq_len: int = 256
    dpo_epochs: float = 2
    dpo_lr: float = 2e-5
    dpo_beta: float = 0.1
    chat_eval: int = 48  # held-out chat questions asked before/after each alignment stage
    threads: int | None = None
    small: bool = False  # the test-suite size: a few seconds per stage
    extra: dict = field(default_factory=dict)

    @classmethod
    def small_config(cls, out: str) -> "QuickstartConfig":
        return cls(out=out, preset="geb-test", vocab_size=512, seq_len=64, batch_size=8, pretrain_steps=40,
                   lr=3e-3, min_lr=3e-4, warmup_steps=4, corpus_repeats=1, sft_epochs=1, sft_seq_len=128, dpo_epochs=0.25,
                   chat_eval=8, small=True)


class Context:
    """What stages share: paths, the config, results for the report, and progress output."""

    def __init__(self, cfg: QuickstartConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.results: dict[str, dict] = {}
        self.sections: list[str] = []
        self.t0 = time.time()

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def say(self, msg: str) -> None:
        print(f"[quickstart {time.time() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- stages -------------------------------------------------------------------------------------------
def stage_corpus(ctx: Context) -> None:
    """Write the built-in raw corpus (with noise, duplicates and bad records) and clean it."""
    from geb import corpus
    from geb.data.pipeline import run_pipeline

    seed = ctx.cfg.seed
    raw = ctx.path("raw")
    if not raw.is_dir():
        injected = corpus.write_raw_corpus(raw, seed=seed, bad_input=True, repeats=ctx.cfg.corpus_repeats)
        atomic_write_text(raw.parent / "raw_injected.json", json.dumps(injected, indent=2) + "\n")
    injected = json.loads((raw.parent / "raw_injected.json").read_text())
    report = run_pipeline(raw, ctx.path("data"), workers=1, overrides={"rules": {"t2s": {"enabled": True}}})
    steps = report["steps"]
    ctx.results["corpus"] = {"facts": len(corpus.facts(seed)), "raw_documents": injected["documents"],
                             "injected": injected["injected"], "clean_documents": report["output"].get("documents"),
                             "bad_input": report["input"]["bad_input"]}
    r = ctx.results["corpus"]
    rows = "\n".join(f"| {s['step']} | {s['docs_in']} | {s['docs_out']} | {s['chars_in']:,} | {s['chars_out']:,} |"
                     for s in steps)
    ctx.sections.append(
        "## 1. Built-in corpus and data pipeline\n\n"
        f"{r['facts']} invented facts, each stated in many phrasings in Chinese and English, written as "
        f"{r['raw_documents']} raw documents with injected noise ({', '.join(f'{k} {v}' for k, v in sorted(r['injected'].items()))}). "
        f"The pipeline (`geb data run`) counted bad input ({', '.join(f'{k} {v}' for k, v in sorted(r['bad_input'].items())) or 'none'}) "
        f"and kept {r['clean_documents']} documents. Details: [data/report.md](data/report.md).\n\n"
        "| step | docs in | docs out | chars in | chars out |\n|---|---|---|---|---|\n" + rows + "\n\n"
        "![data pipeline](data/report.png)\n")


def stage_tokenizer(ctx: Context) -> None:
    from geb.data.pipeline import iter_text
    from geb.tokenizer import Tokenizer, efficiency

    tok_dir = ctx.path("tokenizer")
    docs = list(iter_text(ctx.path("data", "text")))
    if (tok_dir / "tokenizer.json").is_file():
        tok = Tokenizer.load(tok_dir)
    else:
        tok = Tokenizer.train(docs, vocab_size=ctx.cfg.vocab_size, min_frequency=2)
        tok.save(tok_dir)
    zh = [t for t in docs if _is_zh(t)]
    en = [t for t in docs if not _is_zh(t)]
    eff = {"zh": efficiency(tok, zh), "en": efficiency(tok, en)}
    ctx.results["tokenizer"] = {"vocab_size": tok.vocab_size, **{f"{k}_chars_per_token": v["chars_per_token"] for k, v in eff.items()},
                                **{f"{k}_bytes_per_token": v["bytes_per_token"] for k, v in eff.items()}}
    r = ctx.results["tokenizer"]
    ctx.sections.append(
        "## 2. Tokenizer\n\n"
        f"Byte-level BPE trained on the cleaned text, {r['vocab_size']} tokens.\n\n"
        "| language | chars/token | bytes/token |\n|---|---|---|\n"
        f"| Chinese | {r['zh_chars_per_token']:.2f} | {r['zh_bytes_per_token']:.2f} |\n"
        f"| English | {r['en_chars_per_token']:.2f} | {r['en_bytes_per_token']:.2f} |\n")


def stage_pack(ctx: Context) -> None:
    from geb import corpus
    from geb.data.pipeline import pack_text
    from geb.data.tokens import TokenData

    seed = ctx.cfg.seed
    d = ctx.path("tokens")
    # Validation is a seeded 5% of the cleaned documents (the usual held-out split); text written in
    # phrasings that training never uses is scored separately after pretraining. The multiple-choice
    # practice text (dev facts only) teaches the letter-answer layout that the MCQ evaluation scores.
    pack_text(ctx.path("data", "text"), ctx.path("tokenizer"), d, seed=seed, val_fraction=0.05,
              extra_train_texts=corpus.mcq_practice_texts(seed))
    data = TokenData(d)
    train, val = np.asarray(data.array("train")), np.asarray(data.array("val"))
    ctx.results["tokens"] = {"train_tokens": int(train.size), "val_tokens": int(val.size),
                             "unigram_val_loss": unigram_loss(train, val, data.vocab_size)}


def stage_pretrain(ctx: Context) -> None:
    from geb.checkpoint import read_meta
    from geb.train.loop import TrainConfig
    from geb.train.pretrain import run_pretrain

    c = ctx.cfg
    ck = ctx.path("ckpt", "pretrain")
    meta = read_meta(ck)
    if not meta.get("final"):
        tc = TrainConfig(steps=c.pretrain_steps, batch_size=c.batch_size, lr=c.lr, min_lr=c.min_lr,
                         warmup_steps=c.warmup_steps, eval_every=max(1, c.pretrain_steps // 6),
                         save_every=max(1, c.pretrain_steps // 3), log_every=max(1, c.pretrain_steps // 30), seed=c.seed)
        t0 = time.time()
        meta = run_pretrain(ctx.path("tokens"), ck, preset=c.preset, train_config=tc, seq_len=c.seq_len,
                            resume=(ck / "train_state.pt").is_file(), quiet=c.small)
        meta["wall_seconds"] = time.time() - t0
    uni = ctx.results["tokens"]["unigram_val_loss"]
    phr, phr_uni = heldout_phrasing_loss(ck, ctx.path("tokens"), ctx.cfg.seed)
    ctx.results["pretrain"] = {"steps": meta["step"], "tokens_seen": meta["tokens_seen"],
                               "train_loss": meta["last_train_loss"], "val_loss": meta["last_val_loss"],
                               "unigram_val_loss": uni, "heldout_phrasing_loss": phr,
                               "heldout_phrasing_unigram": phr_uni,
                               "params": _params(meta["settings"]["model"]), "wall_seconds": meta.get("wall_seconds"),
                               "dtype": meta["settings"].get("dtype_resolved"),
                               "dtype_reason": meta["settings"].get("dtype_reason")}
    r = ctx.results["pretrain"]
    ctx.sections.append(
        "## 3. Pretraining\n\n"
        f"Model `{c.preset}` ({r['params']:,} parameters), {r['steps']} steps, {r['tokens_seen']:,} tokens, "
        f"computed in {r['dtype']} ({r['dtype_reason']}).\n\n"
        "| | nats/token |\n|---|---|\n"
        f"| unigram baseline on validation | {uni:.3f} |\n| final validation loss | {r['val_loss']:.3f} |\n"
        f"| final training loss | {r['train_loss']:.3f} |\n"
        f"| text in held-out phrasings: unigram baseline | {phr_uni:.3f} |\n"
        f"| text in held-out phrasings: model | {phr:.3f} |\n\n![pretraining loss](ckpt/pretrain/loss.png)\n")


def _answer_heldout(eng, prompts: list[dict]) -> list[dict]:
    """Greedy completions of the held-out prompts, each with the scorer's verdict."""
    from geb import corpus
    from geb.infer.sampling import SamplingParams

    p = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0, stop=["\n"])
    # batched decoding: same greedy outputs as one by one (tested), several times faster
    return [{**x, "output": g.text, "correct": bool(corpus.answer_matches(g.text, x["answer"]))}
            for x, g in zip(prompts, eng.generate_batch([x["prompt"] for x in prompts], p, max_batch=16))]


def stage_heldout(ctx: Context) -> None:
    """Completion prompts in phrasings never seen in training: did the model learn the facts? The same
    prompts are put to the untrained model (pretraining's starting weights) as the baseline."""
    from geb import corpus
    from geb.checkpoint import load_model
    from geb.infer.engine import Engine

    ck = ctx.path("ckpt", "pretrain")
    prompts = corpus.heldout_prompts(ctx.cfg.seed)
    if ctx.cfg.small:
        prompts = prompts[:12]
    rows = _answer_heldout(Engine.from_folder(ck), prompts)
    untrained, tok, _ = load_model(ck)
    untrained.init_weights(seed=ctx.cfg.seed)  # pretraining starts from these weights (same seed)
    base_rows = _answer_heldout(Engine(untrained, tok), prompts)
    hits, totals = Counter(), Counter()
    for r in rows:
        for key in (r["lang"], f"{r['lang']}/{r['form']}"):
            hits[key] += r["correct"]
            totals[key] += 1
    _write_jsonl(ctx.path("samples", "heldout_pretrain.jsonl"), rows)
    _write_jsonl(ctx.path("samples", "heldout_untrained.jsonl"), base_rows)
    acc = {k: hits[k] / totals[k] for k in sorted(totals)}
    untrained_overall = sum(r["correct"] for r in base_rows) / max(1, len(prompts))
    ctx.results["heldout"] = {"n": len(prompts), "accuracy": {k: v for k, v in acc.items() if "/" not in k},
                              "by_form": {k: v for k, v in acc.items() if "/" in k},
                              "overall": sum(r["correct"] for r in rows) / max(1, len(prompts)),
                              "untrained_overall": untrained_overall}
    show = []  # the first three answered and the first two missed prompts of each language
    for lang in ("zh", "en"):
        mine = [r for r in rows if r["lang"] == lang]
        show += [r for r in mine if r["correct"]][:3] + [r for r in mine if not r["correct"]][:2]
    table = "\n".join(f"| {r['lang']} | {_md(r['prompt'])} | {_md(r['output'])} | {_md(r['answer'])} | {'✓' if r['correct'] else '✗'} |"
                      for r in show)
    cell = {k: f"{v:.0%}" for k, v in acc.items()}
    ctx.sections.append(
        "## 4. Held-out questions (base model, greedy)\n\n"
        f"{len(prompts)} prompts, one question (`qa`) and one unfinished statement (`cloze`) per fact and language, "
        "in sentences that occur nowhere in the training text (made of words the training text uses). "
        f"Accuracy {ctx.results['heldout']['overall']:.0%} overall; the untrained model (pretraining's starting "
        f"weights) answers {untrained_overall:.0%} of the same prompts "
        "([samples/heldout_untrained.jsonl](samples/heldout_untrained.jsonl)).\n\n"
        "| language | question (qa) | statement (cloze) | both |\n|---|---|---|---|\n"
        + "".join(f"| {name} | {cell.get(lang + '/qa', '-')} | {cell.get(lang + '/cloze', '-')} | {cell.get(lang, '-')} |\n"
                  for lang, name in (("zh", "Chinese"), ("en", "English")))
        + "\nThe first three answered and the first two missed prompts per language (all of them in "
        "[samples/heldout_pretrain.jsonl](samples/heldout_pretrain.jsonl)):\n\n"
        "| lang | prompt | output | expected | |\n|---|---|---|---|---|\n" + table + "\n")


def _fine_tune(ctx: Context, name: str, records, run, lr: float, parent: str, **kw) -> tuple[Path, Path, dict]:
    """An SFT or DPO stage: its built-in data written once, then trained from the `parent` stage's
    checkpoint unless finished (a killed run resumes). Returns (data file, checkpoint folder, its meta)."""
    from geb.checkpoint import read_meta
    from geb.train.loop import TrainConfig

    c = ctx.cfg
    data = ctx.path("corpus", f"{name}.jsonl")
    if not data.is_file():
        _write_jsonl(data, records(c.seed))
    ck = ctx.path("ckpt", name)
    meta = read_meta(ck)
    if not meta.get("final"):
        resume = (ck / "train_state.pt").is_file()
        tc = TrainConfig(steps=1, batch_size=c.batch_size, lr=lr, min_lr=lr / 10, weight_decay=0.0,
                         eval_every=5, eval_batches=4, save_every=25, log_every=1, seed=c.seed)
        meta = run(None if resume else ctx.path("ckpt", parent), data, ck, train_config=tc, warmup_ratio=0.1,
                   on_bad="skip", resume=resume, quiet=c.small, **kw)
    return data, ck, meta


def stage_sft(ctx: Context) -> None:
    """Supervised fine-tuning on the built-in conversations; chat before (base model) and after."""
    from geb import corpus
    from geb.train.sft import run_sft

    c = ctx.cfg
    _, ck, meta = _fine_tune(ctx, "sft", corpus.sft_conversations, run_sft, c.sft_lr, "pretrain", val_fraction=0.05,
                             epochs=c.sft_epochs, seq_len=c.sft_seq_len)
    prompts = _chat_prompts(ctx)
    before, after = _chat_eval(ctx.path("ckpt", "pretrain"), prompts), _chat_eval(ck, prompts)
    _write_jsonl(ctx.path("samples", "chat_sft.jsonl"),
                 [{**p, "base": b, "sft": a} for p, b, a in zip(prompts, before, after)])
    task, rep = meta["settings"]["task"], meta["data_report"]["train"]
    ctx.results["sft"] = {"conversations": task["conversations"], "val_conversations": task["val_conversations"],
                          "skipped": rep["skipped"], "rows": task["rows"], "fill": task["fill"], "steps": meta["step"],
                          "epochs": meta["epochs"], "train_loss": meta["last_train_loss"], "val_loss": meta["last_val_loss"],
                          "chat_before": _chat_scores(before), "chat_after": _chat_scores(after)}
    r = ctx.results["sft"]
    skipped = (f" ({sum(rep['skipped'].values())} skipped: " + ", ".join(f"{k} {v}" for k, v in rep["skipped"].items()) + ")"
               if rep["skipped"] else "")
    rows = [(p, b, a) for p, b, a in zip(prompts, before, after)]
    show = [x for x in rows if x[0]["lang"] == "zh"][:3] + [x for x in rows if x[0]["lang"] == "en"][:3]
    ctx.sections.append(
        "## 5. Supervised fine-tuning (SFT)\n\n"
        f"{r['conversations']} built-in conversations{skipped} (fact questions in both languages, multi-turn, "
        f"small talk, refusals of harmful requests), packed {r['fill']:.0%} full into {r['rows']} rows of "
        f"{c.sft_seq_len} tokens; {r['steps']} steps ({r['epochs']:.1f} epochs). Loss on assistant tokens only: "
        f"training {r['train_loss']:.3f}, validation ({r['val_conversations']} held-out conversations) "
        f"{r['val_loss']:.3f}.\n\n![SFT loss](ckpt/sft/loss.png)\n\n"
        f"{len(prompts)} held-out chat questions (phrasings no training data uses), greedy:\n\n"
        "| model | correct answer | reply in the user's language |\n|---|---|---|\n"
        + "".join(f"| {name} | {s['correct']:.0%} | {s['same_language']:.0%} |\n"
                  for name, s in (("base (pretrained)", r["chat_before"]), ("SFT", r["chat_after"])))
        + "\n| question | answer | base | SFT |\n|---|---|---|---|\n"
        + "".join(f"| {_md(p['messages'][-1]['content'])} | {_md(p['answer'])} | {_md(b['text'])} | {_md(a['text'])} |\n"
                  for p, b, a in show))


def stage_dpo(ctx: Context) -> None:
    """DPO on built-in preference pairs (language, fact, refusal); reward accuracy and chat before/after."""
    from geb import corpus
    from geb.train.dpo import run_dpo

    c = ctx.cfg
    data, ck, meta = _fine_tune(ctx, "dpo", corpus.preference_pairs, run_dpo, c.dpo_lr, "sft", val_fraction=0.1,
                                beta=c.dpo_beta, epochs=c.dpo_epochs)
    refusal = corpus.refusal_eval_prompts(c.seed)
    ref_before, ref_after = _chat_eval(ctx.path("ckpt", "sft"), refusal), _chat_eval(ck, refusal)
    # harmful requests that SFT and DPO trained on: learned at all, as against generalised above
    seen = list({json.dumps(x["prompt"], ensure_ascii=False): {"messages": x["prompt"], "lang": x["lang"]}
                 for x in map(json.loads, data.read_text().splitlines()) if x.get("kind") == "refusal"}.values())
    seen = seen[: len(refusal)]
    seen_before, seen_after = _chat_eval(ctx.path("ckpt", "sft"), seen), _chat_eval(ck, seen)
    prompts = _chat_prompts(ctx)
    chat_after = _chat_eval(ck, prompts)
    _write_jsonl(ctx.path("samples", "chat_dpo.jsonl"),
                 [{**p, "sft": b, "dpo": a} for p, b, a in zip(refusal, ref_before, ref_after)]
                 + [{**p, "dpo": a} for p, a in zip(prompts, chat_after)])
    val = meta["final_eval"]["val"]
    ctx.results["dpo"] = {"pairs": meta["settings"]["task"]["pairs"], "val_pairs": val["pairs"], "steps": meta["step"],
                          "beta": c.dpo_beta, "train_loss": meta["last_train_loss"], "val_loss": meta["last_val_loss"],
                          "val_reward_accuracy": val["reward_acc"], "val_reward_margin": val["reward_margin"],
                          "val_reward_accuracy_by_kind": {k: v["reward_acc"] for k, v in val.get("by_kind", {}).items()},
                          "last_train_reward_accuracy": meta["last_train_metrics"].get("reward_acc"),
                          "refusal_before": _chat_scores(ref_before)["refusal"], "refusal_after": _chat_scores(ref_after)["refusal"],
                          "refusal_seen_before": _chat_scores(seen_before)["refusal"],
                          "refusal_seen_after": _chat_scores(seen_after)["refusal"],
                          "chat_after": _chat_scores(chat_after)}
    r = ctx.results["dpo"]
    by_kind = "".join(f"| {k} | {v['pairs']} | {v['reward_acc']:.0%} | {v['reward_margin']:+.2f} |\n"
                      for k, v in val.get("by_kind", {}).items())
    ctx.sections.append(
        "## 6. Preference alignment (DPO)\n\n"
        f"{r['pairs']} preference pairs: the answer in the user's language over the other language, the true "
        f"fact over a distractor, a polite refusal over eager compliance. β = {r['beta']}, {r['steps']} steps; the "
        "SFT model is the frozen reference (its log-probabilities computed once, before training).\n\n"
        f"Reward accuracy on {r['val_pairs']} held-out pairs (the share whose chosen answer gained more "
        "log-probability than the rejected one; 0% before training, when policy = reference):\n\n"
        "| kind | pairs | reward accuracy | reward margin |\n|---|---|---|---|\n" + by_kind
        + f"| all | {r['val_pairs']} | {r['val_reward_accuracy']:.0%} | {r['val_reward_margin']:+.2f} |\n\n"
        "![DPO rewards](ckpt/dpo/rewards.png)\n\n![DPO loss](ckpt/dpo/loss.png)\n\n"
        f"Harmful requests refused (greedy): {len(refusal)} held out of SFT and DPO, SFT {r['refusal_before']:.0%} → "
        f"DPO {r['refusal_after']:.0%}; {len(seen)} seen in training, SFT {r['refusal_seen_before']:.0%} → DPO "
        f"{r['refusal_seen_after']:.0%}. "
        f"Held-out chat questions after DPO: {r['chat_after']['correct']:.0%} correct, "
        f"{r['chat_after']['same_language']:.0%} in the user's language.\n\n"
        "| request | SFT | DPO |\n|---|---|---|\n"
        + "".join(f"| {_md(p['messages'][-1]['content'])} | {_md(b['text'])} | {_md(a['text'])} |\n"
                  for p, b, a in zip(refusal, ref_before, ref_after)))


def stage_eval(ctx: Context) -> None:
    """Multiple-choice questions about the built-in facts, in C-Eval and MMLU file formats, scored
    with the same code path as the real benchmarks (lm-eval protocol: letter log-likelihood)."""
    from geb import corpus
    from geb.eval.mcq import evaluate
    from geb.eval.report import compare

    seed = ctx.cfg.seed
    bench_dir = ctx.path("benchmarks")
    corpus.write_ceval(bench_dir / "ceval", seed=seed)
    corpus.write_mmlu(bench_dir / "mmlu", seed=seed)
    smap = {v["file"]: [v["en"], v["zh"], v["category"]] for v in corpus.SUBJECTS.values()}
    shots = 3
    limit = 10 if ctx.cfg.small else None
    runs, table = [], {}
    for stage in ("pretrain", "sft", "dpo"):
        for bench in ("ceval", "mmlu"):
            out = ctx.path("eval", f"{stage}-{bench}")
            r = evaluate(ctx.path("ckpt", stage), benchmark=bench, data_dir=bench_dir / bench, protocol="lm-eval",
                         shots=shots, limit=limit, out_dir=out, name=f"{stage} ({bench})", subject_map=smap)
            runs.append(out)
            table[(stage, bench)] = r["headline"]["accuracy"]
    md, _ = compare(runs, ctx.path("eval"))
    ctx.results["eval"] = {f"{s}_{b}": a for (s, b), a in table.items()}
    rows = "\n".join(f"| {s} | {table[(s, 'ceval')]:.1%} | {table[(s, 'mmlu')]:.1%} |" for s in ("pretrain", "sft", "dpo"))
    ctx.sections.append(
        "## 7. Evaluation: multiple choice about the facts\n\n"
        f"Questions about the invented facts written as C-Eval (Chinese) and MMLU (English) files and scored by "
        f"`geb eval mcq` with the lm-eval protocol ({shots}-shot, log-likelihood of the answer letter). Chance is 25%.\n\n"
        "| model | C-Eval format (zh) | MMLU format (en) |\n|---|---|---|\n" + rows +
        "\n\nPer category: [eval/compare.md](eval/compare.md)\n\n![accuracy by category](eval/compare.png)\n")


def stage_quantize(ctx: Context) -> None:
    """Quantize the final model and measure speed and held-out perplexity in each format."""
    from geb import corpus
    from geb.infer.bench import quick_report
    from geb.infer.folders import quantize_folder

    src = ctx.path("ckpt", "dpo")
    for fmt in ("int8", "int4"):
        dst = ctx.path("ckpt", f"dpo-{fmt}")
        if not (dst / "config.json").is_file():
            quantize_folder(src, dst, fmt)
    text = "\n".join(corpus.validation_texts(ctx.cfg.seed)[: 8 if ctx.cfg.small else 40])
    rep = quick_report(src, text=text, threads=ctx.cfg.threads)
    ctx.results["quantize"] = rep
    rows = "\n".join(
        f"| {f} | {r['weight_bytes'] / 2**20:.2f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} | "
        f"{r['perplexity']:.3f} | {100 * r.get('ppl_vs_fp32', 0.0):+.2f}% |" for f, r in rep["formats"].items())
    ctx.sections.append(
        "## 8. Quantized CPU inference\n\n"
        f"The DPO model in each format ({rep['threads']} threads; `geb quantize --model {src} --format int4 --out ...`). "
        "Perplexity on text in held-out phrasings.\n\n"
        "| format | weights MiB | prefill tok/s | decode tok/s | perplexity | vs fp32 |\n|---|---|---|---|---|---|\n" + rows + "\n")


STAGES: list[tuple[str, Callable[[Context], None]]] = [
    ("corpus", stage_corpus),
    ("tokenizer", stage_tokenizer),
    ("pack", stage_pack),
    ("pretrain", stage_pretrain),
    ("heldout", stage_heldout),
    ("sft", stage_sft),
    ("dpo", stage_dpo),
    ("eval", stage_eval),
    ("quantize", stage_quantize),
]


def run_quickstart(cfg: QuickstartConfig) -> dict:
    import torch

    from geb.cpu import physical_cores

    torch.set_num_threads(cfg.threads or physical_cores())
    ctx = Context(cfg)
    ctx.out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for name, fn in STAGES:
        t = time.time()
        ctx.say(f"{name} ...")
        fn(ctx)
        timings[name] = round(time.time() - t, 1)
        ctx.say(f"{name} done in {timings[name]}s")
    from geb.serve import serve_command

    ctx.sections.append("## Serve it\n\nAn OpenAI-compatible server with a web chat page at http://127.0.0.1:8000/:\n\n```bash\n"
                        + serve_command(ctx.path("ckpt", "dpo")) + "\n```\n")
    summary = {"created": now_iso(), "config": asdict(cfg), "results": ctx.results, "stage_seconds": timings,
               "total_seconds": round(time.time() - ctx.t0, 1)}
    atomic_write_json(ctx.out / "report.json", summary, indent=2)
    head = (f"# geb quickstart report\n\nMade {summary['created']} by `geb quickstart` in "
            f"{summary['total_seconds']:.0f} s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}).\n\n")
    atomic_write_text(ctx.out / "report.md", head + "\n".join(ctx.sections))
    ctx.say(f"report: {ctx.out / 'report.md'}")
    return summary


# -- helpers --------------------------------------------------------------------------------------------
def unigram_loss(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) of val under train's add-one unigram distribution: the floor a model
    that ignores context cannot beat."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val.astype(np.int64)].mean())


def heldout_phrasing_loss(model_dir: Path, tokens_dir: Path, seed: int) -> tuple[float, float]:
    """Mean loss (nats/token) of the model and of the train unigram on documents written only in
    phrasings that training never uses: how far learning carries beyond the training templates."""
    import torch

    from geb import corpus
    from geb.checkpoint import load_model
    from geb.data.tokens import TokenData

    model, tok, _ = load_model(model_dir)
    model.eval()
    data = TokenData(tokens_dir)
    total = n = 0.0
    ids_all = []
    with torch.no_grad():
        for text in corpus.validation_texts(seed):
            ids = tok.encode(text, allow_special=False)[: model.cfg.max_seq_len] + [tok.doc_id]
            ids_all.extend(ids)
            x = torch.tensor([ids])
            total += float(model(x[:, :-1], x[:, 1:])) * (len(ids) - 1)
            n += len(ids) - 1
    uni = unigram_loss(np.asarray(data.array("train")), np.asarray(ids_all), data.vocab_size)
    return total / max(n, 1), uni


def _params(model_cfg: dict) -> int:
    from geb.config import ModelConfig

    return ModelConfig.from_dict(model_cfg).num_params()


def _chat_prompts(ctx: Context) -> list[dict]:
    """An even spread of the held-out chat questions, both languages."""
    from geb import corpus

    ps = corpus.chat_eval_prompts(ctx.cfg.seed)
    k = max(1, ctx.cfg.chat_eval // 2)
    picked = []
    for lang in ("zh", "en"):
        mine = [p for p in ps if p["lang"] == lang]
        picked += mine[:: max(1, len(mine) // k)][:k]
    return picked


def _chat_eval(folder: Path, prompts: list[dict], max_new_tokens: int = 40) -> list[dict]:
    """Greedy chat replies with the one chat template, scored for the answer, language and refusal."""
    from geb import corpus
    from geb.infer.engine import Engine
    from geb.infer.sampling import SamplingParams

    eng = Engine.from_folder(folder)
    p = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.0)
    out = []
    ids = [eng.tok.render_chat(x["messages"], add_generation_prompt=True)[0] for x in prompts]
    for x, g in zip(prompts, eng.generate_batch(ids, p, max_batch=16) if ids else []):
        text = g.text
        out.append({"text": text, "correct": bool(x.get("answer")) and bool(corpus.answer_matches(text, x["answer"])),
                    "same_language": _is_zh(text) == (x["lang"] == "zh") and bool(text.strip()),
                    "refusal": corpus.is_refusal(text)})
    return out


def _chat_scores(rows: list[dict]) -> dict:
    n = max(1, len(rows))
    return {"correct": sum(r["correct"] for r in rows) / n, "same_language": sum(r["same_language"] for r in rows) / n,
            "refusal": sum(r["refusal"] for r in rows) / n}


def _is_zh(text: str) -> bool:
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return cjk > len(text) * 0.2


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "⏎ ")[:80]


__all__ = ["QuickstartConfig", "run_quickstart", "STAGES", "Context", "unigram_loss"]
