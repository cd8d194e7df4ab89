"""Rule cleaning: one datatrove step per rule, each with a name, on/off default and stated parameters.

Rules change a document's text (strip, mask, drop lines); a document left empty is dropped and
counted. Line rules never touch lines inside fenced code blocks (``` or ~~~), and URL/PII masking
skips inline `code` spans, so code with URLs survives. Order is the order of `CLEAN_RULES`.

Why not datatrove's formatters: its PIIFormatter replaces only e-mails and IPs (no phone or ID-card
numbers, no Chinese mobiles), its SymbolLinesFormatter and C4 line rule only know ASCII sentence ends
and its HTML support is trafilatura extraction of whole pages; the rules here are bilingual.
"""

from __future__ import annotations

import html
import re
import unicodedata
from pathlib import Path

from datatrove.data import Document

from geb.data.metering import MeteredStep
from geb.data.text import CJK_RE, INLINE_CODE_RE, code_line_mask, ends_sentence, nonspace_count, split_sentences, units
from geb.errors import GebError


class Rule(MeteredStep):
    """A named, configurable step. `defaults` are the stated parameter defaults."""

    rule: str = ""
    enabled_by_default = True
    defaults: dict = {}
    help = ""

    def __init__(self, stats_dir, max_examples: int = 5, **params):
        super().__init__(self.rule, stats_dir, max_examples)
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise GebError(f"rule '{self.rule}': unknown setting(s) {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(self.defaults) or 'none'})")
        self.p = {**self.defaults, **params}

    # -- helpers ------------------------------------------------------------------------------
    def map_lines(self, doc: Document, fn, reason: str) -> str:
        """Apply fn(line) → str | None to each line outside code blocks; None drops the line."""
        lines = doc.text.split("\n")
        code = code_line_mask(lines)
        out = []
        append = out.append
        for line, is_code in zip(lines, code):
            if is_code or line.isspace() or not line:
                append(line)
                continue
            new = fn(line)
            if new is None:
                self.removed(doc, line, reason)
            else:
                append(new)
        return tidy("\n".join(out))

    def sub_outside_code(self, doc: Document, text: str, pattern: re.Pattern, repl, reason: str,
                         redact: bool = False) -> str:
        """pattern.sub on text, skipping fenced code lines and inline `code` spans; counts matches.

        With redact, report examples show only the first two characters (the report must not
        republish the personal data the rule removed)."""
        found: list[str] = []

        def counted(m):
            found.append(m.group(0))
            return repl(m) if callable(repl) else repl

        if "`" not in text and "~~~" not in text:  # no code anywhere: one pass over the whole text
            text = pattern.sub(counted, text)
            for f in found:
                self.removed(doc, f"{f[:2]}… ({len(f)} chars)" if redact else f, reason)
            return text
        lines = text.split("\n")
        code = code_line_mask(lines)
        for i, (line, is_code) in enumerate(zip(lines, code)):
            if is_code:
                continue
            parts, last = [], 0
            for m in INLINE_CODE_RE.finditer(line):
                parts.append(pattern.sub(counted, line[last:m.start()]))
                parts.append(m.group(0))
                last = m.end()
            parts.append(pattern.sub(counted, line[last:]))
            lines[i] = "".join(parts)
        for f in found:
            self.removed(doc, f"{f[:2]}… ({len(f)} chars)" if redact else f, reason)
        return "\n".join(lines)


TRAILING_SPACE_RE = re.compile(r"[ \t]+\n")
BLANK_LINES_RE = re.compile(r"\n{3,}")


def tidy(text: str) -> str:
    """Trailing spaces off each line, at most one blank line in a row, no blank edges."""
    if " \n" in text or "\t\n" in text:  # the substring tests are much cheaper than the regexes
        text = TRAILING_SPACE_RE.sub("\n", text)
    if "\n\n\n" in text:
        text = BLANK_LINES_RE.sub("\n\n", text)
    return text.strip("\n")


# ---------------------------------------------------------------------------------------------
HTML_TAGS = ("a abbr address area article aside audio b base bdi bdo blockquote body br button canvas caption "
             "center cite code col colgroup dd del details dfn dialog div dl dt em embed fieldset figcaption figure "
             "font footer form h1 h2 h3 h4 h5 h6 head header hr html i iframe img input ins kbd label legend li link "
             "main map mark meta meter nav noscript object ol optgroup option output p param picture pre progress q "
             "s samp script section select small source span strike strong style sub summary sup table tbody td "
             "template textarea tfoot th thead time title tr track tt u ul var video wbr").split()
BLOCK_TAGS = set("address article aside blockquote body br dd div dl dt fieldset figcaption figure footer form h1 h2 "
                 "h3 h4 h5 h6 header hr html li main nav ol p pre section table tbody td tfoot th thead title tr ul".split())
TAG_RE = re.compile(r"</?(" + "|".join(HTML_TAGS) + r")\b(?:\s[^<>]*)?/?>", re.I)
DROP_BLOCK_RE = re.compile(r"<(script|style|noscript|template)\b[^>]*>.*?</\1\s*>|<!--.*?-->|<!DOCTYPE[^>]*>", re.I | re.S)
ENTITY_RE = re.compile(r"&(?:[a-zA-Z][a-zA-Z0-9]{1,31}|#\d{1,7}|#[xX][0-9a-fA-F]{1,6});")


class HtmlRule(Rule):
    rule = "html"
    help = "strip HTML tags (known element names only, so `a < b` and List<T> survive) and decode entities"
    defaults = {"drop_script_style": True}

    def process(self, doc):
        text = doc.text
        if TAG_RE.search(text) or "<!--" in text:
            if self.p["drop_script_style"]:
                for m in DROP_BLOCK_RE.finditer(text):
                    self.removed(doc, m.group(0), "script/style/comment")
                text = DROP_BLOCK_RE.sub(" ", text)
            tags = TAG_RE.findall(text)
            if tags:
                self.removed(doc, " ".join(f"<{t}>" for t in tags[:20]), "tags", count=len(tags))
            text = TAG_RE.sub(lambda m: "\n" if m.group(1).lower() in BLOCK_TAGS else "", text)
        if ENTITY_RE.search(text):
            ents = ENTITY_RE.findall(text)
            self.removed(doc, " ".join(ents[:20]), "entities", count=len(ents))
            text = html.unescape(text)
        if text != doc.text:
            doc.text = tidy("\n".join(re.sub(r"[ \t\xa0]+", " ", ln).strip() for ln in text.split("\n")))
        return doc


# Cc except tab/newline, plus invisible format characters (zero-width space, BOM, word joiner, soft
# hyphen, bidi overrides). The zero-width joiner stays: emoji sequences need it.
CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\ufeff\u00ad]")


class ControlCharsRule(Rule):
    rule = "control_chars"
    help = "remove control and invisible format characters (\\r\\n → \\n; ZWJ kept for emoji)"

    def process(self, doc):
        text = doc.text.replace("\r\n", "\n").replace("\r", "\n")
        found = CONTROL_RE.findall(text)
        if found:
            self.removed(doc, " ".join(f"U+{ord(c):04X}" for c in found[:20]), "control", count=len(found))
            text = CONTROL_RE.sub("", text)
        doc.text = text
        return doc


GBK_GARBAGE_RE = re.compile("锟斤拷|烫烫烫|屯屯屯|鐨勪|銆�")
# UTF-8 read as Latin-1/cp1252 always shows a lead byte 0xC2-0xF4 as one of Â..ô: lines without one
# cannot be that mojibake, so ftfy's (slower) badness test only sees lines with one.
LEAD_BYTE_RE = re.compile("[\u00c2-\u00f4]")


class MojibakeRule(Rule):
    rule = "mojibake"
    help = ("repair UTF-8 read as Latin-1/cp1252 with ftfy.fix_encoding, then drop lines still garbled "
            "(ftfy's badness test, or GBK garbage such as 锟斤拷/烫烫烫)")
    defaults = {"repair": True}

    def setup(self):
        from ftfy import chardata

        # fix_encoding re-decodes text through the one-byte encodings that can encode all of it, and
        # otherwise only repairs sequences UTF8_DETECTOR_RE finds. No one-byte encoding holds a CJK
        # character, so a text with one that the detector does not match comes back unchanged: skip
        # ftfy's whole-text badness scan there (checked against the installed ftfy, else always call it).
        self._detector = getattr(chardata, "UTF8_DETECTOR_RE", None)
        if self._detector is not None and any(chardata.possible_encoding("中", e) for e in chardata.CHARMAP_ENCODINGS):
            self._detector = None

    def process(self, doc):
        from ftfy import fix_encoding
        from ftfy.badness import is_bad

        if self.p["repair"] and not (self._detector is not None and CJK_RE.search(doc.text)
                                     and not self._detector.search(doc.text)):
            fixed = fix_encoding(doc.text)
            if fixed != doc.text:
                self.removed(doc, doc.text, "repaired", count=1)
                doc.text = fixed
        # U+FFFD is left to replacement_chars (ftfy counts it as bad too). A line can only be dropped
        # when the document holds GBK garbage or a lead-byte letter: otherwise only tidy what map_lines would
        if not GBK_GARBAGE_RE.search(doc.text) and not LEAD_BYTE_RE.search(doc.text):
            doc.text = tidy(doc.text)
            return doc
        doc.text = self.map_lines(
            doc, lambda ln: None if GBK_GARBAGE_RE.search(ln) or (
                LEAD_BYTE_RE.search(ln) and is_bad(ln.replace("\ufffd", ""))) else ln,
            "garbled line")
        return doc


class ReplacementCharsRule(Rule):
    rule = "replacement_chars"
    help = ("U+FFFD (text lost in a bad decode): delete the characters, and drop a line where they are more than "
            "max_ratio of its non-space characters (little of it is left to read)")
    defaults = {"max_ratio": 0.3}

    def process(self, doc):
        if "\ufffd" not in doc.text:
            return doc

        def fix(ln):
            n = ln.count("\ufffd")
            if not n:
                return ln
            if n / max(1, sum(1 for c in ln if not c.isspace())) > self.p["max_ratio"]:
                return None
            self.removed(doc, ln, "U+FFFD deleted", count=n)
            return ln.replace("\ufffd", "")

        doc.text = self.map_lines(doc, fix, "mostly U+FFFD line")
        return doc


ALNUM_RUN_RE = re.compile(r"[^\W_]+")


class SymbolLinesRule(Rule):
    rule = "symbol_lines"
    help = "drop lines (≥ min_chars non-space) whose share of characters that are not letters/digits/CJK exceeds max_ratio"
    defaults = {"max_ratio": 0.5, "min_chars": 5}

    def process(self, doc):
        lo, mx = self.p["min_chars"], self.p["max_ratio"]

        def keep(ln):
            if len(ln) < lo:
                return ln
            rest = ALNUM_RUN_RE.sub("", ln)  # letters, digits and CJK are all \w (less _): symbols and spaces remain
            sym = nonspace_count(rest)
            n = len(ln) - (len(rest) - sym)
            if n < lo:
                return ln
            return None if sym / n > mx else ln

        doc.text = self.map_lines(doc, keep, "symbol line")
        return doc


# Full-width punctuation that Chinese text uses as its own (，！？：；（）～ …): kept in CJK context.
CJK_PUNCT = set(chr(c) for c in [*range(0xFF01, 0xFF10), *range(0xFF1A, 0xFF21), *range(0xFF3B, 0xFF41),
                                 *range(0xFF5B, 0xFF66)]) | {"\u2026"}
CJK_PUNCT_RE = re.compile("[" + re.escape("".join(sorted(CJK_PUNCT))) + "]")


class NormalizeRule(Rule):
    rule = "normalize"
    help = ("Unicode NFKC (full-width letters/digits → half-width, compatibility forms folded); full-width "
            "punctuation and … are kept next to CJK text (cjk_punct=context), always kept (keep) or folded (fold)")
    defaults = {"form": "NFKC", "cjk_punct": "context"}

    def process(self, doc):
        text, form, mode = doc.text, self.p["form"], self.p["cjk_punct"]
        if mode not in ("context", "keep", "fold"):
            raise GebError(f"rule 'normalize': cjk_punct must be context, keep or fold (got {mode!r})")
        if unicodedata.is_normalized(form, text):
            return doc
        if mode == "fold" or not CJK_PUNCT_RE.search(text):
            new = unicodedata.normalize(form, text)
        else:
            out, last = [], 0
            for m in CJK_PUNCT_RE.finditer(text):
                i = m.start()
                if mode == "keep" or _cjk_near(text, i):
                    out.append(unicodedata.normalize(form, text[last:i]))
                    out.append(text[i])
                    last = i + 1
            out.append(unicodedata.normalize(form, text[last:]))
            new = "".join(out)
        if new != text:
            changed = [a for a, b in zip(text, new) if a != b][:20]
            self.removed(doc, "".join(changed), "normalized", count=1)
            doc.text = new
        return doc


def _cjk_near(text: str, i: int) -> bool:
    """A CJK character or CJK punctuation is the nearest non-space character before or after i."""
    for rng in (range(i - 1, max(-1, i - 4), -1), range(i + 1, min(len(text), i + 4))):
        for j in rng:
            c = text[j]
            if c.isspace():
                continue
            if CJK_RE.match(c) or c in CJK_PUNCT or "\u3000" <= c <= "\u303f":
                return True
            break
    return False


class TraditionalToSimplifiedRule(Rule):
    rule = "t2s"
    enabled_by_default = False
    help = "convert traditional to simplified Chinese with OpenCC's bundled dictionaries (opencc-python-reimplemented)"
    defaults = {"config": "t2s"}

    def setup(self):
        from opencc import OpenCC

        self._cc = OpenCC(self.p["config"])

    def process(self, doc):
        if CJK_RE.search(doc.text):
            new = self._cc.convert(doc.text)
            if new != doc.text:
                self.removed(doc, "".join(a for a, b in zip(doc.text, new) if a != b)[:40], "converted")
                doc.text = new
        return doc


# Boundaries are ASCII-only: in Python's Unicode regexes CJK characters are \w, and Chinese text puts
# numbers and addresses right after them (我的手机是13812345678).
EMAIL_RE = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])")
# Every match starts with a digit, + or ( : the (?=[\d+(]) lookahead after the lookbehind changes no match
# but lets the engine leave most positions at once (3x faster on digit-rich news text).
# Chinese resident ID (18 digits with a valid-looking birth date, last may be X), then US SSN.
ID_RE = re.compile(r"(?<![0-9A-Za-z])(?=[\d+(])(?:[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
                   r"|\d{3}-\d{2}-\d{4})(?![0-9A-Za-z])")
PHONE_RE = re.compile(
    r"(?<![0-9A-Za-z+])(?=[\d+(])(?:"
    r"(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}"           # Chinese mobile, 11 digits, optional +86
    r"|0\d{2,3}-\d{7,8}"                                   # Chinese landline with area code
    r"|(?:\+1[ .-]?)?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}"      # North American with separators
    r"|\+\d{1,3}(?:[ .-]\d{2,4}){2,4}"                     # international with + and separators
    r")(?![0-9A-Za-z])")
DIGIT_RE = re.compile(r"\d")
URL_RE = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"'`，。！？、；）」』]+[^\s<>\"'`，。！？、；）」』.,;:!?)\]]")


class PiiRule(Rule):
    rule = "pii"
    help = ("mask (or remove) e-mail addresses, phone numbers (Chinese mobiles/landlines, +country, North "
            "American) and ID-card-like numbers (Chinese 18-digit resident IDs, US SSNs); code is left alone")
    defaults = {"mode": "mask", "email": "<EMAIL>", "phone": "<PHONE>", "id_number": "<ID>"}

    def process(self, doc):
        mode = self.p["mode"]
        if mode not in ("mask", "remove"):
            raise GebError(f"rule 'pii': mode must be mask or remove (got {mode!r})")
        text = doc.text
        has_digit = DIGIT_RE.search(text) is not None
        for kind, pat in (("email", EMAIL_RE), ("id_number", ID_RE), ("phone", PHONE_RE)):
            # every e-mail has an @ and every ID or phone number a digit: skip the scans that cannot match
            if not (("@" in text) if kind == "email" else has_digit):
                continue
            text = self.sub_outside_code(doc, text, pat, self.p[kind] if mode == "mask" else "", kind,
                                         redact=True)
        doc.text = text
        return doc


class UrlRule(Rule):
    rule = "urls"
    help = "mask (or remove) URLs outside code blocks and inline `code`"
    defaults = {"mode": "mask", "placeholder": "<URL>"}

    def process(self, doc):
        if self.p["mode"] not in ("mask", "remove"):
            raise GebError(f"rule 'urls': mode must be mask or remove (got {self.p['mode']!r})")
        if "://" in doc.text or "www." in doc.text:
            repl = self.p["placeholder"] if self.p["mode"] == "mask" else ""
            doc.text = self.sub_outside_code(doc, doc.text, URL_RE, repl, "url")
        return doc


class WordListRule(Rule):
    rule = "wordlist"
    enabled_by_default = False
    help = "remove listed words/phrases (file: one per line, # comments): action line (drop the line), doc or word"
    defaults = {"path": "", "action": "line"}

    def setup(self):
        path = self.p["path"]
        if not path:
            raise GebError("rule 'wordlist' is on but has no path (set wordlist.path=FILE)")
        f = Path(path)
        if not f.is_file():
            raise GebError(f"{f}: word list not found")
        terms = [t.strip() for t in f.read_text(encoding="utf-8").splitlines() if t.strip() and not t.startswith("#")]
        if self.p["action"] not in ("line", "doc", "word"):
            raise GebError(f"rule 'wordlist': action must be line, doc or word (got {self.p['action']!r})")
        # ASCII terms match whole words; CJK terms match anywhere (no word boundaries in Chinese).
        alts = [re.escape(t) if CJK_RE.search(t) else rf"(?<!\w){re.escape(t)}(?!\w)" for t in sorted(terms, key=len, reverse=True)]
        self._re = re.compile("|".join(alts), re.I) if alts else None

    def process(self, doc):
        if self._re is None or not self._re.search(doc.text):
            return doc
        act = self.p["action"]
        if act == "doc":
            self.removed(doc, doc.text, "listed word")
            return None
        if act == "word":
            doc.text = tidy(self.sub_outside_code(doc, doc.text, self._re, "", "listed word"))
            return doc
        doc.text = self.map_lines(doc, lambda ln: None if self._re.search(ln) else ln, "listed word")
        return doc


BOILERPLATE_RE = re.compile(
    r"(?:enable|turn on|requires?)\s+javascript|javascript (?:is|has been) disabled|we use cookies|cookie policy|"
    r"accept (?:all )?cookies|terms of (?:use|service)|privacy policy|all rights reserved|lorem ipsum|"
    r"版权所有|转载请注明|免责声明|点击(?:这里|此处|查看)|返回顶部|上一篇|下一篇|扫一扫|关注我们|加入收藏|设为首页", re.I)


JS_SPAN_RE = re.compile(r"(?:enable|turn on|requires?)\s+javascript", re.I)
# A phrase every BOILERPLATE_RE alternative contains: substring tests over the lowered text are ~15x
# cheaper than the case-insensitive alternation, so the regex only runs where one is present.
BOILERPLATE_KEYS = ("javascript", "cookie", "terms of", "privacy policy", "all rights reserved", "lorem ipsum", "版权所有",
                    "转载请注明", "免责声明", "点击", "返回顶部", "上一篇", "下一篇", "扫一扫", "关注我们", "加入收藏", "设为首页")


def _lowered_like_re_i(text: str) -> str:
    """Lower case such that whatever re.I matches to an ASCII letter becomes that letter: İ lowers to
    two characters, and re.I also matches ı to i and ſ to s (re._casefix)."""
    return text.replace("\u0130", "i").lower().replace("\u0131", "i").replace("\u017f", "s")


class BoilerplateRule(Rule):
    rule = "boilerplate"
    help = "drop navigation/legal boilerplate lines (C4's javascript/cookie/terms lines, 版权所有, 上一篇/下一篇 ...)"

    def process(self, doc):
        low = _lowered_like_re_i(doc.text)
        keys = [k for k in BOILERPLATE_KEYS if k in low]
        if not keys:
            return doc

        def hit(ln: str) -> bool:  # the regex only on lines holding a key (a whole-text search of a long
            if not any(k in _lowered_like_re_i(ln) for k in keys):  # page with a key cost 60 ms)
                return False
            return BOILERPLATE_RE.search(ln) is not None

        # as before, a document is rewritten only when the regex matches it somewhere; a match found by a
        # line is one in the text, and the only alternative that can span lines is "...\s+javascript"
        lines = doc.text.split("\n")
        if any(map(hit, lines)) or ("javascript" in keys and JS_SPAN_RE.search(doc.text)):
            doc.text = self.map_lines(doc, lambda ln: None if hit(ln) else ln, "boilerplate")
        return doc


class IncompleteLinesRule(Rule):
    rule = "incomplete_lines"
    help = ("drop lines that do not end a sentence: Chinese 。！？… / closing ”」』, English . ! ? "
            "(closing quotes/brackets allowed after); code blocks are kept")

    def process(self, doc):
        doc.text = self.map_lines(doc, lambda ln: ln if ends_sentence(ln) else None, "incomplete")
        return doc


def norm_key(s: str) -> str:
    """Case and whitespace folded (str.split's whitespace is the regex \\s)."""
    return " ".join(s.lower().split())


class InDocDedupRule(Rule):
    rule = "indoc_dedup"
    help = ("inside each document, drop paragraphs and then sentences that repeat an earlier one exactly "
            "(after case/space folding) and have at least min_units units")
    defaults = {"min_units": 8}

    def process(self, doc):
        lo = self.p["min_units"]
        seen: set[str] = set()
        lines = doc.text.split("\n")
        code = code_line_mask(lines)
        out = []
        for line, is_code in zip(lines, code):
            key = norm_key(line)
            if not is_code and key:
                if key in seen and len(units(line)) >= lo:  # units counted only for repeats
                    self.removed(doc, line, "repeated paragraph")
                    continue
                seen.add(key)
            out.append(line)
        sents: set[str] = set()
        final = []
        for line, is_code in zip(out, code_line_mask(out)):
            if is_code or not line.strip():
                final.append(line)
                continue
            kept, last = [], 0
            for a, b in split_sentences(line):
                s = line[a:b]
                key = norm_key(s)
                if key in sents and len(units(s)) >= lo:
                    self.removed(doc, s, "repeated sentence")
                else:
                    sents.add(key)
                    kept.append(line[last:b])
                last = b
            new = "".join(kept).strip()
            if new:
                final.append(new)
        doc.text = tidy("\n".join(final))
        return doc


# mojibake runs before control_chars: C1 characters are part of the cp1252 mojibake ftfy can undo.
CLEAN_RULES: list[type[Rule]] = [HtmlRule, MojibakeRule, ControlCharsRule, ReplacementCharsRule, NormalizeRule,
                                 TraditionalToSimplifiedRule, PiiRule, UrlRule, WordListRule, BoilerplateRule,
                                 SymbolLinesRule, IncompleteLinesRule, InDocDedupRule]
