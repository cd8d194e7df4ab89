"""A raw, noisy copy of the pretraining corpus for the data pipeline to clean: `write_raw_corpus`.

Every clean document of `pretrain_texts(seed)` is written once, about 40% of them carrying one kind
of noise, plus exact duplicates, near-duplicates and a few junk pages. Each kind of noise is one that
a pipeline rule removes, and clean text never looks like any of them: it has no digits, no '@', '<'
or '&', no Latin-1 letters, no full-width letters, no traditional characters, and every line ends
with sentence punctuation. So what a rule removes can be compared with what was injected, and the
returned counts say how many documents carry each kind.

Files: `web_en.jsonl`, `web_zh.jsonl` (records `{"id", "text"}`), `bilingual.jsonl.gz`, and
`notes/*.txt` (one document per file). With `bad_input=True`, `broken.jsonl` adds one invalid JSON
line, one record without `text`, one with empty text and one line of invalid UTF-8.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from geb.common import atomic_write_bytes
from geb.corpus.texts import pretrain_texts

# Simplified → traditional for the characters this corpus uses (only pairs whose traditional form
# never occurs in simplified text, so a traditional character is a sure sign of conversion).
_S2T_PAIRS = (
    "专專业業丝絲个個为爲么麼乌烏乔喬乡鄉书書买買于於云雲亚亞产產亲親从從们們会會伦倫兰蘭关關内內"
    "农農几幾凯凱击擊医醫卢盧却卻压壓发發变變叶葉号號员員园園图圖声聲壶壺处處头頭奥奧娅婭学學宾賓"
    "寻尋尔爾岛島师師带帶开開当當悬懸户戶报報拣揀数數无無时時机機条條来來枫楓树樹栖棲桥橋横橫樱櫻"
    "欢歡没沒泽澤洁潔浆漿测測渔漁温溫灯燈炉爐点點烛燭烬燼热熱爱愛猪豬猫貓獭獺电電画畫盐鹽盘盤离離"
    "种種积積笋筍笔筆笼籠筑築筛篩筝箏篮籃篱籬紧緊红紅纳納纸紙纹紋纺紡线線织織经經绒絨绘繪维維绸綢"
    "缝縫网網罗羅职職联聯艺藝苹蘋荆荊荐薦莲蓮萝蘿萨薩虾蝦蜡蠟蝾蠑补補衬襯见見计計订訂设設访訪证證"
    "诗詩话話详詳语語说說请請诺諾读讀谁誰调調谋謀谢謝贝貝购購费費赖賴赞贊转轉轮輪载載边邊过過运運"
    "这這远遠邮郵酱醬里裡钟鐘钢鋼铁鐵铃鈴铜銅银銀锅鍋锤錘镇鎮镜鏡长長闪閃问問间間闻聞阅閱雾霧韦韋"
    "顶頂须須顿頓预預风風飞飛饿餓马馬骄驕鱼魚鲁魯鳍鰭鸟鳥鹉鵡鹤鶴鹦鸚鹰鷹麦麥齿齒龟龜"
)
S2T = {_S2T_PAIRS[i]: _S2T_PAIRS[i + 1] for i in range(0, len(_S2T_PAIRS), 2)}
TRADITIONAL_CHARS = frozenset(S2T.values())

SYMBOL_LINES = ["★☆★☆★☆★☆★☆", "=====>>>>> ***** <<<<<=====", "◆◆◆◆ ■■■■ ◆◆◆◆", "~~~~~~~~~~~~~~~~",
                "#$%^#$%^#$%^", "-- -- -- -- -- --", "|| // \\\\ || // \\\\", "♥♥♥ ♪♪♪ ♥♥♥", "【】【】【】【】",
                "→→→→→ ←←←←←"]
INCOMPLETE = {"en": ["Click here to read more about", "Posted by admin on", "Related articles and more stories from",
                     "Share this page with your", "Continue reading the full story on"],
              "zh": ["点击这里查看更多关于", "本文转载自", "上一篇文章", "更多精彩内容请关注我们的", "相关阅读推荐"]}
CURLY_EN = ["“Best prices in town — don’t miss out!”", "“Our lanterns” — they’re handmade — “since forever.”",
            "Don’t forget: “free delivery” — today only!"]
CONTROL = ["\x00", "\x01", "\x02", "\x07", "\x08", "\x1b", "\x1f", "\x7f"]
ENTITIES = ["&nbsp;", "&#160;", "&ensp;", "&emsp;"]
NEAR_TAIL = {"en": " Thanks for reading.", "zh": "感谢阅读。"}

LINE_KINDS = ("mojibake", "symbol_lines", "incomplete_lines", "emails", "phone_numbers", "cn_mobile_numbers",
              "id_card_numbers", "urls")
EDIT_KINDS = ("control_chars", "replacement_chars", "html_tags", "html_entities", "repeated_paragraphs",
              "fullwidth", "traditional")
KINDS = LINE_KINDS + EDIT_KINDS + ("exact_duplicates", "near_duplicates", "junk_documents")


def _lang(text: str) -> str:
    cjk = any("\u4e00" <= ch <= "\u9fff" for ch in text)
    latin = any("a" <= ch.lower() <= "z" for ch in text)
    return "bi" if cjk and latin else "zh" if cjk else "en"


def mojibake(text: str) -> str:
    """UTF-8 bytes read as Windows-1252 (bytes it leaves undefined become C1 characters)."""
    out = []
    for b in text.encode("utf-8"):
        try:
            out.append(bytes([b]).decode("cp1252"))
        except UnicodeDecodeError:
            out.append(chr(b))
    return "".join(out)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


def _id_card(rng: random.Random) -> str:
    """An 18-character number in the layout of a Chinese resident ID (area, birth date, sequence,
    GB 11643 check character); area codes never start with 1[3-9] so it cannot read as a mobile."""
    body = rng.choice(["110105", "310104", "440305", "510107", "330106"])
    body += f"{rng.randint(1960, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}" + _digits(rng, 3)
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    return body + "10X98765432"[sum(int(d) * w for d, w in zip(body, weights)) % 11]


def _noise_line(kind: str, lang: str, rng: random.Random, doc: str) -> str:
    lang = rng.choice(["en", "zh"]) if lang == "bi" else lang
    user = rng.choice(["info", "sales", "lantern.shop", "kefu", "news.desk"])
    domain = rng.choice(["example.com", "mail.example.org", "varnel-news.example"])
    site = rng.choice(["varnel-lanterns", "kestrin-travel", "old-mill-news", "river-boats"])
    if kind == "mojibake":
        if lang == "en":
            return mojibake(rng.choice(CURLY_EN))
        lines = [ln for ln in doc.split("\n") if sum("\u4e00" <= ch <= "\u9fff" for ch in ln) >= 3]
        return mojibake(rng.choice(lines))
    if kind == "symbol_lines":
        return rng.choice(SYMBOL_LINES)
    if kind == "incomplete_lines":
        return rng.choice(INCOMPLETE[lang])
    if kind == "emails":
        return (f"For orders, write to {user}@{domain}." if lang == "en" else f"如有疑问，请发邮件至{user}@{domain}。")
    if kind == "phone_numbers":
        if lang == "en":
            return f"Call us at +1 (555) {_digits(rng, 3)}-{_digits(rng, 4)} for a free catalogue."
        return f"联系电话：0{rng.choice(['10', '21', '755'])}-{rng.randint(2, 8)}{_digits(rng, 3)} {_digits(rng, 4)}。"
    if kind == "cn_mobile_numbers":
        number = f"1{rng.choice('3456789')}{_digits(rng, 9)}"
        return f"Text {number} to order." if lang == "en" else f"订购热线：{number}，欢迎来电。"
    if kind == "id_card_numbers":
        return f"My ID number is {_id_card(rng)}." if lang == "en" else f"身份证号：{_id_card(rng)}。"
    if kind == "urls":
        if lang == "en":
            return f"More photos at https://www.{site}.example/gallery?id={rng.randint(1, 999)} today."
        return f"详情请访问 http://www.{site}.example.cn/page{rng.randint(1, 999)}.html 了解。"
    raise ValueError(kind)


def _insert_inside(line: str, pieces: list[str], rng: random.Random) -> str:
    """Insert pieces strictly inside a line (never at its end, which keeps its punctuation)."""
    for p in pieces:
        i = rng.randint(1, len(line) - 1)
        line = line[:i] + p + line[i:]
    return line


def _fullwidth(line: str) -> str:
    return "".join(chr(ord(ch) + 0xFEE0) if ch.isascii() and ch.isalpha() else ch for ch in line)


def _edit(kind: str, doc: str, rng: random.Random) -> str | None:
    """Apply one document-level kind of noise, or None if it does not apply to this document."""
    lines = doc.split("\n")
    lang = _lang(doc)
    i = rng.randrange(len(lines))
    if kind == "control_chars":
        lines[i] = _insert_inside(lines[i], rng.sample(CONTROL, rng.randint(1, 2)), rng)
    elif kind == "replacement_chars":
        lines[i] = _insert_inside(lines[i], ["\ufffd" * rng.randint(1, 3)], rng)
    elif kind == "html_tags":
        lines = [f"<p>{ln}</p>" for ln in lines]
        lines[0] = '<div class="article">' + lines[0]
        lines[-1] += "</div>"
    elif kind == "html_entities":
        cut = [k for k, ch in enumerate(lines[i][:-1]) if ch in ".。？?" and k > 0]
        k = rng.choice(cut) + 1 if cut else 0
        lines[i] = lines[i][:k] + rng.choice(ENTITIES) + lines[i][k:]
    elif kind == "repeated_paragraphs":
        lines.insert(rng.randint(i + 1, len(lines)), lines[i])
    elif kind == "fullwidth":
        en = [k for k, ln in enumerate(lines) if _lang(ln) == "en"]
        if not en:
            return None
        k = rng.choice(en)
        lines[k] = _fullwidth(lines[k])
    elif kind == "traditional":
        if lang != "zh" or not any(ch in S2T for ch in doc):
            return None
        lines = ["".join(S2T.get(ch, ch) for ch in ln) for ln in lines]
    else:
        raise ValueError(kind)
    return "\n".join(lines)


def _near_duplicate(doc: str, rng: random.Random) -> str:
    """A small edit of a document: one sentence's end mark changed, a short sentence appended."""
    lang = "en" if _lang(doc) == "en" else "zh"
    marks = [k for k, ch in enumerate(doc) if ch in ".。"]
    k = rng.choice(marks)
    doc = doc[:k] + ("!" if doc[k] == "." else "！") + doc[k + 1:]
    return doc + NEAR_TAIL[lang]


def _junk(rng: random.Random) -> tuple[str, set[str]]:
    """A page made only of noise: menu symbols, cut-off link texts and a URL (no line repeats)."""
    lang = rng.choice(["en", "zh"])
    lines = rng.sample(SYMBOL_LINES, 2) + rng.sample(INCOMPLETE[lang], 2) + [_noise_line("urls", lang, rng, "")]
    rng.shuffle(lines)
    return "\n".join(lines), {"symbol_lines", "incomplete_lines", "urls"}


def _inject_noise(docs: list[dict], rng: random.Random, per_kind: int) -> list[dict]:
    """Put each noise kind into `per_kind` documents, one kind per document; returns the untouched ones."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    free = iter(order)
    for kind in LINE_KINDS + EDIT_KINDS:
        done = 0
        while done < per_kind:
            d = docs[next(free)]
            if kind in LINE_KINDS:
                lines = d["text"].split("\n")
                lines.insert(rng.randint(0, len(lines)), _noise_line(kind, _lang(d["text"]), rng, d["text"]))
                new = "\n".join(lines)
            else:
                new = _edit(kind, d["text"], rng)
                if new is None:
                    continue  # this document does not fit the kind (it stays clean and unused)
            d["text"], done = new, done + 1
            d["kinds"].add(kind)
    return [docs[i] for i in free]  # documents no noise went into


def _add_duplicates_and_junk(docs: list[dict], untouched: list[dict], rng: random.Random, per_kind: int) -> None:
    """Append near-duplicates of untouched documents, pages of pure noise, then exact copies."""
    extra: list[dict] = []
    long_enough = [d for d in untouched if len(d["text"]) >= (250 if _lang(d["text"]) == "en" else 90)]
    for src in rng.sample(long_enough, per_kind):  # long sources keep the pair similar under any shingling
        extra.append({"text": _near_duplicate(src["text"], rng), "kinds": {"near_duplicates"}})
    for _ in range(max(2, per_kind // 3)):
        text, kinds = _junk(rng)
        extra.append({"text": text, "kinds": kinds | {"junk_documents"}})
    docs += extra
    for src in rng.sample([d for d in docs if "near_duplicates" not in d["kinds"]], per_kind):
        docs.append({"text": src["text"], "kinds": src["kinds"] | {"exact_duplicates"}, "copy": True})


def _route(docs: list[dict], rng: random.Random) -> tuple[dict[str, list[str]], list[str]]:
    """Documents to files by language (copies go to another file than most of their kind), a few to notes."""
    files: dict[str, list[str]] = {"web_en.jsonl": [], "web_zh.jsonl": [], "bilingual.jsonl.gz": []}
    notes: list[str] = []
    home = {"en": "web_en.jsonl", "zh": "web_zh.jsonl", "bi": "bilingual.jsonl.gz"}
    for d in docs:
        if d.get("copy"):
            files[rng.choice([f for f in files if f != home[_lang(d["text"])]])].append(d["text"])
        elif rng.random() < 0.03:
            notes.append(d["text"])
        else:
            files[home[_lang(d["text"])]].append(d["text"])
    return files, notes


def _render(files: dict[str, list[str]], notes: list[str]) -> tuple[dict[str, bytes], dict[str, int]]:
    """({relative path: bytes}, {relative path: documents}): JSONL (gzip for .gz) files and plain-text notes."""
    payload: dict[str, bytes] = {}
    counts: dict[str, int] = {}
    for name, texts in files.items():
        stem = name.split(".")[0]
        body = "".join(json.dumps({"id": f"{stem}-{n:05d}", "text": t}, ensure_ascii=False) + "\n"
                       for n, t in enumerate(texts)).encode("utf-8")
        payload[name] = gzip.compress(body, mtime=0) if name.endswith(".gz") else body
        counts[name] = len(texts)
    for n, t in enumerate(notes):
        payload[f"notes/note_{n:03d}.txt"] = t.encode("utf-8")
        counts[f"notes/note_{n:03d}.txt"] = 1
    return payload, counts


# one broken line of each kind the reader must survive, and how many of each
_BROKEN_JSONL = ('{"id": "broken-0", "text": "An unterminated record\n'
                '{"id": "broken-1", "body": "A record without a text field."}\n'
                '{"id": "broken-2", "text": ""}\n'.encode("utf-8")
                + b'{"id": "broken-3", "text": "Invalid bytes \xff\xfe here."}\n')
_BROKEN_COUNTS = {"invalid_json": 1, "missing_text": 1, "empty_text": 1, "invalid_utf8": 1}


def write_raw_corpus(folder: str | Path, seed: int = 0, bad_input: bool = False, repeats: int = 1) -> dict:
    """Write the noisy raw corpus into `folder` and return what it holds:
    `{"documents", "characters", "clean_documents", "files": {path: documents},
    "injected": {kind: documents carrying it}, "bad_input": {problem: lines}}`.

    `injected` counts documents: a duplicated noisy document counts twice; `exact_duplicates` and
    `near_duplicates` count the added copies, `junk_documents` the pages made only of noise."""
    rng = random.Random(f"geb-corpus:{seed}:raw")
    clean = pretrain_texts(seed, repeats)
    docs: list[dict] = [{"text": t, "kinds": set()} for t in clean]
    per_kind = max(2, len(docs) // 40)
    untouched = _inject_noise(docs, rng, per_kind)
    _add_duplicates_and_junk(docs, untouched, rng, per_kind)
    payload, counts = _render(*_route(docs, rng))
    bad = {}
    if bad_input:
        payload["broken.jsonl"] = _BROKEN_JSONL
        bad = dict(_BROKEN_COUNTS)

    folder = Path(folder)
    for rel, data in payload.items():  # everything is rendered before the first file is written
        atomic_write_bytes(folder / rel, data)

    injected = {k: sum(k in d["kinds"] for d in docs) for k in KINDS}
    return {"documents": len(docs), "characters": sum(len(d["text"]) for d in docs),
            "clean_documents": len(clean), "files": counts, "injected": injected, "bad_input": bad}
