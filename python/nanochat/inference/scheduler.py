"""The continuous-batching scheduler: many requests share one model replica and its preallocated KV cache; each
step is one forward over a token of every decoding row plus prefill chunks of admitted prompts.

Notable choices:
- Decoding rows are kept compacted at the front of the cache, so the decode step runs over a view of the first rows
  and reads no device value on the host: it compiles, and on CUDA it replays graphs captured per bucketed batch
  size (`DecodeGraphs`). A prompt is prefilled in a free row above them, a chunk per step (a long prompt never
  stalls the streams), then moves down; its other samples get copies of its row (one prefill per prompt).
- A finished row's KV goes to a `PrefixStore`; a new prompt that starts with held tokens prefills only the rest.
- Stops: <|assistant_end|> and <|bos|> (sampled), the token budget, stop strings (on the decoded text),
  cancellation (checked before every step). A sampled <|python_start|> … <|python_end|> is evaluated by
  `nanochat.tools.calculator.evaluate` and the result forced as <|output_start|> result <|output_end|> (mask 0).
- Failures are attributed to rows: whatever belongs to one row (its sampling parameters and sampling, its text
  decoding and stop strings, its tool call and the encoding of the tool output) ends that row alone with an "error"
  event naming the cause, and the batch goes on; a failed forward over prefill chunks is retried part by part, so
  a prompt the model fails on fails its own request; only a failure of the batch step itself (the decode forward)
  fails every request in flight, after which the replica starts clean (`serve_forever`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanochat.common import get_logger
from nanochat.inference.kv_cache import CacheView, KVCache, PackedBatch, PrefixStore, round_up
from nanochat.inference.sampling import SamplingParams, row_generator, sample_tokens
from nanochat.inference.text_stream import SPECIAL_TEXT, TextStream
from nanochat.tools.calculator import evaluate

TERMINAL_TOKENS = ("<|assistant_end|>", "<|bos|>")
MAX_TOOL_EXPRESSION_TOKENS = 512  # a longer python block is not evaluated (the model is rambling)


# ---------------------------------------------------------------------------------------------------------------
# Requests and events


@dataclass
class TokenEvent:
    """One generated token of one sample; `token` is None only on a final event without a token (cancelled)."""
    sample: int
    token: int | None
    mask: int  # 1 sampled, 0 forced by the tool
    text: str  # text delta safe to show now
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | None
    error: str | None = None  # with finish_reason "error": what failed, in words (never empty)


class GenerationRequest:
    """A prompt, its sampling parameters and `n` samples; events go to `on_event` (called in the worker thread)
    or, without a callback, into `self.events` (a thread-safe queue)."""

    def __init__(self, prompt: list[int], params: SamplingParams | None = None, n: int = 1,
                 on_event: Callable[[TokenEvent], None] | None = None):
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a non-empty list of token ids")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        self.prompt = list(prompt)
        self.params = params or SamplingParams()
        self.n = n
        self.on_event = on_event
        self.events: "collections.deque[TokenEvent]" = collections.deque()
        self.cancelled = False
        self.finished = threading.Event()
        self.unfinished_samples = n
        self.completion_tokens = 0
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.counted = False  # by the scheduler's requests_finished

    def cancel(self) -> None:
        """Ask the scheduler to drop this request; its rows are freed before the next decode step."""
        self.cancelled = True

    def _emit(self, event: TokenEvent) -> None:
        if event.token is not None:
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
        if event.finish_reason is not None:
            self.unfinished_samples -= 1
        if self.on_event is None:
            self.events.append(event)
        else:
            try:
                self.on_event(event)
            except Exception:  # a broken consumer must not take the batch down: drop the request instead
                get_logger().exception("event callback failed; cancelling the request")
                self.cancelled = True
        if self.unfinished_samples == 0:
            self.finished.set()


# ---------------------------------------------------------------------------------------------------------------
# Continuous-batching scheduler


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    sample: int
    generator: torch.Generator
    budget: int  # tokens this row may still emit in total
    cache_len: int  # valid positions in its cache row (mirrors cache.cache_lens, kept on the host)
    text: TextStream
    sampling: tuple[float, int, float]  # (temperature, top_k, top_p) as the sampler takes them (0 = off)
    last_token: int = -1  # emitted but not yet fed to the model
    generated: list = field(default_factory=list)  # every emitted token, sampled or forced
    forced: collections.deque = field(default_factory=collections.deque)
    in_python: bool = False
    python_tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    finished: bool = False


class _PackedForwardFailed(RuntimeError):
    """The model failed on a forward with prefill chunks, before any length or row changed."""


class _RowFailed(Exception):
    """One row's own part of a step failed (see `_row_stage`): that row ends with an error, the batch goes on."""


def _describe(e: BaseException) -> str:
    """An exception in words: its type, and its message when it has one."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


@contextlib.contextmanager
def _row_stage(what: str):
    """Attribute a failure inside to one row's `what` (e.g. "the tool call"): it becomes a _RowFailed naming both."""
    try:
        yield
    except _RowFailed:
        raise
    except Exception as e:
        raise _RowFailed(f"{what} failed: {_describe(e)}") from e


@dataclass(eq=False)
class _Prefill:
    """An admitted request whose prompt is being written into cache row `row`, a chunk per step."""
    request: GenerationRequest
    row: int
    done: int  # prompt tokens already in the row (reused from the prefix store, then prefilled)


POLICIES = ("chunked", "serial")
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # decode batch sizes with a CUDA graph


class DecodeGraphs:
    """The decode step (one token for each of the rows 0..n-1) replayed from CUDA graphs, one per bucketed batch
    size, captured on first use. A graph runs the model over rows 0..b-1 of the cache and all its positions, with
    static buffers for the ids and lengths; rows n..b-1 (idle or prefilling) compute a throw-away token whose k/v
    land just past their valid length, where the next write overwrites them, and their lengths are not advanced.
    Needs the model's forward free of host syncs (see kv_cache.py); all graphs share one memory pool.
    `_record` is the only CUDA-specific part (a test replaces it to check the rest on CPU)."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        self.buckets = sorted({b for b in GRAPH_BUCKETS if b < cache.batch_size} | {cache.batch_size})
        self.graphs: dict[int, tuple] = {}
        self.pool = None

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (n, 1) on the device -> logits (n, V) of rows 0..n-1, whose lengths advance by one."""
        n = ids.size(0)
        b = next(b for b in self.buckets if b >= n)
        dev = self.cache.k.device
        # capture and replay on the cache's GPU, not the calling thread's current one
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            if b not in self.graphs:
                self.graphs[b] = self._capture(b)
            replay, static_ids = self.graphs[b]
            static_ids[:n].copy_(ids)
            logits = replay()
        self.cache.cache_lens[:n] += 1
        return logits[:n]

    def _capture(self, b: int) -> tuple:
        static_ids = torch.zeros(b, 1, dtype=torch.long, device=self.cache.k.device)
        static_lens = self.cache.cache_lens[:b].clone()
        view = CacheView(self.cache.k[:, :b], self.cache.v[:, :b], static_lens, self.cache.tokens[:b])

        def step() -> torch.Tensor:  # the lengths are read inside the graph; the view advances only its copy
            static_lens.copy_(self.cache.cache_lens[:b])
            return self.model(static_ids, kv_cache=view)[:, -1, :]
        return self._record(step), static_ids

    def _record(self, step):
        """Capture `step` in a CUDA graph (after a warm-up off the capture: Triton compiles, the allocator
        settles); returns a function that replays it and returns its static output."""
        dev = self.cache.k.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay


class Scheduler:
    """Many requests share one model replica: admit waiting requests into free rows, and each step run one forward
    over the decoding rows plus prefill chunks of admitted prompts; retire finished rows. Thread-safe `submit`;
    `step` and `serve_forever` run in one worker thread.

    Cache rows: the decoding rows are rows 0..n-1 (compacted, so the decode step is a view over the first rows);
    a prompt being prefilled owns one free row above them and moves down (a row swap) when its prefill completes;
    its other samples get copies of that row then. `policy="serial"` is the old scheduling, kept for benchmarks:
    each admitted prompt is prefilled alone and whole, then the rows decode."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_len: int | None = None, tools: bool = True,
                 max_waiting: int | None = None, max_prefill_tokens: int = 4096, step_tokens: int = 256,
                 prefix_cache: PrefixStore | int | None = None, cuda_graphs: bool | None = None,
                 policy: str = "chunked"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        cfg = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = int(max_len or cfg.sequence_len)
        self.vocab_size = cfg.vocab_size
        # the model's vocabulary may be padded past the tokenizer's: those ids are never sampled
        self.sample_vocab = min(cfg.vocab_size, tokenizer.get_vocab_size())
        self.tools = tools
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens  # serial policy: prompt tokens admitted per step
        self.step_tokens = step_tokens  # chunked policy: tokens per forward, one per decoding row + prefill chunks
        self.policy = policy
        p = next(model.parameters())
        self.device = p.device
        cache_dtype = torch.bfloat16 if self.device.type == "cuda" else p.dtype
        self.cache = KVCache(batch_size, self.max_len, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, self.device,
                             cache_dtype)
        if isinstance(prefix_cache, int):
            prefix_cache = PrefixStore(prefix_cache) if prefix_cache > 0 else None
        self.prefix_store: PrefixStore | None = prefix_cache  # shared with an Engine's later schedulers
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a model on CUDA, got {self.device}")
        self.graphs = DecodeGraphs(model, self.cache) if cuda_graphs else None
        special = lambda name: tokenizer.encode_special(name)  # noqa: E731
        self.terminal = {special(name) for name in TERMINAL_TOKENS}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.special_text = {special(name): text for name, text in SPECIAL_TEXT.items()}
        for name in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"):
            self.special_text[special(name)] = ""  # structure tokens never show up as text
        self.rows: list[_Row] = []  # decoding: rows[i] lives in cache row i
        self.prefilling: list[_Prefill] = []  # admitted, prompt not complete yet (FIFO: chunks go to the oldest)
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.purged: list[GenerationRequest] = []  # cancelled while waiting, final events not yet sent
        self.cond = threading.Condition()
        # counters (read by the server's /metrics; written only by the worker thread)
        self.tokens_generated = 0
        self.decode_steps = 0
        self.prefill_tokens = 0
        self.requests_finished = 0

    # -- thread-safe front --------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_active_rows(self) -> int:
        """Cache rows holding a request: decoding, or being prefilled."""
        return len(self.rows) + len(self.prefilling)

    def submit(self, request: GenerationRequest) -> bool:
        """Queue a request; False (and nothing queued) when the waiting queue is full."""
        if request.n > self.batch_size:
            raise ValueError(f"n={request.n} samples exceed the batch size {self.batch_size}")
        if len(request.prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens leaves no room in a context of {self.max_len}")
        if max(request.prompt) >= self.vocab_size or min(request.prompt) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        with self.cond:
            if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
                self._purge_cancelled_waiting()
                if len(self.waiting) >= self.max_waiting:
                    return False
            self.waiting.append(request)
            self.cond.notify()
        return True

    def _purge_cancelled_waiting(self) -> None:
        """Drop cancelled requests still in the queue (caller holds self.cond); the worker sends their final
        events when it next admits, so here they only stop counting against the queue bound."""
        cancelled = [r for r in self.waiting if r.cancelled]
        if cancelled:
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
            self.purged.extend(cancelled)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def has_work(self) -> bool:
        return bool(self.rows or self.prefilling or self.waiting or self.purged)

    def serve_forever(self, stop: threading.Event, idle_wait_s: float = 0.5) -> None:
        """The worker loop: step while there is work, sleep on the condition otherwise."""
        while not stop.is_set():
            with self.cond:
                if not self.has_work():
                    self.cond.wait(idle_wait_s)
                    continue
            try:
                self.step()
            except Exception as e:  # the batch step failed: fail the requests in flight, not the worker
                get_logger().exception("decode step failed")
                self._fail_all(f"the batch step failed: {_describe(e)}")

    # -- one step -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> int:
        """Retire cancelled requests, admit waiting ones, run one forward (decoding rows + prefill chunks; under
        the serial policy, each new prompt alone and then the decode step). Returns the tokens emitted."""
        self._retire(cancelled_only=True)
        self._admit()
        if self.policy == "serial":
            emitted = 0
            for p in list(self.prefilling):
                emitted += self._forward_guarded([], [(p, len(p.request.prompt) - p.done)])
            self._retire()  # rows that finished on their first token are not decoded
            if self.rows:
                emitted += self._forward(self.rows, [])
        elif self.rows or self.prefilling:
            emitted = self._forward_guarded(self.rows, self._plan_chunks())
        else:
            emitted = 0
        self._retire()
        self.tokens_generated += emitted
        return emitted

    def _reserved_rows(self) -> int:
        return len(self.rows) + sum(p.request.n for p in self.prefilling)

    def _free_row(self, lo: int) -> int:
        """The lowest cache row >= lo that no request holds."""
        held = {p.row for p in self.prefilling}
        return next(r for r in range(lo, self.batch_size) if r not in held)

    def _admit(self) -> None:
        with self.cond:
            purged, self.purged = self.purged, []
        for req in purged:
            self._finish_cancelled(req)
        admitted_tokens = 0
        while True:
            with self.cond:
                if not self.waiting:
                    break
                req = self.waiting[0]
                if not req.cancelled:
                    if self._reserved_rows() + req.n > self.batch_size:
                        break
                    if self.policy == "serial" and admitted_tokens and \
                            admitted_tokens + len(req.prompt) > self.max_prefill_tokens:
                        break
                self.waiting.popleft()
            if req.cancelled:
                self._finish_cancelled(req)
                continue
            admitted_tokens += len(req.prompt)
            p = _Prefill(req, self._free_row(len(self.rows)), 0)
            if self.prefix_store is not None:
                key, reuse = self.prefix_store.lookup(req.prompt)
                if key is not None:
                    self.prefix_store.load(key, reuse, self.cache, p.row)
                    p.done = reuse
            self.prefilling.append(p)

    def _plan_chunks(self) -> list[tuple[_Prefill, int]]:
        """Prefill chunks for this step, oldest prompt first, within the tokens the decoding rows leave."""
        budget = max(1, self.step_tokens - len(self.rows))
        chunks = []
        for p in self.prefilling:
            if budget <= 0:
                break
            take = min(budget, len(p.request.prompt) - p.done)
            chunks.append((p, take))
            budget -= take
        return chunks

    def _forward_guarded(self, rows: list[_Row], chunks: list[tuple[_Prefill, int]]) -> int:
        """`_forward`, and when the model fails on a forward with prefill chunks (e.g. out of memory on a long
        prompt), the parts again one by one: the chunk that fails fails its own request only. The failed forward
        changed no length (lengths advance after the last layer; k/v written past them are never read), so the
        retry sees the same state. Any other failure propagates (serve_forever fails every request in flight)."""
        try:
            return self._forward(rows, chunks)
        except _PackedForwardFailed as e:
            get_logger().exception("a forward with prefill chunks failed")
            if len(chunks) == 1 and not rows:
                self._fail_prefill(chunks[0][0], str(e))
                return 0
        emitted = 0
        for p, take in chunks:
            try:
                emitted += self._forward([], [(p, take)])
            except _PackedForwardFailed as e:
                get_logger().exception("prefill failed; failing the request")
                self._fail_prefill(p, str(e))
        if rows:
            self._retire()  # a row started above may have ended on its first token (or failed)
            if self.rows:
                emitted += self._forward(self.rows, [])
        return emitted

    def _fail_prefill(self, p: _Prefill, cause: str) -> None:
        self.prefilling.remove(p)
        self.cache.reset([p.row])
        for s in range(p.request.n):
            p.request._emit(TokenEvent(s, None, 0, "", "error", error=cause))
        self._count_finished(p.request)

    def _forward(self, rows: list[_Row], chunks: list[tuple[_Prefill, int]]) -> int:
        """One forward: a token for each of `rows` (the decoding rows 0..n-1, or none) and the prefill chunks.
        Samples the next token of every row and the first tokens of each prompt the step completes."""
        rows = list(rows)
        n = len(rows)
        last = [r.last_token for r in rows]
        if not chunks:
            ids = torch.tensor(last, dtype=torch.long, device=self.device).view(n, 1)
            logits = self._decode_logits(rows, ids)  # (n, V)
            finishing = []
        else:
            decode_lens = [r.cache_len for r in rows]
            length = min(self.max_len, round_up(max(decode_lens, default=0) + 1))
            outputs, finishing, tokens, at = list(range(n)), [], list(last), n
            for p, take in chunks:
                tokens += p.request.prompt[p.done:p.done + take]
                at += take
                if p.done + take == len(p.request.prompt):
                    outputs.append(at - 1)
                    finishing.append(p)
            batch = PackedBatch(self.cache, n, decode_lens, length,
                                [(p.row, p.done, take) for p, take in chunks], outputs)
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(1, -1)
            try:
                logits = self.model(ids, kv_cache=batch)[0]  # (n + len(finishing), V)
            except Exception as e:  # nothing changed yet: the parts can be retried one by one
                raise _PackedForwardFailed(f"the forward over its prompt failed: {_describe(e)}") from e
            for p, take in chunks:
                p.done += take
                self.prefill_tokens += take
        if rows:
            self.decode_steps += 1
        for r in rows:
            r.cache_len += 1
        started: list[tuple[_Row, int]] = []  # new rows and the logits row of their first token
        for j, p in enumerate(finishing):
            self.prefilling.remove(p)
            started += [(r, n + j) for r in self._start_rows(p)]
        free = [i for i, r in enumerate(rows) if not r.forced]
        to_sample = [rows[i] for i in free] + [r for r, _ in started]
        picks = free + [i for _, i in started]
        sampled = self._sample(to_sample, logits[picks]) if to_sample else []
        chosen = dict(zip(picks[:len(free)], sampled))
        for i, r in enumerate(rows):
            if i in chosen:
                self._accept_row(r, chosen[i], 1)
            else:
                self._accept_row(r, r.forced.popleft(), 0)
        for (r, _), tok in zip(started, sampled[len(free):]):
            self._accept_row(r, tok, 1)
        return n + len(started)

    def _decode_logits(self, rows: list[_Row], ids: torch.Tensor) -> torch.Tensor:
        """The decode step: rows 0..n-1 take one token each. No host sync: the view length comes from the host's
        lengths, every device value stays on the device (CUDA graphs replay it)."""
        n = len(rows)
        if self.graphs is not None:
            return self.graphs(ids)
        length = min(self.max_len, round_up(max(r.cache_len for r in rows) + 1))
        return self.model(ids, kv_cache=self.cache.view(0, n, length))[:, -1, :]

    def _start_rows(self, p: _Prefill) -> list[_Row]:
        """A prompt is in: move its row down to the decoding rows (row d = len(self.rows)), give its other samples
        copies, and make their _Rows. A prefilling request in the way moves to a free row; the admission count
        (rows reserved for every sample) guarantees one. When the request's own settings fail (its sampling
        parameters, seed or stop strings), its samples end with an error instead and its row is freed."""
        req, P, d = p.request, len(p.request.prompt), len(self.rows)
        try:
            with _row_stage("checking the sampling parameters"):
                # checked again (SamplingParams checks them when built, but they are plain attributes): a bad
                # value fails this request here, not the batched sampler of every row later
                params = dataclasses.replace(req.params)
                sampling = (float(params.temperature), int(params.top_k or 0),
                            1.0 if params.top_p is None else float(params.top_p))
                seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
                generators = [row_generator(seed, s, self.device) for s in range(req.n)]
            with _row_stage("setting up the stop strings"):
                texts = [TextStream(self.tokenizer, params.stop, self.special_text) for _ in range(req.n)]
        except _RowFailed as e:
            get_logger().warning("request failed at its start: %s", e)
            self.cache.reset([p.row])
            for s in range(req.n):
                req._emit(TokenEvent(s, None, 0, "", "error", error=str(e)))
            self._count_finished(req)
            return []
        holder = {q.row: q for q in self.prefilling}
        if p.row != d:
            q = holder.pop(d, None)
            if q is None:
                self.cache.copy_row(self.cache, p.row, d, P)
                self.cache.reset([p.row])
            else:
                self.cache.swap_rows(p.row, d, max(P, q.done))
                q.row = p.row
                holder[q.row] = q
            p.row = d
        for s in range(1, req.n):
            q = holder.pop(d + s, None)
            if q is not None:
                free = next(r for r in range(d + req.n, self.batch_size) if r not in holder)
                self.cache.copy_row(self.cache, q.row, free, q.done)
                q.row = free
                holder[free] = q
            self.cache.copy_row(self.cache, d, d + s, P)
        budget = min(params.max_tokens, self.max_len - P)
        new_rows = [_Row(req, s, generators[s], budget, P, texts[s], sampling) for s in range(req.n)]
        self.rows.extend(new_rows)
        return new_rows

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int | None]:
        """The next token of each row, all rows sampled at once. When that fails, each row is sampled alone with
        the uniform it already drew (the sampler treats rows independently): a row whose sampling fails alone ends
        with an error (None here), the others get the tokens the batch would have given them."""
        logits = logits[:, :self.sample_vocab]
        if not any(r.sampling[0] > 0 for r in rows):  # all greedy: no random draws, no parameter tensors
            return logits.argmax(dim=-1).tolist()
        dev = logits.device
        u = [torch.rand(1, generator=r.generator, device=dev) if r.sampling[0] > 0 else torch.zeros(1, device=dev)
             for r in rows]
        try:
            return self._sample_rows(logits, [r.sampling for r in rows], u)
        except Exception:
            get_logger().exception("batched sampling failed; sampling each row alone")
        out: list[int | None] = []
        for i, r in enumerate(rows):
            try:
                out += self._sample_rows(logits[i:i + 1], [r.sampling], u[i:i + 1])
            except Exception as e:
                self._fail_row(r, f"sampling failed: {_describe(e)}")
                out.append(None)
        return out

    @staticmethod
    def _sample_rows(logits: torch.Tensor, sampling: list[tuple[float, int, float]],
                     u: list[torch.Tensor]) -> list[int]:
        dev = logits.device
        temps, top_k, top_p = zip(*sampling)
        out = sample_tokens(logits, torch.tensor(temps, device=dev), torch.tensor(top_k, device=dev),
                            torch.tensor(top_p, device=dev), torch.cat(u))
        return out.tolist()

    def _accept_row(self, row: _Row, token: int | None, mask: int) -> None:
        """`_accept`, and when the row's own part fails (its text, its stop strings, its tool call), that row
        alone ends with an error event naming the cause. A row whose sampling failed (token None) has ended."""
        if token is None:
            return
        try:
            self._accept(row, token, mask)
        except Exception as e:
            get_logger().warning("a row failed; the batch goes on", exc_info=True)
            self._fail_row(row, str(e) if isinstance(e, _RowFailed) else f"its step failed: {_describe(e)}")

    def _fail_row(self, row: _Row, cause: str) -> None:
        """End one row with an error event (unless it has ended already); `_retire` frees its cache row."""
        if row.finished:
            return
        row.finished, row.finish_reason = True, "error"
        row.forced.clear()
        row.request._emit(TokenEvent(row.sample, None, 0, "", "error", error=cause))

    def _accept(self, row: _Row, token: int, mask: int) -> None:
        """Record one emitted token of a row: stops, the tool state machine, the event. A failure of the row's own
        part raises _RowFailed naming it, before the row has ended or sent an event for the token."""
        row.last_token = token
        row.generated.append(token)
        with _row_stage("decoding the text (and matching the stop strings)"):
            text, hit_stop = row.text.push(token)
        finish = None
        if mask == 1 and token in self.terminal:
            finish = "stop"
        elif hit_stop:
            finish = "stop"
        elif len(row.generated) >= row.budget:
            finish = "length"
        elif self.tools:
            self._tool_step(row, token, mask)
        if finish is not None:
            with _row_stage("decoding the text"):
                text += row.text.flush()
            row.finished, row.finish_reason = True, finish
        row.request._emit(TokenEvent(row.sample, token, mask, text, finish))

    def _tool_step(self, row: _Row, token: int, mask: int) -> None:
        if mask == 1 and token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif row.in_python and token == self.python_end:
            row.in_python = False
            if len(row.python_tokens) <= MAX_TOOL_EXPRESSION_TOKENS:
                with _row_stage("the tool call"):
                    result = evaluate(self.tokenizer.decode(row.python_tokens))
                with _row_stage("encoding the tool output"):
                    output = self.tokenizer.encode(result)
                row.forced.extend([self.output_start, *output, self.output_end])
        elif row.in_python:
            row.python_tokens.append(token)

    def _retire(self, cancelled_only: bool = False) -> None:
        """Drop cancelled prefills (their rows free at once) and finished (or only cancelled) rows, moving the
        last decoding row into each hole. A row that finished normally leaves its KV in the prefix store first
        (sample 0 only: the one a chat client continues); a cancelled or failed one never does."""
        # a row's cache is reset before the row is dropped: another thread that sees no rows sees empty lengths
        for p in [p for p in self.prefilling if p.request.cancelled]:
            self.cache.reset([p.row])
            self.prefilling.remove(p)
            self._finish_cancelled(p.request)
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if row.request.cancelled and not row.finished:
                row.finished = True
                row.request._emit(TokenEvent(row.sample, None, 0, "", "cancelled"))
            if not row.finished or (cancelled_only and not row.request.cancelled):
                i += 1
                continue
            if self.prefix_store is not None and row.sample == 0 and row.finish_reason in ("stop", "length"):
                fed = row.request.prompt + row.generated[:-1]  # the last token was never fed to the model
                self.prefix_store.insert(fed[:row.cache_len], self.cache, i)
            last = len(self.rows) - 1
            if i != last:
                self.cache.copy_row(self.cache, last, i, self.rows[last].cache_len)
                self.rows[i] = self.rows[last]
            self.cache.reset([last])
            self.rows.pop()
            self._count_finished(row.request)

    def _finish_cancelled(self, req: GenerationRequest) -> None:
        for s in range(req.n):
            req._emit(TokenEvent(s, None, 0, "", "cancelled"))
        self._count_finished(req)

    def _count_finished(self, req: GenerationRequest) -> None:
        if req.finished.is_set() and not req.counted:
            req.counted = True
            self.requests_finished += 1

    def _fail_all(self, message: str) -> None:
        for row in self.rows:
            if not row.finished:
                row.finished = True
                row.request._emit(TokenEvent(row.sample, None, 0, "", "error", error=message))
            self._count_finished(row.request)
        for p in self.prefilling:
            for s in range(p.request.n):
                p.request._emit(TokenEvent(s, None, 0, "", "error", error=message))
            self._count_finished(p.request)
        self.rows.clear()
        self.prefilling.clear()
        self.cache.reset()
        get_logger().error("failed all active requests: %s", message)

