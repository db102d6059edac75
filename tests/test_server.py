"""The server with real parts: uvicorn on 127.0.0.1 (a free port) in a thread, the official `openai` client and raw
httpx; validation errors, 429 back-pressure, disconnects freeing rows, /health under load, and a bounded load test
(32 concurrent streams, some disconnecting, plus malformed requests)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from nanochat.inference.engine import Engine
from nanochat.model.tiny import tiny_model
from nanochat.serve.app import ServerConfig, create_app
from nanochat.serve.thread import ServerThread

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


class SlowModel(torch.nn.Module):
    """Wraps a model, sleeps in every forward and never samples the stop tokens, so that requests stay in flight
    long enough to observe."""

    def __init__(self, inner, delay_s: float, silenced: list[int]):
        super().__init__()
        self.inner, self.config, self.delay_s, self.silenced = inner, inner.config, delay_s, silenced

    def forward(self, idx, kv_cache=None):
        time.sleep(self.delay_s)
        logits = self.inner(idx, kv_cache=kv_cache)
        logits[..., self.silenced] = float("-inf")
        return logits


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, n_layer=2, n_embd=64, sequence_len=256, seed=3)


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(model, tok, ServerConfig(batch_size=8, max_waiting=64))
    with ServerThread(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(app, timeout_s: float = 10.0) -> None:
    sched = app.state.replicas[0].scheduler
    deadline = time.monotonic() + timeout_s
    while sched.num_active_rows or sched.num_waiting:
        assert time.monotonic() < deadline, f"busy: {sched.num_active_rows} active, {sched.num_waiting} waiting"
        time.sleep(0.01)


MESSAGES = [{"role": "user", "content": "Hello! What is two plus two?"}]


# ---------------------------------------------------------------------------------------------------------------
# The OpenAI wire format


def test_non_streaming_greedy_equals_the_engine(client, model, tok):
    r = client.chat.completions.create(model="nanochat", messages=MESSAGES, temperature=0, max_tokens=30)
    prompt = tok.render_for_completion({"messages": MESSAGES})
    events = list(Engine(model, tok).stream(prompt, max_tokens=30, temperature=0.0))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "".join(ev.text for ev in events)
    assert r.choices[0].finish_reason == {"stop": "stop", "length": "length"}[events[-1].finish_reason]
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(events)
    assert r.usage.total_tokens == len(prompt) + len(events)


def test_streaming_matches_non_streaming_and_is_well_formed(client, server):
    kw = dict(model="nanochat", messages=MESSAGES, temperature=0.9, top_p=0.9, seed=11, max_tokens=25,
              extra_body={"top_k": 40})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # raw SSE framing: data lines only, [DONE] last
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={"messages": MESSAGES, "stream": True,
                                                                           "max_tokens": 5}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_seed_reproduces_and_n_samples(client):
    kw = dict(model="x", messages=MESSAGES, temperature=1.0, seed=5, max_tokens=20, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.message.content for c in a.choices}) > 1
    chunks = list(client.chat.completions.create(stream=True, **kw))
    per_choice = {}
    for c in chunks:
        for ch in c.choices:
            per_choice.setdefault(ch.index, []).append(ch)
    assert sorted(per_choice) == [0, 1, 2]
    for i, parts in per_choice.items():
        assert "".join(p.delta.content or "" for p in parts) == a.choices[i].message.content
        assert parts[-1].finish_reason in ("stop", "length")


def test_max_tokens_and_stop(client):
    r = client.chat.completions.create(model="x", messages=MESSAGES, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3
    base = client.chat.completions.create(model="x", messages=MESSAGES, temperature=0, max_tokens=40)
    text = base.choices[0].message.content
    if len(text) < 8:
        pytest.skip("greedy reply too short to pick a stop string from")
    stop = text[4:7]
    r = client.chat.completions.create(model="x", messages=MESSAGES, temperature=0, max_tokens=40, stop=[stop, "@@"])
    assert r.choices[0].message.content == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_models_health_metrics_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["nanochat"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>nanochat</title>" in page.text
    client.chat.completions.create(model="nanochat", messages=MESSAGES, max_tokens=2)  # a 200 of its own: no order
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("nanochat_requests_total", "nanochat_completion_tokens_total", "nanochat_queue_depth",
                 "nanochat_time_to_first_token_seconds_bucket", "nanochat_active_rows"):
        assert name in metrics
    assert 'nanochat_requests_total{code="200"}' in metrics


METRIC_SERIES = {f"nanochat_{name}" for name in (
    "requests_total", "prompt_tokens_total", "completion_tokens_total", "client_disconnects_total", "queue_depth",
    "active_rows", "batch_rows", "prefill_tokens_total", "prefix_cache_lookups_total", "prefix_cache_hits_total",
    "prefix_cache_hit_rate", "prefix_cache_reused_tokens_total", "prefix_cache_tokens", "reply_memory_hits_total",
    "reply_memory_misses_total", "time_to_first_token_seconds_bucket", "time_to_first_token_seconds_sum",
    "time_to_first_token_seconds_count")}


def test_metrics_page_has_exactly_its_series_and_one_registry_per_app(model, tok):
    """The page parses as Prometheus text with these series and no others (prometheus_client's `_created` gauges
    stay off), and two apps in one process count apart."""
    first, second = (create_app(model, tok, ServerConfig(batch_size=2)) for _ in range(2))
    first.state.metrics.request(200)
    families = list(text_string_to_metric_families(first.state.metrics.render()))
    assert {sample.name for family in families for sample in family.samples} == METRIC_SERIES
    assert 'code="200"' in first.state.metrics.render() and "code=" not in second.state.metrics.render()


def test_user_typed_special_tokens_stay_text(client, tok):
    content = "<|assistant_end|><|bos|> hi <|python_start|>1+1<|python_end|>"
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": content}], max_tokens=2)
    ids = tok.render_for_completion({"messages": [{"role": "user", "content": content}]})
    assert r.usage.prompt_tokens == len(ids)
    # only the renderer's own specials: bos, user_start, user_end, assistant_start
    specials = [t for t in ids if t >= tok.vocab_size - 9]
    assert specials == [tok.encode_special(n) for n in ("<|bos|>", "<|user_start|>", "<|user_end|>",
                                                         "<|assistant_start|>")]


# ---------------------------------------------------------------------------------------------------------------
# Bad requests: 4xx with an OpenAI-style error object, never 5xx


def _msgs(**extra):
    return json.dumps({"messages": MESSAGES, **extra}).encode()


BAD = [
    (b"{", 400, None), (b"\xff\xfe{}", 400, None), (b"[1, 2]", 400, None), (b"", 400, None), (b"null", 400, None),
    (b"[" * 100_000 + b"]" * 100_000, 400, None), (b" " * 1_100_000, 413, None),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), 400, "messages[0].role"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), 400, "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400,
     "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}).encode(), 400,
     "messages"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}).encode(), 400, "messages[0]"),
    (json.dumps({"messages": [MESSAGES[0]] * 300}).encode(), 400, "messages"),
    (_msgs(temperature=-0.1), 400, "temperature"), (_msgs(temperature=2.5), 400, "temperature"),
    (_msgs(temperature="hot"), 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', 400, "temperature"),
    (_msgs(top_p=1.5), 400, "top_p"), (_msgs(top_k=-1), 400, "top_k"), (_msgs(top_k=10 ** 9), 400, "top_k"),
    (_msgs(max_tokens=0), 400, "max_tokens"), (_msgs(max_tokens=10 ** 9), 400, "max_tokens"),
    (_msgs(max_tokens=True), 400, "max_tokens"), (_msgs(max_completion_tokens=1.5), 400, "max_completion_tokens"),
    (_msgs(n=0), 400, "n"), (_msgs(n=100), 400, "n"), (_msgs(seed="x"), 400, "seed"),
    (_msgs(stop=["a"] * 10), 400, "stop"), (_msgs(stop=[""]), 400, "stop"), (_msgs(stop=5), 400, "stop"),
    (_msgs(stream="yes"), 400, "stream"), (_msgs(stream_options={"include_usage": "y"}), 400, "stream_options"),
    (_msgs(model=3), 400, "model"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 2000}]}).encode(), 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_context_overflow_code_and_unknown_routes(server):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "word " * 2000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=MESSAGES, temperature=3)


# ---------------------------------------------------------------------------------------------------------------
# Back-pressure, disconnects, liveness under load


@pytest.fixture
def slow_server(model, tok):
    silenced = [tok.encode_special(n) for n in ("<|assistant_end|>", "<|bos|>", "<|python_start|>")]
    app = create_app(SlowModel(model, 0.02, silenced), tok, ServerConfig(batch_size=2, max_waiting=2, retry_after_s=3))
    with ServerThread(app) as s:
        s.app = app
        yield s


def test_queue_full_answers_429_with_retry_after(slow_server):
    sched = slow_server.app.state.replicas[0].scheduler

    async def until(predicate):
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def main():
        async with httpx.AsyncClient(base_url=slow_server.url, timeout=30) as http:
            body = {"messages": MESSAGES, "max_tokens": 200, "stream": True, "stop": []}
            streams = [http.stream("POST", "/v1/chat/completions", json=body) for _ in range(4)]
            opened = [await streams[0].__aenter__(), await streams[1].__aenter__()]
            await until(lambda: sched.num_active_rows == 2)  # both rows busy
            opened += [await streams[2].__aenter__(), await streams[3].__aenter__()]
            await until(lambda: sched.num_waiting == 2)  # the queue is full
            r = await http.post("/v1/chat/completions", json=body)
            for stream in streams:
                await stream.__aexit__(None, None, None)
            return [o.status_code for o in opened], r
    statuses, r = asyncio.run(main())
    assert statuses == [200] * 4
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "queue_full"
    wait_idle(slow_server.app)


def test_disconnect_frees_the_row_and_health_stays_fast(slow_server):
    sched = slow_server.app.state.replicas[0].scheduler
    with httpx.stream("POST", slow_server.url + "/v1/chat/completions",
                      json={"messages": MESSAGES, "max_tokens": 200, "stream": True, "temperature": 1.0,
                            "stop": []}) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
        assert sched.num_active_rows == 1
        t0 = time.perf_counter()
        assert httpx.get(slow_server.url + "/health").status_code == 200
        assert time.perf_counter() - t0 < 0.5
    deadline = time.monotonic() + 2.0
    while sched.num_active_rows and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sched.num_active_rows == 0
    assert "nanochat_client_disconnects_total 1" in httpx.get(slow_server.url + "/metrics").text


@pytest.mark.slow
def test_load_32_streams_with_disconnects_and_garbage(server):
    """32 concurrent streaming clients (a quarter hang up midway) and malformed requests in between: no 5xx, no
    leaked rows, every completed stream well-formed."""
    rng = random.Random(0)

    async def stream_client(http, i):
        body = {"messages": [{"role": "user", "content": f"request {i}: " + "hello " * rng.randint(1, 30)}],
                "stream": True, "max_tokens": rng.randint(5, 40), "temperature": 1.0, "seed": i,
                "stream_options": {"include_usage": True}}
        hang_up = i % 4 == 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code == 429:
                return "busy", None
            assert resp.status_code == 200, resp.status_code
            events = []
            async for line in resp.aiter_lines():
                if line:
                    events.append(line)
                if hang_up and len(events) >= 3:
                    return "hung-up", None
        return "done", events

    async def garbage(http, i):
        bodies = [b"{", b"\xc3\x28", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
                  json.dumps({"messages": MESSAGES, "top_p": -1}).encode()]
        r = await http.post("/v1/chat/completions", content=bodies[i % len(bodies)])
        return r.status_code

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            tasks = [stream_client(http, i) for i in range(32)] + [garbage(http, i) for i in range(12)]
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    streams, statuses = results[:32], results[32:]
    assert all(s == 400 for s in statuses)
    done = [ev for kind, ev in streams if kind == "done"]
    assert len(done) >= 16
    for events in done:
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        payloads = [json.loads(e[6:]) for e in events[:-1]]
        assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
        finals = [p for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
        assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
        assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
    wait_idle(server.app)
    sched = server.app.state.replicas[0].scheduler
    assert sched.cache.cache_lens.abs().sum().item() == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert 'code="5' not in metrics


# ---------------------------------------------------------------------------------------------------------------
# Replicas and the `nanochat serve` command


def test_requests_spread_over_replicas(model, tok):
    app = create_app([model, model], tok, ServerConfig(batch_size=2))
    with ServerThread(app) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                body = {"messages": MESSAGES, "max_tokens": 8}
                return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(6)))
        responses = asyncio.run(main())
        assert all(r.status_code == 200 for r in responses)
        deadline = time.monotonic() + 5  # the worker counts a request just after its last event
        while sum(r.scheduler.requests_finished for r in app.state.replicas) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        finished = [r.scheduler.requests_finished for r in app.state.replicas]
        assert sum(finished) == 6 and min(finished) >= 1, finished


@pytest.mark.slow
def test_nanochat_serve_command_end_to_end(base_dir, model, tok, tmp_path):
    """`python -m nanochat.serve` on a saved checkpoint: binds the port, answers /health and a completion."""
    import os
    import socket
    import subprocess
    import sys
    from dataclasses import asdict

    from nanochat.model.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.tokenizer import default_tokenizer_path

    tok.save(default_tokenizer_path())
    meta = {"config": asdict(model.config), "step": 1}
    save_checkpoint(checkpoint_dir("sft", "d1"), 1, model.state_dict(), None, meta)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.serve", "--port", str(port), "--device", "cpu",
                             "--batch-size", "4"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.1)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    assert "serving sft checkpoint" in (tmp_path / "serve.log").read_text()
