"""SIGKILL at a random early point of `geb data run`, `sft`, `dpo`, `quantize`, `export gguf` and
`export hf`, then the same command again: it finishes, the result is identical to an uninterrupted
run, and nothing that the killed process left looks finished when it is not (a published artifact is
always complete; temporary names are cleaned by the next run).

The kill comes after the process has visibly started its work (its temporary output or live log
exists) plus a random delay; the seed is printed so a failure can be replayed (GEB_KILL_SEED)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, save_random_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = int(os.environ.get("GEB_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
ATTEMPTS = 4


@pytest.fixture
def rng():
    print(f"kill seed: GEB_KILL_SEED={SEED}")
    return random.Random(SEED)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "geb", *map(str, args)], env=_env(), capture_output=True, text=True,
                       timeout=600)
    if check:
        assert p.returncode == 0, f"geb {args} failed:\n{p.stdout}\n{p.stderr}"
    return p


def _in_process(args) -> None:
    """The uninterrupted reference run, in this process (saves a torch import; threads stay at 1)."""
    from geb.cli import main

    assert torch.get_num_threads() == 1
    assert main([str(a) for a in args]) == 0


def _kill_during(args, started, rng, delay: float) -> bool:
    """Start `geb ARGS`, wait until started() says its work is under way, SIGKILL it after a random
    delay in [0, delay) s. True when the kill landed while it ran (False: it finished first)."""
    # its own process group: the kill takes the worker processes too (as a terminal's or a scheduler's does)
    proc = subprocess.Popen([sys.executable, "-m", "geb", *map(str, args)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and not started():
        assert time.time() < deadline
        time.sleep(0.001)
    if proc.poll() is None:
        time.sleep(rng.uniform(0, delay))
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode == -signal.SIGKILL


def _temp_of(out: Path):
    return lambda: any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.iterdir())


def _tensors(f: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(f))


def _same_tensors(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def big_model(tmp_path_factory, tokenizer):
    """A model large enough (12 MB) that writing it takes a while to land a kill in."""
    from geb.config import get_preset

    cfg = get_preset("geb-test").replace(d_model=256, n_head=8, n_kv_head=4, head_dim=32, ffn_hidden=704, n_layer=4)
    return save_random_model(tmp_path_factory.mktemp("kill-models") / "big", cfg, tokenizer)


def _kill_then_rerun(tmp_path, args_for, started_for, rng, delay, check_partial, same):
    """Reference run, then kill runs until one is killed mid-way; rerun the same command; compare.
    `delay`: the longest wait after the start, in seconds, or a function of the reference run's time."""
    ref = tmp_path / "ref" / "out"
    ref.parent.mkdir()
    t0 = time.time()
    _in_process(args_for(ref))
    if callable(delay):
        delay = delay(time.time() - t0)
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"try{attempt}" / "out"
        out.parent.mkdir()
        killed = _kill_during(args_for(out), started_for(out), rng, delay / (attempt + 1))
        print(f"attempt {attempt}: {'killed' if killed else 'finished first'}")
        if out.exists():  # published before the kill landed: then it must be complete and right
            check_partial(out, ref)
        if killed:
            break
    assert killed, "the command finished before every kill"
    _run(args_for(out))
    assert same(out, ref)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary left behind


def test_kill_quantize(tmp_path, big_model, rng):
    args = lambda out: ["quantize", "--model", big_model, "--format", "int8", "--out", out, "--threads", "1"]

    def same(a, b):
        return (_same_tensors(a / "model.safetensors", b / "model.safetensors")
                and (a / "config.json").read_bytes() == (b / "config.json").read_bytes())

    _kill_then_rerun(tmp_path, args, _temp_of, rng, 0.05, lambda o, r: same(o, r) or pytest.fail("partial"), same)


def test_kill_export_hf(tmp_path, big_model, rng):
    args = lambda out: ["export", "hf", "--model", big_model, "--out", out, "--threads", "1"]
    same = lambda a, b: _files(a) == _files(b)
    _kill_then_rerun(tmp_path, args, _temp_of, rng, 0.05, lambda o, r: same(o, r) or pytest.fail("partial"), same)


def test_kill_export_gguf(tmp_path, big_model, rng):
    args = lambda out: ["export", "gguf", "--model", big_model, "--out", out, "--type", "q8_0", "--threads", "1"]
    same = lambda a, b: a.read_bytes() == b.read_bytes()
    _kill_then_rerun(tmp_path, args, _temp_of, rng, 0.1, lambda o, r: same(o, r) or pytest.fail("partial"), same)


# -- training: the rerun continues from the last checkpoint with --resume (without one: the same command)
def _live_log(out: Path):
    def started():
        try:
            return bool((out / "metrics.jsonl").read_text().strip())
        except OSError:
            return False
    return started


def _train_kill_then_rerun(tmp_path, args_for, rng, delay):
    from geb.checkpoint import load_model, load_train_state

    ref = tmp_path / "ref"
    _in_process(args_for(["--out", ref]))
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"try{attempt}"
        killed = _kill_during(args_for(["--out", out]), _live_log(out), rng, delay / (attempt + 1))
        print(f"attempt {attempt}: {'killed' if killed else 'finished first'}")
        if killed:
            break
    assert killed, "the run finished before every kill"
    if (out / "meta.json").exists():  # a checkpoint: complete and consistent with its training state
        meta = json.loads((out / "meta.json").read_text())
        print(f"killed after the checkpoint of step {meta['step']}")
        load_model(out)
        assert load_train_state(out)["step"] == meta["step"]
        assert not meta["final"] or meta["step"] == json.loads((ref / "meta.json").read_text())["step"]
        if not meta["final"]:
            _run(args_for(["--resume", out]))
    else:
        _run(args_for(["--out", out]))
    assert _same_tensors(out / "model.safetensors", ref / "model.safetensors")
    recs = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                      if r["kind"] == "train"]
    assert recs(out) == recs(ref)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]


def _conversations(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kill_sft(tmp_path, tiny_model_dir, rng):
    data = _conversations(tmp_path / "conv.jsonl")

    def args(dest):
        if dest[0] == "--resume":
            return ["sft", "--data", data, *dest, "--quiet", "--threads", "1"]
        return ["sft", "--model", tiny_model_dir, "--data", data, *dest, "--steps", "12", "--batch-size", "2",
                "--seq-len", "64", "--dtype", "fp32", "--save-every", "3", "--eval-every", "100", "--quiet",
                "--threads", "1"]

    _train_kill_then_rerun(tmp_path, args, rng, 1.0)


def test_kill_dpo(tmp_path, tiny_model_dir, rng):
    data = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(16)]
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))

    def args(dest):
        if dest[0] == "--resume":
            return ["dpo", "--data", data, *dest, "--quiet", "--threads", "1"]
        return ["dpo", "--model", tiny_model_dir, "--data", data, *dest, "--steps", "12", "--batch-size", "2",
                "--dtype", "fp32", "--save-every", "3", "--eval-every", "100", "--quiet", "--threads", "1"]

    _train_kill_then_rerun(tmp_path, args, rng, 1.0)


# -- the data pipeline ------------------------------------------------------------------------------------
def _raw(root: Path) -> Path:
    from conftest import SAMPLE_TEXT

    root.mkdir()
    paras = [f"{t} Paragraph {i} adds a sentence of its own so that documents differ. 第{i}段也有自己的一句话。"
             for i, t in enumerate(SAMPLE_TEXT[:40])]
    for k in range(4):
        rows = [{"id": f"{k}-{i}", "text": "\n".join(paras[(i + j) % 40] for j in range(3))} for i in range(k, 40, 4)]
        (root / f"part{k}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return root


def test_kill_data_run(tmp_path, tokenizer, rng):
    pytest.importorskip("datatrove")
    from geb.data.pipeline import iter_docs
    from geb.data.tokens import TokenData

    raw = _raw(tmp_path / "raw")
    tokenizer.save(tmp_path / "tok")
    args = lambda out: ["data", "run", "--input", raw, "--output", out, "--tokenizer", tmp_path / "tok"]

    def started(out):
        return lambda: (out / "work" / "logs").is_dir()

    def check_partial(out, ref):
        # whatever is published is complete: text and tokens only ever appear whole
        if (out / "text" / "meta.json").exists():
            assert dict(iter_docs(out / "text")) == dict(iter_docs(ref / "text"))
        if (out / "tokens" / "meta.json").exists():
            assert TokenData(out / "tokens", verify=True).data_hash == TokenData(ref / "tokens").data_hash
        assert not (out / "text").exists() or (out / "text" / "meta.json").exists()
        assert not (out / "tokens").exists() or (out / "tokens" / "meta.json").exists()

    def same(out, ref):
        a, b = (json.loads((d / "report.json").read_text()) for d in (out, ref))
        assert dict(iter_docs(out / "text")) == dict(iter_docs(ref / "text"))
        assert TokenData(out / "tokens", verify=True).data_hash == TokenData(ref / "tokens").data_hash
        assert [(s["step"], s["docs_in"], s["docs_out"]) for s in a["steps"]] == \
               [(s["step"], s["docs_in"], s["docs_out"]) for s in b["steps"]]
        return a["output"]["documents"] == b["output"]["documents"] and a["input"] == b["input"]

    _kill_then_rerun(tmp_path, args, started, rng, lambda took: max(0.5, took), check_partial, same)
