"""Text helpers shared by the data pipeline's rules, filters and dedup: scripts, words, sentences, code.

Chinese has no spaces, so every count that web-data heuristics take over "words" is taken here over
*units*: a Latin word or number, or one CJK character (`units`), or over jieba words when a
segmentation is needed (`words`). `BilingualWordTokenizer` exposes the same view to datatrove's
MinHash and sentence-dedup steps, so their shingles are character n-grams for Chinese and word
n-grams for English without spaCy models.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import unicodedata
from functools import cache, lru_cache

from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from geb.errors import GebError

# CJK ideographs (basic, extension A, compatibility) and the supplementary planes' extensions.
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
CJK_RE = re.compile(f"[{CJK}]")
# A unit: a Latin/Greek/Cyrillic/digit word (with inner ' or -), or a single CJK character.
UNIT_RE = re.compile(rf"[{CJK}]|[^\W_{CJK}]+(?:['’\-][^\W_{CJK}]+)*")
LETTER_RE = re.compile(rf"[^\W\d_]|[{CJK}]")

# Sentence ends: Chinese 。！？… and ASCII .!?, optionally followed by closing quotes/brackets.
TERMINALS = "。！？!?.…"
CLOSERS = "\"'”’」』）)】》〉"
SENT_END_RE = re.compile(rf"[{re.escape(TERMINALS)}]+[{re.escape(CLOSERS)}]*")
# A line is a complete sentence when it ends with terminal punctuation (closers allowed after it), or
# with a closing quote alone (the issue's `"` and `」`: quoted speech often ends the sentence inside).
LINE_END_RE = re.compile(rf"(?:[{re.escape(TERMINALS)}][{re.escape(CLOSERS)}]*|[\"”」』])\s*$")

QUOTES_END = "\"”」』"


def ends_sentence(line: str) -> bool:
    """LINE_END_RE.search(line), without a regex search that tries every position of a long line."""
    t = line.rstrip()
    if not t:
        return False
    if t[-1] in QUOTES_END:
        return True
    t = t.rstrip(CLOSERS)
    return bool(t) and t[-1] in TERMINALS


FENCE_RE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE_RE = re.compile(r"`[^`\n]+`")


def cjk_count(text: str) -> int:
    return len(CJK_RE.findall(text))


SPACES_RE = re.compile(r"\s+")


def nonspace_count(text: str) -> int:
    return len(text) - sum(map(len, SPACES_RE.findall(text)))


def is_chinese(text: str, threshold: float = 0.3) -> bool:
    """True when CJK characters are at least `threshold` of the non-space characters."""
    n = nonspace_count(text)
    return n > 0 and cjk_count(text) / n >= threshold


def units(text: str) -> list[str]:
    """Latin words/numbers and single CJK characters, punctuation and spaces dropped."""
    return UNIT_RE.findall(text)


@lru_cache(maxsize=8)
def doc_units(text: str) -> tuple[str, ...]:
    """units(text) as a tuple, cached for the last few texts: the quality filters in a row all count
    the same document's units."""
    return tuple(UNIT_RE.findall(text))


@lru_cache(maxsize=1)
def _segmenter():
    """The Chinese word segmenter: rjieba (jieba's algorithm and dictionary in Rust, ~15x faster) when
    installed, else jieba. Both ship their dictionary: nothing downloads."""
    try:
        import rjieba

        return lambda text: _as_jieba(rjieba.cut(text, True), text)
    except ImportError:
        pass
    import jieba  # it caches its prefix dict in the temp folder

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba.lcut


# jieba's HMM step cuts a run of ASCII letters/digits/symbols at every symbol but keeps decimals and
# percentages ("2008-6-1" → 2008 6 1, "1.5" and "85%" whole); rjieba keeps such runs whole, so they
# are cut here the way jieba does. On the benchmark corpus (8,529 Chinese documents) the two then give
# the same word list for all but one document (jieba keeps "AT&T" whole).
ASCII_RUN_RE = re.compile(r"[a-zA-Z0-9]+(?:\.\d+)?%?|.", re.S)


# Two adjacent ASCII characters, one not a letter or digit: a text without such a pair has no token
# _as_jieba would cut (every token is a piece of the text).
ASCII_PAIR_RE = re.compile(r"[\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f][\x00-\x7f]|[\x00-\x7f][\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]")


def _as_jieba(seg: list[str], text: str | None = None) -> list[str]:
    if text is not None and not ASCII_PAIR_RE.search(text):
        return seg
    out = []
    for w in seg:
        if w.isascii() and not w.isalnum() and len(w) > 1:
            out.extend(ASCII_RUN_RE.findall(w))
        else:
            out.append(w)
    return out


@lru_cache(maxsize=8)
def words(text: str) -> tuple[str, ...]:
    """Words for heuristics: jieba segmentation where the text has CJK, else the Latin units.

    Punctuation and whitespace tokens are dropped, so English words and Chinese words count alike.
    Cached for the last few texts: consecutive quality filters segment the same document. jieba's HMM
    stays on: without it unknown words (transliterated names) fall apart into characters, whose
    repeats then look like repeated n-grams.
    """
    if not CJK_RE.search(text):
        return tuple(units(text))
    try:
        seg = _segmenter()(text)
    except ImportError:  # jieba is in the `data` extra; characters are the fallback unit
        return tuple(units(text))
    return tuple(w for w in seg if w.isalnum() or UNIT_RE.search(w))  # isalnum: [^\W_] without a regex call


# A newline, or a run that starts with a terminal and goes on over terminals and closers.
SENT_BREAK_RE = re.compile(rf"\n|[{re.escape(TERMINALS)}][{re.escape(TERMINALS + CLOSERS)}]*")
ASCII_TERMINALS = frozenset(".!?")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans in both languages: a span ends after terminal punctuation (+closers) or a newline.

    An ASCII '.' only ends a sentence when followed by whitespace or the end (so 3.14, e.g. and URLs
    stay whole); Chinese terminals end it anywhere.
    """
    spans = []
    start = 0
    n = len(text)
    for m in SENT_BREAK_RE.finditer(text):
        i, j = m.span()
        if text[i] == "\n":
            if text[start:i].strip():
                spans.append((start, i))
            start = j
            continue
        if (text[i] in ASCII_TERMINALS and j < n and not text[j].isspace()
                and ASCII_TERMINALS.issuperset(text[i:j])):
            continue  # "3.14", "e.g.x", "a.b": not a boundary
        if text[start:j].strip():
            spans.append((start, j))
        start = j
    if text[start:].strip():
        spans.append((start, n))
    # strip leading whitespace of each span (datatrove re-joins spans with the gaps it skipped)
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        out.append((a, b))
    return out


def code_line_mask(lines: list[str]) -> list[bool]:
    """True for lines inside fenced code blocks (``` or ~~~), fences included: rules leave them alone."""
    if not any("```" in ln or "~~~" in ln for ln in lines):
        return [False] * len(lines)
    mask, inside = [], False
    for line in lines:
        if FENCE_RE.match(line):
            mask.append(True)
            inside = not inside
        else:
            mask.append(inside)
    return mask


class BilingualWordTokenizer(WordTokenizer):
    """A datatrove WordTokenizer for mixed Chinese/English text that needs no model download.

    word_tokenize → units (CJK characters one by one, Latin words whole): datatrove's MinHash then
    shingles Chinese by character n-grams and English by word n-grams. Sentences come from
    `split_sentences` (Chinese and ASCII terminals, newlines).
    """

    def __init__(self, unit: str = "words"):
        if unit not in ("words", "chars"):
            raise GebError(f"minhash shingle unit must be 'words' or 'chars' (got {unit!r})")
        super().__init__("zh+en")
        self.unit = unit

    def word_tokenize(self, text: str) -> list[str]:
        if self.unit == "chars":
            # every character but spaces, for Latin text too: one edited letter then changes n shingles,
            # not the n word n-grams around it, which is what keeps short English copies above the threshold
            return list("".join(text.split()))  # split() cuts at exactly the characters isspace() names
        return units(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b] for a, b in split_sentences(text)]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return split_sentences(text)

    # one instance per process is enough; equality by type keeps datatrove's lru_cache keyed sanely
    def __eq__(self, other):
        return type(other) is type(self) and other.unit == self.unit

    def __hash__(self):
        return hash((type(self).__name__, self.unit))


# Planes 0 and 1 hold every nonspacing mark but the variation selectors of plane 14 (Unicode 15); a
# text with a character past plane 1 takes datatrove's own per-character test, so a later Unicode
# version that puts marks elsewhere changes nothing.
MARK_PLANES = (range(0x20000), range(0xE0000, 0xF0000))
PAST_PLANE_1 = "\U00020000"


@cache
def _marks() -> tuple[frozenset, dict]:
    """The nonspacing marks (category Mn) of planes 0, 1 and 14, as a set of characters and as a
    str.translate table that deletes them (~0.05 s: the scan of all 17 planes took 0.35 s per process)."""
    codes = [c for plane in MARK_PLANES for c in plane if unicodedata.category(chr(c)) == "Mn"]
    return frozenset(map(chr, codes)), dict.fromkeys(codes)


@cache
def _without_diacritics(fields: tuple) -> TextNormConfig:
    return dataclasses.replace(TextNormConfig(**dict(fields)), norm_unicode_diacritics=False)


def simplify(text: str, config: TextNormConfig) -> str:
    """datatrove's simplify_text(text, config), equal output, faster: its last step (NFD, then drop
    every Mn character) is a Python generator over every character, which made simplify_text most
    of the MinHash and sentence-dedup signature time; here a set lookup tells whether a text has a
    mark at all (most do not) and one str.translate deletes them, and ASCII text (which NFD leaves
    alone and has no marks) skips the step."""
    if not config.norm_unicode_diacritics:
        return simplify_text(text, config)
    text = simplify_text(text, _without_diacritics(tuple(vars(config).items())))  # the config is unhashable
    if not text.isascii():
        text = unicodedata.normalize("NFD", text)
        if max(text) >= PAST_PLANE_1:
            text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        else:
            marks, table = _marks()
            if not marks.isdisjoint(text):
                text = text.translate(table)
    return text.strip()
