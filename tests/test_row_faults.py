"""One row's failure is that row's alone: a fault injected into one row of a running batch at each stage of a row's
step (its sampling parameters, its sampling, its text decoding and stop strings, its tool call, the encoding of its
tool output) ends that row with an error event naming the cause, while every other row gets exactly the tokens it
gets in a run without the faulty row; a failed batch forward fails the batch (under a server's worker and under the
Engine, whose streams then end with an error naming the exception) and the next request succeeds; through
the real server, a stream whose calculator returns a lone surrogate ends with an OpenAI-style error while a
concurrent stream completes."""

from __future__ import annotations

import io
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from test_engine import prompt_of

import nanochat.inference.scheduler as scheduler_module
import nanochat.inference.tool_calls as tool_calls_module
from nanochat.inference.engine import Engine
from nanochat.inference.sampling import SamplingParams
from nanochat.inference.scheduler import GenerationRequest, Scheduler
from nanochat.inference.text_stream import TextStream
from nanochat.model.tiny import tiny_model
from nanochat.serve.chat_cli import ChatSession, ChatSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

EXPRESSION = "7*6"  # the tool call of the faulty row; its tokens are distinct, as a bigram script needs


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, sequence_len=256, seed=1)


def tool_script(tok) -> dict[int, int]:
    """<|assistant_start|> -> <|python_start|> EXPRESSION <|python_end|>, and <|output_end|> -> <|assistant_end|>."""
    S = tok.encode_special
    chain = [S("<|assistant_start|>"), S("<|python_start|>"), *tok.encode(EXPRESSION), S("<|python_end|>")]
    assert len(set(chain)) == len(chain)
    return {**dict(zip(chain[:-1], chain[1:])), S("<|output_end|>"): S("<|assistant_end|>")}


class ToolCaller(torch.nn.Module):
    """The tiny transformer, except that after a token of `script` the next token is the script's, and that the
    script's first two tokens never come otherwise: a prompt that ends in <|assistant_start|> makes a tool call,
    the other rows run the real model (and its KV cache) and never call the tool."""

    def __init__(self, inner, script: dict[int, int]):
        super().__init__()
        self.inner, self.config, self.script = inner, inner.config, script
        start = next(iter(script))
        self.unprompted = [start, script[start]]  # <|assistant_start|>, <|python_start|>

    def forward(self, idx, kv_cache=None):
        logits = self.inner(idx, kv_cache=kv_cache).clone()  # (B, T', V) at the positions the engine samples
        logits[..., self.unprompted] = float("-inf")
        inputs = kv_cache.select(idx)  # (B, T') the token at each of those positions
        for b, t in (inputs.unsqueeze(-1) == torch.tensor(list(self.script))).any(-1).nonzero().tolist():
            logits[b, t] = float("-inf")
            logits[b, t, self.script[int(inputs[b, t])]] = 0.0
        return logits


def others(tok) -> list[GenerationRequest]:
    """The rows that must not notice the faulty one: plain-text prompts (no <|assistant_start|>), greedy and
    sampled, one with two samples."""
    bos = tok.encode_special("<|bos|>")
    specs = [("The quick brown fox", SamplingParams(max_tokens=24, temperature=0.0), 1),
             ("Tell me a story about the sea", SamplingParams(max_tokens=30, temperature=0.9, seed=3), 2),
             ("Numbers 1 2 3", SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=4), 1)]
    return [GenerationRequest([bos, *tok.encode(text)], params, n) for text, params, n in specs]


def outputs(req: GenerationRequest) -> list[tuple[list[int], str | None]]:
    """Each sample's (tokens, finish reason)."""
    out = [([], None) for _ in range(req.n)]
    for ev in req.events:
        if ev.token is not None:
            out[ev.sample][0].append(ev.token)
        if ev.finish_reason is not None:
            out[ev.sample] = (out[ev.sample][0], ev.finish_reason)
    return out


def run(sched: Scheduler, limit: int = 2000) -> None:
    for _ in range(limit):
        if not sched.has_work():
            return
        sched.step()
    raise AssertionError("the scheduler did not drain")


class FaultyTextStream(TextStream):
    """A text stream that fails on its third token, for the rows whose stop strings hold the marker."""

    MARKER = "@@fault@@"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pushed = 0

    def push(self, token: int):
        self.pushed += 1
        if self.MARKER in self.stop and self.pushed == 3:
            raise ValueError("injected: undecodable bytes")
        return super().push(token)


SAMPLING_MARKER = 0.625  # the faulty row's temperature, which the injected sampler fault recognises


def inject(stage: str, monkeypatch, faulty: GenerationRequest) -> str:
    """Set up the fault of `stage` for the faulty request; returns the text its error event must hold."""
    if stage == "sampling parameters":
        faulty.params.temperature = float("nan")  # past SamplingParams' own check, as any later change would be
        return "checking the sampling parameters failed: ValueError: temperature must be a number in [0, 100], got nan"
    if stage == "sampling":
        faulty.params.temperature = SAMPLING_MARKER
        real = scheduler_module.sample_tokens

        def sample_tokens(logits, temperature, *args):
            if bool((temperature == SAMPLING_MARKER).any()) and faulty.completion_tokens >= 3:
                raise RuntimeError("injected: sampler fault")
            return real(logits, temperature, *args)
        monkeypatch.setattr(scheduler_module, "sample_tokens", sample_tokens)
        return "sampling failed: RuntimeError: injected: sampler fault"
    if stage == "text":
        faulty.params.stop = (FaultyTextStream.MARKER,)
        monkeypatch.setattr(scheduler_module, "TextStream", FaultyTextStream)
        return "decoding the text (and matching the stop strings) failed: ValueError: injected: undecodable bytes"
    if stage == "tool call":
        def evaluate(expression):
            raise RuntimeError(f"injected: the calculator crashed on {expression!r}")
        monkeypatch.setattr(tool_calls_module, "evaluate", evaluate)
        return f"the tool call failed: RuntimeError: injected: the calculator crashed on {EXPRESSION!r}"
    assert stage == "tool output"
    monkeypatch.setattr(tool_calls_module, "evaluate", lambda expression: "\ud800")  # a calculator that lets it by
    return "encoding the tool output failed: ValueError: text is not valid Unicode text"


@pytest.mark.parametrize("stage", ["sampling parameters", "sampling", "text", "tool call", "tool output"])
def test_a_fault_in_one_row_fails_that_row_alone(stage, model, tok, monkeypatch):
    caller = ToolCaller(model, tool_script(tok))
    python_start = tok.encode_special("<|python_start|>")

    def scheduler() -> Scheduler:  # mixed chunked prefill and decoding: 16 tokens a step over 5 rows
        return Scheduler(caller, tok, batch_size=5, tools=True, step_tokens=16)

    baseline = others(tok)
    sched = scheduler()
    for req in baseline:
        sched.submit(req)
    run(sched)
    expected = [outputs(req) for req in baseline]
    assert not any(python_start in tokens for out in expected for tokens, _ in out), "another row calls the tool"

    faulty_events, in_flight = [], []

    def on_event(ev):
        faulty_events.append(ev)
        if ev.finish_reason is not None:
            in_flight.append(sched.num_active_rows)
    faulty = GenerationRequest(prompt_of(tok, "calc"), SamplingParams(max_tokens=40, temperature=0.0),
                               on_event=on_event)
    cause = inject(stage, monkeypatch, faulty)
    rest = others(tok)
    sched = scheduler()
    for req in [rest[0], faulty, *rest[1:]]:
        sched.submit(req)
    run(sched)

    assert [outputs(req) for req in rest] == expected  # token for token, and the same finish reasons
    final = faulty_events[-1]
    assert [ev.finish_reason for ev in faulty_events].count(None) == len(faulty_events) - 1
    assert final.finish_reason == "error" and final.token is None and final.error.startswith(cause), final.error
    assert in_flight[0] >= 2, "the other rows were not in flight when the faulty row failed"
    assert sched.num_active_rows == 0 and int(sched.cache.cache_lens.abs().sum()) == 0
    assert sched.requests_finished == len(rest) + 1


class Flaky(torch.nn.Module):
    """The model, except that every decode forward (one token per row) raises while `armed`."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.armed = inner, inner.config, False

    def forward(self, idx, kv_cache=None):
        if self.armed and idx.size(1) == 1:
            raise RuntimeError("injected: device lost")
        return self.inner(idx, kv_cache=kv_cache)


def test_a_failed_batch_forward_fails_the_batch_then_the_replica_recovers(model, tok):
    """Only the decode forward itself fails everyone in flight (serve_forever), with its cause in every error
    event; the next request then gets exactly the tokens it gets on a fresh scheduler."""

    flaky = Flaky(model)
    sched = Scheduler(flaky, tok, batch_size=4, tools=False, prefix_cache=4096)
    first = others(tok)[:2]
    seen = []

    def arm_after_three_tokens(ev):  # called on the worker thread, between two steps of the batch
        seen.append(ev)
        flaky.armed = flaky.armed or first[0].completion_tokens >= 3
    first[0].on_event = arm_after_three_tokens
    stop = threading.Event()
    worker = threading.Thread(target=sched.serve_forever, args=(stop,))
    worker.start()
    try:
        for req in first:
            sched.submit(req)
        assert all(req.finished.wait(30) for req in first)
        assert len(seen) == 4 and seen[-1].finish_reason == "error"
        for events in (seen, first[1].events):
            finals = [ev for ev in events if ev.finish_reason is not None]
            assert [ev.finish_reason for ev in finals] == ["error"] * len({ev.sample for ev in events})
            assert all(ev.error == "the batch step failed: RuntimeError: injected: device lost" for ev in finals)
        flaky.armed = False
        again = others(tok)[1]
        sched.submit(again)
        assert again.finished.wait(30) and worker.is_alive()
    finally:
        stop.set()
        sched.wake()
        worker.join(10)
    alone = others(tok)[1]
    fresh = Scheduler(model, tok, batch_size=4, tools=False)
    fresh.submit(alone)
    run(fresh)
    assert outputs(again) == outputs(alone) and all(reason != "error" for _, reason in outputs(alone))


def test_a_failed_batch_step_under_the_engine_ends_its_requests_with_the_cause(model, tok):
    """Engine.stream (the chat CLI) and Engine.generate (evals, RL) step the scheduler themselves: a failed decode
    forward ends their requests with an error event naming the exception, as a server replica's does, and the
    engine's next call works."""
    flaky = Flaky(model)
    engine = Engine(flaky, tok, prefix_cache_tokens=0)
    prompt = others(tok)[0].prompt
    events = []
    for ev in engine.stream(prompt, max_tokens=20, temperature=0.0):
        events.append(ev)
        flaky.armed = len(events) >= 3
    assert [ev.finish_reason for ev in events] == [None, None, None, "error"] and events[-1].token is None
    assert events[-1].error == "the batch step failed: RuntimeError: injected: device lost"
    with pytest.raises(RuntimeError, match="^generation failed for prompt 0: the batch step failed: RuntimeError: "
                                           "injected: device lost$"):
        engine.generate([prompt], max_tokens=5)
    flaky.armed = False
    assert engine.generate([prompt], max_tokens=5) == Engine(model, tok).generate([prompt], max_tokens=5)

    session = ChatSession(engine, tok, ChatSettings(temperature=0.0, max_tokens=8))  # what the user sees
    flaky.armed = True
    out = io.StringIO()
    assert session.reply("Hi", out) == "" and session.turns == 0
    assert out.getvalue().endswith("(generation failed: the batch step failed: RuntimeError: injected: device lost)\n")


def test_engine_generate_names_the_cause(model, tok, monkeypatch):
    """Engine.generate raises on a failed row with the cause in its message, never an empty one."""
    monkeypatch.setattr(tool_calls_module, "evaluate", lambda expression: "\ud800")
    engine = Engine(ToolCaller(model, tool_script(tok)), tok, prefix_cache_tokens=0)
    with pytest.raises(RuntimeError, match=r"generation failed for prompt 1: encoding the tool output failed: "
                                           r"ValueError: text is not valid Unicode"):
        engine.generate([others(tok)[0].prompt, prompt_of(tok, "calc")], max_tokens=20)


# ---------------------------------------------------------------------------------------------------------------
# Through the real server


class ForkModel(torch.nn.Module):
    """A bigram 'model' (the next token a fixed function of the last one) with one fork: after <|assistant_start|>
    a tool call or a plain-text loop, equally likely, so that the seed picks the path. Sleeps in every forward so
    that two streams overlap for many steps."""

    def __init__(self, tok, delay_s: float):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=256, vocab_size=tok.vocab_size, n_layer=1, n_kv_head=1,
                                      head_dim=2)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        S = tok.encode_special
        self.loop = list(dict.fromkeys(tok.encode("the quick brown fox jumps")))  # distinct tokens, cycled
        self.script = {k: [v] for k, v in tool_script(tok).items()}
        self.script[S("<|assistant_start|>")].append(self.loop[0])
        self.script.update({a: [b] for a, b in zip(self.loop, self.loop[1:] + self.loop[:1])})
        self.default, self.delay_s = S("<|assistant_end|>"), delay_s

    def forward(self, idx, kv_cache=None):
        time.sleep(self.delay_s)
        inputs = kv_cache.select(idx)  # (B, T') the tokens whose successors the engine samples
        logits = torch.full((*inputs.shape, self.config.vocab_size), -1e4)
        for b, t in torch.ones_like(inputs).nonzero().tolist():
            for nxt in self.script.get(int(inputs[b, t]), [self.default]):
                logits[b, t, nxt] = 0.0
        kv_cache.advance(idx.size(1))
        return logits


@pytest.mark.slow
def test_a_stream_whose_tool_output_is_not_text_errors_while_another_completes(tok, monkeypatch):
    openai = pytest.importorskip("openai")
    from nanochat.serve.app import ServerConfig, create_app
    from nanochat.serve.thread import ServerThread

    model = ForkModel(tok, delay_s=0.0)
    messages = [{"role": "user", "content": "calc"}]
    prompt = tok.render_for_completion({"messages": messages})
    engine = Engine(model, tok, prefix_cache_tokens=0)
    seeds = {}  # the first token -> a seed that samples it
    for seed in range(64):
        events = list(engine.stream(prompt, max_tokens=1, temperature=1.0, seed=seed))
        seeds.setdefault(events[0].token, seed)
    tool_seed, plain_seed = seeds[tok.encode_special("<|python_start|>")], seeds[model.loop[0]]
    plain_kw = dict(model="nanochat", messages=messages, temperature=1.0, seed=plain_seed, max_tokens=150)
    expected = {n: "".join(ev.text for ev in engine.stream(prompt, max_tokens=n, temperature=1.0, seed=plain_seed))
                for n in (20, 150)}

    monkeypatch.setattr(tool_calls_module, "evaluate", lambda expression: "\ud800")  # a calculator that lets it by
    model.delay_s = 0.01  # the plain stream takes 150 steps (>= 1.5 s), the tool call fails within 6
    app = create_app(model, tok, ServerConfig(batch_size=4, max_waiting=8))
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        sched = app.state.replicas[0].scheduler
        plain = client.chat.completions.create(stream=True, **plain_kw)
        text = ""
        for chunk in plain:  # until the plain stream is decoding
            text += chunk.choices[0].delta.content or ""
            if text:
                break
        tool = client.chat.completions.create(stream=True, **{**plain_kw, "seed": tool_seed})
        with pytest.raises(openai.APIError, match="generation failed: encoding the tool output failed: "
                                                  "ValueError: text is not valid Unicode") as failed:
            for _ in tool:
                pass
        assert failed.value.body["code"] == "generation_failed" and failed.value.body["type"] == "server_error"
        deadline = time.monotonic() + 10
        while sched.num_active_rows == 2 and time.monotonic() < deadline:  # the worker retires the failed row
            time.sleep(0.01)
        assert sched.num_active_rows == 1, "the plain stream ended before the tool call failed"
        finish = None
        for chunk in plain:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        assert text == expected[150] and finish == "length"

        # without streaming: a 500 that names the cause (not the client's fault); the replica goes on serving
        with pytest.raises(openai.InternalServerError, match="encoding the tool output failed") as failed:
            client.chat.completions.create(**{**plain_kw, "seed": tool_seed, "max_tokens": 20})
        assert failed.value.status_code == 500
        again = client.chat.completions.create(**{**plain_kw, "max_tokens": 20})
        assert again.choices[0].message.content == expected[20] and again.choices[0].finish_reason == "length"
