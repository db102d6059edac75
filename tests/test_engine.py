"""The inference engine against its references: greedy decoding with the KV cache equals GPT.generate's full
recompute (batch 1, several samples, ragged continuous batches), seeds reproduce, the sampler equals a naive
per-row implementation, the tool state machine on scripted token streams, stops, cancellation and text streaming."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from nanochat.inference.engine import Engine
from nanochat.inference.sampling import SamplingParams, sample_tokens
from nanochat.inference.scheduler import GenerationRequest, Scheduler
from nanochat.inference.text_stream import TextStream
from nanochat.model.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, sequence_len=256, seed=1)


def prompt_of(tok, text: str) -> list[int]:
    return tok.render_for_completion({"messages": [{"role": "user", "content": text}]})


def reference(model, tok, prompt, max_tokens):
    """GPT.generate (no cache), cut after the first terminal token like the engine."""
    terminal = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    out = []
    for t in model.generate(prompt, max_tokens, temperature=0.0):
        out.append(t)
        if t in terminal:
            break
    return out


def with_prompt(engine, prompt, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
    """Engine.generate over one prompt, as (prompt + generated ids, prompt zeros + mask) per sample."""
    [samples] = engine.generate([prompt], **kwargs)
    return [prompt + ids for ids, _ in samples], [[0] * len(prompt) + mask for _, mask in samples]


PROMPTS = ["Hello there, how are you?", "The quick brown fox", "x", "Tell me a story about the sea and the sky."]


# ---------------------------------------------------------------------------------------------------------------
# Greedy parity with the full-recompute reference


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_batch1_matches_full_recompute(model, tok, text):
    prompt = prompt_of(tok, text)
    expected = reference(model, tok, prompt, 40)
    engine = Engine(model, tok, tools=False)
    got = [ev.token for ev in engine.stream(prompt, max_tokens=40, temperature=0.0)]
    assert got == expected
    assert len(got) >= 5


def test_greedy_several_samples_share_one_prefill(model, tok):
    prompt = prompt_of(tok, PROMPTS[0])
    expected = reference(model, tok, prompt, 30)
    engine = Engine(model, tok, tools=False)
    results, masks = with_prompt(engine, prompt, num_samples=3, max_tokens=30, temperature=0.0)
    terminal = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    body = [t for t in expected if t not in terminal]
    for ids, mask in zip(results, masks):
        assert ids == prompt + body
        assert mask == [0] * len(prompt) + [1] * len(body)
    streamed = [[ev.token for ev in engine.stream(prompt, num_samples=3, max_tokens=30, temperature=0.0)
                 if ev.sample == s and ev.token is not None] for s in range(3)]
    assert streamed[0] == expected[:len(streamed[0])]
    assert streamed[0] == streamed[1] == streamed[2]


def test_ragged_continuous_batch_matches_reference(model, tok):
    """More requests than rows, different prompt lengths and budgets: requests join and leave between steps."""
    sched = Scheduler(model, tok, batch_size=3, tools=False)
    rng = random.Random(0)
    texts = PROMPTS + ["a b c d e f g h i j k l m n o p", "Why?", "Numbers 1 2 3 4 5 6 7 8 9"]
    requests = []
    for text in texts:
        req = GenerationRequest(prompt_of(tok, text), SamplingParams(max_tokens=rng.randint(3, 25), temperature=0.0))
        assert sched.submit(req)
        requests.append(req)
    peak = 0
    for _ in range(500):
        if not sched.has_work():
            break
        sched.step()
        peak = max(peak, sched.num_active_rows)
        # every active row's host-side length mirrors the cache, and idle rows hold nothing
        lens = sched.cache.cache_lens.tolist()
        assert lens[:sched.num_active_rows] == [r.cache_len for r in sched.rows]
        assert all(n == 0 for n in lens[sched.num_active_rows:])
    assert not sched.has_work() and peak == 3
    assert sched.requests_finished == len(requests)
    for req in requests:
        got = [ev.token for ev in req.events]
        assert got == reference(model, tok, req.prompt, req.params.max_tokens)
        assert req.events[-1].finish_reason in ("stop", "length")
        assert req.finished.is_set()


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def test_seeds_reproduce_and_do_not_depend_on_the_batch(model, tok):
    prompt = prompt_of(tok, PROMPTS[1])
    engine = Engine(model, tok, tools=False)
    kw = dict(max_tokens=20, temperature=1.0, top_k=50, top_p=0.95)
    a = with_prompt(engine, prompt, num_samples=2, seed=7, **kw)[0]
    b = with_prompt(engine, prompt, num_samples=2, seed=7, **kw)[0]
    c = with_prompt(engine, prompt, num_samples=2, seed=8, **kw)[0]
    assert a == b
    assert a != c
    assert a[0] != a[1]  # samples of one request differ
    # the same request inside a busy batch produces the same tokens
    sched = Scheduler(model, tok, batch_size=4, tools=False)
    others = [GenerationRequest(prompt_of(tok, t), SamplingParams(max_tokens=15, temperature=0.9, seed=i))
              for i, t in enumerate(PROMPTS[2:])]
    mine = GenerationRequest(prompt, SamplingParams(seed=7, **kw), n=2)
    for r in [others[0], mine, others[1]]:
        sched.submit(r)
    while sched.has_work():
        sched.step()
    terminal = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    for s in range(2):
        got = [ev.token for ev in mine.events if ev.sample == s and ev.token not in terminal]
        assert prompt + got == a[s]


def naive_sample(logits_row, temperature, top_k, top_p, u):
    """Per-row reference: with top-k or top-p, sort, keep top-k, keep the top-p prefix; inverse CDF at u (over the
    vocabulary in its own order without them)."""
    if temperature == 0:
        return int(torch.argmax(logits_row))
    order = list(range(len(logits_row)))
    if top_k or top_p < 1.0:
        order.sort(key=lambda i: (-float(logits_row[i]), i))
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(torch.tensor([float(logits_row[i]) / temperature for i in order], dtype=torch.float64), 0)
    if top_p < 1.0:
        keep, mass = [], 0.0
        for i, p in enumerate(probs.tolist()):
            if i > 0 and mass >= top_p:
                break
            keep.append(i)
            mass += p
        probs = probs[:len(keep)]
    probs = probs / probs.sum()
    cdf = torch.cumsum(probs, 0)
    return order[min(int((cdf <= u).sum()), len(probs) - 1)]


def test_sampler_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 3
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 0.5])
    top_k = torch.tensor([0, 0, 5, 0, 3, 10])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.8, 0.5, 0.9])
    mismatches = 0
    for trial in range(60):
        u = torch.rand(6, generator=g)
        got = sample_tokens(logits, temperature, top_k, top_p, u).tolist()
        for b in range(6):
            want = naive_sample(logits[b], float(temperature[b]), int(top_k[b]), float(top_p[b]), float(u[b]))
            mismatches += got[b] != want
    assert mismatches <= 2  # float32 vs float64 CDFs may disagree on a boundary, nothing more


def test_sampler_rows_do_not_depend_on_their_neighbours():
    """A row's token depends only on its own logits, parameters and uniform: in mixed batches (plain, top-k,
    top-p, greedy) each row samples what it samples alone, and a batch of plain rows agrees with the reference."""
    g = torch.Generator().manual_seed(1)
    temperature = torch.tensor([1.0, 0.7, 1.3, 0.0, 1.0, 0.9])
    top_k = torch.tensor([0, 5, 0, 0, 3, 0])
    top_p = torch.tensor([1.0, 1.0, 0.8, 1.0, 0.5, 1.0])
    for trial in range(40):
        logits = torch.randn(6, 64, generator=g) * 3
        u = torch.rand(6, generator=g)
        batch = sample_tokens(logits, temperature, top_k, top_p, u).tolist()
        alone = [sample_tokens(logits[b:b + 1], temperature[b:b + 1], top_k[b:b + 1], top_p[b:b + 1],
                               u[b:b + 1]).item() for b in range(6)]
        assert batch == alone, trial
        plain = [0, 5]
        got = sample_tokens(logits[plain], temperature[plain], top_k[plain], top_p[plain], u[plain]).tolist()
        assert got == [naive_sample(logits[b], float(temperature[b]), 0, 1.0, float(u[b])) for b in plain]


def test_sampler_respects_top_k_and_top_p_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]] * 2)
    seen = [set(), set()]
    for u in torch.linspace(0, 0.999, 60):
        out = sample_tokens(logits, torch.tensor([1.0, 1.0]), torch.tensor([2, 0]), torch.tensor([1.0, 0.0]),
                            torch.tensor([u, u]))
        seen[0].add(int(out[0]))
        seen[1].add(int(out[1]))
    assert seen == [{0, 1}, {0}]


# ---------------------------------------------------------------------------------------------------------------
# The tool state machine on scripted token streams


class ScriptedModel(torch.nn.Module):
    """A 'model' whose next token is a fixed function of the last input token (a bigram script)."""

    def __init__(self, vocab_size: int, script: dict[int, int], default: int):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=256, vocab_size=vocab_size, n_layer=1, n_kv_head=1, head_dim=2)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.script, self.default = script, default

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.script.get(int(idx[b, t]), self.default)] = 10.0
        logits = kv_cache.select(logits)  # the positions the engine samples from (see kv_cache.py)
        kv_cache.advance(T)
        return logits


def scripted(tok, expression: str, answer_tail: str = "ok"):
    S = tok.encode_special
    expr = tok.encode(expression)
    tail = tok.encode(answer_tail)
    chain = [S("<|assistant_start|>"), S("<|python_start|>"), *expr, S("<|python_end|>")]
    assert len(set(chain)) == len(chain), "script tokens must be unique"
    script = dict(zip(chain[:-1], chain[1:]))
    script[S("<|output_end|>")] = tail[0]
    for a, b in zip(tail, tail[1:] + [S("<|assistant_end|>")]):
        script[a] = b
    return ScriptedModel(tok.vocab_size, script, default=S("<|assistant_end|>")), expr, tail


@pytest.mark.parametrize("expression,result", [("7*6", "42"), ("1/0", "Error: division by zero")])
def test_tool_call_forces_the_evaluated_output(tok, expression, result):
    S = tok.encode_special
    model, expr, tail = scripted(tok, expression)
    engine = Engine(model, tok)
    results, masks = with_prompt(engine, prompt_of(tok, "calc"), num_samples=2, max_tokens=60, temperature=0.0)
    prompt_len = len(prompt_of(tok, "calc"))
    expected = ([S("<|python_start|>"), *expr, S("<|python_end|>")]
                + [S("<|output_start|>"), *tok.encode(result), S("<|output_end|>")] + tail)
    expected_mask = [1] * (len(expr) + 2) + [0] * (len(tok.encode(result)) + 2) + [1] * len(tail)
    for ids, mask in zip(results, masks):
        assert ids[prompt_len:] == expected
        assert mask[prompt_len:] == expected_mask
    text = "".join(ev.text for ev in engine.stream(prompt_of(tok, "calc"), max_tokens=60, temperature=0.0))
    assert text == f"\n```python\n{expression}\n```\n```output\n{result}\n```\n{tok.decode(tail)}"


def test_tools_off_forces_nothing(tok):
    model, expr, _ = scripted(tok, "2+3")
    results, masks = with_prompt(Engine(model, tok, tools=False), prompt_of(tok, "c"), max_tokens=20, temperature=0)
    assert 0 not in masks[0][len(prompt_of(tok, "c")):]
    assert tok.encode_special("<|output_start|>") not in results[0]


# ---------------------------------------------------------------------------------------------------------------
# Stops, budgets, cancellation, text


def test_stop_string_ends_the_row_and_trims_text(model, tok):
    prompt = prompt_of(tok, PROMPTS[3])
    engine = Engine(model, tok, tools=False)
    full = "".join(ev.text for ev in engine.stream(prompt, max_tokens=40, temperature=0.0))
    assert len(full) > 12
    stop = full[6:10]
    start = full.find(stop)
    events = list(engine.stream(prompt, max_tokens=40, temperature=0.0, stop=[stop]))
    assert "".join(ev.text for ev in events) == full[:start]
    assert events[-1].finish_reason == "stop"


def test_max_tokens_and_context_budget(model, tok):
    prompt = prompt_of(tok, PROMPTS[0])
    sched = Scheduler(model, tok, batch_size=2, max_len=len(prompt) + 4, tools=False)
    req = GenerationRequest(prompt, SamplingParams(max_tokens=100, temperature=1.0, seed=0, stop=()))
    sched.submit(req)
    while sched.has_work():
        sched.step()
    assert len(req.events) <= 4
    assert req.events[-1].finish_reason in ("length", "stop")
    with pytest.raises(ValueError, match="no room"):
        sched.submit(GenerationRequest(prompt + [1] * 4, SamplingParams()))


def test_cancel_frees_the_row_within_one_step(model, tok):
    sched = Scheduler(model, tok, batch_size=2, tools=False)
    keep = GenerationRequest(prompt_of(tok, "a"), SamplingParams(max_tokens=200, temperature=1.0, seed=1, stop=()))
    drop = GenerationRequest(prompt_of(tok, "b"), SamplingParams(max_tokens=200, temperature=1.0, seed=2), n=1)
    sched.submit(keep)
    sched.submit(drop)
    for _ in range(3):
        sched.step()
    assert sched.num_active_rows == 2 or keep.finished.is_set() or drop.finished.is_set()
    before = len(keep.events)
    drop.cancel()
    sched.step()
    assert drop.finished.is_set() and drop.events[-1].finish_reason == "cancelled"
    if not keep.finished.is_set():
        assert sched.num_active_rows == 1 and len(keep.events) == before + 1
        assert sched.cache.cache_lens[1].item() == 0


def test_text_stream_handles_split_utf8_and_stop_across_tokens(tok):
    text = "naïve café — 日本語 déjà vu, hello world"
    ids = tok.encode(text)
    stream = TextStream(tok)
    out = "".join(stream.push(t)[0] for t in ids) + stream.flush()
    assert out == text
    stream = TextStream(tok, stop=("hello w",))
    pieces, stopped = [], False
    for t in ids:
        piece, stopped = stream.push(t)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == text[:text.index("hello w")]
    stream = TextStream(tok, stop=("zzz-never",))  # a held-back partial match is released at the end
    assert "".join(stream.push(t)[0] for t in tok.encode("abc zzz")) + stream.flush() == "abc zzz"


def test_user_special_token_text_stays_plain(tok):
    ids = prompt_of(tok, "<|assistant_end|><|python_start|>")
    specials = {tok.encode_special(n) for n in ("<|assistant_end|>", "<|python_start|>")}
    assert not specials & set(ids)


def test_bad_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="prompt"):
        GenerationRequest([], SamplingParams())


class FailingModel(ScriptedModel):
    """Raises on prompts longer than `max_prompt`, or on any decode step once `fail_decode` is set."""

    def __init__(self, *args, max_prompt: int = 10**9, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_prompt, self.fail_decode = max_prompt, False

    def forward(self, idx, kv_cache=None):
        if idx.size(1) > self.max_prompt or (idx.size(1) == 1 and self.fail_decode):
            raise RuntimeError("simulated out of memory")
        return super().forward(idx, kv_cache)


def test_model_failures_fail_requests_not_the_worker(tok):
    import threading

    loop_token = tok.encode("a")[0]
    model = FailingModel(tok.vocab_size, {loop_token: loop_token}, default=loop_token, max_prompt=20)
    sched = Scheduler(model, tok, batch_size=4, tools=False)
    ok = GenerationRequest(prompt_of(tok, "a"), SamplingParams(max_tokens=5, temperature=0.0))
    too_long = GenerationRequest(prompt_of(tok, "word " * 40), SamplingParams(max_tokens=5, temperature=0.0))
    sched.submit(too_long)
    sched.submit(ok)
    stop = threading.Event()
    worker = threading.Thread(target=sched.serve_forever, args=(stop,))
    worker.start()
    try:
        assert ok.finished.wait(10) and too_long.finished.wait(10)
        assert [ev.finish_reason for ev in too_long.events] == ["error"]
        assert ok.events[-1].finish_reason == "length" and len(ok.events) == 5
        model.fail_decode = True  # now a decode step fails: every request in flight ends with "error"
        a = GenerationRequest(prompt_of(tok, "a"), SamplingParams(max_tokens=50, temperature=0.0))
        sched.submit(a)
        assert a.finished.wait(10) and a.events[-1].finish_reason == "error"
        assert sched.num_active_rows == 0 and worker.is_alive()
    finally:
        stop.set()
        sched.wake()
        worker.join(10)


def test_cancelled_waiting_requests_do_not_hold_the_queue(model, tok):
    sched = Scheduler(model, tok, batch_size=1, max_waiting=2, tools=False)
    reqs = [GenerationRequest(prompt_of(tok, "q"), SamplingParams(max_tokens=3, temperature=0.0)) for _ in range(3)]
    assert sched.submit(reqs[0]) and sched.submit(reqs[1])
    assert not sched.submit(reqs[2])  # full
    reqs[0].cancel()
    assert sched.submit(reqs[2])  # the cancelled one no longer counts
    while sched.has_work():
        sched.step()
    assert [ev.finish_reason for ev in reqs[0].events] == ["cancelled"]
    assert reqs[1].finished.is_set() and reqs[2].finished.is_set()
    assert sched.requests_finished == 3
