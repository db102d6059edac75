"""Prefix reuse: a prompt that starts with tokens whose KV a finished request left in the store copies them instead
of recomputing, with the tokens of a cold prefill; the store is bounded (LRU); a cancelled request leaves nothing;
the server reports hits and reused tokens in /metrics."""

from __future__ import annotations

import pytest
import torch

from nanochat.inference.engine import Engine
from nanochat.inference.kv_cache import KVCache, PrefixStore
from nanochat.inference.sampling import SamplingParams
from nanochat.inference.scheduler import GenerationRequest, Scheduler
from nanochat.model.tiny import tiny_model
from nanochat.serve.app import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, sequence_len=512, seed=2)


def run(sched: Scheduler) -> None:
    while sched.has_work():
        sched.step()


def tokens(req: GenerationRequest, sample: int = 0) -> list[int]:
    return [ev.token for ev in req.events if ev.sample == sample and ev.token is not None]


def cold(model, tok, prompt, **params) -> list[int]:
    sched = Scheduler(model, tok, batch_size=1, tools=False)
    req = GenerationRequest(prompt, SamplingParams(**params))
    sched.submit(req)
    run(sched)
    return tokens(req)


SYSTEM = "You are a careful assistant. Answer briefly, in plain words, and say when you do not know. "
TURNS = ["What is the capital of France?", "And of Spain?", "Which one is bigger?", "Thanks! One more: Italy?"]


def test_multi_turn_reuses_the_previous_turn_with_cold_results(model, tok):
    sched = Scheduler(model, tok, batch_size=2, tools=False, step_tokens=32, prefix_cache=4096)
    store = sched.prefix_store
    messages, previous_prompt = [], []
    for i, text in enumerate(TURNS):
        messages.append({"role": "user", "content": (SYSTEM if i == 0 else "") + text})
        prompt = tok.render_for_completion({"messages": messages})
        params = dict(max_tokens=12, temperature=0.0)
        req = GenerationRequest(prompt, SamplingParams(**params))
        before = (store.hits, store.reused_tokens, sched.prefill_tokens)
        sched.submit(req)
        run(sched)
        assert tokens(req) == cold(model, tok, prompt, **params)
        if i:
            assert store.hits == before[0] + 1
            reused = store.reused_tokens - before[1]
            assert reused >= len(previous_prompt)  # at least the whole previous prompt was copied
            assert sched.prefill_tokens - before[2] == len(prompt) - reused
        previous_prompt = prompt
        reply = "".join(ev.text for ev in req.events)
        messages.append({"role": "assistant", "content": reply})
    assert store.lookups == len(TURNS) and store.hits == len(TURNS) - 1


def test_shared_system_prompt_and_sampled_requests(model, tok):
    """A later request sharing only a long system prompt reuses that much; seeded sampling matches cold too."""
    sched = Scheduler(model, tok, batch_size=3, tools=False, step_tokens=16, prefix_cache=4096)
    first = tok.render_for_completion({"messages": [{"role": "system", "content": SYSTEM * 2},
                                                    {"role": "user", "content": "Hi"}]})
    second = tok.render_for_completion({"messages": [{"role": "system", "content": SYSTEM * 2},
                                                     {"role": "user", "content": "Something else entirely"}]})
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    sched.submit(GenerationRequest(first, SamplingParams(max_tokens=6, temperature=0.0)))
    run(sched)
    params = dict(max_tokens=10, temperature=0.8, top_k=40, seed=5)
    req = GenerationRequest(second, SamplingParams(**params), n=2)
    sched.submit(req)
    run(sched)
    assert sched.prefix_store.reused_tokens == common
    assert tokens(req, 0) == cold(model, tok, second, **params)
    assert tokens(req, 1) != tokens(req, 0)


def test_identical_prompt_recomputes_its_last_token(model, tok):
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": SYSTEM}]})
    engine = Engine(model, tok, tools=False)
    a = engine.generate([prompt], max_tokens=8, temperature=0.0)[0]
    b = engine.generate([prompt], max_tokens=8, temperature=0.0)[0]
    assert a == b
    assert engine.prefix_store.hits == 1 and engine.prefix_store.reused_tokens == len(prompt) - 1


def test_cancelled_requests_leave_nothing_in_the_store(model, tok):
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": SYSTEM * 3}]})
    sched = Scheduler(model, tok, batch_size=2, tools=False, step_tokens=16, prefix_cache=4096)
    mid_prefill = GenerationRequest(prompt, SamplingParams(max_tokens=20, temperature=0.0))
    mid_decode = GenerationRequest(prompt, SamplingParams(max_tokens=20, temperature=0.0))
    sched.submit(mid_prefill)
    sched.step()
    assert sched.prefilling and sched.prefilling[0].done < len(prompt)
    mid_prefill.cancel()
    sched.submit(mid_decode)
    while len(tokens(mid_decode)) < 3:
        sched.step()
    mid_decode.cancel()
    run(sched)
    assert len(sched.prefix_store) == 0 and sched.prefix_store.tokens_held == 0
    again = GenerationRequest(prompt, SamplingParams(max_tokens=20, temperature=0.0))
    sched.submit(again)
    run(sched)
    assert sched.prefix_store.hits == 0
    assert tokens(again) == cold(model, tok, prompt, max_tokens=20, temperature=0.0)
    assert len(sched.prefix_store) == 1  # a request that finishes normally is kept


def test_store_is_bounded_and_evicts_the_least_recently_used():
    cache = KVCache(1, 64, 2, 1, 4)
    cache.k.normal_()
    cache.v.normal_()
    store = PrefixStore(max_tokens=100, min_tokens=4)
    seqs = [[i] * 8 + list(range(30)) for i in range(4)]  # 38 tokens each, differing from the first token
    store.insert(seqs[0], cache, 0)
    store.insert(seqs[1], cache, 0)
    assert store.tokens_held == 76
    assert store.lookup(seqs[0] + [99])[1] == 38  # touches entry 0: entry 1 is now the oldest
    store.insert(seqs[2], cache, 0)  # 114 > 100: evicts entry 1
    assert store.tokens_held == 76 and len(store) == 2
    assert store.lookup(seqs[1] + [99]) == (None, 0)
    assert store.lookup(seqs[0][:20] + [7, 7])[1] == 20
    store.insert(seqs[0] + [5, 6], cache, 0)  # extends entry 0: replaces it
    assert len(store) == 2 and store.tokens_held == 78
    store.insert(seqs[2][:10], cache, 0)  # covered by a held entry: nothing new
    assert len(store) == 2 and store.tokens_held == 78
    store.insert(list(range(200)), cache, 0)  # longer than the whole store: not kept
    assert store.tokens_held == 78
    assert store.lookup([3, 3, 3, 9, 9]) == (None, 0)  # shorter than min_tokens
    key, n = store.lookup(seqs[2] + [1])
    other = KVCache(1, 64, 2, 1, 4)
    store.load(key, n, other, 0)
    torch.testing.assert_close(other.k[:, 0, :n], cache.k[:, 0, :n])
    assert other.cache_lens.tolist() == [n]
    assert (store.lookups, store.hits) == (5, 3)


def test_metrics_report_hits_and_reused_tokens(model, tok):
    app = create_app(model, tok, ServerConfig(batch_size=2, prefix_cache_tokens=2048))
    sched = app.state.replicas[0].scheduler
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": SYSTEM}]})
    for _ in range(2):
        sched.submit(GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0.0)))
        run(sched)
    text = app.state.metrics.render()
    assert "nanochat_prefix_cache_lookups_total 2" in text
    assert "nanochat_prefix_cache_hits_total 1" in text
    assert "nanochat_prefix_cache_hit_rate 0.5\n" in text
    assert f"nanochat_prefix_cache_reused_tokens_total {len(prompt) - 1}" in text
    assert f"nanochat_prefill_tokens_total {len(prompt) + 1}" in text


def test_the_cli_session_reuses_its_history(model, tok):
    import io

    from nanochat.serve.chat_cli import ChatSession, ChatSettings

    engine = Engine(model, tok)
    session = ChatSession(engine, tok, ChatSettings(temperature=0.0, max_tokens=12))
    session.reply(SYSTEM, io.StringIO())
    first_len = len(session.tokens)
    second = session.reply("And then?", io.StringIO())
    store = engine.prefix_store
    # the first prompt and every reply token but the last (never fed to the model; then the closing token)
    assert store.hits == 1 and store.reused_tokens >= first_len - 2
    prompt2 = session.tokens[:first_len] + tok.render_for_completion(
        {"messages": [{"role": "user", "content": "And then?"}]})[1:]
    cold_text = "".join(ev.text for ev in Engine(model, tok, prefix_cache_tokens=0).stream(
        prompt2, max_tokens=12, temperature=0.0))
    assert second == cold_text


@pytest.mark.slow
def test_the_server_reuses_a_resent_history(model, tok):
    """Two turns over HTTP, the second resending the first (as OpenAI clients and the web UI do)."""
    import httpx

    from nanochat.serve.thread import ServerThread

    app = create_app(model, tok, ServerConfig(batch_size=2))
    with ServerThread(app) as server:
        messages = [{"role": "user", "content": SYSTEM}]
        body = {"messages": messages, "max_tokens": 10, "temperature": 0}
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
        messages += [reply["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
    assert "nanochat_prefix_cache_hits_total 1" in metrics
    reused = float(next(line.split()[1] for line in metrics.splitlines()
                        if line.startswith("nanochat_prefix_cache_reused_tokens_total")))
    first = tok.render_for_completion({"messages": messages[:1]})
    assert reused >= len(first)
