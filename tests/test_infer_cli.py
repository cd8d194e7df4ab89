"""`geb quantize` and `geb bench` end to end on a tiny model (kept tiny: speed is never asserted)."""

from __future__ import annotations

import json

from geb.infer.bench import quick_report


def test_quantize_and_bench_cli(tmp_path, tiny_model_dir, geb_cli):
    out = tmp_path / "tiny-int4"
    r = geb_cli("quantize", "--model", tiny_model_dir, "--format", "int4", "--out", out, "--threads", "1")
    assert "wrote" in r.stdout and (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"format": "int4", "group_size": 32, "layout": "geb-fused-v1",
                                   "embedding_format": "int8", "head_format": "int8"}
    res = tmp_path / "bench.json"
    geb_cli("bench", "--model", out, "--prompt-len", "8", "--new-tokens", "4", "--threads", "1",
            "--no-isolate", "--json", res)
    rep = json.loads(res.read_text())
    (row,) = rep["results"]
    assert row["format"] == "int4" and row["threads"] == 1 and row["prompt_len"] == 8
    for k in ("prefill_tok_s", "decode_tok_s", "decode_at_depth_tok_s", "ttft_s", "peak_rss_bytes"):
        assert row[k] > 0
    # the weights counted are those in the file (plus the safetensors header)
    size = (out / "model.safetensors").stat().st_size
    assert 0 < size - row["weight_bytes"] < 64 * 1024


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    from geb.cli import main

    rc = main(["quantize", "--model", str(tiny_model_dir), "--format", "int4", "--group-size", "48",
               "--out", str(tmp_path / "x"), "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--group-size" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    assert main(["bench", "--config", "geb-test"]) == 2
    assert "--random-weights" in capsys.readouterr().err


def test_quick_report_all_formats(tiny_model_dir):
    rep = quick_report(tiny_model_dir, prompt_len=8, new_tokens=4, threads=1,
                       text="The capital of France is Paris. 北京是中国的首都。")
    assert list(rep["formats"]) == ["fp32", "bf16", "int8", "int4"]
    sizes = [rep["formats"][f]["weight_bytes"] for f in ("fp32", "bf16", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 3 * sizes[3]
    assert rep["formats"]["fp32"]["ppl_vs_fp32"] == 0.0
    assert abs(rep["formats"]["int8"]["ppl_vs_fp32"]) < 0.01
