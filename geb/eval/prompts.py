"""The named evaluation protocols: prompt layouts, answer continuations and CoT answer extraction.

- `lm-eval`: EleutherAI lm-evaluation-harness (v0.4 task configs `mmlu/default`, `ceval-valid`,
  `cmmlu`): description + k shots from the first k dev rows, each `<question>\\nA. ..\\nD. ..\\nAnswer:`
  (`答案：` for C-Eval/CMMLU) + " " + letter, joined by a blank line; the model's log-likelihood of
  " A".." D" after the question decides (argmax, no length normalisation).
- `original`: each benchmark authors' own code: MMLU (hendrycks/test evaluate.py: the same layout,
  question not stripped, " A".." D" as next token), C-Eval (ceval evaluator for base models: header
  `以下是中国关于{科目}考试的单项选择题…`, `答案：A` without a space, letters "A".."D" compared at the
  next token), CMMLU (haonan-li/CMMLU mp_utils: `题目：` before each question, `答案是：A`).
- `cot`: zero-shot chain of thought (C-Eval's CoT setting; Kojima et al. 2022 for English):
  `…答案：让我们一步一步思考，` / `…Answer: Let's think step by step.`, greedy generation, then the
  answer letter is extracted by `extract_answer`.
"""

from __future__ import annotations

import re

from geb.errors import GebError
from geb.eval.benchmarks import LETTERS, Item, Subject

PROTOCOLS = ("lm-eval", "original", "cot")


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise GebError(f"unknown protocol {protocol!r} (choose from: {', '.join(PROTOCOLS)})")


def _choices(item: Item) -> str:
    return "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, item.choices))


def description(protocol: str, benchmark: str, subject: Subject) -> str:
    if benchmark == "mmlu":
        return f"The following are multiple choice questions (with answers) about {subject.name.replace('_', ' ')}.\n\n"
    if benchmark == "ceval":
        if protocol == "lm-eval":
            return f"以下是中国关于{subject.zh}的单项选择题，请选出其中的正确答案。\n\n"
        return f"以下是中国关于{subject.zh}考试的单项选择题，请选出其中的正确答案。\n\n"
    if protocol == "cot":
        return f"以下是关于{subject.zh}的单项选择题，请分析并选出正确答案。\n\n"
    return f"以下是关于{subject.zh}的单项选择题，请直接给出正确答案的选项。\n\n"


def question(protocol: str, benchmark: str, item: Item) -> str:
    """The text of one question up to where the answer goes."""
    if protocol == "lm-eval":
        return item.question.strip() + _choices(item) + ("\nAnswer:" if benchmark == "mmlu" else "\n答案：")
    if protocol == "original":
        if benchmark == "mmlu":
            return item.question + _choices(item) + "\nAnswer:"
        if benchmark == "ceval":
            return item.question + _choices(item) + "\n答案："
        return "题目：" + item.question + _choices(item) + "\n答案是："
    # cot
    if benchmark == "mmlu":
        return item.question.strip() + _choices(item) + "\nAnswer: Let's think step by step."
    return item.question.strip() + _choices(item) + "\n答案：让我们一步一步思考，"


def continuations(protocol: str, benchmark: str) -> tuple[str, ...]:
    """The four answer strings whose log-likelihood is compared after the question."""
    if protocol == "original" and benchmark != "mmlu":
        return LETTERS
    return tuple(" " + L for L in LETTERS)


def shot(protocol: str, benchmark: str, item: Item) -> str:
    """A solved example: the question, its answer continuation and the blank line after it."""
    ans = continuations(protocol, benchmark)[LETTERS.index(item.answer)]
    return question(protocol, benchmark, item) + ans + "\n\n"


def context(protocol: str, benchmark: str, subject: Subject, shots: list[Item], item: Item) -> tuple[str, str]:
    """(prefix shared by the subject's questions, question text); the prompt is their concatenation."""
    prefix = description(protocol, benchmark, subject) + "".join(shot(protocol, benchmark, s) for s in shots)
    return prefix, question(protocol, benchmark, item)


def cot_chat_message(benchmark: str, subject: Subject, item: Item) -> str:
    """The user message for a chat model under the cot protocol."""
    body = description("cot", benchmark, subject) + item.question.strip() + _choices(item)
    if benchmark == "mmlu":
        return body + '\nThink step by step, then finish with "The answer is X".'
    return body + "\n请一步一步思考，最后用“答案是X”的形式给出答案。"


# Ordered from the most explicit statement of an answer to the weakest hint; within one pattern the
# last match wins (a model often restates the options before concluding).
_ANSWER_PATTERNS = [
    r"答案(?:应该|应|就)?(?:是|为|选)\s*[:：]?\s*[(（【\[]?\s*([ABCD])(?![A-Za-z])",
    r"(?i:the\s+(?:correct\s+|right\s+|best\s+)?answer\s+(?:is|should\s+be|would\s+be))\s*[:：]?\s*(?:option\s+)?[(\[]?([ABCD])(?![A-Za-z])",
    r"(?i:answer)\s*[:：]\s*[(\[]?([ABCD])(?![A-Za-z])",
    r"答案\s*[:：]\s*[(（【\[]?\s*([ABCD])(?![A-Za-z])",
    r"(?:选择|选项|应选|故选|所以选|因此选|选)\s*[(（【\[]?\s*([ABCD])(?![A-Za-z])",
    r"(?<![A-Za-z])([ABCD])\s*(?:是|为)?(?:正确|对)(?:的)?(?:答案|选项)?",
    r"(?i:option\s+)?[(\[]?(?<![A-Za-z])([ABCD])[)\]]?\s+(?i:is\s+(?:the\s+)?correct)",
]


def extract_answer(text: str) -> str | None:
    """The answer letter a chain-of-thought generation commits to, or None if it names none."""
    for pat in _ANSWER_PATTERNS:
        found = re.findall(pat, text)
        if found:
            return found[-1]
    standalone = set(re.findall(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])", text))
    if len(standalone) == 1:
        return standalone.pop()
    return None
