"""The continuous-batching scheduler with chunked prefill against the one-request-at-a-time path: mixed prompt
lengths chunked over several steps and batched with decoding rows, stop strings, n > 1, the python tool and
cancellations in flight give the tokens each request gets alone; a request cancelled mid-prefill frees its row and
its chunk budget at once; release() ends a request wherever it is, without a forward; the step plan's packing
(ids, kept positions, logits rows) is checked on its own; the decode step compiles with torch.compile(fullgraph=True) (no host sync); on CUDA the
decode step from CUDA graphs equals the eager one."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from test_engine import FailingModel, prompt_of, scripted

from nanochat.inference.engine import Engine
from nanochat.inference.kv_cache import KVCache, PackedBatch
from nanochat.inference.rows import Prefill
from nanochat.inference.sampling import SamplingParams
from nanochat.inference.scheduler import DecodeGraphs, GenerationRequest, Scheduler, StepPlan
from nanochat.model.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, sequence_len=256, seed=1)


class Recorder(torch.nn.Module):
    """Passes through to the model and records the shape of every step: (decoding rows, prefill chunks)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.steps = inner, inner.config, []

    def forward(self, idx, kv_cache=None):
        if isinstance(kv_cache, PackedBatch):
            self.steps.append((kv_cache.n_decode, [(s, c) for _, s, c, _ in kv_cache.chunks]))
        else:
            self.steps.append((idx.size(0), []))
        return self.inner(idx, kv_cache=kv_cache)


def alone(model, tok, req: GenerationRequest, tools=False) -> list[list[int]]:
    """The tokens of each sample when the request runs by itself (one-request-at-a-time path)."""
    p = req.params
    engine = Engine(model, tok, tools=tools, prefix_cache_tokens=0)
    out = [[] for _ in range(req.n)]
    for ev in engine.stream(req.prompt, req.n, max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                            top_p=p.top_p, seed=p.seed, stop=p.stop):
        if ev.token is not None:
            out[ev.sample].append(ev.token)
    return out


def tokens_by_sample(req: GenerationRequest) -> list[list[int]]:
    out = [[] for _ in range(req.n)]
    for ev in req.events:
        if ev.token is not None:
            out[ev.sample].append(ev.token)
    return out


def run(sched: Scheduler, limit: int = 2000) -> None:
    for _ in range(limit):
        if not sched.has_work():
            return
        sched.step()
    raise AssertionError("the scheduler did not drain")


TEXTS = ["Hello there, how are you?", "x", "The quick brown fox jumps over the lazy dog, twice, and then once more.",
         "Tell me a story about the sea and the sky and the wind between them, in many words.", "Why?",
         "Numbers 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"]


def test_chunked_prefill_batched_with_decode_matches_requests_alone(model, tok):
    """Mixed lengths, several chunks per long prompt and several prompts per step, next to decoding rows."""
    rec = Recorder(model)
    sched = Scheduler(rec, tok, batch_size=4, tools=False, step_tokens=12)
    rng = random.Random(0)
    requests = []
    for i, text in enumerate(TEXTS):
        params = SamplingParams(max_tokens=rng.randint(4, 20), temperature=0.0 if i % 2 else 0.9, seed=i)
        req = GenerationRequest(prompt_of(tok, text), params, n=2 if i == 2 else 1)
        assert sched.submit(req)
        requests.append(req)
    run(sched)
    for req in requests:
        assert tokens_by_sample(req) == alone(model, tok, req)
        assert req.finished.is_set()
    mixed = [s for s in rec.steps if s[0] and s[1]]
    assert mixed, "no step held both decoding rows and prefill chunks"
    assert any(len(chunks) > 1 for _, chunks in rec.steps), "no step prefilled two prompts together"
    assert any(start > 0 for _, chunks in rec.steps for start, _ in chunks), "no prompt was chunked"
    assert all(n + sum(c for _, c in chunks) <= max(12, n + 1) for n, chunks in rec.steps)
    assert sched.num_active_rows == 0 and int(sched.cache.cache_lens.abs().sum()) == 0


def test_small_chunks_give_the_tokens_of_whole_prompts(model, tok):
    """8-token steps over 3 rows against each prompt prefilled whole, alone (the serial scheduling's parity)."""
    sched = Scheduler(model, tok, batch_size=3, tools=False, step_tokens=8)
    reqs = [GenerationRequest(prompt_of(tok, t), SamplingParams(max_tokens=10, temperature=0.0)) for t in TEXTS]
    for r in reqs:
        sched.submit(r)
    run(sched)
    assert [alone(model, tok, r) for r in reqs] == [tokens_by_sample(r) for r in reqs]


def test_stop_strings_and_samples_inside_a_busy_batch(model, tok):
    prompt = prompt_of(tok, TEXTS[3])
    full = alone(model, tok, GenerationRequest(prompt, SamplingParams(max_tokens=30, temperature=0.0)))[0]
    text = tok.decode(full)
    stop = text[5:9]
    sched = Scheduler(model, tok, batch_size=5, tools=False, step_tokens=7)
    busy = [GenerationRequest(prompt_of(tok, t), SamplingParams(max_tokens=25, temperature=1.0, seed=i))
            for i, t in enumerate(TEXTS)]
    mine = GenerationRequest(prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=(stop,)), n=3)
    for r in busy[:2] + [mine] + busy[2:]:
        sched.submit(r)
    run(sched)
    assert tokens_by_sample(mine) == alone(model, tok, mine)
    assert "".join(ev.text for ev in mine.events if ev.sample == 1) == text[:text.find(stop)]
    for r in busy:
        assert tokens_by_sample(r) == alone(model, tok, r)


def test_tool_calls_next_to_other_requests(tok):
    """The scripted calculator (a bigram 'model'): tool output forced while other prompts prefill and decode."""
    model, _, _ = scripted(tok, "7*6")
    sched = Scheduler(model, tok, batch_size=6, tools=True, step_tokens=5)
    reqs = [GenerationRequest(prompt_of(tok, t), SamplingParams(max_tokens=40, temperature=0.0), n=1 + i % 2)
            for i, t in enumerate(["calc", "a much longer prompt than the others, to be chunked", "c"])]
    for r in reqs:
        sched.submit(r)
    run(sched)
    for r in reqs:
        got = tokens_by_sample(r)
        assert got == alone(model, tok, r, tools=True)
        assert tok.encode_special("<|output_start|>") in got[0]
        assert [ev.mask for ev in r.events if ev.sample == 0].count(0) == len(tok.encode("42")) + 2


def test_cancel_mid_prefill_frees_the_row_and_the_budget_at_once(model, tok):
    rec = Recorder(model)
    sched = Scheduler(rec, tok, batch_size=3, tools=False, step_tokens=6)
    long = GenerationRequest(prompt_of(tok, TEXTS[3] * 2), SamplingParams(max_tokens=5, temperature=0.0))
    after = GenerationRequest(prompt_of(tok, TEXTS[2]), SamplingParams(max_tokens=5, temperature=0.0))
    sched.submit(long)
    sched.submit(after)
    sched.step()
    sched.step()
    assert [p.request for p in sched.prefilling] == [long, after]
    assert rec.steps[-1][1] == [(6, 6)]  # the long prompt takes the whole budget, in order
    row = sched.prefilling[0].row
    long.cancel()
    rec.steps.clear()
    sched.step()
    assert long.finished.is_set() and [ev.finish_reason for ev in long.events] == ["cancelled"]
    assert [p.request for p in sched.prefilling] == [after] or after.first_token_at is not None
    assert rec.steps[0][1][0] == (0, 6)  # the whole budget went to the next prompt in the same step
    assert row not in {p.row for p in sched.prefilling} and int(sched.cache.cache_lens[row]) == 0
    run(sched)
    assert tokens_by_sample(after) == alone(model, tok, after)
    assert sched.num_active_rows == 0 and int(sched.cache.cache_lens.abs().sum()) == 0
    assert sched.requests_finished == 2


def test_step_plan_says_what_each_part_feeds_and_which_logits_row_answers_it():
    """Two decoding rows, a chunk that leaves its prompt unfinished, then two that complete theirs: the packed ids,
    the positions whose logits are kept, and the logits row of each completed prompt."""
    rows = [SimpleNamespace(last_token=7), SimpleNamespace(last_token=8)]
    partial = Prefill(SimpleNamespace(prompt=[10, 11, 12, 13, 14], n=1), row=2, done=1)
    first = Prefill(SimpleNamespace(prompt=[20, 21, 22], n=2), row=3, done=1)
    second = Prefill(SimpleNamespace(prompt=[30], n=1), row=5, done=0)
    plan = StepPlan.build(rows, [(partial, 2), (first, 2), (second, 1)])
    assert plan.tokens() == [7, 8, 11, 12, 21, 22, 30]
    assert plan.packed_chunks() == [(2, 1, 2), (3, 1, 2), (5, 0, 1)]
    assert plan.outputs() == [0, 1, 5, 6]  # the decoding rows, then each completed prompt's last token
    assert [c.logits_row for c in plan.chunks] == [None, 2, 3]
    assert [c.prefill for c in plan.completing] == [first, second]
    assert StepPlan.build([], [(second, 1)]).outputs() == [0] and StepPlan.build(rows, []).outputs() == [0, 1]


def test_release_ends_a_request_at_once_wherever_it_is(model, tok):
    """release() (what the Engine calls when its caller stops early): a decoding request and a waiting one end
    with "cancelled" events and free their rows without a forward; the request beside them is unaffected; a
    finished request is left as it is."""
    rec = Recorder(model)
    sched = Scheduler(rec, tok, batch_size=3, tools=False, step_tokens=64)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    decoding = GenerationRequest(prompt_of(tok, TEXTS[0]), greedy, n=2)
    other = GenerationRequest(prompt_of(tok, TEXTS[2]), greedy)
    waiting = GenerationRequest(prompt_of(tok, TEXTS[4]), greedy, n=2)  # 2 + 1 + 2 rows > 3: it waits
    for req in (decoding, other, waiting):
        sched.submit(req)
    sched.step()
    sched.step()
    assert len(sched.rows) == 3 and sched.num_waiting == 1 and decoding.completion_tokens == 4
    steps = len(rec.steps)
    sched.release(decoding)
    sched.release(waiting)
    assert len(rec.steps) == steps  # no forward
    for req in (decoding, waiting):
        finals = [ev for ev in req.events if ev.finish_reason is not None]
        assert req.finished.is_set() and [(ev.sample, ev.finish_reason) for ev in finals] == [(0, "cancelled"),
                                                                                              (1, "cancelled")]
    assert [r.request for r in sched.rows] == [other] and sched.num_waiting == 0 and sched.requests_finished == 2
    assert sched.cache.cache_lens.tolist()[1:] == [0, 0]
    run(sched)
    assert tokens_by_sample(other) == alone(model, tok, other)
    events = len(other.events)
    sched.release(other)
    assert len(other.events) == events and sched.requests_finished == 3 and not sched.has_work()
    assert int(sched.cache.cache_lens.abs().sum()) == 0


def test_random_traffic_with_cancellations(model, tok):
    """Random prompts, n, budgets and cancellations at random steps: every request that is not cancelled gets the
    tokens it gets alone, rows never leak, and the host lengths always mirror the cache."""
    rng = random.Random(3)
    sched = Scheduler(model, tok, batch_size=5, tools=False, step_tokens=9)
    requests, cancelled = [], set()
    for i in range(14):
        words = [rng.choice(["sea", "sky", "wind", "a", "blue", "long", "words"]) for _ in range(rng.randint(1, 25))]
        text = " ".join(words)
        req = GenerationRequest(prompt_of(tok, text), SamplingParams(max_tokens=rng.randint(1, 12),
                                                                     temperature=rng.choice([0.0, 0.8]), seed=i),
                                n=rng.choice([1, 1, 2, 3]))
        sched.submit(req)
        requests.append(req)
    for step in range(2000):
        if not sched.has_work():
            break
        if rng.random() < 0.08:
            live = [r for r in requests if not r.finished.is_set() and r not in cancelled]
            if live:
                victim = rng.choice(live)
                victim.cancel()
                cancelled.add(victim)
        sched.step()
        lens = sched.cache.cache_lens.tolist()
        assert lens[:len(sched.rows)] == [r.cache_len for r in sched.rows]
        assert all(lens[p.row] == p.done for p in sched.prefilling)
        held = set(range(len(sched.rows))) | {p.row for p in sched.prefilling}
        assert len(held) == sched.num_active_rows
        assert all(n == 0 for r, n in enumerate(lens) if r not in held)
    assert not sched.has_work() and sched.requests_finished == len(requests)
    assert cancelled
    for req in requests:
        if req not in cancelled:
            assert tokens_by_sample(req) == alone(model, tok, req)


def test_a_failing_prompt_fails_alone_next_to_decoding_rows(tok):
    """The model fails on one prompt (a simulated out-of-memory on more than 12 tokens in one forward): that
    request ends with "error", the rows decoding in the same forward and the prompt prefilled beside it go on."""
    loop = tok.encode("a")[0]
    model = FailingModel(tok.vocab_size, {loop: loop}, default=loop, max_prompt=12)
    sched = Scheduler(model, tok, batch_size=4, tools=False, step_tokens=64)
    running = GenerationRequest(prompt_of(tok, "a"), SamplingParams(max_tokens=8, temperature=0.0))
    sched.submit(running)
    sched.step()
    sched.step()
    too_long = GenerationRequest(prompt_of(tok, "word " * 20), SamplingParams(max_tokens=3, temperature=0.0))
    short = GenerationRequest(prompt_of(tok, "b"), SamplingParams(max_tokens=3, temperature=0.0))
    sched.submit(too_long)
    sched.submit(short)
    run(sched)
    assert [ev.finish_reason for ev in too_long.events] == ["error"]
    assert too_long.events[-1].error == "the forward over its prompt failed: RuntimeError: simulated out of memory"
    assert tokens_by_sample(running) == [[loop] * 8] and running.events[-1].finish_reason == "length"
    assert tokens_by_sample(short) == [[loop] * 3]
    assert sched.num_active_rows == 0 and sched.requests_finished == 3


# ---------------------------------------------------------------------------------------------------------------
# The packed step against the full forward


def test_packed_batch_equals_the_full_forward(model):
    """Two decoding rows (lengths 5 and 9), a first chunk (row 2, positions 0..3) and a later chunk (row 3,
    positions 6..8) in one forward: each selected logit equals the full forward of its sequence at that position."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in (6, 10, 4, 9)]
    cache = KVCache(4, 32, cfg.n_layer, cfg.n_kv_head, cfg.head_dim)
    with torch.no_grad():
        for row, (seq, held) in enumerate(zip(seqs, (5, 9, 0, 6))):
            if held:
                one = KVCache(1, 32, cfg.n_layer, cfg.n_kv_head, cfg.head_dim)
                model(seq[:, :held], kv_cache=one)
                cache.copy_row(one, 0, row)
        ids = torch.cat([seqs[0][:, 5:6], seqs[1][:, 9:10], seqs[2], seqs[3][:, 6:9]], dim=1)  # (1, 9)
        batch = PackedBatch(cache, 2, [5, 9], 32, [(2, 0, 4), (3, 6, 3)],
                            outputs=[0, 1, 3, 5, 6, 8])
        got = model(ids, kv_cache=batch)[0]
        want = [model(seqs[0])[0, 5], model(seqs[1])[0, 9], model(seqs[2])[0, 1], model(seqs[2])[0, 3],
                model(seqs[3])[0, 6], model(seqs[3])[0, 8]]
    torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=1e-4)
    assert cache.cache_lens.tolist() == [6, 10, 4, 9]


@pytest.mark.slow
def test_packed_batch_under_the_triton_interpreter():
    """The same packed step through the Triton kernels (Triton's CPU interpreter, in a subprocess)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", NANOCHAT_KERNELS="triton")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k",
           "test_packed_batch_equals_the_full_forward"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


# ---------------------------------------------------------------------------------------------------------------
# The decode step: no host sync, CUDA graphs


def test_decode_step_compiles_fullgraph(model, tok):
    """The decode forward over a ragged cache view traces into one graph: any host read of a device value
    (`int(t)`, `bool(t)`, `.item()`, `.tolist()`) is a graph break. fullgraph=True rejects data-dependent branches;
    `torch._dynamo.explain` also counts breaks that this torch lets a fullgraph compile survive (`.item()`)."""
    torch._dynamo.reset()
    cfg = model.config
    caches = [KVCache(3, 64, cfg.n_layer, cfg.n_kv_head, cfg.head_dim) for _ in range(2)]
    prompts = [torch.randint(0, cfg.vocab_size, (1, n)) for n in (5, 9, 2)]
    with torch.no_grad():
        for cache in caches:
            for row, p in enumerate(prompts):
                one = KVCache(1, 64, cfg.n_layer, cfg.n_kv_head, cfg.head_dim)
                model(p, kv_cache=one)
                cache.copy_row(one, 0, row)

        def decode(ids, view):
            return model(ids, kv_cache=view)[:, -1, :]

        compiled = torch.compile(decode, fullgraph=True, backend="eager", dynamic=False)
        ids = torch.randint(0, cfg.vocab_size, (3, 1))
        for _ in range(3):
            want = decode(ids, caches[0].view(0, 3, 64))
            got = compiled(ids, caches[1].view(0, 3, 64))
            torch.testing.assert_close(got, want)
            ids = want.argmax(-1, keepdim=True)
    assert caches[1].cache_lens.tolist() == [8, 12, 5]
    explained = torch._dynamo.explain(decode)(ids, caches[1].view(0, 3, 64))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


class EagerGraphs(DecodeGraphs):
    """DecodeGraphs with the capture replaced by plain calls: the buckets, static buffers, padded rows and length
    updates run on CPU exactly as around a CUDA graph."""

    def _record(self, step):
        return step


def test_bucketed_decode_step_logic_on_cpu(model, tok):
    """Batch sizes pad up to buckets whose extra rows are idle: the same tokens as the plain decode step (the
    random-traffic test checks that idle rows keep length 0)."""
    outs = {}
    for graphs in (False, True):
        sched = Scheduler(model, tok, batch_size=6, tools=False, step_tokens=10)
        if graphs:
            sched.graphs = EagerGraphs(model, sched.cache)
        reqs = [GenerationRequest(prompt_of(tok, t), SamplingParams(max_tokens=6 + 3 * i, temperature=0.0), n=1)
                for i, t in enumerate(TEXTS)]
        for r in reqs:
            sched.submit(r)
        run(sched)
        outs[graphs] = [tokens_by_sample(r) for r in reqs]
        if graphs:
            assert len(sched.graphs.graphs) >= 3  # several buckets, padded over idle rows
    assert outs[True] == outs[False]
    assert outs[False] == [alone(model, tok, r) for r in reqs]


def same_up_to_near_ties(model, prompt: list[int], a: list[int], b: list[int], gap: float = 0.05) -> bool:
    """Whether two greedy continuations agree until a step whose top two logits (full forward of the common
    prefix) are within `gap`: bf16 kernels that reduce in another order may break such a tie either way."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + a[:i]], device="cuda"))[0, -1].float()
            top = logits.topk(2).values
            return bool(top[0] - top[1] < gap)
    return len(a) == len(b)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(tok):
    """On CUDA: the scheduler with CUDA graphs (batch sizes padded up to buckets) gives the tokens of the eager
    decode step (up to bf16 near-ties), the graph's logits equal the eager ones, and neither step synchronizes."""
    model = tiny_model(tok.vocab_size, n_layer=2, n_embd=128, n_head=2, n_kv_head=1, sequence_len=256,
                       seed=1).cuda()
    outs = {}
    for graphs in (False, True):
        sched = Scheduler(model, tok, batch_size=6, tools=False, step_tokens=16, cuda_graphs=graphs)
        assert (sched.graphs is not None) == graphs
        reqs = [GenerationRequest(prompt_of(tok, t), SamplingParams(max_tokens=12 + 3 * i, temperature=0.0), n=1)
                for i, t in enumerate(TEXTS)]
        for r in reqs:
            sched.submit(r)
        run(sched)
        outs[graphs] = [tokens_by_sample(r)[0] for r in reqs]
        if graphs:
            assert len(sched.graphs.graphs) >= 2  # several buckets were used
    for r, eager, graphed in zip(reqs, outs[False], outs[True]):
        assert same_up_to_near_ties(model, r.prompt, eager, graphed), (eager, graphed)
    assert sum(e == g for e, g in zip(outs[False], outs[True])) >= len(reqs) - 1
    # logits of one step, graph vs eager, on the same cache state; neither step waits for the device
    sched = Scheduler(model, tok, batch_size=4, tools=False, cuda_graphs=True)
    for t in TEXTS[:3]:
        sched.submit(GenerationRequest(prompt_of(tok, t), SamplingParams(max_tokens=50, temperature=0.0)))
    sched.step()  # the three prompts prefill together: (up to) three decoding rows, padded up to a bucket
    n = len(sched.rows)
    assert n >= 2
    ids = torch.tensor([[r.last_token] for r in sched.rows], device="cuda")
    lens = sched.cache.cache_lens.clone()
    step = torch.tensor([1] * n + [0] * (4 - n), device="cuda", dtype=torch.int32)
    with torch.no_grad():
        sched.graphs(ids)  # captures the bucket's graph (capturing synchronizes)
        sched.cache.cache_lens.copy_(lens)
        eager = model(ids, kv_cache=sched.cache.view(0, n, sched.max_len))[:, -1, :]
        sched.cache.cache_lens.copy_(lens)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graphed = sched.graphs(ids).clone()
            model(ids, kv_cache=sched.cache.view(0, n, sched.max_len))  # the eager step
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(graphed.float(), eager.float(), atol=2e-2, rtol=2e-2)
    assert sched.cache.cache_lens.tolist() == (lens + 2 * step).tolist()


def test_cuda_graphs_need_cuda(model, tok):
    with pytest.raises(ValueError, match="cuda_graphs"):
        Scheduler(model, tok, batch_size=2, cuda_graphs=True)
    assert Scheduler(model, tok, batch_size=2).graphs is None  # off by default off CUDA
