"""Quality filtering: Gopher/C4-style document heuristics made Chinese-aware, and a perplexity filter.

Counts are over units (Latin words, single CJK characters) or jieba words (geb.data.text), never
over spaces, so unspaced Chinese is measured like English. Thresholds follow Gopher (Rae et al.
2021) where one exists; where Chinese needs its own (stop words), it is stated in `defaults`.

Why not datatrove's GopherQualityFilter/GopherRepetitionFilter/C4QualityFilter: they take one
language per step and split words with spaCy (or whitespace); a bilingual corpus needs the unit
choice made per document. The perplexity filter scores with a character n-gram model fit here on a
trusted sample (reference_lm.py) or with a geb model folder; datatrove's perplexity step needs KenLM models
downloaded from the Hub.
"""

from __future__ import annotations

import re
from collections import Counter

from geb.data.rules import Rule
from geb.data.text import CJK_RE, LETTER_RE, cjk_count, doc_units, is_chinese, words
from geb.errors import GebError


class DocFilter(Rule):
    """A rule that keeps or drops whole documents: check(doc) returns the reason to drop, or None."""

    stage = "quality"

    def check(self, doc) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def process(self, doc):
        reason = self.check(doc)
        if reason:
            self.removed(doc, doc.text, reason)
            return None
        return doc


class LengthFilter(DocFilter):
    rule = "length"
    help = "keep documents with min_units..max_units units (a unit: a Latin word or one CJK character)"
    defaults = {"min_units": 10, "max_units": 500_000}

    def check(self, doc):
        n = len(doc_units(doc.text))
        if n < self.p["min_units"]:
            return "too short"
        if n > self.p["max_units"]:
            return "too long"
        return None


ELLIPSIS_RE = re.compile(r"\.{3,}|…+")
BULLET_RE = re.compile(r"^\s*(?:[-*•·●◦▪‣>]|\d+[.)、]|[（(]?[一二三四五六七八九十]+[)）、])\s")


class GopherQualityFilter(DocFilter):
    rule = "gopher_quality"
    help = ("Gopher heuristics: '#' and ellipses (... … ……, one per run) per unit, bullet-line and ellipsis-line "
            "shares (documents of ≥ min_lines lines), share of units with a letter or CJK character, English mean "
            "word length (not applied to Chinese)")
    defaults = {"max_symbol_word_ratio": 0.1, "max_bullet_lines_ratio": 0.9, "max_ellipsis_lines_ratio": 0.3,
                "min_lines": 3, "min_alpha_ratio": 0.7, "min_avg_word_length": 3, "max_avg_word_length": 10}

    def check(self, doc):
        text, p = doc.text, self.p
        us = doc_units(text)
        if not us:
            return "no words"
        n = len(us)
        if (text.count("#") + len(ELLIPSIS_RE.findall(text))) / n > p["max_symbol_word_ratio"]:
            return "symbol/word ratio"
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) >= p["min_lines"]:  # a one-line review ending in …… is not a page of cut-off snippets
            if sum(1 for ln in lines if BULLET_RE.match(ln)) / len(lines) > p["max_bullet_lines_ratio"]:
                return "bullet lines"
            ends = sum(1 for ln in lines if ln.rstrip().endswith(("...", "…")))
            if ends / len(lines) > p["max_ellipsis_lines_ratio"]:
                return "ellipsis lines"
        # a unit of letters only (isalpha: every Latin word and CJK character) has one: the regex only
        # looks at the rest (numbers, hyphenated or mixed units)
        if (n - sum(1 for u in us if not u.isalpha() and not LETTER_RE.search(u))) / n < p["min_alpha_ratio"]:
            return "few alphabetic words"
        # a CJK character is always a unit of its own, so the Latin units are the rest
        if n - cjk_count(text) > n / 2:
            latin = [u for u in us if not CJK_RE.match(u)]
            mean = sum(map(len, latin)) / len(latin)
            if not p["min_avg_word_length"] <= mean <= p["max_avg_word_length"]:
                return "mean word length"
        return None


# Gopher's eight words plus the commonest English function words (Gopher's eight alone miss short
# factual prose: "Halvard is called ... in Chinese" has none of them).
EN_STOP = {"the", "be", "to", "of", "and", "that", "have", "with", "a", "an", "in", "is", "it", "for", "on", "as",
           "was", "are", "by", "from", "at", "this", "or", "not"}
ZH_STOP = {"的", "了", "是", "在", "和", "有", "也", "就", "不", "都", "这", "我", "你", "他", "她", "它",
           "我们", "他们", "一个", "与", "及", "而", "但", "之", "把", "被", "对", "从", "为", "着"}


class StopwordFilter(DocFilter):
    rule = "stopwords"
    help = ("keyword/stop-word density: a document of ≥ min_words words (jieba words for Chinese) needs ≥ min_count "
            "stop words and a stop-word density ≥ min_density (24 English function words incl. Gopher's 8; 30 Chinese), "
            "and its most frequent content word may cover at most max_keyword_ratio of its words (keyword stuffing); "
            "shorter documents are too short for word statistics")
    defaults = {"min_words": 50, "min_count": 2, "min_density": 0.02, "max_keyword_ratio": 0.2}

    def check(self, doc):
        if len(doc_units(doc.text)) < self.p["min_words"]:  # units ≥ words: skips jieba for short documents
            return None
        ws = [w.lower() for w in words(doc.text)]
        if len(ws) < self.p["min_words"]:
            return None
        stop = ZH_STOP if is_chinese(doc.text) else EN_STOP
        n_stop = sum(1 for w in ws if w in stop or w in EN_STOP)
        if n_stop < self.p["min_count"] or n_stop / len(ws) < self.p["min_density"]:
            return "few stop words"
        content = Counter(w for w in ws if w not in stop and w not in EN_STOP and (len(w) >= 2 or CJK_RE.match(w)))
        if content:
            _, top = content.most_common(1)[0]
            if top / len(ws) > self.p["max_keyword_ratio"]:
                return "keyword stuffing"
        return None


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of their characters)."""
    seen, dup, dup_chars = set(), 0, 0
    total = sum(len(x) for x in items) or 1
    for x in items:
        if x in seen:
            dup += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup / max(1, len(items)), dup_chars / total


class RepetitionFilter(DocFilter):
    rule = "repetition"
    help = ("Gopher repetition: duplicate lines/paragraphs (by count and characters); for documents of ≥ min_words "
            "words also the most frequent 2/3/4-gram's character share and the duplicated 5..10-gram character share "
            "(n-grams over jieba words for Chinese; in shorter documents one repeated name already exceeds them)")
    defaults = {"min_words": 100, "dup_line_frac": 0.3, "dup_para_frac": 0.3, "dup_line_char_frac": 0.2, "dup_para_char_frac": 0.2,
                "top_ngram": {"2": 0.2, "3": 0.18, "4": 0.16},
                "dup_ngram": {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10}}

    def check(self, doc):
        text, p = doc.text, self.p
        paras = [x.strip() for x in re.split(r"\n\s*\n", text) if x.strip()]
        lines = [x.strip() for x in text.split("\n") if x.strip()]
        f, fc = _dup_fraction(paras)
        if f > p["dup_para_frac"] or fc > p["dup_para_char_frac"]:
            return "duplicate paragraphs"
        f, fc = _dup_fraction(lines)
        if f > p["dup_line_frac"] or fc > p["dup_line_char_frac"]:
            return "duplicate lines"
        if len(doc_units(text)) < p["min_words"]:  # units ≥ words: skips jieba for short documents
            return None
        ws = words(text)
        total = sum(len(w) for w in ws)
        if not total or len(ws) < p["min_words"]:
            return None
        for n, limit in sorted((int(k), v) for k, v in p["top_ngram"].items()):
            grams = Counter(zip(*(ws[k:] for k in range(n))))  # the n-grams as tuples, built in C
            if grams:
                g, c = grams.most_common(1)[0]
                if c > 1 and c * sum(len(w) for w in g) / total > limit:
                    return f"top {n}-gram"
        lens = [len(w) for w in ws]
        for n, limit in sorted((int(k), v) for k, v in p["dup_ngram"].items()):
            if len(ws) < n:
                break
            seen, covered, any_dup = set(), [False] * len(ws), False
            for i, g in enumerate(zip(*(ws[k:] for k in range(n)))):
                if g in seen:
                    covered[i:i + n] = (True,) * n
                    any_dup = True
                else:
                    seen.add(g)
            if not any_dup:
                break  # a repeated (n+1)-gram holds a repeated n-gram: no longer one repeats either
            if sum(x for x, c in zip(lens, covered) if c) / total > limit:
                return f"duplicate {n}-grams"
        return None


class PerplexityFilter(DocFilter):
    rule = "perplexity"
    enabled_by_default = False
    help = ("drop documents whose perplexity under a reference LM exceeds max_ppl: kind=ngram (character n-gram "
            "fit on a trusted sample, `geb data fit-lm`; max_ppl 'auto' = the model's 99th percentile on held-out "
            "trusted text) or kind=geb (a geb model folder, per-token perplexity; max_ppl required)")
    defaults = {"kind": "ngram", "path": "", "max_ppl": "auto", "max_chars": 20_000}

    def setup(self):
        kind, path = self.p["kind"], self.p["path"]
        if not path:
            raise GebError("rule 'perplexity' is on but has no model (set perplexity.path=LM_FILE_OR_MODEL_DIR)")
        if kind == "ngram":
            from geb.data.reference_lm import CharNgramLM

            self._lm = CharNgramLM.load(path)
            self._score = self._lm.perplexity
            limit = self.p["max_ppl"]
            self._max = float(self._lm.meta["p99_ppl"] if limit == "auto" else limit)
        elif kind == "geb":
            if self.p["max_ppl"] == "auto":
                raise GebError("rule 'perplexity' with kind=geb needs a number for max_ppl")
            from geb.data.reference_lm import GebModelScorer

            self._score = GebModelScorer(path).perplexity
            self._max = float(self.p["max_ppl"])
        else:
            raise GebError(f"rule 'perplexity': kind must be ngram or geb (got {kind!r})")

    def check(self, doc):
        ppl = self._score(doc.text[: self.p["max_chars"]])
        doc.metadata["ppl"] = round(ppl, 2)
        return f"perplexity > {self._max:g}" if ppl > self._max else None


QUALITY_FILTERS: list[type[DocFilter]] = [LengthFilter, GopherQualityFilter, StopwordFilter, RepetitionFilter,
                                          PerplexityFilter]
