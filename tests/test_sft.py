"""SFT: the template's loss mask, packing without leakage, learning, resume, meta, and bad input."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from geb.checkpoint import load_model
from geb.errors import GebError
from geb.train.chatdata import load_conversations
from geb.train.loop import TrainConfig
from geb.train.sft import IGNORE, SFTTask, collate, pack_rows, run_sft


def _conv(i: int, lang: str = "en") -> dict:
    if lang == "zh":
        return {"messages": [{"role": "user", "content": f"{i}加{i}等于多少？"},
                             {"role": "assistant", "content": f"{i}加{i}等于{2 * i}。"}]}
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


CONVS = [_conv(i, "zh" if i % 3 == 0 else "en") for i in range(24)]


def _cfg(**kw):
    base = dict(steps=8, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4, save_every=3,
                log_every=1, dtype="fp32", device="cpu", seed=3, weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


def _records(folder):
    return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]


def test_loss_mask_is_exactly_the_assistant_turns(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "北京是哪里？"},
            {"role": "assistant", "content": "中国的首都。"}, {"role": "user", "content": "And Paris?"},
            {"role": "assistant", "content": "The capital of France."}]
    (ex,), _, _ = load_conversations([{"messages": msgs}], tokenizer, 128)
    ids, mask = ex
    assert ids[-1] == tokenizer.im_end_id  # ends at the last <|im_end|>: the trailing newline carries no loss
    b = collate([[ex]], tokenizer.pad_id)
    trained = [t for t in b["targets"][0].tolist() if t != IGNORE]
    # the trained tokens are the two answers, each followed by <|im_end|>, and nothing else
    expect = tokenizer.encode("中国的首都。") + [tokenizer.im_end_id] + tokenizer.encode("The capital of France.") + [tokenizer.im_end_id]
    assert tokenizer.decode(trained) == tokenizer.decode(expect)
    assert trained.count(tokenizer.im_end_id) == 2
    # every target is the next input token (a shift, never a jump)
    assert b["ids"][0, 1:].tolist() == ids[1:-1]
    # the instruction/input/output form renders as one user turn + one assistant turn
    (ex2,), _, _ = load_conversations([{"instruction": "Translate", "input": "猫", "output": "cat"}], tokenizer, 128)
    assert tokenizer.decode(ex2[0]) == "<|im_start|>user\nTranslate\n\n猫<|im_end|>\n<|im_start|>assistant\ncat<|im_end|>"


def test_the_checkpoint_carries_the_template_sft_trained_with(tmp_path, tokenizer):
    """Every tool renders chats from the stored Jinja template; it must give the text SFT trained on."""
    jinja2 = pytest.importorskip("jinja2")
    tokenizer.save(tmp_path)
    template = json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "再见"}]
    (ex,), _, _ = load_conversations([{"messages": msgs}], tokenizer, 128)
    text = jinja2.Environment().from_string(template).render(messages=msgs, add_generation_prompt=False)
    assert text == tokenizer.decode(ex[0]) + "\n"  # SFT drops only the final newline
    gen = jinja2.Environment().from_string(template).render(messages=msgs[:4], add_generation_prompt=True)
    assert gen == tokenizer.decode(tokenizer.render_chat(msgs[:4], add_generation_prompt=True)[0])


def test_pack_rows_places_everything_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    rows = pack_rows(lengths, 64)
    placed = sorted(i for r in rows for i in r)
    assert placed == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 1.15 * sum(lengths) / 64 + 1  # best-fit decreasing packs tightly
    assert pack_rows(lengths, 64, pack=False) == [[i] for i in range(300)]


def test_packed_conversation_has_the_same_loss_as_alone(tokenizer, tiny_cfg):
    """No attention and no loss leaks between conversations sharing a row."""
    from geb.model import GEB

    torch.manual_seed(0)
    model = GEB(tiny_cfg).eval()
    exs, _, _ = load_conversations(CONVS[:3], tokenizer, 128)
    packed = collate([exs], tokenizer.pad_id)
    assert "attn_mask" in packed and packed["ids"].shape[0] == 1
    with torch.no_grad():
        lp = model(packed["ids"], positions=packed["positions"], attn_mask=packed["attn_mask"])
        o = 0
        for ex in exs:
            alone = collate([[ex]], tokenizer.pad_id)
            la = model(alone["ids"], positions=alone["positions"])
            n = len(ex[0]) - 1
            torch.testing.assert_close(lp[0, o : o + n], la[0, :n], atol=1e-5, rtol=1e-5)
            assert torch.equal(packed["targets"][0, o : o + n], alone["targets"][0, :n])
            o += n
        # changing the second conversation changes nothing in the first or third
        other = [exs[0], ([tokenizer.im_start_id] * len(exs[1][0]), exs[1][1]), exs[2]]
        p2 = collate([other], tokenizer.pad_id)
        l2 = model(p2["ids"], positions=p2["positions"], attn_mask=p2["attn_mask"])
        n0, n1 = len(exs[0][0]) - 1, len(exs[1][0]) - 1
        assert torch.equal(l2[0, :n0], lp[0, :n0]) and torch.equal(l2[0, n0 + n1 :], lp[0, n0 + n1 :])
        # the token-mean loss of a packed batch equals the pooled per-conversation losses
        total = model(packed["ids"], packed["targets"], positions=packed["positions"], attn_mask=packed["attn_mask"])
        num, den = 0.0, 0
        for ex in exs:
            a = collate([[ex]], tokenizer.pad_id)
            logits = model(a["ids"], positions=a["positions"])
            num += float(F.cross_entropy(logits[0], a["targets"][0], ignore_index=IGNORE, reduction="sum"))
            den += int((a["targets"] != IGNORE).sum())
        assert float(total) == pytest.approx(num / den, rel=1e-5)


def test_batches_are_a_pure_function_of_the_cursor(tokenizer):
    exs, _, _ = load_conversations(CONVS, tokenizer, 64)
    a = SFTTask(exs, [], 64, 3, 2, seed=5, pad_id=tokenizer.pad_id)
    b = SFTTask(exs, [], 64, 3, 2, seed=5, pad_id=tokenizer.pad_id)
    for idx, micro in [(7, 1), (0, 0), (3, 1)]:
        x, y = a.batch(idx, micro), b.batch(idx, micro)
        assert all(torch.equal(x[k], y[k]) for k in x)
    # every row is visited once per epoch
    seen = [tuple(id(e) for e in a._row(g)) for g in range(len(a.rows))]
    assert len(set(seen)) == len(a.rows)


def test_sft_learns_writes_meta_and_resumes_exactly(tmp_path, tiny_model_dir):
    full = run_sft(tiny_model_dir, CONVS, tmp_path / "a", val_fraction=0.2, train_config=_cfg(), seq_len=64, quiet=True)
    recs = _records(tmp_path / "a")
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    assert train[-1] < train[0] - 0.5
    assert [r["step"] for r in recs if r["kind"] == "val"] == [4, 8]
    assert full["stage"] == "sft" and full["parent"] == str(tiny_model_dir) and full["parent_stage"] == "random"
    assert full["data_report"]["train"] == {**full["data_report"]["train"], "records": 24, "used": 24, "skipped_total": 0}
    assert full["settings"]["task"]["val_conversations"] == 5 and full["settings"]["task"]["pack"] is True
    assert (tmp_path / "a" / "loss.png").is_file()
    model, tok, _ = load_model(tmp_path / "a")
    assert tok.hash() == full["tokenizer_hash"]
    # crash after step 5 (last checkpoint: step 3), then resume: the same curve and weights
    r = run_sft(tiny_model_dir, CONVS, tmp_path / "b", val_fraction=0.2, train_config=_cfg(), seq_len=64, quiet=True,
                stop_after=5)
    assert r["stopped"]
    run_sft(None, CONVS, tmp_path / "b", resume=True, quiet=True)
    curve = lambda d: [(x["step"], x["loss"]) for x in _records(d) if x["kind"] == "train"]
    assert curve(tmp_path / "a") == curve(tmp_path / "b")
    with pytest.raises(GebError, match="data differ"):
        run_sft(None, CONVS[:-1], tmp_path / "b", resume=True, quiet=True, overrides={"steps": 9})


def test_epochs_set_the_step_count_and_unpacked_mode(tmp_path, tiny_model_dir):
    meta = run_sft(tiny_model_dir, CONVS[:12], tmp_path / "e", epochs=2, train_config=_cfg(batch_size=2),
                   seq_len=64, pack=False, quiet=True)
    assert meta["settings"]["task"]["rows"] == 12 and meta["step"] == 12  # 2 epochs × 12 rows / 2 per step
    assert meta["epochs"] == 2.0 and meta["last_val_loss"] is None


@pytest.mark.parametrize("record,reason,needle", [
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role", "unknown role 'narrator'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}, "empty_turn", "empty user turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "empty_turn", "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                   {"role": "user", "content": "and?"}]}, "last_not_assistant", "not the assistant's"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo " * 200}]}, "too_long", "not truncated"),
    ({"instruction": "", "output": "x"}, "empty_turn", "empty user turn"),
    ({"text": "plain"}, "bad_format", "expected 'messages'"),
])
def test_bad_conversations_error_or_are_counted(tmp_path, tokenizer, record, reason, needle):
    f = tmp_path / "d.jsonl"
    good = json.dumps(CONVS[0])
    f.write_text(good + "\n" + json.dumps(record) + "\n" + good + "\n")
    with pytest.raises(GebError, match=rf"d\.jsonl:2: .*{needle}"):
        load_conversations(f, tokenizer, 64)
    exs, rep, _ = load_conversations(f, tokenizer, 64, on_bad="skip")
    assert len(exs) == 2 and rep.used == 2 and rep.records == 3 and dict(rep.skipped) == {reason: 1}
    assert rep.examples[0].startswith(f"{f}:2:")


def test_invalid_json_and_nothing_usable(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(CONVS[0]) + "\n{not json\n")
    with pytest.raises(GebError, match=r"d\.jsonl:2: not valid JSON"):
        load_conversations(f, tokenizer, 64)
    _, rep, _ = load_conversations(f, tokenizer, 64, on_bad="skip")
    assert dict(rep.skipped) == {"invalid_json": 1}
    f.write_text("{not json\n")
    with pytest.raises(GebError, match="no usable conversations"):
        load_conversations(f, tokenizer, 64, on_bad="skip")
    with pytest.raises(GebError, match="not found"):
        load_conversations(tmp_path / "missing.jsonl", tokenizer, 64)


def test_skips_are_reported_in_meta(tmp_path, tiny_model_dir):
    data = CONVS[:8] + [{"messages": [{"role": "bot", "content": "x"}]}]
    meta = run_sft(tiny_model_dir, data, tmp_path / "s", train_config=_cfg(steps=1), seq_len=64, on_bad="skip", quiet=True)
    rep = meta["data_report"]["train"]
    assert rep["used"] == 8 and rep["skipped"] == {"unknown_role": 1} and "unknown role 'bot'" in rep["skipped_examples"][0]
