"""The continuous-batching scheduler: many requests share one model replica and its preallocated KV cache; each
step is one forward over a token of every decoding row plus prefill chunks of admitted prompts.

Contracts, and why:
- Every request gets the tokens it would get alone: rows are independent in the forward (a packed step attends
  within each row only) and in sampling (each sample draws from its own generator), so batching, chunking and
  row moves never change a reply. The tests compare against a request run by itself.
- The decode step reads no device value on the host: decoding rows are compacted at the front of the cache (see
  rows.py), so it is a view over the first rows, which compiles and on CUDA replays as a graph (`DecodeGraphs`).
- A long prompt never stalls the streams: it is prefilled a chunk per step within `step_tokens`, next to the
  decoding rows. A prompt's other samples get copies of its row: one prefill per prompt.
- A finished reply's KV goes to a `PrefixStore`, so a chat that resends its history prefills only the new turn.
- Failures are attributed to rows: whatever belongs to one row (its sampling parameters and sampling, its text
  and stop strings, its tool call) ends that row alone with an "error" event whose `error` names the stage and
  the exception ("the tool call failed: RuntimeError: ..."), and the batch goes on. A failed forward over prefill
  chunks is retried part by part, so a prompt the model fails on fails its own request. Only a failure of the
  batch step itself (the decode forward) fails every request in flight (`run_step`), and the scheduler starts
  clean: a server replica keeps serving.
- Threads: `submit` and `GenerationRequest.cancel` may be called from any thread; `step`, `run_step`, `release`
  and `serve_forever` run in one worker thread.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from nanochat.common import get_logger
from nanochat.inference.kv_cache import CacheView, KVCache, PackedBatch, PrefixStore, round_up
from nanochat.inference.rows import Prefill, RowFailed, RowTable, describe, row_stage
from nanochat.inference.sampling import SamplingParams, row_generator, sample_tokens
from nanochat.inference.text_stream import SPECIAL_TEXT, TextStream
from nanochat.inference.tool_calls import ToolCalls, ToolTokens

TERMINAL_TOKENS = ("<|assistant_end|>", "<|bos|>")


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
# Decoding rows


@dataclass(eq=False)
class _Row:
    """One sample being decoded; the row table keeps it in cache row `rows.index(self)`."""
    request: GenerationRequest
    sample: int
    generator: torch.Generator
    budget: int  # tokens this row may still emit in total
    cache_len: int  # valid positions in its cache row (mirrors cache.cache_lens, kept on the host)
    text: TextStream
    sampling: tuple[float, int, float]  # (temperature, top_k, top_p) as the sampler takes them (0 = off)
    tool: ToolCalls | None  # None when the scheduler runs without tools
    last_token: int = -1  # emitted but not yet fed to the model
    generated: list = dataclasses.field(default_factory=list)  # every emitted token, sampled or forced
    finish_reason: str | None = None
    finished: bool = False

    @property
    def forced(self) -> bool:
        """The row's next token is forced (tool output), not sampled."""
        return self.tool is not None and bool(self.tool.forced)


class _PackedForwardFailed(RuntimeError):
    """The model failed on a forward with prefill chunks, before any length or row changed."""


# ---------------------------------------------------------------------------------------------------------------
# The step plan


@dataclass
class _Chunk:
    prefill: Prefill
    start: int  # the first prompt position fed (prefill.done when planned)
    take: int  # prompt tokens fed this step
    position: int  # index of its last token in the packed step's tokens
    logits_row: int | None  # the logits row of the prompt's last token when this chunk completes it, else None


@dataclass
class StepPlan:
    """One forward, built by `StepPlan.build` and consumed by `Scheduler._forward`: what each part feeds and which
    logits row answers it. Decoding row i (cache row i) feeds its last token and is answered by logits row i; a
    prefill chunk feeds `take` prompt tokens into its cache row, and a chunk that completes its prompt is answered
    by `logits_row`, from which every sample of that request draws its first token."""
    rows: list[_Row]
    chunks: list[_Chunk]

    @classmethod
    def build(cls, rows: list[_Row], chunks: list[tuple[Prefill, int]]) -> StepPlan:
        """`chunks`: (prefill, prompt tokens to feed), in packing order."""
        planned, position, logits_row = [], len(rows), len(rows)
        for p, take in chunks:
            position += take
            completes = p.done + take == len(p.request.prompt)
            planned.append(_Chunk(p, p.done, take, position - 1, logits_row if completes else None))
            logits_row += completes
        return cls(list(rows), planned)

    @property
    def completing(self) -> list[_Chunk]:
        return [c for c in self.chunks if c.logits_row is not None]

    def tokens(self) -> list[int]:
        """The packed step's input ids: each decoding row's last token, then each chunk's prompt slice."""
        out = [r.last_token for r in self.rows]
        for c in self.chunks:
            out += c.prefill.request.prompt[c.start:c.start + c.take]
        return out

    def outputs(self) -> list[int]:
        """The positions whose logits the step needs, in logits-row order."""
        return list(range(len(self.rows))) + [c.position for c in self.completing]

    def packed_chunks(self) -> list[tuple[int, int, int]]:
        """(cache row, start position, length) of each chunk, as PackedBatch takes them."""
        return [(c.prefill.row, c.start, c.take) for c in self.chunks]


# ---------------------------------------------------------------------------------------------------------------
# The decode step from CUDA graphs


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


# ---------------------------------------------------------------------------------------------------------------
# The continuous-batching scheduler


class Scheduler:
    """Many requests share one model replica: admit waiting requests into free rows, and each step run one forward
    over the decoding rows plus prefill chunks of admitted prompts; retire finished rows. Thread-safe `submit`;
    `step` (or `run_step`), `release` and `serve_forever` run in one worker thread. Which request holds which cache
    row is the row table's (`self.table`, rows.py)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_len: int | None = None, tools: bool = True,
                 max_waiting: int | None = None, step_tokens: int = 256,
                 prefix_cache: PrefixStore | int | None = None, cuda_graphs: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
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
        self.step_tokens = step_tokens  # tokens per forward: one per decoding row, the rest prefill chunks
        p = next(model.parameters())
        self.device = p.device
        cache_dtype = torch.bfloat16 if self.device.type == "cuda" else p.dtype
        self.cache = KVCache(batch_size, self.max_len, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, self.device,
                             cache_dtype)
        self.table = RowTable(self.cache)
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
        self.tool_tokens = ToolTokens.of(tokenizer)
        self.special_text = {special(name): text for name, text in SPECIAL_TEXT.items()}
        for name in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"):
            self.special_text[special(name)] = ""  # structure tokens never show up as text
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.purged: list[GenerationRequest] = []  # cancelled while waiting, final events not yet sent
        self.cond = threading.Condition()
        # counters (read by the server's /metrics; written only by the worker thread)
        self.tokens_generated = 0
        self.decode_steps = 0
        self.prefill_tokens = 0
        self.requests_finished = 0

    @property
    def rows(self) -> list[_Row]:
        """The decoding rows: rows[i] lives in cache row i."""
        return self.table.decoding

    @property
    def prefilling(self) -> list[Prefill]:
        """Admitted requests whose prompt is not complete yet, oldest first."""
        return self.table.prefilling

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
            self.run_step()

    # -- the worker's side --------------------------------------------------------------------------------------

    def run_step(self) -> int:
        """`step`, and when the batch step itself fails, every request in flight ends with an error event naming
        the cause and the scheduler starts clean, so the caller's loop goes on. Returns the tokens emitted."""
        try:
            return self.step()
        except Exception as e:
            get_logger().exception("decode step failed")
            self._fail_all(f"the batch step failed: {describe(e)}")
            return 0

    def release(self, request: GenerationRequest) -> None:
        """End `request` now, wherever it is (waiting, prefilling, decoding, or already finished: then nothing
        happens): its unfinished samples get "cancelled" events and its rows are freed, without a forward (so it
        is safe after a step that raised). Other cancelled requests are dropped along with it."""
        request.cancel()
        with self.cond:
            queued = request in self.waiting or request in self.purged
            if queued:
                self.waiting = collections.deque(r for r in self.waiting if r is not request)
                self.purged = [r for r in self.purged if r is not request]
        if queued:
            self._finish_cancelled(request)
        self._retire(cancelled_only=True)

    @torch.no_grad()
    def step(self) -> int:
        """Retire cancelled requests, admit waiting ones, run one forward (decoding rows + prefill chunks), retire
        finished rows. Returns the tokens emitted; raises when the batch step itself fails (see `run_step`)."""
        self._retire(cancelled_only=True)
        self._admit()
        emitted = self._forward_guarded(self.rows, self._plan_chunks()) if self.rows or self.prefilling else 0
        self._retire()
        self.tokens_generated += emitted
        return emitted

    def _admit(self) -> None:
        with self.cond:
            purged, self.purged = self.purged, []
        for req in purged:
            self._finish_cancelled(req)
        while True:
            with self.cond:
                if not self.waiting:
                    break
                req = self.waiting[0]
                if not req.cancelled and not self.table.can_admit(req.n):
                    break
                self.waiting.popleft()
            if req.cancelled:
                self._finish_cancelled(req)
                continue
            p = self.table.admit(req)
            if self.prefix_store is not None:
                key, reuse = self.prefix_store.lookup(req.prompt)
                if key is not None:
                    self.prefix_store.load(key, reuse, self.cache, p.row)
                    p.done = reuse

    def _plan_chunks(self) -> list[tuple[Prefill, int]]:
        """Prefill chunks for this step, oldest prompt first, within the tokens the decoding rows leave."""
        budget = max(1, self.step_tokens - len(self.rows))
        chunks = []
        for p in self.prefilling:
            if budget <= 0:
                break
            take = min(budget, p.remaining)
            chunks.append((p, take))
            budget -= take
        return chunks

    def _forward_guarded(self, rows: list[_Row], chunks: list[tuple[Prefill, int]]) -> int:
        """`_forward`, and when the model fails on a forward with prefill chunks (e.g. out of memory on a long
        prompt), the parts again one by one: the chunk that fails fails its own request only. The failed forward
        changed no length (lengths advance after the last layer; k/v written past them are never read), so the
        retry sees the same state. Any other failure propagates (`run_step` fails every request in flight)."""
        try:
            return self._forward(StepPlan.build(rows, chunks))
        except _PackedForwardFailed as e:
            get_logger().exception("a forward with prefill chunks failed")
            if len(chunks) == 1 and not rows:
                self._fail_prefill(chunks[0][0], str(e))
                return 0
        emitted = 0
        for p, take in chunks:
            try:
                emitted += self._forward(StepPlan.build([], [(p, take)]))
            except _PackedForwardFailed as e:
                get_logger().exception("prefill failed; failing the request")
                self._fail_prefill(p, str(e))
        if rows:
            self._retire()  # a row started above may have ended on its first token (or failed)
            if self.rows:
                emitted += self._forward(StepPlan.build(self.rows, []))
        return emitted

    def _fail_prefill(self, p: Prefill, cause: str) -> None:
        self.table.drop(p)
        for s in range(p.request.n):
            p.request._emit(TokenEvent(s, None, 0, "", "error", error=cause))
        self._count_finished(p.request)

    def _forward(self, plan: StepPlan) -> int:
        """Run one planned forward and emit what it answers: the next token of every decoding row (sampled, or
        the tool's forced one) and the first token of every sample of each prompt the step completes. Returns
        the tokens emitted."""
        rows, n = plan.rows, len(plan.rows)
        if not plan.chunks:
            ids = torch.tensor([r.last_token for r in rows], dtype=torch.long, device=self.device).view(n, 1)
            logits = self._decode_logits(rows, ids)  # (n, V)
        else:
            decode_lens = [r.cache_len for r in rows]
            length = min(self.max_len, round_up(max(decode_lens, default=0) + 1))
            batch = PackedBatch(self.cache, n, decode_lens, length, plan.packed_chunks(), plan.outputs())
            ids = torch.tensor(plan.tokens(), dtype=torch.long, device=self.device).view(1, -1)
            try:
                logits = self.model(ids, kv_cache=batch)[0]  # (n + completing prompts, V)
            except Exception as e:  # nothing changed yet: the parts can be retried one by one
                raise _PackedForwardFailed(f"the forward over its prompt failed: {describe(e)}") from e
            for c in plan.chunks:
                c.prefill.done += c.take
                self.prefill_tokens += c.take
        if rows:
            self.decode_steps += 1
        for r in rows:
            r.cache_len += 1
        started = [(r, c.logits_row) for c in plan.completing for r in self._start_rows(c.prefill)]
        picks = [(r, i) for i, r in enumerate(rows) if not r.forced] + started  # (row, its logits row)
        sampled = self._sample([r for r, _ in picks], logits[[i for _, i in picks]]) if picks else []
        token_of = dict(zip([r for r, _ in picks], sampled))
        for r in rows:
            if r in token_of:
                self._accept_row(r, token_of[r], 1)
            else:
                self._accept_row(r, r.tool.forced.popleft(), 0)
        for r, _ in started:
            self._accept_row(r, token_of[r], 1)
        return n + len(started)

    def _decode_logits(self, rows: list[_Row], ids: torch.Tensor) -> torch.Tensor:
        """The decode step: rows 0..n-1 take one token each. No host sync: the view length comes from the host's
        lengths, every device value stays on the device (CUDA graphs replay it)."""
        n = len(rows)
        if self.graphs is not None:
            return self.graphs(ids)
        length = min(self.max_len, round_up(max(r.cache_len for r in rows) + 1))
        return self.model(ids, kv_cache=self.cache.view(0, n, length))[:, -1, :]

    def _start_rows(self, p: Prefill) -> list[_Row]:
        """A prompt is in: make a _Row per sample and promote them to decoding rows (the row table moves the
        KV). When the request's own settings fail (its sampling parameters, seed or stop strings), its samples
        end with an error instead and its row is freed."""
        req = p.request
        try:
            with row_stage("checking the sampling parameters"):
                # checked again (SamplingParams checks them when built, but they are plain attributes): a bad
                # value fails this request here, not the batched sampler of every row later
                params = dataclasses.replace(req.params)
                sampling = (float(params.temperature), int(params.top_k or 0),
                            1.0 if params.top_p is None else float(params.top_p))
                seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
                generators = [row_generator(seed, s, self.device) for s in range(req.n)]
            with row_stage("setting up the stop strings"):
                texts = [TextStream(self.tokenizer, params.stop, self.special_text) for _ in range(req.n)]
        except RowFailed as e:
            get_logger().warning("request failed at its start: %s", e)
            self._fail_prefill(p, str(e))
            return []
        P = len(req.prompt)
        budget = min(params.max_tokens, self.max_len - P)
        new_rows = [_Row(req, s, generators[s], budget, P, texts[s], sampling,
                         ToolCalls(self.tokenizer, self.tool_tokens) if self.tools else None)
                    for s in range(req.n)]
        self.table.promote(p, new_rows)
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
                self._fail_row(r, f"sampling failed: {describe(e)}")
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
            self._fail_row(row, str(e) if isinstance(e, RowFailed) else f"its step failed: {describe(e)}")

    def _fail_row(self, row: _Row, cause: str) -> None:
        """End one row with an error event (unless it has ended already); `_retire` frees its cache row."""
        if row.finished:
            return
        row.finished, row.finish_reason = True, "error"
        if row.tool is not None:
            row.tool.forced.clear()
        row.request._emit(TokenEvent(row.sample, None, 0, "", "error", error=cause))

    def _accept(self, row: _Row, token: int, mask: int) -> None:
        """Record one emitted token of a row: stops, the tool state machine, the event. A failure of the row's own
        part raises RowFailed naming it, before the row has ended or sent an event for the token."""
        row.last_token = token
        row.generated.append(token)
        with row_stage("decoding the text (and matching the stop strings)"):
            text, hit_stop = row.text.push(token)
        finish = None
        if mask == 1 and token in self.terminal:
            finish = "stop"
        elif hit_stop:
            finish = "stop"
        elif len(row.generated) >= row.budget:
            finish = "length"
        elif row.tool is not None:
            row.tool.push(token, mask)
        if finish is not None:
            with row_stage("decoding the text"):
                text += row.text.flush()
            row.finished, row.finish_reason = True, finish
        row.request._emit(TokenEvent(row.sample, token, mask, text, finish))

    def _retire(self, cancelled_only: bool = False) -> None:
        """Drop cancelled prefills (their rows free at once) and finished (or only cancelled) rows; the row table
        keeps the rest compacted. A row that finished normally leaves its KV in the prefix store first (sample 0
        only: the one a chat client continues); a cancelled or failed one never does."""
        for p in [p for p in self.prefilling if p.request.cancelled]:
            self.table.drop(p)
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
            self.table.retire(i)  # the last row moves into i: look at i again
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
        self.table.clear()
        get_logger().error("failed all active requests: %s", message)
