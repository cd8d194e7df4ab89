"""The lm-eval bridge: a `geb` model for EleutherAI's lm-evaluation-harness, and local task configs.

Needs the optional extra `eval` (`pip install lm-eval`; its core pulls datasets/evaluate, not
transformers). Use it as:

- CLI: `python -m geb.eval.lmeval --model geb --model_args path=DIR --tasks ... [--include_path DIR]`
  (lm-eval's own CLI with the geb model registered; lm-eval 0.4 has no plugin discovery, so plain
  `lm_eval` cannot see a model that no module registered).
- Python: `from geb.eval.lmeval import GebLM` then
  `lm_eval.simple_evaluate(model=GebLM(path=DIR), tasks=[...], task_manager=...)`, or
  `register()` and `simple_evaluate(model="geb", model_args="path=DIR", ...)`.

`write_task_configs` turns a benchmark folder in its official layout into lm-eval task YAMLs that
read local JSON-lines copies (no download) and reproduce the harness's stock prompt for MMLU,
C-Eval and CMMLU, so any stock-style run works offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from geb.common import atomic_write_text
from geb.errors import GebError

try:  # the optional extra: the class below exists only when lm-eval is installed
    from lm_eval.api.model import LM as _LMBase
except ImportError:  # pragma: no cover - exercised only without the extra
    _LMBase = object


def _require():
    if _LMBase is object:
        raise GebError("the lm-eval bridge needs the optional extra: pip install 'lm-eval>=0.4'")


class GebLM(_LMBase):
    """lm-eval model over a geb checkpoint folder: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, path: str | None = None, batch_size=8, max_length: int | None = None, device: str | None = None,
                 max_batch_size=None, **_ignored):
        _require()
        super().__init__()
        from geb.infer.scoring import is_quantized, load_scorer
        from geb.scoring import Scorer

        if not path:
            raise GebError("the geb lm-eval model needs model_args path=<model folder>")
        bs = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 8
        bs = bs if bs > 1 else 8
        max_len = int(max_length) if max_length else None
        if is_quantized(path) or _device(device) == "cpu":
            self.scorer, tok, _, self._engine = load_scorer(path, batch_size=bs, max_len=max_len)
        else:  # a GPU: the full model on it (the engine's runtime is CPU-only)
            from geb.checkpoint import load_model

            model, tok, _ = load_model(path, device=_device(device))
            self.scorer, self._engine = Scorer(model, tok, batch_size=bs, max_len=max_len), None
        self.path = str(path)
        self.tok = tok

    @property
    def engine(self):
        """The generation engine, built on first use (scoring-only tasks never need it)."""
        if self._engine is None:
            from geb.infer.engine import Engine

            self._engine = Engine(self.scorer.model, self.tok)
        return self._engine

    # -- lm-eval interface ----------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return f"geb-{self.tok.hash()}"

    def chat_template(self, chat_template=False) -> str:
        return self.tok.chat_template

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        ids, _ = self.tok.render_chat(list(chat_history), add_generation_prompt=add_generation_prompt)
        return self.tok.decode(ids)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [self.scorer.encode_pair(*req.args[:2]) for req in requests]
        out = self.scorer.loglikelihood(pairs)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            (text,) = req.args[:1]
            lp, _ = self.scorer.rolling(self.tok.encode(text))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
            out.append(lp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        from geb.infer.sampling import SamplingParams

        out = []
        L = self.scorer.max_len
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] or {})
            until = kw.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(kw.pop("max_gen_toks", 256))
            do_sample = bool(kw.pop("do_sample", False))
            temp = float(kw.pop("temperature", 0.0) or 0.0)
            ids = self.tok.encode(context)
            keep = max(1, L - max_new)
            ids = ids[-keep:] if len(ids) > keep else ids
            p = SamplingParams(max_new_tokens=max_new, temperature=temp if do_sample and temp > 0 else 0.0,
                               top_k=0, top_p=float(kw.pop("top_p", 1.0) or 1.0), repetition_penalty=1.0,
                               seed=kw.pop("seed", None), stop=list(until))
            text = self.engine.generate(ids, p).text if ids else ""
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def _device(device: str | None) -> str:
    """lm-eval's CLI asks for 'cuda' by default: fall back to the CPU when there is no GPU."""
    import torch

    if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "cpu"
    return str(device)


def register() -> None:
    """Make `geb` a model name in lm-eval's registry (idempotent)."""
    _require()
    from lm_eval.api import registry

    try:
        if registry.get_model("geb") is GebLM:
            return
    except (ValueError, KeyError):
        pass
    registry.register_model("geb")(GebLM)


def main(argv: list[str] | None = None) -> None:
    """`python -m geb.eval.lmeval ARGS`: lm-eval's CLI with the geb model registered."""
    import sys

    try:
        register()
    except GebError as e:
        print(f"geb lm-eval: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


# -- local task configs -----------------------------------------------------------------------------
def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def write_task_configs(benchmark: str, data_dir, out_dir, split: str | None = None,
                       subjects: list[str] | None = None) -> list[str]:
    """Write lm-eval tasks `geb_<benchmark>_<subject>` (+ group `geb_<benchmark>`) reading local
    JSON-lines copies of the benchmark; returns the task names. Point lm-eval at them with
    `--include_path OUT_DIR` (CLI) or `TaskManager(include_path=OUT_DIR)`."""
    from geb.eval import prompts
    from geb.eval.benchmarks import load_benchmark

    bench = load_benchmark(benchmark, data_dir, split=split, subjects=subjects)
    out = Path(out_dir).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    answer_tail = "\nAnswer:" if benchmark == "mmlu" else "\n答案："
    doc_to_text = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}" + answer_tail
    names = []
    for subj in bench.subjects:
        files = {}
        for sp, items in ((bench.split, subj.items), ("dev", subj.dev)):
            f = out / "data" / f"{benchmark}_{subj.name}.{sp}.jsonl"  # benchmarks share subject names
            rows = ({"id": it.id, "question": it.question, "A": it.choices[0], "B": it.choices[1],
                     "C": it.choices[2], "D": it.choices[3], "answer": it.answer} for it in items)
            atomic_write_text(f, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            files[sp] = str(f)
        task = f"geb_{benchmark}_{subj.name}"
        names.append(task)
        lines = [
            f"task: {task}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            *(f"    {sp}: {_yaml_str(p)}" for sp, p in files.items()),
            f"test_split: {bench.split}",
            "fewshot_split: dev" if subj.dev else "",
            "fewshot_config:\n  sampler: first_n",
            "output_type: multiple_choice",
            f"description: {_yaml_str(prompts.description('lm-eval', benchmark, subj))}",
            f"doc_to_text: {_yaml_str(doc_to_text)}",
            'doc_to_choice: ["A", "B", "C", "D"]',
            "doc_to_target: \"{{['A', 'B', 'C', 'D'].index(answer)}}\"",
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true",
            "metadata:\n  version: 1.0",
        ]
        atomic_write_text(out / f"{task}.yaml", "\n".join(x for x in lines if x) + "\n")
    group = [f"group: geb_{benchmark}", "task:", *(f"  - {t}" for t in names),
             "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: true",
             "metadata:\n  version: 1.0"]
    atomic_write_text(out / f"_geb_{benchmark}.yaml", "\n".join(group) + "\n")
    return names


if __name__ == "__main__":
    main()
