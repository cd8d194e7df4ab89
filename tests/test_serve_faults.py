"""Faults injected into serving: one bad request among running ones, malformed bodies, hang-ups, a crowd.

- The batch engine: an exception in one request's admission (a seed torch refuses), prefill or sampling
  fails that request alone; the others give exactly what they give alone. A cancelled request's slot
  is free after the very next step.
- The server (a real `geb serve` subprocess on 127.0.0.1): client errors are 400s naming the field,
  never 500 (lone surrogates, 100,000-deep nesting, NaN, bools and strings where numbers belong, a user
  message without content, a seed past 64 bits); random malformed bodies (hypothesis) get 200 or a
  4xx JSON error and leave the server healthy; clients that hang up mid-stream (closing politely,
  resetting the socket, or leaving halfway through their body) free their slots without touching the
  other streams; 64 clients at once against 8 slots + 8 waiting each get an answer or a 429, bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from serve_helpers import make_model, running_server  # noqa: E402

from geb.infer.sampling import SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOO_BIG_SEED = 2**64  # 18446744073709551616: torch.Generator().manual_seed refuses it


# -- the batch engine: one request's failure is its own ------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from geb.infer.engine import Engine

    return Engine.from_folder(tiny_model_dir, threads=1)


def _prompts(tokenizer):
    return [tokenizer.encode(t) for t in ("Water boils at", "春眠不觉晓", "In 2024, 3 cats", "The capital of")]


def _params():
    return [SamplingParams(max_new_tokens=12, temperature=0, stop_ids=[]),
            SamplingParams(max_new_tokens=10, temperature=0.8, seed=3, stop_ids=[]),
            SamplingParams(max_new_tokens=14, temperature=0, repetition_penalty=1.0, stop_ids=[])]


def test_a_seed_torch_refuses_fails_only_its_request(engine, tokenizer):
    prompts, ps = _prompts(tokenizer), _params()
    alone = [list(engine.generate_ids(x, p)) for x, p in zip(prompts, ps)]
    be = engine.batch_engine(max_batch=4, max_len=64)
    good = [be.submit(x, p) for x, p in zip(prompts, ps)]
    be.step()
    be.step()  # the three are mid-generation when the bad one joins
    bad_params = SamplingParams(max_new_tokens=8, temperature=0.7, stop_ids=[])
    bad_params.seed = TOO_BIG_SEED  # past the protocol's bound (as the server sent it before the bound)
    bad = be.submit(prompts[3], bad_params)
    events = be.step()
    assert bad.finish_reason == "error" and bad.error and bad.slot == -1
    assert any(ev.request is bad and ev.finish_reason == "error" for ev in events)
    be.run()
    for r, want in zip(good, alone):
        assert r.ids == want and r.finish_reason == "length"
    assert not be.active and not be.prefilling and be.cache.lengths == [0, 0, 0, 0]


def test_prefill_and_sampling_errors_fail_only_their_request(engine, tokenizer, monkeypatch):
    import geb.infer.batch as batch

    prompts, ps = _prompts(tokenizer), _params()
    alone = [list(engine.generate_ids(x, p)) for x, p in zip(prompts, ps)]
    victim_prompt = tokenizer.encode("Paris is known for")
    marker = SamplingParams(max_new_tokens=20, temperature=0.5, top_k=3, seed=1, stop_ids=[])
    real_sample, real_prefill, calls = batch.sample_next, engine.rt.prefill, []

    def sample_next(logits, p, seen=None, generator=None):
        if p is marker:
            calls.append(1)
            if len(calls) == 4:  # mid-generation, after three tokens
                raise RuntimeError("simulated sampling fault")
        return real_sample(logits, p, seen, generator)

    def prefill(ids, cache, slot):
        if list(ids) == victim_prompt:
            raise RuntimeError("simulated prefill fault")
        return real_prefill(ids, cache, slot)

    monkeypatch.setattr(batch, "sample_next", sample_next)
    monkeypatch.setattr(engine.rt, "prefill", prefill)
    be = engine.batch_engine(max_batch=3, max_len=64)
    good = [be.submit(prompts[0], ps[0]), be.submit(prompts[1], ps[1])]
    sampled = be.submit(prompts[3], marker)
    be.step()
    prefilled = be.submit(victim_prompt, ps[2])  # joins a full batch later, in the slot the fault frees
    third = be.submit(prompts[2], ps[2])
    be.run()
    assert sampled.finish_reason == "error" and "simulated sampling fault" in sampled.error
    assert len(sampled.ids) == 3
    assert prefilled.finish_reason == "error" and "simulated prefill fault" in prefilled.error
    for r, want in zip([*good, third], alone):
        assert r.ids == want and r.finish_reason == "length"
    assert not be.active and not be.prefilling and be.cache.lengths == [0, 0, 0]


def test_a_cancelled_request_leaves_at_the_next_step(engine, tokenizer):
    prompts, ps = _prompts(tokenizer), _params()
    alone = [list(engine.generate_ids(x, p)) for x, p in zip(prompts, ps)]
    be = engine.batch_engine(max_batch=3, max_len=64)
    reqs = [be.submit(x, p) for x, p in zip(prompts, ps)]
    for _ in range(3):
        be.step()
    assert len(be.active) == 3
    be.cancel(reqs[0].id)
    events = be.step()
    assert [ev.finish_reason for ev in events if ev.request is reqs[0]] == ["cancelled"]
    assert len(be.active) == 2 and reqs[0].slot == -1 and be.cache.lengths[2] == 0
    waiting = be.submit(prompts[3], ps[0])
    be.step()
    assert waiting.slot >= 0  # the freed slot is taken at once
    be.run()
    for r, want in zip(reqs[1:], alone[1:]):
        assert r.ids == want


# -- the server: client errors are 400s -------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(tiny_model_dir, tmp_path_factory):
    """Short answers (at most 16 new tokens), 4 slots: what fuzzing needs."""
    log = tmp_path_factory.mktemp("serve-faults") / "small.log"
    with running_server(tiny_model_dir, log, "--max-concurrency", "4", "--max-waiting", "4",
                        "--max-tokens", "16") as s:
        yield s
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


USER = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = {"model": "tiny", "messages": USER, "max_tokens": 4}
TEXT = {"model": "tiny", "prompt": "Water boils at", "max_tokens": 4}


def _post(server, route: str, body, timeout: float = 60) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.base_url}/{route}", content=data, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def _deep(n: int) -> str:
    return '{"model": "tiny", "prompt": "a", "user": ' + "[" * n + "]" * n + "}"


@pytest.mark.parametrize("route, body, param", [
    ("chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.[0].content"),
    ("completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt.[1]"),
    ("completions", '{"model": "tiny", "prompt": "a", "\\ud800": 1}', None),
    ("completions", _deep(100_000), None),
    ("completions", _deep(200), "user"),  # under json's recursion limit, over the server's
    ("completions", '{"model": "tiny", "prompt": "a", "temperature": NaN}', None),
    ("completions", '{"model": "tiny", "prompt": "a", "top_p": Infinity}', None),
    ("completions", '{"model": "tiny", "prompt": "a", "repetition_penalty": 1e999}', "repetition_penalty"),
    ("completions", {**TEXT, "seed": TOO_BIG_SEED}, "seed"),
    ("completions", {**TEXT, "seed": -1}, "seed"),
    ("completions", {**TEXT, "max_tokens": "10"}, "max_tokens"),
    ("completions", {**TEXT, "max_tokens": True}, "max_tokens"),
    ("completions", {**TEXT, "max_tokens": 4.0}, "max_tokens"),
    ("completions", {**TEXT, "prompt": [1, True]}, "prompt"),
    ("completions", {**TEXT, "echo": "yes"}, "echo"),
    ("completions", {**TEXT, "best_of": 21}, "best_of"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]}, "messages.[0].content"),
    ("chat/completions", {**CHAT, "messages": [{"role": "system"}, *USER]}, "messages.[0].content"),
    ("chat/completions", {**CHAT, "messages": [{"role": 1, "content": "a"}]}, "messages.[0].role"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
    ("chat/completions", {**CHAT, "temperature": "0.5"}, "temperature"),
    ("chat/completions", {**CHAT, "temperature": 1e-300}, "temperature"),
    ("chat/completions", {**CHAT, "top_p": True}, "top_p"),
    ("chat/completions", {**CHAT, "n": True}, "n"),
    ("chat/completions", {**CHAT, "n": 1.0}, "n"),
    ("chat/completions", {**CHAT, "stream": 1}, "stream"),
    ("chat/completions", {**CHAT, "stream": "false"}, "stream"),
    ("chat/completions", {**CHAT, "stop": [1]}, "stop"),
    ("chat/completions", {**CHAT, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ("chat/completions", {**CHAT, "logit_bias": {"5": 101}}, "logit_bias.5"),
    ("chat/completions", {**CHAT, "repetition_penalty": 1e-300}, "repetition_penalty"),
    ("chat/completions", {**CHAT, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {**CHAT, "top_k": -1}, "top_k"),
    ("chat/completions", {**CHAT, "ignore_eos": 0}, "ignore_eos"),
    ("chat/completions", {**CHAT, "user": 7}, "user"),
    ("chat/completions", {**CHAT, "model": 7}, "model"),
    ("chat/completions", {**CHAT, "service_tier": "fastest"}, "service_tier"),
    ("chat/completions", {**CHAT, "metadata": {"k": 1}}, "metadata.k"),
])
def test_client_errors_are_400_naming_the_field(small_server, route, body, param):
    r = _post(small_server, route, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_seeds_at_the_ends_of_the_range_work(small_server):
    """n choices use seed + i, wrapping at 2^64: the largest seed with n=2 is fine and reproducible."""
    body = {**TEXT, "seed": TOO_BIG_SEED - 1, "n": 2, "temperature": 1.0, "top_k": 0}
    a, b = _post(small_server, "completions", body), _post(small_server, "completions", body)
    assert a.status_code == b.status_code == 200
    assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]
    wrapped = _post(small_server, "completions", {**body, "seed": 0, "n": 1})  # choice 1 above is seed 0
    assert wrapped.json()["choices"][0]["text"] == a.json()["choices"][1]["text"]


# -- the server: random malformed bodies (hypothesis) -------------------------------------------------
_TEXT = st.text(max_size=12) | st.sampled_from(["\ud800", "a\udc00b", "\x00", "\u2028", "😀", ""])
# boundaries of the integer widths a server might store a value in, besides hypothesis's own choices
_EDGES = st.sampled_from([-1, 0, 2**31, 2**32, 2**53 + 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1])
_SCALAR = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | _EDGES
           | st.floats(allow_nan=False, allow_infinity=False) | _TEXT)
_JSON = st.recursive(_SCALAR, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_TEXT, kids, max_size=3),
                     max_leaves=8)
_CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                "seed", "stream", "stream_options", "logit_bias", "user", "top_k", "repetition_penalty",
                "ignore_eos", "logprobs", "top_logprobs", "tool_choice", "response_format", "metadata", "bogus"]
_TEXT_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "echo",
                "suffix", "best_of", "logprobs", "top_k", "repetition_penalty", "stream_options", "bogus"]
_MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "tool"]) | _JSON,
                                               "content": _TEXT | _JSON, "name": _JSON})


@st.composite
def bodies(draw):
    """A valid request with a few fields replaced, removed or added; or bytes that are barely JSON."""
    kind = draw(st.sampled_from(["chat", "text", "raw"]))
    if kind == "raw":
        valid = json.dumps(TEXT).encode()
        return "completions", draw(st.binary(max_size=64) | st.builds(lambda k: valid[:k], st.integers(0, len(valid)))
                                   | st.integers(1, 5000).map(lambda n: ("[" * n + "]" * n).encode()))
    text = draw(_TEXT)  # a valid request around a string that may not be Unicode
    body, fields = (({**CHAT, "messages": [{"role": "user", "content": text}]}, _CHAT_FIELDS) if kind == "chat"
                    else ({**TEXT, "prompt": text}, _TEXT_FIELDS))
    for name in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(_JSON | st.integers(0, 20))
    if kind == "chat" and draw(st.booleans()):
        body["messages"] = draw(st.lists(_MESSAGE, max_size=3))
    route = "chat/completions" if kind == "chat" else "completions"
    return route, json.dumps(body).encode()  # ensure_ascii: lone surrogates go out as \\udXXX escapes


def _check_answer(r: httpx.Response, body: bytes) -> None:
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, body[:300], r.text[:500])
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [x for x in r.text.split("\n\n") if x]
        assert events[-1] == "data: [DONE]", r.text[-500:]
        for e in events[:-1]:
            assert e.startswith("data: {") and "error" not in json.loads(e[6:]), r.text  # no engine failure
    else:
        assert r.json()["choices"], r.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=bodies())
def test_random_malformed_bodies_never_get_500(small_server, case):
    route, body = case
    r = _post(small_server, route, body, timeout=60)
    hypothesis.event(f"status {r.status_code}")
    _check_answer(r, body)


def test_after_fuzzing_the_server_is_healthy(small_server, engine):
    h = small_server.wait_idle()
    assert h["status"] == "ready" and h["running"] == 0 and h["waiting"] == 0
    assert h["finished"]["error"] == 0
    want = engine.chat(USER, SamplingParams(max_new_tokens=4, temperature=0)).text
    r = _post(small_server, "chat/completions", {**CHAT, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want


# -- the server: hang-ups and a crowd ---------------------------------------------------------------
@pytest.fixture(scope="module")
def long_model(tmp_path_factory, tokenizer, tiny_cfg):
    return make_model(tmp_path_factory.mktemp("serve-faults") / "tiny-long", tokenizer, tiny_cfg, max_seq_len=4096)


@pytest.fixture(scope="module")
def server(long_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-faults") / "server.log"
    with running_server(long_model, log, "--max-concurrency", "8", "--max-waiting", "8",
                        "--max-tokens", "4000", "--max-prompt-tokens", "64") as s:
        yield s
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


QUESTIONS = ["What is the capital of France?", "北京是哪个国家的首都？", "Why does water boil?", "熊猫生活在哪里？"]


def _chat(i: int, max_tokens: int, stream: bool, **extra) -> dict:
    return {"model": "tiny-long", "messages": [{"role": "user", "content": QUESTIONS[i]}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream, **extra}


def _stream_text(server, body: dict) -> str:
    text = ""
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += "".join(c["delta"].get("content") or "" for c in event["choices"])
    return text


def _hang_up_politely(server, started: threading.Event) -> None:
    with httpx.stream("POST", server.base_url + "/chat/completions", timeout=120,
                      json=_chat(0, 3000, True, ignore_eos=True)) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n == 6:  # the role chunk and a few tokens
                started.set()
                return  # closes the connection with ~3000 tokens to go


def _hang_up_rudely(server, started: threading.Event) -> None:
    """Reset the TCP connection (SO_LINGER 0) in the middle of the stream."""
    body = json.dumps(_chat(1, 3000, True, ignore_eos=True)).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while got.count(b"data: ") < 4:
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    started.set()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _leave_mid_body(server) -> None:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b'Content-Length: 500\r\n\r\n{"model": "tiny-long", "mess')
    s.close()


def test_clients_hanging_up_mid_stream_free_their_slots_and_touch_no_one(server):
    alone = [_stream_text(server, _chat(i, 60, True)) for i in range(3)]
    used = [_post(server, "chat/completions", _chat(i, 60, False)).json()["usage"]["completion_tokens"]
            for i in range(3)]
    before = server.wait_idle()
    go = threading.Barrier(6)
    polite, rude = threading.Event(), threading.Event()

    def job(k):
        go.wait(60)
        if k < 3:
            return _stream_text(server, _chat(k, 60, True))
        if k == 3:
            return _hang_up_politely(server, polite)
        if k == 4:
            return _hang_up_rudely(server, rude)
        return _leave_mid_body(server)

    with ThreadPoolExecutor(6) as pool:
        results = [f.result(timeout=300) for f in [pool.submit(job, k) for k in range(6)]]
    assert polite.is_set() and rude.is_set()
    assert results[:3] == alone
    after = server.wait_idle()
    assert after["status"] == "ready" and after["running"] == 0 and after["waiting"] == 0
    assert after["finished"]["cancelled"] == before["finished"]["cancelled"] + 2
    assert after["finished"]["error"] == before["finished"]["error"]
    # the two that hung up were cut short: together they made fewer tokens than one of them had asked for
    assert after["generated_tokens"] - before["generated_tokens"] - sum(used) < 3000


async def _crowd(server, bodies: list[dict]) -> list[tuple[int, str | None]]:
    """Send every body at once; each (status, text of the answer); an answer missing after 240 s fails."""
    async def one(client, body):
        if body["stream"]:
            async with client.stream("POST", "/chat/completions", json=body) as r:
                text = ""
                async for line in r.aiter_lines():
                    if r.status_code == 200 and line.startswith("data: {"):
                        event = json.loads(line[6:])
                        assert "error" not in event, event
                        text += "".join(c["delta"].get("content") or "" for c in event["choices"])
                    elif r.status_code != 200:
                        assert json.loads(line)["error"]["code"] == "rate_limit_exceeded"
                return r.status_code, (text if r.status_code == 200 else r.headers.get("retry-after"))
        r = await client.post("/chat/completions", json=body)
        if r.status_code != 200:
            assert r.json()["error"]["code"] == "rate_limit_exceeded", r.text
            return r.status_code, r.headers.get("retry-after")
        return 200, r.json()["choices"][0]["message"]["content"]

    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=180, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(one(client, b) for b in bodies)), 240)


def test_sixty_four_clients_at_once_get_answers_or_429(server):
    crowd = [_chat(k % 4, 8, stream=bool(k % 2)) for k in range(64)]
    alone = [_post(server, "chat/completions", _chat(i, 8, False)).json()["choices"][0]["message"]["content"]
             for i in range(4)]

    # a full server (8 running + 8 waiting, long answers): everyone else is turned away at once
    holders = [httpx.stream("POST", server.base_url + "/chat/completions", timeout=120,
                            json=_chat(k % 4, 4000, True, ignore_eos=True)) for k in range(16)]
    opened, lines = [], []  # keep each line iterator: dropping one closes its connection (a hang-up)
    try:
        for h in holders:
            opened.append(h.__enter__())
            assert opened[-1].status_code == 200
            lines.append(opened[-1].iter_lines())
            next(lines[-1])  # the role chunk: the request is in the server's queue
        full = server.health()
        answers = asyncio.run(_crowd(server, crowd))
        still = server.health()
    finally:
        for h in holders[:len(opened)]:
            h.__exit__(None, None, None)
    assert full["running"] + full["waiting"] == 16 and full["running"] <= 8
    assert still["finished"] == full["finished"]  # no holder finished while the crowd came: it stayed full
    assert all(status == 429 and retry for status, retry in answers)

    # an empty server: the first 16 are taken, the rest may be turned away; every answer is right
    server.wait_idle()
    answers = asyncio.run(_crowd(server, crowd))
    assert all(status in (200, 429) for status, _ in answers)
    assert sum(status == 200 for status, _ in answers) >= 16
    for k, (status, text) in enumerate(answers):
        if status == 200:
            assert text == alone[k % 4], k
        else:
            assert text == "1"  # Retry-After
    h = server.wait_idle()
    assert h["running"] == 0 and h["waiting"] == 0 and h["peak_batch"] <= 8 and h["finished"]["error"] == 0
