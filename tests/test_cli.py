"""The CLI: every subcommand has --help; errors print one line, not a traceback; generate/chat run."""

import pytest

from geb.cli import COMMANDS, main


def test_top_level_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for name, (_, help_) in COMMANDS.items():
        assert f" {name} " in out and help_ in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"geb {name}" in out and COMMANDS[name][1] in out


def test_info_json(capsys):
    import json

    assert main(["info", "--config", "geb-1.3b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 1_348_044_800
    assert info["bytes"]["fp32"] == 4 * 1_348_044_800 and info["bytes"]["bf16"] == 2 * 1_348_044_800


def test_errors_are_one_line(capsys, tmp_path):
    rc = main(["generate", "hi", "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and "model folder not found" in err and "Traceback" not in err


def test_generate_and_chat_subprocess(geb_cli, tiny_model_dir):
    """`generate` prints the prompt, then the model's greedy continuation; `chat` answers each line with
    the model's reply to the conversation so far, and /reset starts a new one."""
    from geb.infer.engine import Engine
    from geb.infer.sampling import SamplingParams

    eng = Engine.from_folder(tiny_model_dir)
    greedy = SamplingParams(max_new_tokens=5, temperature=0)  # --greedy with the CLI's other defaults
    want = eng.generate("北京", greedy).text
    assert want.strip()  # else the comparison below could not tell output from the echoed prompt
    p = geb_cli("generate", "北京", "--model", tiny_model_dir, "--greedy", "--max-new-tokens", "5")
    assert p.stdout == "北京" + want + "\n"
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    hello = eng.chat([{"role": "user", "content": "hello"}], greedy).text
    nihao = eng.chat([{"role": "user", "content": "你好"}], greedy).text
    after_hello = eng.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": hello},
                            {"role": "user", "content": "你好"}], greedy).text
    assert nihao != after_hello  # so the second reply shows whether /reset dropped the first turn
    p = geb_cli("chat", "--model", tiny_model_dir, "--greedy", "--max-new-tokens", "4",
                input="hello\n/reset\n你好\n/quit\n")
    assert p.stdout == f"geb> {hello}\ngeb> {nihao}\n"


def test_prompt_longer_than_context(geb_cli, tiny_model_dir):
    p = geb_cli("generate", "a " * 400, "--model", tiny_model_dir, check=False)
    assert p.returncode == 2 and "context" in p.stderr and "Traceback" not in p.stderr


def test_info_says_which_decode_path_runs(capsys, monkeypatch):
    from geb.infer import native

    assert main(["info", "--config", "geb-test"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    if native.available():
        assert line.startswith(f"decode path here: native core, {native.isa()} kernels")
    else:
        assert line == f"decode path here: PyTorch ({native.why()})"
    monkeypatch.setitem(native._state, "lib", None)  # as where the extension was not built
    monkeypatch.setitem(native._state, "why", "the native extension geb._native is not built")
    assert main(["info", "--config", "geb-test"]) == 0
    assert capsys.readouterr().out.strip().endswith("decode path here: PyTorch (the native extension geb._native is not built)")
