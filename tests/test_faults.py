"""Faults injected in-process: destinations geb did not write, full disks, read-only folders, corrupt
inputs and leftovers of crashed runs. Each case checks the one-line error, the exit status and that
nothing (the user's files, the previous artifact) was lost. Kill tests are in test_faults_kill.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from geb.checkpoint import load_model
from geb.common import MARKER, AtomicFolder, artifact_kind, check_destination
from geb.cli import main
from geb.data.tokens import TokenData, TokenWriter
from geb.errors import GebError

from conftest import SAMPLE_TEXT

pytestmark = pytest.mark.usefixtures("one_torch_thread")
T = ["--threads", "1"]


def _geb(capsys, *args) -> tuple[int, str]:
    """Run the CLI in this process; (exit status, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _precious(folder):
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    (folder / "sub").mkdir()
    (folder / "sub" / "more.txt").write_text("also precious")
    return folder


def _untouched(folder) -> bool:
    return (sorted(p.name for p in folder.rglob("*")) == ["more.txt", "notes.txt", "sub"]
            and (folder / "notes.txt").read_text() == "precious")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer, tiny_model_dir):
    """One valid input for every writer, so that a refusal can only come from the destination check."""
    from geb.interop.gguf import export_gguf
    from geb.interop.hf import export_hf

    root = tmp_path_factory.mktemp("inputs")
    tokenizer.save(root / "tok")
    w = TokenWriter(root / "tokens", tokenizer.vocab_size, tokenizer.doc_id,
                    extra_meta={"tokenizer": str(root / "tok"), "tokenizer_hash": tokenizer.hash()})
    for t in SAMPLE_TEXT:
        w.add(tokenizer.encode(t), "train")
    for t in SAMPLE_TEXT[:8]:
        w.add(tokenizer.encode(t), "val")
    w.close()
    conv = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(8)]
    (root / "conv.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conv))
    pairs = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in SAMPLE_TEXT))
    export_gguf(tiny_model_dir, root / "m.gguf")
    export_hf(tiny_model_dir, root / "hf")
    return root


def _commands(i, model, out):
    return {
        "pretrain": ["pretrain", "--data", i / "tokens", "--out", out, "--config", "geb-test", "--steps", "1",
                     "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--quiet", *T],
        "sft": ["sft", "--model", model, "--data", i / "conv.jsonl", "--out", out, "--steps", "1", "--batch-size", "2",
                "--seq-len", "64", "--dtype", "fp32", "--quiet", *T],
        "dpo": ["dpo", "--model", model, "--data", i / "pairs.jsonl", "--out", out, "--steps", "1", "--batch-size", "2",
                "--dtype", "fp32", "--quiet", *T],
        "quantize": ["quantize", "--model", model, "--format", "int8", "--out", out, *T],
        "export-hf": ["export", "hf", "--model", model, "--out", out, *T],
        "import-gguf": ["import", "gguf", i / "m.gguf", "--out", out, *T],
        "import-hf": ["import", "hf", i / "hf", "--out", out, *T],
        "tokenize": ["tokenize", i / "docs.jsonl", "--tokenizer", i / "tok", "--out", out],
    }


WRITERS = ["pretrain", "sft", "dpo", "quantize", "export-hf", "import-gguf", "import-hf", "tokenize"]


@pytest.mark.parametrize("name", WRITERS)
def test_a_folder_geb_did_not_write_is_refused_and_kept(name, tmp_path, capsys, inputs, tiny_model_dir):
    out = _precious(tmp_path / "mine")
    rc, err = _geb(capsys, *_commands(inputs, tiny_model_dir, out)[name])
    assert rc == 2, err
    assert str(out) in err and "is not a geb" in err and "--force" in err and "Traceback" not in err
    assert _untouched(out)


def test_evaluation_writers_refuse_a_folder_geb_did_not_write(tmp_path):
    from geb.eval.mcq import write_run
    from geb.eval.toxicity import write_toxicity

    results = {"model": {"name": "m"}, "benchmark": "mmlu", "overall": {"n": 0}}
    out = _precious(tmp_path / "mine")
    with pytest.raises(GebError, match="not a geb evaluation run folder"):
        write_run(results, [], out)
    assert _untouched(out)
    with pytest.raises(GebError, match="not a geb evaluation run folder"):
        write_toxicity({}, [], out)
    assert _untouched(out)


def test_an_evaluation_run_is_replaced_even_one_written_before_the_marker(tmp_path):
    old = tmp_path / "run"
    old.mkdir()
    (old / "results.json").write_text('{"old": true}')
    assert artifact_kind(old) is None  # results.json alone is not taken for a run
    (old / "predictions.jsonl").write_text("")
    assert artifact_kind(old) == "eval"
    with AtomicFolder(old, kind="eval") as tmp:  # what write_run and write_toxicity do
        (tmp / "results.json").write_text('{"new": true}')
    assert json.loads((old / "results.json").read_text()) == {"new": True}
    assert not (old / "predictions.jsonl").exists() and artifact_kind(old) == "eval"


def test_eval_mcq_cli_refuses_before_evaluating(tmp_path, capsys, tiny_model_dir):
    out = _precious(tmp_path / "mine")
    rc, err = _geb(capsys, "eval", "mcq", "--benchmark", "mmlu", "--data", tmp_path / "no-such-benchmark",
                   "--model", tiny_model_dir, "--out", out)
    # refused for the destination, not for the missing benchmark folder: the check comes first
    assert rc == 2 and "is not a geb evaluation run folder" in err and "--force" in err, err
    assert _untouched(out)


def test_a_file_that_is_not_gguf_is_refused(tmp_path, capsys, tiny_model_dir):
    f = tmp_path / "model.gguf"
    f.write_text("my notes, not a model")
    rc, err = _geb(capsys, "export", "gguf", "--model", tiny_model_dir, "--out", f, *T)
    assert rc == 2 and "is not a GGUF file" in err and f.read_text() == "my notes, not a model"


def test_an_artifact_of_another_kind_is_refused(tmp_path, capsys, inputs, tiny_model_dir):
    toks = tmp_path / "tokens"
    shutil.copytree(inputs / "tokens", toks)
    rc, err = _geb(capsys, *_commands(inputs, tiny_model_dir, toks)["quantize"])
    assert rc == 2 and "is a geb token folder, not a geb model folder" in err
    TokenData(toks)  # still intact


@pytest.mark.parametrize("name", ["quantize", "export-hf", "tokenize", "import-gguf"])
def test_an_artifact_of_the_same_kind_is_replaced(name, tmp_path, capsys, inputs, tiny_model_dir):
    out = tmp_path / "out"
    cmd = _commands(inputs, tiny_model_dir, out)[name]
    assert _geb(capsys, *cmd)[0] == 0
    first = sorted(p.name for p in out.iterdir())
    (out / "stale-extra.txt").write_text("written by an older geb")  # the whole folder is replaced
    rc, err = _geb(capsys, *cmd)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == first and MARKER in first


def test_force_says_what_it_deletes_then_writes(tmp_path, capsys, inputs, tiny_model_dir):
    out = _precious(tmp_path / "mine")
    capsys.readouterr()
    rc = main([str(a) for a in _commands(inputs, tiny_model_dir, out)["quantize"] + ["--force"]])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"--force: deleting {out} (2 file(s): notes.txt, sub/more.txt)" in cap.out + cap.err
    assert not (out / "notes.txt").exists() and artifact_kind(out) == "model"


def test_resume_and_data_run_folders_are_their_own_kind(tmp_path, capsys, inputs):
    """A training run killed before its first checkpoint leaves only its live log: that is geb's."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert artifact_kind(out) == "model"
    rc, err = _geb(capsys, *_commands(inputs, None, out)["pretrain"])
    assert rc == 0, err
    rc, err = _geb(capsys, "pretrain", "--data", inputs / "tokens", "--resume", out, "--steps", "2", "--quiet", *T)
    assert rc == 0, err
    assert json.loads((out / "meta.json").read_text())["step"] == 2


def test_library_writers_check_too(tmp_path, tiny_model_dir, tokenizer):
    from geb.checkpoint import save_checkpoint

    out = _precious(tmp_path / "mine")
    model, tok, _ = load_model(tiny_model_dir)
    with pytest.raises(GebError, match="not a geb model folder"):
        save_checkpoint(out, model, tok, {"stage": "x"})
    with pytest.raises(GebError, match="not a geb token folder"):
        with AtomicFolder(out, kind="tokens"):
            pass
    assert _untouched(out)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_a_crashed_writer_are_cleaned(tmp_path, capsys, inputs, tiny_model_dir):
    dead = _dead_pid()
    out = tmp_path / "q"
    stale_tmp = tmp_path / f".q.tmp-{dead}"
    stale_tmp.mkdir()
    (stale_tmp / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".q.tmp-{os.getppid()}"  # a live process's temp folder is left alone
    other = tmp_path / f".other.tmp-{dead}"  # another destination's
    live.mkdir()
    other.mkdir()
    assert _geb(capsys, *_commands(inputs, tiny_model_dir, out)["quantize"])[0] == 0
    assert not stale_tmp.exists() and other.exists() and live.exists()
    # killed between the two renames: the finished folder is missing, the previous one is .q.old-PID
    old = tmp_path / f".q.old-{dead}"
    os.replace(out, old)
    check_destination(out, "model")
    assert artifact_kind(out) == "model" and not old.exists()


# -- OS errors -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _mount(path, opts: str):
    """A tmpfs at `path` (root only); skip the test where this process cannot mount."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _one_line(err: str, *needles: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, err)


def test_read_only_output_folder(tmp_path, capsys, inputs, tiny_model_dir):
    with _mount(tmp_path / "ro", "size=1m,ro") as ro:
        for name in ("quantize", "export-hf", "tokenize"):
            rc, err = _geb(capsys, *_commands(inputs, tiny_model_dir, ro / "out")[name])
            assert rc == 1
            _one_line(err, f"cannot write {ro}", "Read-only file system")
        rc, err = _geb(capsys, "export", "gguf", "--model", tiny_model_dir, "--out", ro / "m.gguf", *T)
        assert rc == 1
        _one_line(err, f"cannot write {ro}", "Read-only file system")


def _du(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_full_disk_during_checkpoint_save_keeps_the_previous_one(tmp_path, capsys, inputs):
    ref = tmp_path / "ref"
    args = ["pretrain", "--data", inputs / "tokens", "--config", "geb-test", "--batch-size", "2", "--seq-len", "32",
            "--dtype", "fp32", "--save-every", "1", "--eval-every", "100", "--quiet", *T]
    assert _geb(capsys, *args, "--out", ref, "--steps", "1")[0] == 0
    size = _du(ref)
    # room for one checkpoint and part of a second: the second save's staging copy runs out of space
    with _mount(tmp_path / "small", f"size={int(size * 1.5) // 4096 * 4096}") as small:
        out = small / "ck"
        rc, err = _geb(capsys, *args, "--out", out, "--steps", "3")
        assert rc == 1
        _one_line(err, f"cannot write {out}", "No space left on device")
        assert json.loads((out / "meta.json").read_text())["step"] == 1
        load_model(out)
        assert not list(small.glob(".ck.*")), list(small.iterdir())


def test_full_disk_during_checkpoint_save_injected(tmp_path, capsys, inputs, monkeypatch):
    """The same without a mount: the write of the training state raises ENOSPC at the second save."""
    from pathlib import Path

    real, calls = Path.write_bytes, []

    def write_bytes(self, data):
        if self.name == "train_state.pt":
            calls.append(self)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "ck"
    rc, err = _geb(capsys, "pretrain", "--data", inputs / "tokens", "--out", out, "--config", "geb-test",
                   "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--save-every", "1", "--steps", "3",
                   "--quiet", *T)
    assert rc == 1
    _one_line(err, f"cannot write {out}", "No space left on device")
    assert json.loads((out / "meta.json").read_text())["step"] == 1 and not list(tmp_path.glob(".ck.*"))


def test_full_disk_during_packing_keeps_the_previous_tokens(tmp_path, capsys, inputs):
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": t * 4}, ensure_ascii=False) + "\n" for t in SAMPLE_TEXT * 20))
    with _mount(tmp_path / "small", "size=64k") as small:
        out = small / "tokens"
        assert _geb(capsys, "tokenize", inputs / "docs.jsonl", "--tokenizer", inputs / "tok", "--out", out)[0] == 0
        before = json.loads((out / "meta.json").read_text())
        rc, err = _geb(capsys, "tokenize", big, "--tokenizer", inputs / "tok", "--out", out)
        assert rc == 1
        _one_line(err, f"cannot write {out}", "No space left on device")
        assert TokenData(out, verify=True).meta == before
        assert sorted(p.name for p in small.iterdir()) == ["tokens"]


def test_full_disk_during_packing_injected(tmp_path, capsys, inputs, monkeypatch):
    from geb.data import tokens

    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tokens, "atomic_write_text", no_space)
    out = tmp_path / "tokens"
    rc, err = _geb(capsys, "tokenize", inputs / "docs.jsonl", "--tokenizer", inputs / "tok", "--out", out)
    assert rc == 1
    _one_line(err, f"cannot write {out}", "No space left on device")
    assert not out.exists() and not list(tmp_path.iterdir())


# -- corrupt input ---------------------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_invalid_config_json_on_export(tmp_path, capsys, tiny_model_dir):
    m = _copy(tiny_model_dir, tmp_path / "m")
    (m / "config.json").write_text('{"vocab_size": 512,')
    for cmd in (["export", "gguf", "--model", m, "--out", tmp_path / "x.gguf"],
                ["export", "hf", "--model", m, "--out", tmp_path / "hf"]):
        rc, err = _geb(capsys, *cmd, *T)
        assert rc == 2
        _one_line(err, f"{m / 'config.json'}: not valid JSON")


@pytest.mark.parametrize("cmd", ["export-hf", "quantize", "export-gguf"])
@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_corrupt_safetensors(cmd, damage, tmp_path, capsys, tiny_model_dir):
    m = _copy(tiny_model_dir, tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    args = {"export-hf": ["export", "hf", "--model", m, "--out", tmp_path / "o"],
            "quantize": ["quantize", "--model", m, "--format", "int8", "--out", tmp_path / "o"],
            "export-gguf": ["export", "gguf", "--model", m, "--out", tmp_path / "o.gguf"]}[cmd]
    rc, err = _geb(capsys, *args, *T)
    assert rc == 2
    _one_line(err, str(f))


def test_corrupt_tokenizer_json(tmp_path, capsys, tiny_model_dir):
    m = _copy(tiny_model_dir, tmp_path / "m")
    data = (m / "tokenizer.json").read_bytes()
    (m / "tokenizer.json").write_bytes(data[: len(data) // 3])
    for args in (["quantize", "--model", m, "--format", "int8", "--out", tmp_path / "o"],
                 ["export", "gguf", "--model", m, "--out", tmp_path / "o.gguf"]):
        rc, err = _geb(capsys, *args, *T)
        assert rc == 2
        _one_line(err, str(m / "tokenizer.json"))


def test_truncated_gguf(tmp_path, capsys, inputs):
    f = tmp_path / "t.gguf"
    data = (inputs / "m.gguf").read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    rc, err = _geb(capsys, "import", "gguf", f, "--out", tmp_path / "o", *T)
    assert rc == 2
    _one_line(err, str(f))


def test_token_shard_corrupted_at_the_same_size(tmp_path, capsys, inputs):
    d = _copy(inputs / "tokens", tmp_path / "tokens")
    shard = d / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(GebError, match=f"{shard}: sampled SHA-256 differs"):
        TokenData(d)
    rc, err = _geb(capsys, "pretrain", "--data", d, "--out", tmp_path / "o", "--config", "geb-test", "--steps", "1",
                   "--quiet", *T)
    assert rc == 2
    _one_line(err, str(shard), "differs from meta.json")


def test_verify_data_checks_every_byte(tmp_path, capsys, tokenizer, monkeypatch):
    """A shard larger than the sampled blocks, corrupted between them: only the full hash sees it."""
    from geb.data import tokens

    monkeypatch.setattr(tokens, "SAMPLE_BYTES", 64)  # 16 blocks of 64 bytes: most of the shard unsampled
    tokenizer.save(tmp_path / "tok")
    w = TokenWriter(tmp_path / "d", tokenizer.vocab_size, tokenizer.doc_id,
                    extra_meta={"tokenizer": str(tmp_path / "tok"), "tokenizer_hash": tokenizer.hash()})
    for t in SAMPLE_TEXT * 4:
        w.add(tokenizer.encode(t), "train")
    w.add(tokenizer.encode(SAMPLE_TEXT[0]), "val")
    w.close()
    shard = tmp_path / "d" / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    n = len(data)
    assert n > 16 * 64 * 4
    offsets = {i * (n - 64) // 15 for i in range(16)}
    pos = next(p for p in range(n // 2, n) if all(not (o <= p < o + 64) for o in offsets))
    data[pos] ^= 0x01
    shard.write_bytes(bytes(data))
    TokenData(tmp_path / "d")  # the sampled check cannot see it
    with pytest.raises(GebError, match="SHA-256 differs"):
        TokenData(tmp_path / "d", verify=True)
    rc, err = _geb(capsys, "pretrain", "--data", tmp_path / "d", "--out", tmp_path / "o", "--config", "geb-test",
                   "--steps", "1", "--verify-data", "--quiet", *T)
    assert rc == 2 and not (tmp_path / "o").exists()
    _one_line(err, str(shard), "SHA-256 differs from meta.json")


def test_truncated_dcp_shard_on_resume(tmp_path, capsys, inputs):
    out = tmp_path / "ck"
    assert _geb(capsys, *_commands(inputs, None, out)["pretrain"])[0] == 0
    shards = sorted((out / "dcp").glob("*.distcp"))
    assert shards
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    rc, err = _geb(capsys, "pretrain", "--data", inputs / "tokens", "--resume", out, "--steps", "2", "--quiet", *T)
    assert rc == 2
    _one_line(err, str(out / "dcp"))
    assert json.loads((out / "meta.json").read_text())["step"] == 1


# -- data run: nothing survives the first stage ----------------------------------------------------------
def test_data_run_where_the_first_stage_keeps_nothing(tmp_path, geb_cli):
    pytest.importorskip("datatrove")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "bad.jsonl").write_text('{"text": "broken\nnot json at all\n[1, 2\n')
    (raw / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (raw / "short.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in ("hi", "ok", "no")))
    out = tmp_path / "out"
    p = geb_cli("data", "run", "--input", raw, "--output", out, check=False)  # a subprocess: datatrove
    assert p.returncode == 2, p.stderr                                      # logs to the process's fd 2
    _one_line(p.stderr, "no documents left")
    assert "kept no document" in p.stdout and "kept 0 documents" in p.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["input"]["files"] == 3 and rep["output"]["documents"] == 0
    assert (out / "report.md").is_file()
