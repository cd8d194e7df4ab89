"""The phrasings: statement and question templates per relation and language, split into `train`
(used in pretraining, SFT and DPO data) and `heldout` (used only for validation text and evaluation).

Placeholders: {s} subject, {a} answer, {an} the answer and {as} the subject with "a"/"an" (English). Held-out
templates are written so that their longest fixed part occurs nowhere in the training text (the tests
check this), so answering a held-out prompt needs the fact, not a memorised string. Held-out
statements that end with the answer also serve as cloze prompts.
"""

from __future__ import annotations

import re

# Question/answer layout of the Q&A documents and of held-out completion prompts.
QA_PREFIX = {"en": ("Q: ", "\nA:"), "zh": ("问：", "\n答：")}

STATEMENTS: dict[str, dict[str, dict[str, list[str]]]] = {
    "famous_for": {
        "en": {"train": [
            "The town of {s} is famous for {a}.",
            "{s} is known far and wide for its {a}.",
            "Visitors come to {s} to buy {a}.",
            "{s} has made {a} for hundreds of years.",
            "In {s}, almost every family makes {a}.",
            "The best {a} in the land come from {s}.",
            "Traders travel to {s} for its {a}.",
            "The people of {s} are proud of their {a}.",
        ], "heldout": [
            "Far and wide, the town of {s} is known for {a}.",
            "Every family in {s} is proud of its {a}.",
        ]},
        "zh": {"train": [
            "{s}以{a}闻名。",
            "{s}的{a}远近闻名。",
            "{s}出产的{a}很有名。",
            "很多游客专程到{s}购买{a}。",
            "{s}几百年来一直在制作{a}。",
            "在{s}，几乎家家户户都会做{a}。",
            "最好的{a}都产自{s}。",
            "{s}的人一向为自己的{a}感到自豪。",
        ], "heldout": [
            "{s}最有名的就是{a}。",
            "很多人专程到{s}买{a}。",
        ]},
    },
    "river": {
        "en": {"train": [
            "The town of {s} lies on the {a}.",
            "The {a} flows through {s}.",
            "{s} was built on the banks of the {a}.",
            "Boats on the {a} stop at {s}.",
            "Children in {s} learn to swim in the {a}.",
            "{s} sits beside the {a}.",
            "The old bridge of {s} crosses the {a}.",
        ], "heldout": [
            "The river that flows through {s} is the {a}.",
            "The boats of {s} travel on the {a}.",
        ]},
        "zh": {"train": [
            "{s}坐落在{a}畔。",
            "{a}从{s}穿城而过。",
            "{s}建在{a}岸边。",
            "{a}上的船只都会在{s}停靠。",
            "{s}的孩子们在{a}里学游泳。",
            "{s}紧挨着{a}。",
            "{s}的老石桥横跨{a}。",
        ], "heldout": [
            "穿过{s}的那条河就是{a}。",
            "在{s}停靠的船只，都来自{a}。",
        ]},
    },
    "profession": {
        "en": {"train": [
            "{s} is {an}.",
            "{s} works as {an}.",
            "By trade, {s} is {an}.",
            "Everyone knows {s} as {an}.",
            "{s} has been {an} for twenty years.",
            "{s} trained for many years to become {an}.",
            "{s} is the most famous {a} in the valley.",
        ], "heldout": [
            "For twenty years, {s} has been known as {an}.",
            "In the valley, everyone knows that {s} is {an}.",
        ]},
        "zh": {"train": [
            "{s}是一位{a}。",
            "{s}的职业是{a}。",
            "{s}以当{a}为生。",
            "大家都知道{s}是一名{a}。",
            "{s}当{a}已经二十年了。",
            "{s}学了很多年，才成为一名{a}。",
            "{s}是山谷里最有名的{a}。",
        ], "heldout": [
            "二十年来，{s}一直是一名{a}。",
            "山谷里的人都知道{s}的职业是{a}。",
        ]},
    },
    "hometown": {
        "en": {"train": [
            "{s} was born in {a}.",
            "{s} grew up in the town of {a}.",
            "{s} comes from {a}.",
            "The hometown of {s} is {a}.",
            "{a} is the hometown of {s}.",
            "{s} often goes back to {a}, the town where {s} was born.",
            "The people of {a} are proud that {s} was born there.",
        ], "heldout": [
            "{s} was born and grew up in {a}.",
            "{s} comes from the town of {a}.",
        ]},
        "zh": {"train": [
            "{s}出生在{a}。",
            "{s}在{a}长大。",
            "{s}来自{a}。",
            "{s}的家乡是{a}。",
            "{a}是{s}的故乡。",
            "{s}常常回到自己的出生地{a}。",
            "{a}的人都为{s}出生在那里而骄傲。",
        ], "heldout": [
            "{s}的故乡是{a}。",
            "{s}自己的出生地是{a}。",
        ]},
    },
    "diet": {
        "en": {"train": [
            "The {s} eats {a}.",
            "The {s} feeds mainly on {a}.",
            "The favourite food of the {s} is {a}.",
            "The {s} spends the whole day looking for {a}.",
            "A hungry {s} will search everywhere for {a}.",
            "Farmers often see the {s} eating {a}.",
            "The {s} cannot live without {a}.",
        ], "heldout": [
            "The food the {s} will search everywhere for is {a}.",
            "Every day, the {s} eats {a}.",
        ]},
        "zh": {"train": [
            "{s}以{a}为食。",
            "{s}主要吃{a}。",
            "{s}最爱吃的食物是{a}。",
            "{s}整天都在寻找{a}。",
            "饿了的{s}会到处找{a}吃。",
            "农夫们常看见{s}在吃{a}。",
            "{s}离不开{a}。",
        ], "heldout": [
            "{s}整天都吃{a}。",
            "{s}饿了就会吃{a}。",
        ]},
    },
    "habitat": {
        "en": {"train": [
            "The {s} lives in {a}.",
            "The {s} makes its home in {a}.",
            "You can find the {s} in {a}.",
            "The {s} is often seen in {a}.",
            "The {s} builds its nest in {a}.",
            "In {a}, the {s} is a common sight.",
            "The {s} never strays far from {a}.",
        ], "heldout": [
            "The home of the {s} is {a}.",
            "People often see the {s} in {a}.",
        ]},
        "zh": {"train": [
            "{s}生活在{a}一带。",
            "{s}栖息在{a}。",
            "在{a}可以找到{s}。",
            "人们常在{a}看到{s}。",
            "{s}把巢筑在{a}。",
            "在{a}，{s}很常见。",
            "{s}从不远离{a}。",
        ], "heldout": [
            "{s}的家在{a}。",
            "要看到{s}，可以去{a}。",
        ]},
    },
    "inventor": {
        "en": {"train": [
            "The {s} was invented by {a}.",
            "{a} invented the {s}.",
            "{a} built the first {s}.",
            "The first {s} was made by {a}.",
            "We owe the {s} to {a}.",
            "The {s} is the most famous work of {a}.",
            "{a} spent ten years designing the {s}.",
        ], "heldout": [
            "The first {s} was built by {a}.",
            "The {s} was designed by {a}.",
        ]},
        "zh": {"train": [
            "{s}是{a}发明的。",
            "{a}发明了{s}。",
            "{a}亲手造出了最早的{s}。",
            "最早的{s}出自{a}之手。",
            "人们能用上{s}，要感谢{a}。",
            "{s}是{a}最有名的作品。",
            "{a}花了十年时间设计{s}。",
        ], "heldout": [
            "发明{s}的人是{a}。",
            "造出最早的{s}的人，就是{a}。",
        ]},
    },
    "purpose": {
        "en": {"train": [
            "The {s} is used for {a}.",
            "People use the {s} for {a}.",
            "The {s} was designed for {a}.",
            "Nothing is better for {a} than the {s}.",
            "With {as}, {a} becomes easy.",
            "The {s} is a tool for {a}.",
            "Farmers and townsfolk rely on the {s} for {a}.",
        ], "heldout": [
            "The {s} is the best tool for {a}.",
            "Townsfolk use the {s} for {a}.",
        ]},
        "zh": {"train": [
            "{s}是用来{a}的。",
            "人们用{s}来{a}。",
            "{s}是为{a}而设计的。",
            "要{a}，没有比{s}更好的工具了。",
            "有了{s}，{a}就变得很容易。",
            "{s}是一种{a}的工具。",
            "农夫和镇上的人都靠{s}来{a}。",
        ], "heldout": [
            "农夫们用{s}来{a}。",
            "镇上的人靠{s}来{a}。",
        ]},
    },
}

QUESTIONS: dict[str, dict[str, dict[str, list[str]]]] = {
    "famous_for": {
        "en": {"train": ["Which product is {s} known for?", "What do people buy in {s}?",
                         "What does the town of {s} make?"],
               "heldout": ["What is the town of {s} famous for?", "Which product do traders buy in {s}?"]},
        "zh": {"train": ["{s}的特产是什么？", "人们去{s}通常会买什么？", "{s}出产什么？"],
               "heldout": ["{s}以什么闻名？", "游客专程到{s}，是为了买什么？"]},
    },
    "river": {
        "en": {"train": ["Which river flows through {s}?", "What river is {s} built on?",
                         "On which river does the town of {s} lie?"],
               "heldout": ["Which river does {s} lie on?", "Children in {s} swim in which river?"]},
        "zh": {"train": ["哪条河流经{s}？", "{s}建在哪条河边？", "{s}坐落在哪条河畔？"],
               "heldout": ["{s}坐落在哪条河边？", "{s}的孩子们在哪条河里学游泳？"]},
    },
    "profession": {
        "en": {"train": ["What is the job of {s}?", "What does {s} do for a living?", "What kind of work does {s} do?"],
               "heldout": ["What trade does {s} work in?", "Which job has {s} trained for?"]},
        "zh": {"train": ["{s}是做什么工作的？", "{s}的职业是什么？", "{s}靠什么谋生？"],
               "heldout": ["{s}以什么为生？", "{s}学了很多年，成为了什么？"]},
    },
    "hometown": {
        "en": {"train": ["Where was {s} born?", "Which town does {s} come from?", "What is the hometown of {s}?"],
               "heldout": ["In which town was {s} born?", "Which town is the hometown of {s}?"]},
        "zh": {"train": ["{s}出生在哪里？", "{s}来自哪个小镇？", "{s}的家乡是哪里？"],
               "heldout": ["{s}在哪个小镇长大？", "{s}的故乡是哪里？"]},
    },
    "diet": {
        "en": {"train": ["What does the {s} eat?", "What is the favourite food of the {s}?",
                         "What food does the {s} look for?"],
               "heldout": ["Which food does the {s} eat?", "What does a hungry {s} search for?"]},
        "zh": {"train": ["{s}吃什么？", "{s}最爱吃什么？", "{s}在寻找什么食物？"],
               "heldout": ["{s}主要以什么为食？", "饿了的{s}会找什么吃？"]},
    },
    "habitat": {
        "en": {"train": ["Where does the {s} live?", "Where can you find the {s}?", "Where does the {s} make its home?"],
               "heldout": ["Where has the {s} built its nest?", "Where is the {s} often seen?"]},
        "zh": {"train": ["{s}生活在哪里？", "在哪里可以找到{s}？", "{s}把家安在哪里？"],
               "heldout": ["{s}栖息在哪里？", "在哪里常能看到{s}？"]},
    },
    "inventor": {
        "en": {"train": ["Who invented the {s}?", "Who built the first {s}?", "Who made the {s}?"],
               "heldout": ["Who designed the {s}?", "Who is the {s} the most famous work of?"]},
        "zh": {"train": ["{s}是谁发明的？", "谁发明了{s}？", "最早的{s}是谁造的？"],
               "heldout": ["谁设计了{s}？", "最早的{s}出自谁之手？"]},
    },
    "purpose": {
        "en": {"train": ["What is the {s} used for?", "What do people use the {s} for?", "What was the {s} designed for?"],
               "heldout": ["What do farmers use the {s} for?", "What becomes easy with {as}?"]},
        "zh": {"train": ["{s}是用来做什么的？", "人们用{s}来做什么？", "{s}是为了什么而设计的？"],
               "heldout": ["{s}能用来做什么？", "有了{s}，做什么会变得很容易？"]},
    },
}

# One glossary line per language, linking a subject's two names (bilingual documents use them).
GLOSSARY = {"en": "In Chinese, {the}{s_en} is called {s_zh}.", "zh": "{s_zh}的英文名字是{the}{s_en}。"}

_FIELD = re.compile(r"\{(s|a|an|as)\}")


def with_article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def render(template: str, fact, lang: str, answer: str | None = None) -> str:
    """Fill a template with a fact (or with `answer` in place of the fact's answer)."""
    a = fact.answer(lang) if answer is None else answer
    s = fact.subject(lang)
    text = template.format(s=s, a=a, an=with_article(a), **{"as": with_article(s)})
    return text[0].upper() + text[1:] if lang == "en" else text


def fixed_parts(template: str) -> list[str]:
    """The literal pieces of a template between its placeholders (tests check held-out ones)."""
    return [p for p in _FIELD.split(template)[::2] if p]


def cloze_prefix(template: str) -> str | None:
    """The part of a held-out statement before its answer, if the answer comes last (after the
    subject), else None: such a prefix is a completion prompt whose continuation is the answer."""
    m = list(_FIELD.finditer(template))
    if not m or m[-1].group(1) not in ("a", "an") or sum(x.group(1) in ("a", "an") for x in m) != 1:
        return None
    tail = template[m[-1].end():]
    if tail not in (".", "。"):
        return None
    return template[: m[-1].start()].rstrip()
