"""Perplexity / bits per byte: exact against a direct computation, windows, token folders, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from geb.errors import GebError
from geb.eval.ppl import perplexity
from geb.scoring import Scorer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    from test_eval_mcq import sharp_copy

    return sharp_copy(tiny_model_dir, tmp_path_factory.mktemp("ppl") / "sharp")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from geb.checkpoint import load_model

    model, tok, _ = load_model(model_dir)
    return model, tok


def _window_lp(model, tok, inp: list[int], targets: list[int]) -> float:
    """Log-prob of `targets`, the last len(targets) next tokens of the input window, from full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([inp]))[0].float()
    logits[:, tok.vocab_size:] = float("-inf")
    lp = torch.log_softmax(logits, -1)[len(inp) - len(targets):]
    return float(sum(lp[j, t] for j, t in enumerate(targets)))


def _direct(model, tok, ids: list[int], L: int) -> float:
    """lm-eval's rolling windows written out: [eos] + ids[:L-1] predicts ids[:L] (or the whole of a
    shorter document); each later window
    is the L tokens that end just before its last target (full windows see 1 token of context)."""
    first = min(L, len(ids))
    total = _window_lp(model, tok, [tok.doc_id] + ids[: first - 1], ids[:first])
    done = L
    while done < len(ids):
        end = min(done + L, len(ids))
        total += _window_lp(model, tok, ids[end - L - 1 : end - 1], ids[done:end])
        done = end
    return total


def test_text_file_figures_are_exact(tmp_path, model_dir, loaded):
    model, tok = loaded
    text = "The capital of France is Paris. 北京是中国的首都。" * 20  # two and a half 128-token windows
    f = tmp_path / "doc.txt"
    f.write_text(text, encoding="utf-8")
    ids = tok.encode(text)
    assert len(ids) > 2 * model.cfg.max_seq_len
    r = perplexity(model_dir, f, out=tmp_path / "ppl.json")
    lp = _direct(model, tok, ids, model.cfg.max_seq_len)
    assert r["tokens"] == len(ids) and r["bytes"] == len(text.encode())
    assert r["nll_sum"] == pytest.approx(-lp, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(-lp / len(ids)), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(-lp / math.log(2) / len(text.encode()), rel=1e-5)
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] == r["perplexity"]


def test_stride_only_adds_context(loaded):
    model, tok = loaded
    sc = Scorer(model, tok)
    short = tok.encode("Water boils at 100 degrees Celsius at sea level.")
    assert len(short) < sc.max_len
    # a document inside one window: every stride scores each token with its full left context
    base = sc.rolling(short)[0]
    for stride in (1, 5):
        assert sc.rolling(short, stride=stride)[0] == pytest.approx(base, abs=1e-3)
    long = tok.encode("春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 16)
    assert len(long) > 2 * sc.max_len
    disjoint, n = sc.rolling(long)
    overlapped, n2 = sc.rolling(long, stride=32)  # the second window's tokens now see context
    assert n == n2 == len(long) and abs(disjoint - overlapped) > 0.1


def test_token_folder_and_tokenizer_mismatch(tmp_path, model_dir, loaded):
    from geb.data.tokens import TokenWriter

    model, tok = loaded
    docs = ["In 2024, 3 cats and 12 dogs lived on Maple Street.", "熊猫生活在四川的山里。"]
    w = TokenWriter(tmp_path / "tok", tok.vocab_size, tok.doc_id)
    for d in docs:
        w.add(tok.encode(d), split="val")
    w.close()
    r = perplexity(model_dir, tmp_path / "tok", split="val")
    stream = tok.encode(docs[0]) + [tok.doc_id] + tok.encode(docs[1]) + [tok.doc_id]
    assert r["tokens"] == len(stream) and r["bytes"] == len("".join(docs).encode())
    assert r["nll_sum"] == pytest.approx(-_direct(model, tok, stream, model.cfg.max_seq_len), rel=1e-5)
    with pytest.raises(GebError, match="no split 'train'"):
        perplexity(model_dir, tmp_path / "tok", split="train")
    w = TokenWriter(tmp_path / "other", 70000, 3)
    w.add([5, 6, 7], split="val")
    w.close()
    with pytest.raises(GebError, match="different tokenizer"):
        perplexity(model_dir, tmp_path / "other")


def test_bad_input(tmp_path, model_dir, capsys):
    from geb.cli import main

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GebError, match="empty"):
        perplexity(model_dir, tmp_path / "empty.txt")
    with pytest.raises(GebError, match="no such file"):
        perplexity(model_dir, tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(GebError, match="not UTF-8"):
        perplexity(model_dir, tmp_path / "bin.txt")
    (tmp_path / "ok.txt").write_text("Water boils at 100 degrees.")
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(tmp_path / "ok.txt"), "--threads", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    # the CLI prints the library's figures for the same file, and they agree with each other
    ref = perplexity(model_dir, tmp_path / "ok.txt")
    for k in ("tokens", "bytes", "perplexity", "bits_per_byte", "nll_per_token"):
        assert got[k] == ref[k], k
    assert got["bytes"] == len("Water boils at 100 degrees.".encode())
    assert got["perplexity"] == pytest.approx(math.exp(got["nll_per_token"]))
    assert got["bits_per_byte"] == pytest.approx(got["nll_per_token"] * got["tokens"] / (got["bytes"] * math.log(2)))


def test_out_file_loses_nothing_geb_did_not_write(tmp_path, model_dir, capsys):
    """`--out FILE`: a file geb did not write is refused (kept whole) unless --force; geb's own result
    file is replaced; a name that is not .json is refused before any scoring."""
    from geb.cli import main

    (tmp_path / "ok.txt").write_text("Water boils at 100 degrees.")
    base = ["eval", "ppl", "--model", str(model_dir), "--data", str(tmp_path / "ok.txt"), "--threads", "1"]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": "precious"}')
    assert main(base + ["--out", str(notes)]) != 0
    assert "not a geb result file" in capsys.readouterr().err and notes.read_text() == '{"mine": "precious"}'
    assert main(base + ["--out", str(tmp_path / "figures.txt")]) != 0
    assert ".json" in capsys.readouterr().err and not (tmp_path / "figures.txt").exists()
    res = tmp_path / "res.json"
    assert main(base + ["--out", str(res)]) == 0
    first = json.loads(res.read_text())
    assert main(base + ["--out", str(res)]) == 0  # geb's own result: replaced
    assert json.loads(res.read_text())["perplexity"] == first["perplexity"]
    assert main(base + ["--out", str(notes), "--force"]) == 0
    assert json.loads(notes.read_text())["perplexity"] == first["perplexity"]
