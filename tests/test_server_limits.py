"""The server at the edges of what it accepts, on a real uvicorn on 127.0.0.1: every value the request parser lets
through is served (200), a value the replica cannot serve is a 400 naming the field, a replica whose worker thread
died answers 503 with Retry-After and shows up in /health, and a stuck worker cannot hang a client (504)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from nanochat.model.tiny import tiny_model
from nanochat.serve.app import ServerConfig, create_app
from nanochat.serve.replicas import Replica
from nanochat.serve.thread import ServerThread

CONTEXT = 128
ROWS = 2
MESSAGES = [{"role": "user", "content": "Hello! What is two plus two?"}]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, n_layer=1, n_embd=32, sequence_len=CONTEXT, seed=5)


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(model, tok, ServerConfig(batch_size=ROWS, max_n=8))
    with ServerThread(app) as s:
        s.app = app
        yield s


def post(server, body: dict, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)


def long_prompt_content(tok) -> str:
    """The longest 'word word ...' user message whose rendered prompt still fits the context (leaves >= 1 token)."""
    best = ""
    for k in range(1, CONTEXT):
        content = "word " * k
        if len(tok.render_for_completion({"messages": [{"role": "user", "content": content}]})) >= CONTEXT:
            break
        best = content
    return best


# Each accepted by the parser at the end of its range: each must be served.
EDGES = [
    {"n": ROWS}, {"n": ROWS, "stream": True}, {"max_tokens": CONTEXT}, {"max_completion_tokens": CONTEXT},
    {"temperature": 0}, {"temperature": 2.0}, {"top_p": 0.0}, {"top_p": 1.0}, {"top_k": 0}, {"top_k": "vocab"},
    {"seed": -(2 ** 63)}, {"seed": 2 ** 63 - 1}, {"stop": ["x" * 128] * 4}, {"stop": "\U0001f600" * 128},
    {"temperature": 0, "top_k": 1, "top_p": 0.0, "n": ROWS, "seed": 0}, {"messages": "long"},
]


@pytest.mark.parametrize("edge", EDGES, ids=lambda e: json.dumps(e)[:40])
def test_every_accepted_value_is_served(server, tok, edge):
    body = {"messages": MESSAGES, "max_tokens": 4, **edge}
    if body.get("top_k") == "vocab":
        body["top_k"] = tok.get_vocab_size()
    if body["messages"] == "long":
        body["messages"] = [{"role": "user", "content": long_prompt_content(tok)}]
        del body["max_tokens"]  # the default (1024) is clipped to the one or few tokens the context has left
    r = post(server, body)
    assert r.status_code == 200, r.text
    if body.get("stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        finals = [c for e in events[:-1] for c in json.loads(e[6:])["choices"] if c["finish_reason"]]
        assert sorted(c["index"] for c in finals) == list(range(body.get("n", 1)))
    else:
        out = r.json()
        assert len(out["choices"]) == body.get("n", 1)
        assert out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] <= CONTEXT


@pytest.mark.parametrize("stream", [False, True])
def test_n_beyond_the_batch_rows_is_a_400_naming_n(server, stream):
    r = post(server, {"messages": MESSAGES, "max_tokens": 4, "n": ROWS + 1, "stream": stream})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n" and err["type"] == "invalid_request_error" and str(ROWS) in err["message"]


# ---------------------------------------------------------------------------------------------------------------
# Workers that die or hang


class WorkerKilled(BaseException):
    """Not an Exception: `serve_forever` does not catch it, so the worker thread dies (as on a fatal error)."""


def _kill_on_next_step(replica) -> None:
    def step():
        raise WorkerKilled("simulated fatal error in the worker")

    replica.scheduler.step = step


def test_dead_worker_answers_503_and_health_says_so(model, tok):
    app = create_app(model, tok, ServerConfig(batch_size=ROWS, retry_after_s=7))
    with ServerThread(app) as s:
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
        replica = app.state.replicas[0]
        _kill_on_next_step(replica)
        t0 = time.monotonic()
        r = post(s, {"messages": MESSAGES, "max_tokens": 4}, timeout=20)  # in flight when the worker dies
        assert r.status_code == 503 and r.headers["retry-after"] == "7", r.text
        assert r.json()["error"]["code"] == "replica_down"
        assert time.monotonic() - t0 < 10
        replica.thread.join(timeout=5)
        r = post(s, {"messages": MESSAGES, "max_tokens": 4}, timeout=20)  # arrives after: refused at once
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=20,
                          json={"messages": MESSAGES, "max_tokens": 4, "stream": True}) as resp:
            assert resp.status_code == 503
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.headers["retry-after"] == "7"
        body = health.json()
        assert body["status"] == "unhealthy" and body["workers_alive"] == 0
        assert "WorkerKilled" in body["down"][0]["error"]


def test_one_dead_replica_of_two_leaves_the_other_serving(model, tok):
    app = create_app([model, model], tok, ServerConfig(batch_size=ROWS))
    with ServerThread(app) as s:
        dead = app.state.replicas[0]
        _kill_on_next_step(dead)
        dead.scheduler.wake()
        post(s, {"messages": MESSAGES, "max_tokens": 2}, timeout=20)  # may land on either; kills replica 0
        dead.thread.join(timeout=5)
        assert not dead.thread.is_alive()
        for _ in range(3):
            assert post(s, {"messages": MESSAGES, "max_tokens": 2}, timeout=20).status_code == 200
        health = httpx.get(s.url + "/health")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded" and health.json()["workers_alive"] == 1


def test_stuck_worker_times_out_instead_of_hanging(model, tok):
    app = create_app(model, tok, ServerConfig(batch_size=ROWS, first_token_timeout_s=1.0, step_timeout_s=1.0))
    release = threading.Event()
    with ServerThread(app) as s:
        replica = app.state.replicas[0]
        real_step = replica.scheduler.step

        def stuck_step():
            release.wait(30)  # a hung kernel / deadlock: the thread is alive but makes no progress
            return real_step()

        replica.scheduler.step = stuck_step
        try:
            t0 = time.monotonic()
            r = post(s, {"messages": MESSAGES, "max_tokens": 4}, timeout=20)
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
            with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=20,
                              json={"messages": MESSAGES, "max_tokens": 4, "stream": True}) as resp:
                events = [e for e in resp.read().decode().split("\n\n") if e]
            assert json.loads(events[-1][6:])["error"]["code"] == "timeout"
            assert time.monotonic() - t0 < 15
            assert httpx.get(s.url + "/health").json()["status"] == "ok"  # alive, just slow: not down
        finally:
            release.set()


def test_worker_thread_selects_its_replica_device(model, tok, monkeypatch):
    """The worker thread calls torch.cuda.set_device(replica device) before serving (checked on CPU by patching)."""
    replica = Replica(model, tok, ServerConfig(batch_size=1))
    replica.scheduler.device = torch.device("cuda", 1)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(replica.scheduler, "serve_forever", lambda stop: calls.append(("serve", None)))
    replica.start()
    replica.thread.join(timeout=5)
    assert calls == [("set_device", "cuda:1"), ("serve", None)]
