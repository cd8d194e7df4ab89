"""`geb serve` through the official openai client: answers, streaming, limits, errors, disconnects.

One server (a subprocess on a free loopback port, 2 batch slots, no waiting room) serves the module;
expected texts come from the in-process Engine on the same folder, so the server must render chats
with the model's template and sample exactly as the engine does.
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import make_model, running_server

KEY = "sk-geb-test"
CHAT = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, tiny_cfg):
    return make_model(tmp_path_factory.mktemp("serve") / "tiny-long", tokenizer, tiny_cfg, max_seq_len=1024)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("serve-log") / "server.log", "--max-concurrency", "2",
                        "--max-waiting", "0", "--max-tokens", "800", "--max-prompt-tokens", "200", api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def engine(model_dir):
    from geb.infer.engine import Engine

    return Engine.from_folder(model_dir)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def greedy(n):
    from geb.infer.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n, temperature=0)


def stream_text(stream):
    pieces, finish, use = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            use = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    return pieces, finish, use


def test_models_health_and_api_key(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-long"]
    assert client.models.retrieve("tiny-long").id == "tiny-long"
    h = server.health()
    assert h["status"] == "ready" and h["slots"] == 2 and h["context"] == 1000  # 200 prompt + 800 new
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.base_url + "/chat/completions", json={"model": "tiny-long", "messages": CHAT})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


def test_chat_matches_engine_streaming_and_not(client, engine):
    want = engine.chat(CHAT, greedy(24))
    r = client.chat.completions.create(model="tiny-long", messages=CHAT, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.completion_tokens == len(want.ids)
    assert r.usage.total_tokens == want.prompt_tokens + len(want.ids)

    pieces, finish, use = stream_text(client.chat.completions.create(
        model="tiny-long", messages=CHAT, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(pieces) == want.text and finish == want.finish_reason
    assert len(pieces) > 1  # streamed as it was generated, not in one piece
    assert (use.prompt_tokens, use.completion_tokens) == (want.prompt_tokens, len(want.ids))


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny-long", "messages": CHAT, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert "usage" not in first  # only when stream_options.include_usage asks for it


def test_max_tokens_and_stop_sequences(client, engine):
    want = engine.chat(CHAT, greedy(40)).text
    r = client.chat.completions.create(model="tiny-long", messages=CHAT, temperature=0, max_tokens=7)
    assert r.usage.completion_tokens <= 7
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 7
    assert want.startswith(r.choices[0].message.content)
    # a stop string taken from the middle of the greedy answer, at its first occurrence
    k = next(i for i in range(len(want) // 3, len(want) - 2) if want.find(want[i:i + 2]) == i and want[i:i + 2].strip())
    stop = want[k:k + 2]
    r = client.chat.completions.create(model="tiny-long", messages=CHAT, temperature=0, max_tokens=40,
                                       stop=[stop, "never-seen-stop"])
    assert r.choices[0].message.content == want[:k] and r.choices[0].finish_reason == "stop"
    pieces, finish, _ = stream_text(client.chat.completions.create(
        model="tiny-long", messages=CHAT, temperature=0, max_tokens=40, stop=stop, stream=True))
    assert "".join(pieces) == want[:k] and finish == "stop"


def test_completions_endpoint(client, engine, tokenizer):
    want = engine.generate("北京是中国的", greedy(12))
    r = client.completions.create(model="tiny-long", prompt="北京是中国的", temperature=0, max_tokens=12)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == want.prompt_tokens
    ids = tokenizer.encode("北京是中国的")
    r2 = client.completions.create(model="tiny-long", prompt=ids, temperature=0, max_tokens=12, echo=True)
    assert r2.choices[0].text == "北京是中国的" + want.text
    # n choices from a seed: reproducible, counted once for the prompt
    a = client.completions.create(model="tiny-long", prompt="Water", max_tokens=6, n=2, seed=7, temperature=1.0)
    b = client.completions.create(model="tiny-long", prompt="Water", max_tokens=6, n=2, seed=7, temperature=1.0)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1]
    assert a.usage.prompt_tokens == len(tokenizer.encode("Water"))
    assert 2 <= a.usage.completion_tokens <= 12


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "tiny-long", "messages": [', 400, None),                                  # malformed JSON
    ({"model": "tiny-long", "messages": CHAT, "temprature": 0.5}, 400, "temprature"),     # unknown field
    ({"model": "tiny-long", "messages": CHAT, "temperature": 5}, 400, "temperature"),
    ({"model": "tiny-long", "messages": []}, 400, "messages"),
    ({"model": "tiny-long", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.[0].role"),
    ({"model": "tiny-long", "messages": CHAT, "max_tokens": 801}, 400, "max_tokens"),     # over --max-tokens
    ({"model": "tiny-long", "messages": CHAT, "n": 3}, 400, "n"),                         # more than the slots
    ({"model": "tiny-long", "messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "gpt-4o", "messages": CHAT}, 404, "model"),
])
def test_invalid_requests_get_openai_errors(server, body, status, param):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.base_url + "/chat/completions", content=data, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_unknown_field_and_long_prompt_through_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-long", messages=CHAT, extra_body={"frobnicate": True})
    assert "frobnicate" in e.value.message
    long = [{"role": "user", "content": "The capital of France is Paris. " * 40}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-long", messages=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


def test_oversized_body_is_413(server):
    big = {"model": "tiny-long", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    r = httpx.post(server.base_url + "/chat/completions", json=big, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert server.health()["status"] == "ready"


def test_disconnect_mid_stream_frees_the_slot(server, client):
    before = server.health()
    stream = client.chat.completions.create(model="tiny-long", messages=CHAT, temperature=0, max_tokens=800,
                                            stream=True)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 2:
            break
    stream.close()  # the client hangs up with ~800 tokens still to go
    after = server.wait_idle()
    assert after["running"] == 0 and after["waiting"] == 0
    assert after["finished"]["cancelled"] == before["finished"]["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 800


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(server):
    before = server.health()
    # The native core decodes this tiny model at thousands of tokens/s: 800 tokens take ~0.25 s, so the
    # client gives up far sooner than that.
    impatient = server.client(timeout=0.03)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="tiny-long", messages=CHAT, temperature=0, max_tokens=800)
    after = server.wait_idle()
    assert after["running"] == 0
    assert after["finished"]["cancelled"] == before["finished"]["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 800


def test_slow_reader_does_not_hold_its_slot(server, engine):
    want = engine.chat(CHAT, greedy(200))
    body = {"model": "tiny-long", "messages": CHAT, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        lines = r.iter_lines()
        first = next(lines)  # then stop reading while the engine runs on
        idle = server.wait_idle()
        assert idle["running"] == 0  # finished and out of the batch though the client has read one event
        rest = [first, *lines]
    text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content", "") for x in rest
                   if x.startswith("data: {") and json.loads(x[6:])["choices"])
    assert text == want.text


def test_full_server_answers_429_then_recovers(server, client):
    streams = [client.chat.completions.create(model="tiny-long", messages=CHAT, temperature=0, max_tokens=800,
                                              stream=True) for _ in range(2)]
    try:
        for s in streams:  # both hold a slot now
            next(iter(s))
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="tiny-long", messages=CHAT, max_tokens=2)
        assert e.value.response.headers.get("retry-after") and e.value.body["code"] == "rate_limit_exceeded"
    finally:
        for s in streams:
            s.close()
    assert server.wait_idle()["running"] == 0
    r = client.chat.completions.create(model="tiny-long", messages=CHAT, max_tokens=2)
    assert r.usage.completion_tokens <= 2
