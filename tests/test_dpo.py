"""DPO: loss and gradient against the formula, the cached reference, a preference shift on a toy
preference, resume, bad pairs, and the sft → dpo command line."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from geb.errors import GebError
from geb.train import dpo as dpo_mod
from geb.train.chatdata import load_pairs
from geb.train.dpo import DPOTask, collate_pairs, dpo_loss, run_dpo
from geb.train.loop import TrainConfig

# A toy preference: answer in the user's language. Train and held-out pairs use different questions.
EN_Q = ["Where is the red house?", "Who made the blue boat?", "When does the market open?", "What do cats eat?",
        "Which road goes north?", "How old is the bridge?", "Where do the birds sleep?", "Who sings at night?"]
ZH_Q = ["红房子在哪里？", "谁做了蓝色的船？", "市场几点开门？", "猫吃什么？", "哪条路往北走？", "这座桥有多老？",
        "鸟在哪里睡觉？", "谁在晚上唱歌？"]
EN_A = ["It is by the river.", "A fisher made it.", "It opens at nine.", "They eat fish.", "The stone road does.",
        "It is very old.", "They sleep in the trees.", "The old man sings."]
ZH_A = ["在河边。", "一个渔夫做的。", "九点开门。", "它们吃鱼。", "石头路往北走。", "它很老了。", "它们睡在树上。", "老人在唱歌。"]


def _lang_pairs(idx):
    out = []
    for i in idx:
        out.append({"prompt": EN_Q[i], "chosen": EN_A[i], "rejected": ZH_A[i], "lang": "en"})
        out.append({"prompt": [{"role": "user", "content": ZH_Q[i]}], "chosen": ZH_A[i], "rejected": EN_A[i], "lang": "zh"})
    return out


TRAIN, HELDOUT = _lang_pairs(range(6)), _lang_pairs(range(6, 8))


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, lr=2e-3, min_lr=2e-4, warmup_steps=1, eval_every=3, save_every=2,
                log_every=1, dtype="fp32", device="cpu", seed=1, weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


def _records(folder):
    return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]


def _direct_logp(model, pair_ids, mask):
    """log π(answer | prompt) by the definition: one unpadded forward, sum of log-softmax at answer tokens."""
    x = torch.tensor([pair_ids])
    logp = torch.log_softmax(model(x)[0].double(), -1)
    return sum(logp[t - 1, pair_ids[t]] for t in range(1, len(pair_ids)) if mask[t])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_loss_and_gradient_match_the_dpo_formula(tokenizer, tiny_cfg, label_smoothing):
    from geb.model import GEB

    torch.manual_seed(0)
    model = GEB(tiny_cfg)
    # one long answer: the short sequences pack together into rows as wide as it
    long = {"prompt": EN_Q[0], "chosen": " ".join(EN_A[:5]), "rejected": ZH_A[0], "lang": "en"}
    pairs, _, _ = load_pairs(TRAIN[:5] + [long], tokenizer, 128)
    assert len({len(p.chosen) for p in pairs}) > 1  # rows of different lengths: padding is exercised
    ref = torch.randn(len(pairs), 2) * 3 - 40
    beta = 0.3
    task = DPOTask(pairs, ref, [], torch.zeros(0, 2), batch_size=6, grad_accum=1, seed=0,
                   pad_id=tokenizer.pad_id, beta=beta, label_smoothing=label_smoothing)
    b = collate_pairs(pairs, tokenizer.pad_id)
    # some row holds more than one sequence: the block-diagonal packing is what is checked below
    assert "attn_mask" in b and b["ids"].shape[0] < 2 * len(pairs)
    # unpacked (for mask-free attention kernels): one row per sequence, no mask, the same log-probs
    flat = collate_pairs(pairs, tokenizer.pad_id, pack=False)
    assert "attn_mask" not in flat and flat["ids"].shape[0] == 2 * len(pairs)
    with torch.no_grad():
        for x, y in zip(dpo_mod.policy_logps(model, b), dpo_mod.policy_logps(model, flat)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)
    b["ref"] = ref
    loss, mets = task.loss(model, b)
    loss.backward()
    g_task = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # direct: L = mean_i −(1−ε) log σ(z_i) − ε log σ(−z_i), z_i = β[(πc − rc) − (πr − rr)]
    terms, zs = [], []
    for i, p in enumerate(pairs):
        pc = _direct_logp(model, p.chosen, p.chosen_mask)
        pr = _direct_logp(model, p.rejected, p.rejected_mask)
        z = beta * ((pc - float(ref[i, 0])) - (pr - float(ref[i, 1])))
        zs.append(float(z.detach()))
        sig = 1 / (1 + torch.exp(-z))
        terms.append(-(1 - label_smoothing) * torch.log(sig) - label_smoothing * torch.log(1 - sig))
    direct = sum(terms) / len(terms)
    direct.backward()
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_task[n], p.grad.float(), rtol=1e-4, atol=1e-7, msg=n)
    assert mets["reward_margin"] == pytest.approx(sum(zs) / len(zs), abs=1e-5)
    assert mets["reward_acc"] == pytest.approx(sum(z > 0 for z in zs) / len(zs))


def test_loss_gradient_wrt_log_probs_is_the_closed_form():
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64) * 4 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta, eps = 0.1, 0.1
    loss, _ = dpo_loss(pc, pr, rc, rr, beta, eps)
    loss.backward()
    z = beta * ((pc - rc) - (pr - rr)).detach()
    # dL/dπc = −(β/B)[(1−ε)σ(−z) − εσ(z)] and dL/dπr is its negative
    expect = -(beta / 6) * ((1 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z))
    torch.testing.assert_close(pc.grad, expect)
    torch.testing.assert_close(pr.grad, -expect)
    # at z = 0 the loss is log 2 whatever the smoothing
    l0, m0 = dpo_loss(rc, rr, rc, rr, beta, eps)
    assert float(l0) == pytest.approx(math.log(2)) and m0["reward_acc"] == 0.0


def test_preference_moves_the_right_way_and_reference_is_cached_once(tmp_path, tiny_model_dir, monkeypatch):
    calls = []
    real = dpo_mod.compute_logps
    monkeypatch.setattr(dpo_mod, "compute_logps", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    meta = run_dpo(tiny_model_dir, TRAIN, tmp_path / "d", val_data=HELDOUT, beta=0.1,
                   train_config=_cfg(steps=10, eval_every=5, save_every=5), quiet=True)
    # the reference pass ran once over the training and validation pairs (then once for the final eval)
    assert calls[:2] == [len(TRAIN), len(HELDOUT)] and len(calls) == 3
    recs = [r for r in _records(tmp_path / "d") if r["kind"] == "train"]
    # step 1: the policy is the reference, so the loss is log 2 and every reward is 0
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(recs[0]["reward_margin"]) < 1e-5
    assert recs[-1]["reward_margin"] > 0.5 and recs[-1]["reward_acc"] == 1.0
    # on questions never trained on, the policy now prefers the answer in the user's language
    v = meta["final_eval"]["val"]
    assert v["pairs"] == len(HELDOUT) and v["reward_acc"] == 1.0 and v["reward_margin"] > 0.1
    for lang in ("en", "zh"):  # both ways round: the preference follows the prompt's language
        assert v["by_lang"][lang]["pairs"] == 2 and v["by_lang"][lang]["reward_acc"] == 1.0
        assert v["by_lang"][lang]["logp_chosen_shift"] > v["by_lang"][lang]["logp_rejected_shift"]
    vals = [r["val_loss"] for r in _records(tmp_path / "d") if r["kind"] == "val"]
    assert vals[-1] < math.log(2) - 0.05
    assert meta["stage"] == "dpo" and meta["parent"] == str(tiny_model_dir) and meta["reference"]["model"] == str(tiny_model_dir)
    d = tmp_path / "d"
    assert (d / "reference_logps.pt").is_file() and (d / "rewards.png").is_file() and (d / "loss.png").is_file()
    assert not list(tmp_path.glob(".d.*"))  # the cache moved into the finished folder
    cache = torch.load(d / "reference_logps.pt", weights_only=True)
    assert cache["train"].shape == (len(TRAIN), 2) and cache["key"]["data_hash"] == meta["data_hash"]


def test_resume_reuses_the_cache_and_continues_exactly(tmp_path, tiny_model_dir, monkeypatch):
    full = run_dpo(tiny_model_dir, TRAIN, tmp_path / "a", train_config=_cfg(), quiet=True)
    r = run_dpo(tiny_model_dir, TRAIN, tmp_path / "b", train_config=_cfg(), quiet=True, stop_after=3)
    assert r["stopped"] and (tmp_path / ".b.reference_logps.pt").is_file()

    def boom(*a, **k):
        raise AssertionError("reference log-probs recomputed on resume")

    monkeypatch.setattr(dpo_mod, "compute_logps", boom)
    res = run_dpo(None, TRAIN, tmp_path / "b", resume=True, quiet=True)
    curve = lambda d: [(x["step"], x["loss"], x["reward_acc"]) for x in _records(d) if x["kind"] == "train"]
    assert curve(tmp_path / "a") == curve(tmp_path / "b")
    assert res["last_train_loss"] == full["last_train_loss"]
    with pytest.raises(GebError, match="data differ"):
        run_dpo(None, TRAIN[:-1], tmp_path / "b", resume=True, quiet=True, overrides={"steps": 8})
    with pytest.raises(GebError, match="already holds a checkpoint"):
        run_dpo(tiny_model_dir, TRAIN, tmp_path / "a", train_config=_cfg(), quiet=True)


@pytest.mark.parametrize("record,reason,needle", [
    ({"prompt": "hi", "chosen": "Hello.", "rejected": " Hello. "}, "identical_pair", "same text"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_turn", "'prompt' is empty"),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, "empty_turn", "'chosen' is empty"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "chosen": "a",
      "rejected": "b"}, "last_not_user", "not the user's"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}, "unknown_role", "unknown role"),
    ({"prompt": "hi", "chosen": "a " * 200, "rejected": "b"}, "too_long", "not truncated"),
    ({"prompt": "hi", "chosen": "a"}, "bad_format", "'prompt', 'chosen' and 'rejected'"),
])
def test_bad_pairs_error_or_are_counted(tmp_path, tokenizer, record, reason, needle):
    f = tmp_path / "p.jsonl"
    good = json.dumps(TRAIN[0], ensure_ascii=False)
    f.write_text(good + "\n" + json.dumps(record) + "\n")
    with pytest.raises(GebError, match=rf"p\.jsonl:2: .*{needle}"):
        load_pairs(f, tokenizer, 100)
    pairs, rep, _ = load_pairs(f, tokenizer, 100, on_bad="skip")
    assert len(pairs) == 1 and dict(rep.skipped) == {reason: 1}


def test_chosen_as_assistant_message_and_prompt_tokens_carry_no_loss(tokenizer):
    a, _, _ = load_pairs([{"prompt": "hi", "chosen": "Hello.", "rejected": "Go."}], tokenizer, 100)
    b, _, _ = load_pairs([{"prompt": [{"role": "user", "content": "hi"}],
                           "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": "Go."}], tokenizer, 100)
    assert a[0] == b[0]
    p = a[0]
    n_prompt = len(tokenizer.render_chat([{"role": "user", "content": "hi"}])[0])
    assert p.chosen[:n_prompt] == p.rejected[:n_prompt] and not any(p.chosen_mask[:n_prompt])
    assert tokenizer.decode([t for t, m in zip(p.chosen, p.chosen_mask) if m]) == "Hello.<|im_end|>"


def test_sft_then_dpo_on_the_command_line(tmp_path, geb_cli, tiny_model_dir, capsys):
    from geb.cli import main

    conv = tmp_path / "conv.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(EN_Q + ZH_Q, EN_A + ZH_A)] + [{"instruction": "Say hi", "output": "Hi!"},
                                                        {"messages": [{"role": "user", "content": "no answer"}]}]
    conv.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TRAIN))
    # in-process for the error (threads as they are: the test changes no global state)
    rc = main(["sft", "--model", str(tiny_model_dir), "--data", str(conv), "--out", str(tmp_path / "sft"),
               "--threads", str(torch.get_num_threads())])
    err = capsys.readouterr().err
    assert rc == 2 and "conv.jsonl:18:" in err and "--on-bad skip" in err and "Traceback" not in err
    assert not (tmp_path / "sft").exists()
    geb_cli("sft", "--model", tiny_model_dir, "--data", conv, "--out", tmp_path / "sft", "--on-bad", "skip",
            "--steps", "3", "--batch-size", "2", "--seq-len", "64", "--lr", "1e-3", "--val-fraction", "0.2",
            "--eval-every", "3", "--quiet", "--threads", "1")
    sm = json.loads((tmp_path / "sft" / "meta.json").read_text())
    assert sm["step"] == 3 and sm["data_report"]["train"]["skipped"] == {"last_not_assistant": 1}
    assert sm["last_val_loss"] is not None
    p = geb_cli("dpo", "--model", tmp_path / "sft", "--data", pairs, "--out", tmp_path / "dpo", "--steps", "2",
                "--batch-size", "4", "--lr", "1e-3", "--beta", "0.2", "--label-smoothing", "0.1", "--quiet", "--threads", "1")
    assert "reward accuracy" in p.stdout
    dm = json.loads((tmp_path / "dpo" / "meta.json").read_text())
    assert dm["parent"] == str(tmp_path / "sft") and dm["parent_stage"] == "sft" and dm["step"] == 2
    assert dm["settings"]["task"]["beta"] == 0.2 and dm["settings"]["task"]["label_smoothing"] == 0.1
    assert "reward_acc" in dm["last_train_metrics"]
