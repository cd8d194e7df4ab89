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

from geb.checkpoint import now_iso
from geb.errors import GebError


@dataclass
class QuickstartConfig:
    out: str = "quickstart_out"
    preset: str = "geb-tiny"
    vocab_size: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    pretrain_steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    seed: int = 0
    threads: int | None = None
    small: bool = False  # the test-suite size: a few seconds per stage
    extra: dict = field(default_factory=dict)

    @classmethod
    def small_config(cls, out: str) -> "QuickstartConfig":
        return cls(out=out, preset="geb-test", vocab_size=512, seq_len=64, batch_size=8, pretrain_steps=40,
                   lr=3e-3, min_lr=3e-4, warmup_steps=4, small=True)


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
    from geb import corpus

    seed = ctx.cfg.seed
    docs = corpus.pretrain_texts(seed)
    val = corpus.validation_texts(seed)
    d = ctx.path("corpus")
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
    (d / "val.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in val))
    n_zh = sum(1 for t in docs if _is_zh(t))
    ctx.results["corpus"] = {"facts": len(corpus.facts(seed)), "train_documents": len(docs), "val_documents": len(val),
                             "train_chars": sum(map(len, docs)), "zh_documents": n_zh, "en_documents": len(docs) - n_zh}
    r = ctx.results["corpus"]
    ctx.sections.append(
        "## 1. Built-in corpus\n\n"
        f"{r['facts']} invented facts, each stated in many phrasings in Chinese and English. Training: "
        f"{r['train_documents']} documents ({r['zh_documents']} Chinese, {r['en_documents']} English), "
        f"{r['train_chars']:,} characters. Validation: {r['val_documents']} documents written with phrasings "
        "held out of training.\n")


def stage_tokenizer(ctx: Context) -> None:
    from geb.commands.tokenizer import efficiency
    from geb.tokenizer import Tokenizer

    docs = _read_jsonl(ctx.path("corpus", "train.jsonl"))
    tok_dir = ctx.path("tokenizer")
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
        f"Byte-level BPE, {r['vocab_size']} tokens. | language | chars/token | bytes/token |\n|---|---|---|\n"
        f"| Chinese | {r['zh_chars_per_token']:.2f} | {r['zh_bytes_per_token']:.2f} |\n"
        f"| English | {r['en_chars_per_token']:.2f} | {r['en_bytes_per_token']:.2f} |\n")


def stage_pack(ctx: Context) -> None:
    from geb.data.simple import pack_texts
    from geb.data.tokens import TokenData
    from geb.tokenizer import Tokenizer

    d = ctx.path("tokens")
    if not (d / "meta.json").is_file():
        tok = Tokenizer.load(ctx.path("tokenizer"))
        pack_texts(_read_jsonl(ctx.path("corpus", "train.jsonl")), tok, d, seed=ctx.cfg.seed,
                   tokenizer_dir=ctx.path("tokenizer"), val_docs=_read_jsonl(ctx.path("corpus", "val.jsonl")))
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
    ctx.results["pretrain"] = {"steps": meta["step"], "tokens_seen": meta["tokens_seen"],
                               "train_loss": meta["last_train_loss"], "val_loss": meta["last_val_loss"],
                               "unigram_val_loss": uni, "params": meta["settings"]["model"] and
                               _params(meta["settings"]["model"]), "wall_seconds": meta.get("wall_seconds")}
    r = ctx.results["pretrain"]
    ctx.sections.append(
        "## 3. Pretraining\n\n"
        f"Model `{c.preset}` ({r['params']:,} parameters), {r['steps']} steps, {r['tokens_seen']:,} tokens.\n\n"
        "| | nats/token |\n|---|---|\n"
        f"| unigram baseline on validation | {uni:.3f} |\n| final validation loss | {r['val_loss']:.3f} |\n"
        f"| final training loss | {r['train_loss']:.3f} |\n\n![pretraining loss](ckpt/pretrain/loss.png)\n")


def stage_heldout(ctx: Context) -> None:
    """Completion prompts in phrasings never seen in training: did the model learn the facts?"""
    from geb import corpus
    from geb.infer.engine import Engine
    from geb.infer.sampling import SamplingParams

    eng = Engine.from_folder(ctx.path("ckpt", "pretrain"))
    prompts = corpus.heldout_prompts(ctx.cfg.seed)
    if ctx.cfg.small:
        prompts = prompts[:12]
    p = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0, stop=["\n"])
    rows, hits = [], Counter()
    totals = Counter(x["lang"] for x in prompts)
    for x in prompts:
        g = eng.generate(x["prompt"], p)
        ok = corpus.answer_matches(g.text, x["answer"])
        hits[x["lang"]] += ok
        rows.append({**x, "output": g.text, "correct": bool(ok)})
    _write_jsonl(ctx.path("samples", "heldout_pretrain.jsonl"), rows)
    acc = {lang: hits[lang] / totals[lang] for lang in totals}
    ctx.results["heldout"] = {"n": len(prompts), "accuracy": acc, "overall": sum(hits.values()) / max(1, len(prompts))}
    show = [r for r in rows if r["lang"] == "zh"][:4] + [r for r in rows if r["lang"] == "en"][:4]
    table = "\n".join(f"| {r['lang']} | {_md(r['prompt'])} | {_md(r['output'])} | {_md(r['answer'])} | {'✓' if r['correct'] else '✗'} |"
                      for r in show)
    ctx.sections.append(
        "## 4. Held-out questions (base model, greedy)\n\n"
        f"{len(prompts)} prompts in phrasings that never occur in the training text. Accuracy: "
        + ", ".join(f"{k} {v:.0%}" for k, v in sorted(acc.items()))
        + f" (overall {ctx.results['heldout']['overall']:.0%}; an untrained model scores 0%).\n\n"
        "| lang | prompt | output | expected | |\n|---|---|---|---|---|\n" + table + "\n")


STAGES: list[tuple[str, Callable[[Context], None]]] = [
    ("corpus", stage_corpus),
    ("tokenizer", stage_tokenizer),
    ("pack", stage_pack),
    ("pretrain", stage_pretrain),
    ("heldout", stage_heldout),
]


def run_quickstart(cfg: QuickstartConfig) -> dict:
    import torch

    from geb.commands.common import physical_cores

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
    summary = {"created": now_iso(), "config": asdict(cfg), "results": ctx.results, "stage_seconds": timings,
               "total_seconds": round(time.time() - ctx.t0, 1)}
    (ctx.out / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    head = (f"# geb quickstart report\n\nMade {summary['created']} by `geb quickstart` in "
            f"{summary['total_seconds']:.0f} s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}).\n\n")
    (ctx.out / "report.md").write_text(head + "\n".join(ctx.sections))
    ctx.say(f"report: {ctx.out / 'report.md'}")
    return summary


# -- helpers --------------------------------------------------------------------------------------------
def unigram_loss(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) of val under train's add-one unigram distribution: the floor a model
    that ignores context cannot beat."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val.astype(np.int64)].mean())


def _params(model_cfg: dict) -> int:
    from geb.config import ModelConfig

    return ModelConfig.from_dict(model_cfg).num_params()


def _is_zh(text: str) -> bool:
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return cjk > len(text) * 0.2


def _read_jsonl(path: Path) -> list[str]:
    if not path.is_file():
        raise GebError(f"{path}: missing (an earlier quickstart stage did not finish)")
    return [json.loads(l)["text"] for l in path.read_text().splitlines() if l.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "⏎ ")[:80]


__all__ = ["QuickstartConfig", "run_quickstart", "STAGES", "Context", "unigram_loss"]
