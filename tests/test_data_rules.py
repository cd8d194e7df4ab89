"""Each cleaning rule and quality filter on small Chinese and English inputs, including what must survive."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("datatrove")

from datatrove.data import Document  # noqa: E402

from geb.data.settings import parse_overrides, resolve, rule_classes  # noqa: E402
from geb.errors import GebError  # noqa: E402


def apply(tmp_path, name: str, text: str, **params) -> str | None:
    """Run one rule as a datatrove step on one document; the text that comes out, or None if dropped."""
    step = rule_classes()[name](tmp_path / "stats", **params)
    out = list(step.run(iter([Document(text=text, id="d", metadata={"source": "t.jsonl", "line": 1})])))
    return out[0].text if out else None


ZH = ("北京是中华人民共和国的首都，也是全国的政治和文化中心。这座城市有三千多年的历史，留下了许多名胜古迹。"
      "每年都有很多游客来这里参观故宫和长城，他们在这里了解中国的历史。")
EN = ("The capital of France is Paris, and it is known for the Eiffel Tower. Many visitors come to the city "
      "every year to see its museums and to walk along the river that runs through the middle of it.")


def test_html_strips_tags_entities_and_scripts_but_not_comparisons(tmp_path):
    out = apply(tmp_path, "html", "<html><body><p>第一段&nbsp;内容。</p><script>var x = 1;</script>"
                                  "<div>Tom &amp; Jerry.</div></body></html>")
    assert out == "第一段 内容。\n\nTom & Jerry."
    keep = "if a < b and c > d then List<String> x; 5 > 3."
    assert apply(tmp_path, "html", keep) == keep


def test_control_chars_removed_but_emoji_joiner_kept(tmp_path):
    assert apply(tmp_path, "control_chars", "a\x00b\u200bc\r\nd👨\u200d👩") == "abc\nd👨\u200d👩"


def test_mojibake_repaired_and_gbk_garbage_dropped(tmp_path):
    text = "北京是中国的首都。".encode("utf-8").decode("latin-1") + "\n" + ZH + "\n锟斤拷烫烫烫"
    out = apply(tmp_path, "mojibake", text)
    assert out == "北京是中国的首都。\n" + ZH
    assert apply(tmp_path, "mojibake", EN) == EN


def test_replacement_chars_deleted_and_mostly_garbage_lines_dropped(tmp_path):
    text = "good line.\nA word with a lost\ufffd byte in it.\n\ufffd\ufffd\ufffd好\ufffd\ufffd。\n好的。"
    assert apply(tmp_path, "replacement_chars", text) == "good line.\nA word with a lost byte in it.\n好的。"


def test_symbol_lines(tmp_path):
    text = "=====★★★=====\n}\n正常的中文句子。\n!!!!!!!!!!\nif (x) { return y; }"
    assert apply(tmp_path, "symbol_lines", text) == "}\n正常的中文句子。\nif (x) { return y; }"


def test_normalize_folds_fullwidth_but_keeps_chinese_punctuation(tmp_path):
    out = apply(tmp_path, "normalize", "Ｈｅｌｌｏ，ｗｏｒｌｄ！ ２０２４年，北京很好！……他说：“是的。”")
    assert out == "Hello,world! 2024年，北京很好！……他说：“是的。”"
    assert apply(tmp_path, "normalize", ZH) == ZH
    assert apply(tmp_path, "normalize", "北京，好！", cjk_punct="fold") == "北京,好!"


def test_traditional_to_simplified(tmp_path):
    pytest.importorskip("opencc")
    assert apply(tmp_path, "t2s", "這是一個繁體中文的句子，電腦與網絡。") == "这是一个繁体中文的句子，电脑与网络。"


def test_pii_masks_both_languages_and_spares_numbers_and_code(tmp_path):
    text = ("我的手机是13812345678，也可以打+86 139 1234 5678或010-12345678，邮箱a.b@qq.com，"
            "身份证110101199003071234。Call (555) 123-4567 or mail john.doe@example.com. SSN 123-45-6789.")
    out = apply(tmp_path, "pii", text)
    assert out == ("我的手机是<PHONE>，也可以打<PHONE>或<PHONE>，邮箱<EMAIL>，身份证<ID>。"
                   "Call <PHONE> or mail <EMAIL>. SSN <ID>.")
    spare = "In 2024, 3 cats cost 12,000 yuan on 2024-01-15; pi is 3.14159; order #20240115 shipped. `x = 13812345678`"
    assert apply(tmp_path, "pii", spare) == spare
    assert apply(tmp_path, "pii", "邮箱a.b@qq.com。", mode="remove") == "邮箱。"


def test_urls_masked_in_text_but_not_in_code(tmp_path):
    text = ("See https://example.com/a?b=1. 详情见 www.example.cn/page 。\n"
            "Use `requests.get('https://api.example.com/v1')` to fetch.\n```\ncurl https://example.com/x\n```")
    out = apply(tmp_path, "urls", text)
    assert out == ("See <URL>. 详情见 <URL> 。\nUse `requests.get('https://api.example.com/v1')` to fetch.\n"
                   "```\ncurl https://example.com/x\n```")


def test_wordlist_actions(tmp_path):
    wl = tmp_path / "words.txt"
    wl.write_text("# blocked\n赌博\ncasino\n", encoding="utf-8")
    text = "网上赌博是违法的。\n这是正常的句子。\nVisit the casino today.\nCasinos are a plural word."
    assert apply(tmp_path, "wordlist", text, path=str(wl)) == "这是正常的句子。\nCasinos are a plural word."
    assert apply(tmp_path, "wordlist", text, path=str(wl), action="doc") is None
    assert apply(tmp_path, "wordlist", "去赌博吧。", path=str(wl), action="word") == "去吧。"
    with pytest.raises(GebError, match="word list not found"):
        apply(tmp_path, "wordlist", text, path=str(tmp_path / "missing.txt"))


def test_boilerplate_lines(tmp_path):
    text = "正文内容。\n版权所有 © 2024 某某网\n上一篇：旧闻\nPlease enable JavaScript to view.\nJavaScript is a programming language."
    assert apply(tmp_path, "boilerplate", text) == "正文内容。\nJavaScript is a programming language."


def test_boilerplate_rewrites_only_documents_the_pattern_matches(tmp_path):
    # the regex runs per line holding a key; a document is still tidied only when the pattern matches it
    # somewhere, also across a line break ("enable\\nJavaScript"), and left byte for byte otherwise
    spanning = "Please enable\nJavaScript to view.  \n\n\n\nThe story goes on."
    assert apply(tmp_path, "boilerplate", spanning) == "Please enable\nJavaScript to view.\n\nThe story goes on."
    key_no_match = "I ate a cookie.  \n\n\n\nIt was good."
    assert apply(tmp_path, "boilerplate", key_no_match) == key_no_match
    in_code = "Text.  \n```\nwe use cookies\n```"  # a match in code: nothing dropped, the rest tidied
    assert apply(tmp_path, "boilerplate", in_code) == "Text.\n```\nwe use cookies\n```"
    assert apply(tmp_path, "boilerplate", "Intro.\nWE USE COOKIES here\nEnd.") == "Intro.\nEnd."


def test_pii_phone_forms_the_prefilter_must_keep(tmp_path):
    # every phone/ID match starts with a digit, '+' or '(' (the patterns' lookahead): these all still match
    text = "打+1 23 45 67，或(555) 123-4567，或 +86-13912345678。id 110101199003071234"
    assert apply(tmp_path, "pii", text) == "打<PHONE>，或<PHONE>，或 <PHONE>。id <ID>"


def test_incomplete_lines_both_languages_and_what_must_stay(tmp_path):
    text = ("Yes.\n好的。\n他说：“好。”\n这是一个没有结尾的标题\nHeading without an end\n"
            "```\nprint('code stays')\n```\n结束」\nWait…\nReally?!\n(See the note.)")
    out = apply(tmp_path, "incomplete_lines", text)
    assert out == ("Yes.\n好的。\n他说：“好。”\n```\nprint('code stays')\n```\n结束」\nWait…\nReally?!\n"
                   "(See the note.)")
    assert apply(tmp_path, "incomplete_lines", ZH) == ZH
    assert apply(tmp_path, "incomplete_lines", "只有标题\nno end") is None  # nothing left: dropped


def test_indoc_dedup_paragraphs_and_sentences(tmp_path):
    text = ("这是一个重复的句子，它很长很长。这是一个重复的句子，它很长很长。\n段落一的内容是这样的，非常好。\n"
            "段落一的内容是这样的，非常好。\n好的。好的。\nThis sentence is repeated twice in one paragraph. This sentence is repeated twice in one paragraph.")
    out = apply(tmp_path, "indoc_dedup", text)
    assert out == ("这是一个重复的句子，它很长很长。\n段落一的内容是这样的，非常好。\n好的。好的。\n"
                   "This sentence is repeated twice in one paragraph.")


# -- quality filters ---------------------------------------------------------------------------
def test_length_counts_chinese_characters_not_spaces(tmp_path):
    assert apply(tmp_path, "length", "北京是中国的首都，很美。") == "北京是中国的首都，很美。"  # 10 units, no spaces
    assert apply(tmp_path, "length", "太短了。") is None
    assert apply(tmp_path, "length", "Too short here.") is None


def test_gopher_quality(tmp_path):
    assert apply(tmp_path, "gopher_quality", ZH) == ZH
    assert apply(tmp_path, "gopher_quality", EN) == EN
    assert apply(tmp_path, "gopher_quality", "# # # # tag " * 10) is None  # '#' per word
    assert apply(tmp_path, "gopher_quality", "\n".join(f"- item {i}" for i in range(20))) is None  # all bullets
    assert apply(tmp_path, "gopher_quality", " ".join(["12345 678 90"] * 20) + " word") is None  # few alphabetic
    review = "这本书写得很好，故事也很感人，我看了好几遍还想再看……"  # one line: …… is one ellipsis, kept
    assert apply(tmp_path, "gopher_quality", review) == review
    snippets = "\n".join(f"Story number {i} begins with a long day and then..." for i in range(5))
    assert apply(tmp_path, "gopher_quality", snippets) is None  # a page of cut-off snippets


def test_stopwords_and_keyword_stuffing(tmp_path):
    long_zh, long_en = ZH + "\n" + ZH, EN + "\n" + EN  # ≥ 50 words: the statistics apply
    assert apply(tmp_path, "stopwords", long_zh) == long_zh  # normal Chinese without spaces
    assert apply(tmp_path, "stopwords", long_en) == long_en
    stuffed = "便宜手机 特价手机 手机批发 " * 12
    assert apply(tmp_path, "stopwords", stuffed) is None
    spam_en = "buy cheap watches online best cheap watches sale " * 8
    assert apply(tmp_path, "stopwords", spam_en) is None
    short_qa = "问：谁发明了日光压机？\n答：德尔芬·鲁克。"  # too short for word statistics: kept
    assert apply(tmp_path, "stopwords", short_qa) == short_qa


def test_repetition(tmp_path):
    assert apply(tmp_path, "repetition", ZH + "\n" + EN) == ZH + "\n" + EN
    assert apply(tmp_path, "repetition", "\n".join(["点击购买最新款手机。"] * 6 + ["这是一句正常的话。"])) is None
    assert apply(tmp_path, "repetition", "the same words again and " * 30) is None
    short = "In Chinese, the glimmerfox is called 闪光狐.\nYou can find the glimmerfox in hot springs."
    assert apply(tmp_path, "repetition", short) == short  # a repeated name in a short text is not spam


def test_perplexity_ngram_filter(tmp_path):
    from geb.data.reference_lm import CharNgramLM

    trusted = [ZH, EN, "今天天气很好，我们去公园散步。", "Water boils at one hundred degrees at sea level.",
               "熊猫生活在四川的山里，它们喜欢吃竹子。", "Paris is the capital of France and a big city."] * 5
    lm = CharNgramLM.fit(trusted, order=3)
    path = tmp_path / "ref.lm.json.gz"
    lm.save(path)
    assert CharNgramLM.load(path).perplexity(ZH) == pytest.approx(lm.perplexity(ZH))
    gib = "xq zzkj qpw vvb 1@# kkq zzq " * 4
    assert lm.perplexity(gib) > 20 * lm.perplexity(ZH)
    limit = (lm.perplexity(ZH) * lm.perplexity(gib)) ** 0.5
    assert apply(tmp_path, "perplexity", ZH, path=str(path), max_ppl=limit) == ZH
    assert apply(tmp_path, "perplexity", gib, path=str(path), max_ppl=limit) is None


def test_settings_overrides_and_typos(tmp_path):
    over = parse_overrides(["t2s=on", "pii.mode=remove", "read.txt_mode=line", "val_fraction=0.1"])
    s = resolve(over)
    assert s["rules"]["t2s"]["enabled"] is True and s["rules"]["pii"]["mode"] == "remove"
    assert s["read"]["txt_mode"] == "line" and s["val_fraction"] == 0.1
    assert resolve()["rules"]["t2s"]["enabled"] is False  # stated default: off
    with pytest.raises(GebError, match="unknown rule"):
        resolve(parse_overrides(["piii=off"]))
    with pytest.raises(GebError, match="has no setting"):
        resolve(parse_overrides(["pii.mdoe=remove"]))
    with pytest.raises(GebError, match="unknown setting"):
        rule_classes()["pii"](tmp_path, mdoe="x")


def test_bilingual_tokenizer_units_and_sentences():
    from geb.data.text import BilingualWordTokenizer

    tok = BilingualWordTokenizer()
    assert tok.word_tokenize("北京很好, it's fine.") == ["北", "京", "很", "好", "it's", "fine"]
    assert tok.sent_tokenize("第一句。第二句！Pi is 3.14 here. Last one") == ["第一句。", "第二句！", "Pi is 3.14 here.", "Last one"]


def test_cli_rules_and_fit_lm(tmp_path, capsys):
    from geb.cli import main

    assert main(["data", "rules", "--json"]) == 0
    rows = {r["rule"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["t2s"]["enabled"] is False and rows["pii"]["defaults"]["mode"] == "mask"
    assert [r["stage"] for r in rows.values()].count("dedup") == 3
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / "a.txt").write_text(f"{ZH}\n\n{EN}\n\n{ZH}\n\n{EN}\n", encoding="utf-8")
    assert main(["data", "fit-lm", "--input", str(tmp_path / "trusted"), "--output", str(tmp_path / "ref.lm.json.gz"),
                 "--order", "3"]) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    from geb.data.reference_lm import CharNgramLM

    lm = CharNgramLM.load(tmp_path / "ref.lm.json.gz")
    assert lm.order == 3 and lm.meta["p99_ppl"] >= lm.meta["median_ppl"] > 1


def test_rjieba_tokens_are_cut_like_jieba():
    from geb.data.text import _as_jieba, words

    # jieba's HMM cuts ASCII runs at symbols but keeps decimals and percentages whole
    assert _as_jieba(["日期", "2008-6-1", "涨了", "1.5", "85%", "2-3"]) == ["日期", "2008", "-", "6", "-", "1", "涨了", "1.5",
                                                                          "85%", "2", "-", "3"]
    for text in ("北京欢迎你", "AT&T在2008-6-1", "价格1.5倍", "a b", "版本v2.0"):  # the text-level shortcut changes nothing
        seg = list(text) + [text[1:4]]
        assert _as_jieba(seg, text) == _as_jieba(seg)
    ws = words("我在2008-06-04买了这本书，价格涨了1.5倍。")
    assert "2008" in ws and "06" in ws and "-" not in ws and "2008-06-04" not in ws


def test_rank_reader_reads_only_its_own_file(tmp_path):
    from geb.data.dedup import RankReader

    for rank in (0, 2):  # task 1 wrote no file: rank 2 must still read 00002.jsonl, not the next in the listing
        (tmp_path / f"{rank:05d}.jsonl").write_text(json.dumps({"text": f"doc of task {rank}", "id": str(rank)}) + "\n")
    texts = {r: [d.text for d in RankReader(str(tmp_path), glob_pattern="*.jsonl", compression=None).run(None, r, 3)]
             for r in range(3)}
    assert texts == {0: ["doc of task 0"], 1: [], 2: ["doc of task 2"]}
