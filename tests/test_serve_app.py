"""The serving app in process: request validation and its OpenAI error shapes, 503 while the model loads,
a load failure, and the command line the quickstart prints."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_helpers import free_port


def test_parse_defaults_and_extensions():
    from geb.infer.sampling import SamplingParams
    from geb.serve.protocol import ChatRequest, parse

    req = parse(ChatRequest, {"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                        {"role": "user", "content": [{"type": "text", "text": "你"},
                                                                                     {"type": "text", "text": "好"}]}]})
    d = SamplingParams()
    p = req.sampling(10)
    # unset parameters take the model's release defaults, not OpenAI's temperature 1
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (d.temperature, d.top_p, d.top_k,
                                                                         d.repetition_penalty)
    assert req.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]
    req = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0,
                              "top_k": 0, "repetition_penalty": 1.0, "seed": 5, "stop": ["a", ""],
                              "max_completion_tokens": 9})
    p0, p1 = req.sampling(req.limit, 0), req.sampling(req.limit, 1)
    assert p0.greedy and p0.top_k == 0 and p0.repetition_penalty == 1.0 and p0.stop == ["a"]
    assert (p0.seed, p1.seed, p0.max_new_tokens) == (5, 6, 9)
    assert p0.stop_ids is None  # the tokenizer's end tokens
    req = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "ignore_eos": True})
    assert req.sampling(4).stop_ids == []


@pytest.mark.parametrize("body, param, code", [
    ({"model": "m", "prompt": [1, "a"]}, "prompt", "invalid_value"),
    ({"model": "m", "prompt": "a", "stream_options": {"bogus": 1}}, "stream_options.bogus", "unknown_parameter"),
    ({"prompt": "a"}, "model", "missing_required_parameter"),
    ({"model": "m", "prompt": "a", "stop": ["a"] * 5}, "stop", "invalid_value"),
    ({"model": "m", "prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"model": "m", "prompt": "a", "logprobs": 2}, "logprobs", "unsupported_parameter"),
    ({"model": "m", "prompt": "a", "top_p": 0}, "top_p", "invalid_value"),
])
def test_parse_errors_name_the_parameter(body, param, code):
    from geb.serve.protocol import APIError, CompletionRequest, parse

    with pytest.raises(APIError) as e:
        parse(CompletionRequest, body)
    assert e.value.status == 400 and (e.value.param, e.value.code) == (param, code)


def test_image_content_is_refused():
    from geb.serve.protocol import APIError, ChatRequest, parse

    req = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    with pytest.raises(APIError) as e:
        req.conversation()
    assert e.value.param == "messages.[0].content.[0].type"


def test_serve_command_line():
    from geb.serve import serve_command

    assert serve_command("quickstart_out/ckpt/pretrain") == "geb serve --model quickstart_out/ckpt/pretrain"
    assert serve_command("my models/a", format="int4", port=9000) == "geb serve --model 'my models/a' --format int4 --port 9000"


class _Uvicorn:
    """The app under uvicorn on a thread (in process, so the test controls when loading ends)."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.02)
        assert self.server.started
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def test_503_while_loading_then_ready(tiny_model_dir):
    from geb.infer.engine import Engine
    from geb.serve.app import ServerSettings, create_app

    gate = threading.Event()

    def slow_engine():
        assert gate.wait(60)
        return Engine.from_folder(tiny_model_dir)

    app = create_app(ServerSettings(model=str(tiny_model_dir), max_concurrency=2), engine_factory=slow_engine)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with _Uvicorn(app) as srv:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = httpx.post(srv.url + "/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        page = httpx.get(srv.url + "/")  # the page itself is there at once
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        gate.set()
        end = time.monotonic() + 60
        while httpx.get(srv.url + "/health").status_code != 200 and time.monotonic() < end:
            time.sleep(0.05)
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_load_failure_is_reported(tmp_path):
    from geb.errors import GebError
    from geb.serve.app import ServerSettings, create_app

    def broken():
        raise GebError("model.safetensors: truncated file")

    fatal = threading.Event()
    app = create_app(ServerSettings(model=str(tmp_path)), engine_factory=broken)
    app.state.geb.on_fatal = fatal.set
    with _Uvicorn(app) as srv:
        assert fatal.wait(30)
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and "truncated" in h.json()["error"]
        r = httpx.post(srv.url + "/v1/completions", json={"model": "x", "prompt": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"


def test_sse_events_stay_on_one_line():
    """JSON leaves U+0085/U+2028/U+2029 raw, but line splitters honour them: they must be escaped."""
    import json

    from geb.serve.app import sse

    text = "a\x85b\u2028c\u2029d\r\n中文"
    event = sse({"choices": [{"delta": {"content": text}}]})
    assert event.endswith("\n\n") and len(event.strip().splitlines()) == 1
    assert json.loads(event[len("data: "):])["choices"][0]["delta"]["content"] == text
    assert "中文" in event  # non-ASCII text stays raw UTF-8


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    from geb.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "model folder not found" in err and "Traceback" not in err


def test_engine_failure_fails_its_requests_and_serving_goes_on(tiny_model_dir):
    import json

    from geb.infer.engine import Engine
    from geb.serve.app import ServerSettings, create_app

    eng = Engine.from_folder(tiny_model_dir)
    real, calls = eng.rt.decode, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return real(*a, **k)

    eng.rt.decode = flaky
    app = create_app(ServerSettings(model=str(tiny_model_dir)), engine_factory=lambda: eng)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with _Uvicorn(app) as srv:
        end = time.monotonic() + 60
        while httpx.get(srv.url + "/health").status_code != 200 and time.monotonic() < end:
            time.sleep(0.05)
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert "simulated out of memory" in events[-1]["error"]["message"]
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        h = httpx.get(srv.url + "/health").json()
        assert h["finished"]["error"] == 1 and h["running"] == 0
