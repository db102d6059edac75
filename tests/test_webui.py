"""The web UI in headless Chromium (Playwright for Python driving the system `chromium`): type, stream, stop,
regenerate, edit, new chat, the error bubble, code-block rendering, a screenshot, and a tool conversation whose
history round-trips token for token (the page reads the server's tool-call format as the server does)."""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import asdict

import pytest
import torch
from test_server_history import PIECES, play, random_text, replay_server, script

from nanochat.model.tiny import tiny_model
from nanochat.serve.app import ServerConfig, create_app
from nanochat.serve.history import parse_reply
from nanochat.serve.thread import ServerThread

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = os.environ.get("NANOCHAT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"no system chromium at {CHROMIUM} (apt-get install chromium)"),
]


class SlowModel(torch.nn.Module):
    """Sleeps in every forward and never samples the stop tokens, so a reply streams long enough to be stopped."""

    def __init__(self, inner, delay_s: float, silenced: list[int]):
        super().__init__()
        self.inner, self.config, self.delay_s, self.silenced = inner, inner.config, delay_s, silenced

    def forward(self, idx, kv_cache=None):
        time.sleep(self.delay_s)
        logits = self.inner(idx, kv_cache=kv_cache)
        logits[..., self.silenced] = float("-inf")
        return logits


@pytest.fixture(scope="module")
def server(tok):
    silenced = [tok.encode_special(n) for n in ("<|assistant_end|>", "<|bos|>", "<|python_start|>")]
    model = SlowModel(tiny_model(tok.vocab_size, sequence_len=512, seed=2), 0.01, silenced)
    app = create_app(model, tok, ServerConfig(batch_size=4))
    with ServerThread(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1000, "height": 720})
        pg.set_default_timeout(20_000)
        pg.goto(server.url + "/")
        yield pg
        browser.close()


def idle(page):
    page.wait_for_selector("#send:not([hidden])")
    page.wait_for_function("!document.querySelector('.msg.streaming')")


def test_type_stream_stop_regenerate_edit(page, server, tmp_path):
    sched = server.app.state.replicas[0].scheduler
    page.fill("#max-tokens", "400")
    page.fill("#input", "Hello there! Write me a long answer.")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user")
    assert page.inner_text(".msg.user .bubble") == "Hello there! Write me a long answer."
    # streaming: the live bubble grows while the stop button is shown
    page.wait_for_function("(() => { const b = document.querySelector('.msg.streaming .bubble');"
                           " return b && b.textContent.length > 5; })()")
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    idle(page)
    partial = page.inner_text(".msg.assistant .bubble")
    assert partial  # the partial reply stays
    deadline = time.monotonic() + 3
    while sched.num_active_rows and time.monotonic() < deadline:  # stop frees the row
        time.sleep(0.01)
    assert sched.num_active_rows == 0
    # regenerate replaces the last reply
    page.fill("#max-tokens", "8")
    page.click(".regenerate")
    idle(page)
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.user").count() == 1
    # edit the first user message: the conversation is cut there and resent
    page.fill("#input", "Second question")
    page.press("#input", "Enter")
    idle(page)
    assert page.locator(".msg.user").count() == 2
    page.locator(".msg.user .edit").first.click()
    page.fill("textarea.edit", "Edited question")
    page.click(".save")
    idle(page)
    users = page.locator(".msg.user .bubble").all_inner_texts()
    assert users == ["Edited question"]
    assert page.locator(".msg.assistant").count() == 1
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 5000
    shot = os.environ.get("NANOCHAT_UI_SCREENSHOT")  # set it to keep a copy to look at
    if shot:
        shutil.copy(tmp_path / "chat.png", shot)


def test_error_bubble_code_blocks_and_new_chat(page):
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.fill("#temperature", "7")  # out of range: the server answers 400
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    assert "temperature" in page.inner_text(".msg.error .bubble")
    assert "HTTP 400" in page.inner_text(".msg.error .bubble")
    page.fill("#temperature", "0.8")
    page.click(".retry")
    idle(page)
    assert page.locator(".msg.error").count() == 0 and page.locator(".msg.assistant").count() == 1
    # assistant text with a fenced block renders as <pre>, and HTML in it stays text
    html = page.evaluate("""() => { const d = document.createElement('div');
        renderText(d, "Sum:\\n```python\\nprint(1 + 2)\\n```\\nand `x` <b>bold</b>");
        return [d.querySelector('pre.code code').textContent, d.querySelector('pre.code .lang').textContent,
                d.querySelector('code.inline').textContent, d.querySelectorAll('b').length]; }""")
    assert html == ["print(1 + 2)", "python", "x", 0]
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_tool_conversation_round_trips_exactly(page, server, tok):
    """The scripted tool conversation of test_server_history typed into the page: every turn's prompt is the
    exact conversation so far and the prefix store reuses all of it; the page shows each call and result as its
    own block (a failed one marked, cut ones labelled), as the server reads the text."""
    turns = script(tok)
    with replay_server(tok, turns) as replay:
        page.goto(replay.url + "/")
        page.fill("#temperature", "0")

        def send(messages, max_tokens):
            page.fill("#max-tokens", str(max_tokens))
            page.fill("#input", messages[-1]["content"])
            page.press("#input", "Enter")
            page.wait_for_function(f"state.controller === null && state.messages.length === {len(messages) + 1}")
            return page.evaluate("state.messages[state.messages.length - 1].content")

        contents = play(tok, replay, send)
        calls = [p for c in contents for p in parse_reply(c) if p.kind == "python"]
        labels = page.locator("pre.tool-call .lang").all_inner_texts()
        assert len(labels) == len(calls) == 6 and labels.count("calculator (cut off)") == 1
        assert page.locator("pre.tool-call code").all_inner_texts() == [p.text for p in calls]
        assert page.locator("pre.tool-output .lang").all_inner_texts().count("result (cut off)") == 1
        assert page.locator("pre.tool-output.failed code").all_inner_texts() == ["Error: division by zero"]
        bubbles = page.locator(".msg.assistant .bubble")
        for i, content in enumerate(contents):
            kinds = [p.kind for p in parse_reply(content)]
            assert bubbles.nth(i).locator("pre.tool-call").count() == kinds.count("python")
            assert bubbles.nth(i).locator("pre.tool-output").count() == kinds.count("python_output")
    page.goto(server.url + "/")


def test_page_reads_replies_as_the_server_does(page):
    rng = random.Random(2)
    texts = [random_text(rng, PIECES + ["😀"], most=16) for _ in range(2000)]
    assert page.evaluate("(texts) => texts.map(parseReply)", texts) == [
        [asdict(p) for p in parse_reply(t)] for t in texts]
