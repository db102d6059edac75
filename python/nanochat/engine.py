"""Inference engine: token ids in, token ids out, over a preallocated KV cache with continuous batching.

Notable choices:
- One `Scheduler` owns a `KVCache` of `batch_size` rows. Active rows are kept *compacted* at the front of the
  cache (row i of the batch is cache row i); a decode step runs the model over a view of the first n rows and of
  the first T positions (T = longest active row rounded up to 64), so idle rows cost nothing and are never written.
  A finished row is replaced by the last active row (one `copy_row`), and its length reset.
- Admission between decode steps: a waiting request is prefilled alone (batch 1, straight into its cache row), its
  extra samples get a copy of that row (prefill once per prompt), and its first tokens are sampled from the prefill
  logits, so the time to first token is one prefill.
- Sampling per row: temperature (0 = greedy), top-k, then top-p on the top-k distribution, and a `torch.Generator`
  per row seeded from (seed, sample index): a request's output depends only on its own seed, never on which other
  requests share the batch. Inverse-CDF sampling from one uniform per row keeps the batch vectorised.
- Stops: <|assistant_end|> and <|bos|> (sampled), the token budget (max_tokens, or the cache end), stop strings
  (checked on the decoded text), cancellation (checked before every step: a cancelled row is freed within one step).
- The python tool: a sampled <|python_start|> … <|python_end|> is evaluated by `nanochat.tools.evaluate` and the
  result is forced as <|output_start|> result <|output_end|> (mask 0 = forced, 1 = sampled).
- `TextStream` turns tokens into text deltas: it holds back incomplete UTF-8 and any tail that may start a stop
  string, and renders the tool tokens as Markdown code fences.
- `Engine.generate` / `generate_batch` are the synchronous front door (a private scheduler sized to the request);
  the server runs `Scheduler.serve_forever` in a worker thread and feeds it requests.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from nanochat.common import get_logger
from nanochat.kv_cache import KVCache
from nanochat.tools import evaluate

TERMINAL_TOKENS = ("<|assistant_end|>", "<|bos|>")
# How tool tokens read in text output (the CLI, the server, the web UI): Markdown code fences.
SPECIAL_TEXT = {
    "<|python_start|>": "\n```python\n", "<|python_end|>": "\n```\n",
    "<|output_start|>": "```output\n", "<|output_end|>": "\n```\n",
}
MAX_TOOL_EXPRESSION_TOKENS = 512  # a longer python block is not evaluated (the model is rambling)
VIEW_ALIGN = 64  # the attention view over the cache covers the longest row rounded up to this many positions


# ---------------------------------------------------------------------------------------------------------------
# Requests and events


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1.0: off; 0 keeps only the most likely token
    seed: int | None = None  # None: a random seed
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be None or a number in [0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be None or an int, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")


@dataclass
class TokenEvent:
    """One generated token of one sample; `token` is None only on a final event without a token (cancelled)."""
    sample: int
    token: int | None
    mask: int  # 1 sampled, 0 forced by the tool
    text: str  # text delta safe to show now
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | None


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
# Text streaming


class TextStream:
    """Token ids -> text deltas: holds back incomplete UTF-8 and any tail that could begin a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), special_text: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.special_text = special_text or {}
        self.pending_ids: list[int] = []
        self.held = ""  # decoded text not yet released
        self.stopped = False

    def _decode_pending(self, force: bool) -> str:
        if not self.pending_ids:
            return ""
        text = self.tokenizer.decode(self.pending_ids)
        if text.endswith("\ufffd") and not force and len(self.pending_ids) < 4:
            return ""  # an incomplete multi-byte character: wait for the next token
        self.pending_ids = []
        return text

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text to show now, whether a stop string was hit). After a stop, returns ("", True)."""
        if self.stopped:
            return "", True
        if token in self.special_text:
            new = self._decode_pending(force=True) + self.special_text[token]
        else:
            self.pending_ids.append(token)
            new = self._decode_pending(force=False)
        return self._release(self.held + new)

    def _release(self, text: str) -> tuple[str, bool]:
        if not self.stop:
            self.held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.held = ""
            return text[:min(hits)], True
        keep = 0  # longest suffix of text that is a proper prefix of some stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """At the end of generation: everything still held (a partial stop string is plain text after all)."""
        if self.stopped:
            return ""
        text = self.held + self._decode_pending(force=True)
        self.held = ""
        return text


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor) -> torch.Tensor:
    """One id per row of logits (B, V). Per-row temperature (B,) (0 = argmax), top_k (B,) long (0 = off),
    top_p (B,) (1 = off) applied after top-k, and uniform (B,) in [0, 1) drawn by each row's generator."""
    B, V = logits.shape
    greedy = logits.argmax(dim=-1)
    if not bool((temperature > 0).any()):
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-5).unsqueeze(1)
    use_p, use_k = bool((top_p < 1.0).any()), bool((top_k > 0).any())
    if use_p or use_k:
        k_max = V if use_p else min(V, int(top_k.max()))
        values, indices = torch.topk(scaled, k_max, dim=-1)  # (B, K) sorted descending
        pos = torch.arange(k_max, device=logits.device).unsqueeze(0)
        values = values.masked_fill((top_k.unsqueeze(1) > 0) & (pos >= top_k.unsqueeze(1)), float("-inf"))
        probs = F.softmax(values, dim=-1)
        if use_p:  # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            mass_before = probs.cumsum(dim=-1) - probs
            probs = probs.masked_fill((mass_before >= top_p.unsqueeze(1)) & (pos > 0), 0.0)
    else:
        indices = None
        probs = F.softmax(scaled, dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = uniform.to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.size(1) - 1)  # (B, 1)
    sampled = choice.squeeze(1) if indices is None else indices.gather(1, choice).squeeze(1)
    return torch.where(temperature > 0, sampled, greedy)


def row_generator(seed: int, sample: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + sample * 7919) % (2 ** 63))
    return g


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
    last_token: int = -1  # emitted but not yet fed to the model
    num_generated: int = 0
    forced: collections.deque = field(default_factory=collections.deque)
    in_python: bool = False
    python_tokens: list = field(default_factory=list)
    finished: bool = False


class Scheduler:
    """Many requests share one model replica: admit waiting requests into free rows between decode steps, decode
    all active rows together, retire finished ones. Thread-safe `submit`; `step` and `serve_forever` run in one
    worker thread."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_len: int | None = None, tools: bool = True,
                 max_waiting: int | None = None, max_prefill_tokens: int = 4096):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
        self.max_prefill_tokens = max_prefill_tokens
        p = next(model.parameters())
        self.device = p.device
        cache_dtype = torch.bfloat16 if self.device.type == "cuda" else p.dtype
        self.cache = KVCache(batch_size, self.max_len, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, self.device,
                             cache_dtype)
        special = lambda name: tokenizer.encode_special(name)  # noqa: E731
        self.terminal = {special(name) for name in TERMINAL_TOKENS}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.special_text = {special(name): text for name, text in SPECIAL_TEXT.items()}
        for name in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"):
            self.special_text[special(name)] = ""  # structure tokens never show up as text
        self.rows: list[_Row] = []
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.purged: list[GenerationRequest] = []  # cancelled while waiting, final events not yet sent
        self.cond = threading.Condition()
        # counters (read by the server's /metrics; written only by the worker thread)
        self.tokens_generated = 0
        self.decode_steps = 0
        self.requests_finished = 0

    # -- thread-safe front --------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_active_rows(self) -> int:
        return len(self.rows)

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
        return bool(self.rows or self.waiting or self.purged)

    def serve_forever(self, stop: threading.Event, idle_wait_s: float = 0.5) -> None:
        """The worker loop: step while there is work, sleep on the condition otherwise."""
        while not stop.is_set():
            with self.cond:
                if not self.has_work():
                    self.cond.wait(idle_wait_s)
                    continue
            try:
                self.step()
            except Exception as e:  # a model failure fails the requests in flight, not the worker
                get_logger().exception("decode step failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    # -- one step -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> int:
        """Retire cancelled rows, admit waiting requests, run one decode step. Returns the tokens emitted."""
        emitted = 0
        self._retire(cancelled_only=True)
        emitted += self._admit()
        self._retire()  # rows that finished on their first token are not decoded
        if self.rows:
            emitted += self._decode()
        self._retire()
        self.tokens_generated += emitted
        return emitted

    def _view(self, lo: int, hi: int, length: int) -> KVCache:
        """A KVCache over rows lo..hi-1 and positions 0..length-1 of the big cache, sharing its storage."""
        view = KVCache.__new__(KVCache)
        view.k = self.cache.k[:, lo:hi, :length]
        view.v = self.cache.v[:, lo:hi, :length]
        view.cache_lens = self.cache.cache_lens[lo:hi]
        return view

    def _admit(self) -> int:
        emitted, prefill_tokens = 0, 0
        with self.cond:
            purged, self.purged = self.purged, []
        for req in purged:
            for s in range(req.n):
                req._emit(TokenEvent(s, None, 0, "", "cancelled"))
            self._count_finished(req)
        while True:
            with self.cond:
                if not self.waiting:
                    break
                req = self.waiting[0]
                if not req.cancelled:
                    if len(self.rows) + req.n > self.batch_size or (
                            prefill_tokens and prefill_tokens + len(req.prompt) > self.max_prefill_tokens):
                        break
                self.waiting.popleft()
            if req.cancelled:
                for s in range(req.n):
                    req._emit(TokenEvent(s, None, 0, "", "cancelled"))
                self._count_finished(req)
                continue
            prefill_tokens += len(req.prompt)
            r0 = len(self.rows)
            try:
                emitted += self._prefill(req)
            except Exception:  # e.g. out of memory on a long prompt: fail this request, keep the others going
                get_logger().exception("prefill failed; failing the request")
                del self.rows[r0:]
                self.cache.reset(list(range(r0, min(r0 + req.n, self.batch_size))))
                for s in range(req.n):
                    req._emit(TokenEvent(s, None, 0, "", "error"))
                self._count_finished(req)
        return emitted

    def _prefill(self, req: GenerationRequest) -> int:
        P, r0 = len(req.prompt), len(self.rows)
        self.cache.reset(list(range(r0, r0 + req.n)))
        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)  # (1, P)
        logits = self.model(ids, kv_cache=self._view(r0, r0 + 1, P))[:, -1, :]  # (1, V)
        for j in range(1, req.n):
            self.cache.copy_row(self.cache, r0, r0 + j)
        seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        budget = min(req.params.max_tokens, self.max_len - P)
        new_rows = [_Row(req, s, row_generator(seed, s, self.device), budget, P,
                         TextStream(self.tokenizer, req.params.stop, self.special_text)) for s in range(req.n)]
        self.rows.extend(new_rows)
        tokens = self._sample(new_rows, logits.expand(req.n, -1))
        for row, tok in zip(new_rows, tokens):
            self._accept(row, tok, 1)
        return len(new_rows)

    def _decode(self) -> int:
        rows = self.rows
        n = len(rows)
        longest = max(r.cache_len for r in rows) + 1
        length = min(self.max_len, -(-longest // VIEW_ALIGN) * VIEW_ALIGN)
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.device)  # (n, 1)
        logits = self.model(ids, kv_cache=self._view(0, n, length))[:, -1, :]  # (n, V)
        self.decode_steps += 1
        for r in rows:
            r.cache_len += 1
        free = [i for i, r in enumerate(rows) if not r.forced]
        sampled = self._sample([rows[i] for i in free], logits[free]) if free else []
        chosen = dict(zip(free, sampled))
        for i, r in enumerate(rows):
            if i in chosen:
                self._accept(r, chosen[i], 1)
            else:
                self._accept(r, r.forced.popleft(), 0)
        return n

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        dev = logits.device
        logits = logits[:, :self.sample_vocab]
        temps = [float(r.request.params.temperature) for r in rows]
        top_k = [int(r.request.params.top_k or 0) for r in rows]
        top_p = [1.0 if r.request.params.top_p is None else float(r.request.params.top_p) for r in rows]
        u = [torch.rand(1, generator=r.generator, device=dev) if t > 0 else torch.zeros(1, device=dev)
             for r, t in zip(rows, temps)]
        out = sample_tokens(logits, torch.tensor(temps, device=dev), torch.tensor(top_k, device=dev),
                            torch.tensor(top_p, device=dev), torch.cat(u))
        return out.tolist()

    def _accept(self, row: _Row, token: int, mask: int) -> None:
        """Record one emitted token of a row: stops, the tool state machine, the event."""
        row.last_token = token
        row.num_generated += 1
        text, hit_stop = row.text.push(token)
        finish = None
        if mask == 1 and token in self.terminal:
            finish = "stop"
        elif hit_stop:
            finish = "stop"
        elif row.num_generated >= row.budget:
            finish = "length"
        elif self.tools:
            self._tool_step(row, token, mask)
        if finish is not None:
            row.finished = True
            text += row.text.flush()
        row.request._emit(TokenEvent(row.sample, token, mask, text, finish))

    def _tool_step(self, row: _Row, token: int, mask: int) -> None:
        if mask == 1 and token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif row.in_python and token == self.python_end:
            row.in_python = False
            if len(row.python_tokens) <= MAX_TOOL_EXPRESSION_TOKENS:
                result = evaluate(self.tokenizer.decode(row.python_tokens))
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.in_python:
            row.python_tokens.append(token)

    def _retire(self, cancelled_only: bool = False) -> None:
        """Drop finished (or only cancelled) rows, moving the last active row into each hole."""
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if row.request.cancelled and not row.finished:
                row.finished = True
                row.request._emit(TokenEvent(row.sample, None, 0, "", "cancelled"))
            if not row.finished or (cancelled_only and not row.request.cancelled):
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self.cache.copy_row(self.cache, last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
            self.cache.reset([last])
            self._count_finished(row.request)

    def _count_finished(self, req: GenerationRequest) -> None:
        if req.finished.is_set() and not req.counted:
            req.counted = True
            self.requests_finished += 1

    def _fail_all(self, message: str) -> None:
        for row in self.rows:
            if not row.finished:
                row.finished = True
                row.request._emit(TokenEvent(row.sample, None, 0, "", "error"))
            self._count_finished(row.request)
        self.rows.clear()
        self.cache.reset()
        get_logger().error("failed all active requests: %s", message)


# ---------------------------------------------------------------------------------------------------------------
# Synchronous front door


class Engine:
    """Generation for one caller at a time (the CLI, evals, RL): each call runs a private scheduler sized to it."""

    def __init__(self, model, tokenizer, tools: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.tools = tools

    def steps(self, tokens: list[int], num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
              top_k: int | None = None, top_p: float | None = None, seed: int | None = 42,
              stop: tuple[str, ...] = ()):
        """Yield, per scheduler step, the list of TokenEvents it produced (at most one per sample)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop=tuple(stop))
        context = self.model.config.sequence_len
        if len(tokens) >= context:
            raise ValueError(f"prompt of {len(tokens)} tokens does not fit the model's context of {context}")
        max_len = min(context, len(tokens) + max_tokens)
        sched = Scheduler(self.model, self.tokenizer, batch_size=num_samples, max_len=max_len, tools=self.tools)
        req = GenerationRequest(list(tokens), params, n=num_samples)
        sched.submit(req)
        try:
            while not req.finished.is_set():
                sched.step()
                events = list(req.events)
                req.events.clear()
                if events:
                    yield events
        finally:
            req.cancel()

    def stream(self, tokens: list[int], num_samples: int = 1, **kwargs):
        """Yield TokenEvents as they are produced (samples interleaved step by step)."""
        for events in self.steps(tokens, num_samples, **kwargs):
            yield from events

    def generate(self, tokens: list[int], num_samples: int = 1, **kwargs):
        """Yield (token_column, mask_column), one entry per sample, every step. A sample that has finished
        yields <|bos|> with mask 0 until all samples finish; a terminal token is yielded once, when it is sampled.
        Keyword arguments: max_tokens, temperature, top_k, top_p, seed, stop (see SamplingParams)."""
        bos = self.tokenizer.encode_special("<|bos|>")
        column, masks, seen = [bos] * num_samples, [0] * num_samples, set()
        for ev in self.stream(tokens, num_samples, **kwargs):  # a step may hold a prefill and a decode token
            if ev.token is None:
                continue
            if ev.sample in seen:
                yield column, masks
                column, masks, seen = [bos] * num_samples, [0] * num_samples, set()
            column[ev.sample], masks[ev.sample] = ev.token, ev.mask
            seen.add(ev.sample)
        if seen:
            yield column, masks

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """All samples to completion: (prompt + generated ids, mask) per sample, terminal tokens left out."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        terminal = {self.tokenizer.encode_special(name) for name in TERMINAL_TOKENS}
        for ev in self.stream(tokens, num_samples, **kwargs):
            if ev.token is None or (ev.mask == 1 and ev.token in terminal):
                continue
            results[ev.sample].append(ev.token)
            masks[ev.sample].append(ev.mask)
        return results, masks


# ---------------------------------------------------------------------------------------------------------------
# Loading a chat model (shared by `nanochat chat` and `nanochat serve`)

CHAT_STAGES = ("rl", "sft", "mid")  # preference order when no --source is given


def load_chat_model(source: str | None = None, device="cpu", model_tag: str | None = None, step: int | None = None,
                    model_dir=None):
    """(model, tokenizer, meta, stage) from the checkpoint of `source`, or of the most finished chat stage that has
    one (rl, then sft, then mid); or from the folder model_dir written by `nanochat export`."""
    from nanochat.checkpoint import checkpoint_dir, load_exported, load_model

    if model_dir is not None:
        model, tokenizer, meta = load_exported(model_dir, device)
        return model, tokenizer, meta, meta.get("stage") or "exported"

    if source is not None:
        return (*load_model(source, device=device, model_tag=model_tag, step=step), source)
    for stage in CHAT_STAGES:
        stage_dir = checkpoint_dir(stage, "x").parent
        if stage_dir.is_dir() and any(p.is_dir() for p in stage_dir.iterdir()):
            try:
                return (*load_model(stage, device=device, model_tag=model_tag, step=step), stage)
            except FileNotFoundError:
                continue
    raise FileNotFoundError(f"no chat checkpoint (stages {', '.join(CHAT_STAGES)}) under {stage_dir.parent}; "
                            f"train one (`nanochat chat-sft`) or name one with --source base")
