"""The web chat page end to end in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

A user opens the page, gives the API key, asks in English, then follows up in Chinese: each answer
must stream in (several pieces) and equal, character for character, what the API returns for the
same conversation with greedy decoding, so the page keeps the whole history and decodes UTF-8 split
across network reads correctly.
"""

from __future__ import annotations

import os

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import running_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY = "sk-web"
pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} not installed")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("serve-web") / "server.log", "--max-concurrency", "2",
                        api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = browser.new_page()
            pg.set_default_timeout(60_000)
            yield pg
        finally:
            browser.close()


def turn(page, text: str, submit: str) -> dict:
    n = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    if submit == "enter":
        page.press("#input", "Enter")
    else:
        page.click("#send")
    done = page.locator(".msg.assistant").nth(n)
    done.and_(page.locator("[data-done='1']")).wait_for()
    return {"user": page.locator(".msg.user").nth(n).text_content(),
            "answer": done.locator(".content").text_content(),
            "chunks": int(done.get_attribute("data-chunks")),
            "stats": page.text_content("#stats")}


def test_chat_page_streams_a_bilingual_conversation(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 1")
    assert not page.text_content("#model").startswith("tiny")  # no key yet: the page asks for one
    page.click("#settings summary")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    page.select_option("#lang", "en")

    # Enter while an input method is composing picks a candidate: it must not send
    page.fill("#input", "北京")
    page.evaluate("""document.getElementById('input').dispatchEvent(
        new KeyboardEvent('keydown', {key: 'Enter', isComposing: true, bubbles: true}))""")
    assert page.locator(".msg").count() == 0

    client = server.client()
    history = []
    for text, submit in [("What is the capital of France?", "enter"), ("北京是哪个国家的首都？", "click")]:
        got = turn(page, text, submit)
        history.append({"role": "user", "content": text})
        want = client.chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=12)
        answer = want.choices[0].message.content
        history.append({"role": "assistant", "content": answer})
        assert got["user"] == text
        assert got["answer"] == answer
        assert got["chunks"] > 1  # arrived in pieces, as streamed
        assert f"{want.usage.completion_tokens} tokens" in got["stats"] and "tokens/s" in got["stats"]

    page.select_option("#lang", "zh")
    assert page.text_content("#send") == "发送"
    assert page.get_attribute("#input", "placeholder").startswith("给 geb 发消息")
    page.click("#new")
    assert page.locator(".msg").count() == 0
    assert server.health()["running"] == 0
