"""Load: 16 concurrent streaming greedy requests batched in one engine give exactly what each gives alone.

Bounded: 16 short requests (plus one that hangs up midway) on loopback against `geb serve` with 16
batch slots. Prompts and token budgets differ, so sequences join and leave the running batch at
different steps (a leaving sequence's cache slot is refilled by moving another): any cross-talk
between batched sequences would change some greedy answer.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import running_server

QUESTIONS = ["What is the capital of France?", "北京是哪个国家的首都？", "Why does water boil?",
             "熊猫生活在哪里？", "Write a line of code.", "春眠不觉晓的下一句是什么？", "How many dogs lived on Maple Street?",
             "Tell me about the Great Wall.", "你好", "Hi", "水在多少度沸腾？", "Name a tower in Paris.",
             "Count to five.", "请介绍一下长城。", "What is 3 + 12?", "Say something kind."]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-load") / "server.log"
    with running_server(tiny_model_dir, log, "--max-concurrency", "16") as s:
        yield s


def ask(client, i: int, max_tokens: int | None = None, hang_up_after: int | None = None):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTIONS[i]}], temperature=0,
        max_tokens=max_tokens or 16 + 2 * i, stream=True, stream_options={"include_usage": True})
    text, finish, use, pieces = "", None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            use = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for c in chunk.choices:
            text += c.delta.content or ""
            pieces += bool(c.delta.content)
            finish = c.finish_reason or finish
        if hang_up_after is not None and pieces >= hang_up_after:
            stream.close()
            return None
    return text, finish, use


def test_sixteen_concurrent_streams_match_serving_alone(server):
    client = server.client(timeout=300)
    alone = [ask(client, i) for i in range(len(QUESTIONS))]  # one at a time: a batch of one
    assert all(a[1] in ("stop", "length") and a[2] is not None for a in alone)
    before = server.health()

    start = threading.Barrier(len(QUESTIONS) + 1)

    def job(i):
        start.wait(60)
        if i < len(QUESTIONS):
            return ask(client, i)
        return ask(client, 0, max_tokens=100, hang_up_after=3)  # leaves the batch long before its end

    with ThreadPoolExecutor(len(QUESTIONS) + 1) as pool:
        futures = [pool.submit(job, i) for i in range(len(QUESTIONS) + 1)]
        together = [f.result(timeout=300) for f in futures]

    for i, (a, b) in enumerate(zip(alone, together)):
        assert b == a, f"request {i} ({QUESTIONS[i]!r}) differs when batched"
    assert together[-1] is None  # the one that hung up
    h = server.wait_idle()
    assert h["status"] == "ready" and h["running"] == 0 and h["waiting"] == 0
    assert h["peak_batch"] >= 8  # the requests really were decoded together
    assert h["finished"]["error"] == 0
    assert h["finished"]["cancelled"] == before["finished"]["cancelled"] + 1
    # and the server still answers afterwards
    assert ask(client, 0) == alone[0]
