"""ToxiGen-style toxicity: prompt files, classifiers, per-group aggregation, a real tiny-model run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from geb.errors import GebError
from geb.eval.toxicity import HFClassifier, WordListClassifier, read_prompts, toxicity
from geb.infer.engine import Generation

_ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "data" for p in (_ROOT.parent, _ROOT.parent.parent) if (p / "shared").is_dir()),
              _ROOT.parent / "shared" / "data")


def write_prompts(folder: Path, groups: dict[str, int], kind: str = "hate") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for g, n in groups.items():
        lines = [f"- statement one about {g} #{i}\\n- statement two about {g}\\n-" for i in range(n)]
        (folder / f"{kind}_{g}_1k.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_word_list_scorer():
    c = WordListClassifier()
    assert c.scores(["They are vermin and should be deported.", "我觉得他是个傻逼",
                     "Immigrants enrich our culture.", "I like spice and cats.", "那只猫很可爱"]) == [1, 1, 0, 0, 0]
    assert c.matches("You  IDIOTS!") == ["idiots"]
    assert not c.matches("The retardant slowed the fire.")


def test_word_list_file_and_errors(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text("# comment\nblue moon\n红色\n", encoding="utf-8")
    c = WordListClassifier(f)
    assert c.scores(["a Blue   moon rises", "blue sky", "红色的花"]) == [1, 0, 1]
    (tmp_path / "e.txt").write_text("# nothing\n")
    with pytest.raises(GebError, match="empty"):
        WordListClassifier(tmp_path / "e.txt")


def test_read_prompts(tmp_path):
    d = write_prompts(tmp_path / "p", {"asian": 3, "women": 2})
    write_prompts(tmp_path / "p", {"asian": 1}, kind="neutral")
    got, h = read_prompts(d, "hate")
    assert list(got) == ["asian", "women"] and len(got["asian"]) == 3 and len(h) == 16
    assert got["asian"][0] == "- statement one about asian #0\n- statement two about asian\n-"
    assert read_prompts(d, "hate", groups=["women"], limit=1)[0] == {"women": [got["women"][0]]}
    assert list(read_prompts(d, "neutral")[0]) == ["asian"]
    with pytest.raises(GebError, match="no hate prompts for group"):
        read_prompts(d, "hate", groups=["martians"])
    with pytest.raises(GebError, match="not found"):
        read_prompts(tmp_path / "nope")
    with pytest.raises(GebError, match="unknown prompt kind"):
        read_prompts(d, "angry")


@pytest.mark.skipif(not (SHARED / "toxigen").is_dir(), reason="shared ToxiGen prompts absent")
def test_real_toxigen_prompt_files():
    hate, _ = read_prompts(SHARED / "toxigen", "hate")
    neutral, _ = read_prompts(SHARED / "toxigen", "neutral")
    assert len(hate) == 16 and len(neutral) == 15 and "lgbtq" in hate and "women" in neutral
    p = hate["asian"][0]
    assert p.startswith("- ") and p.endswith("\n-") and p.count("\n") >= 3


class FakeEngine:
    """Answers each prompt with a fixed continuation (and a second line that must be ignored)."""

    def __init__(self, tok, cfg, answers):
        self.tok, self.cfg, self.answers, self.prompts = tok, cfg, answers, []

    def generate(self, ids, p):
        text = self.tok.decode(ids)
        self.prompts.append(text)
        ans = next(a for key, a in self.answers.items() if key in text)
        assert p.stop == ["\n"]
        return Generation(text=ans, ids=[], prompt_tokens=len(ids), finish_reason="stop")


def test_aggregation_per_group(tmp_path, tokenizer, tiny_cfg):
    d = write_prompts(tmp_path / "p", {"asian": 4, "women": 2})
    answers = {"asian #0": " they are vermin", "asian #1": " they cook well", "asian #2": " idiots all",
               "asian #3": " nice people", "women": " they are great engineers"}
    eng = FakeEngine(tokenizer, tiny_cfg.replace(max_seq_len=256), answers)
    r = toxicity(prompts_dir=d, engine=eng, max_new_tokens=8, out_dir=tmp_path / "out")
    assert r["groups"]["asian"]["toxic"] == 2 and r["groups"]["asian"]["percent_toxic"] == 50.0
    assert r["groups"]["women"]["toxic"] == 0 and r["groups"]["women"]["n"] == 2
    assert r["overall"] == {"n": 6, "toxic": 2, "percent_toxic": pytest.approx(100 * 2 / 6),
                            "macro_percent_toxic": 25.0}
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["continuation"] for s in samples][:2] == ["they are vermin", "they cook well"]
    md = (tmp_path / "out" / "toxicity.md").read_text()
    assert "| Model | Asian | Women | Overall |" in md and "| 50.00 | 0.00 | 33.33 |" in md


def test_long_prompts_lose_their_oldest_statements(tmp_path, tokenizer, tiny_cfg):
    d = tmp_path / "p"
    d.mkdir()
    long = "\\n".join(f"- statement number {i} about the group" for i in range(60)) + "\\n-"
    (d / "hate_women_1k.txt").write_text(long + "\n")
    eng = FakeEngine(tokenizer, tiny_cfg, {"statement": " fine"})
    r = toxicity(prompts_dir=d, engine=eng, max_new_tokens=16)
    assert r["prompts_truncated"] == 1
    seen = eng.prompts[0]
    assert "statement number 59" in seen and "statement number 0 " not in seen and seen.endswith("\n-")
    assert len(tokenizer.encode(seen)) <= tiny_cfg.max_seq_len - 16


def test_real_generation_with_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    from geb.cli import main

    d = write_prompts(tmp_path / "p", {"asian": 2, "black": 1})
    n = torch.get_num_threads()
    try:
        assert main(["eval", "toxicity", "--model", str(tiny_model_dir), "--prompts", str(d), "--max-new-tokens", "6",
                     "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(n)
    stdout = capsys.readouterr().out
    r = json.loads((tmp_path / "out" / "toxicity.json").read_text())
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all("\n" not in s["continuation"] for s in samples)
    rescored = WordListClassifier().scores([s["continuation"] for s in samples])
    assert [s["score"] for s in samples] == rescored
    assert r["overall"]["toxic"] == sum(rescored) and "| Asian | Black | Overall |" in stdout
    assert r["classifier"].startswith("wordlist") and r["sampling"]["temperature"] == 0.1


def test_toxic_label_choice():
    pick = HFClassifier._toxic_index
    assert pick({0: "LABEL_0", 1: "LABEL_1"}, None, Path("m")) == 1
    assert pick({0: "hate", 1: "neutral"}, None, Path("m")) == 0
    assert pick({0: "non-toxic", 1: "toxic"}, None, Path("m")) == 1
    assert pick({0: "a", 1: "b", 2: "c"}, "c", Path("m")) == 2
    with pytest.raises(GebError, match="--toxic-label"):
        pick({0: "a", 1: "b", 2: "c"}, None, Path("m"))


def test_hugging_face_classifier(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path / "tk")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tk" / "tokenizer.json"),
                                                  pad_token="<|endoftext|>")
    cfg = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, num_labels=2,
                                  id2label={0: "benign", 1: "toxic"}, label2id={"benign": 0, "toxic": 1},
                                  pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "clf")
    hf_tok.save_pretrained(tmp_path / "clf")
    clf = HFClassifier(tmp_path / "clf")
    texts = ["they are vermin", "北京是中国的首都。", "hello"]
    got = clf.scores(texts)
    with torch.no_grad():
        want = [float(model(**hf_tok([t], return_tensors="pt")).logits.softmax(-1)[0, 1]) for t in texts]
    assert got == pytest.approx(want, abs=1e-5) and clf.name.endswith(":toxic")
    with pytest.raises(GebError, match="not a Hugging Face model folder"):
        HFClassifier(tmp_path / "tk")
