"""The OpenAI-compatible HTTP app (Starlette) and web UI over one scheduler per model replica: `create_app` wires
the routes, `nanochat serve` (serve/cli.py) runs it with uvicorn.

Two choices shape it:
- Each replica (one model on one device) runs its engine's serving scheduler (`Scheduler.serve_forever`) in its own
  worker thread; the event loop only parses, validates, queues and streams, so /health and /metrics answer at once
  however busy the model is. Tokens cross back to the loop in bursts (EventRelay) into a per-request asyncio.Queue.
- Nothing waits forever: every wait for the worker has a deadline (ServerConfig: first token, then each step), a
  handler notices within WORKER_POLL_S that its worker died (503, or 504 for a missed deadline), and a client that
  goes away cancels its request. Bad input is a 4xx with an OpenAI-style error object, never a 5xx.
- A reply sent back in a later request's history renders as the tokens that were generated for it, tool calls
  included (serve/history.py: the server remembers its replies' tokens by their text), so the model sees its own
  past and the prefix store hits on every turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from nanochat.common import get_logger
from nanochat.inference.engine import Engine
from nanochat.inference.sampling import SamplingParams
from nanochat.inference.scheduler import TERMINAL_TOKENS, GenerationRequest, TokenEvent
from nanochat.serve.history import ReplyMemory, render_prompt

ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for "system"


# ---------------------------------------------------------------------------------------------------------------
# Config and errors


@dataclass
class ServerConfig:
    model_name: str = "nanochat"
    batch_size: int = 16  # decode rows per replica
    max_waiting: int = 64  # requests queued per replica (not yet in a row) before answering 429
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_n: int = 8  # samples per request (n)
    max_stop: int = 4  # stop strings per request
    max_stop_chars: int = 128
    default_max_tokens: int = 1024  # when the request sets none (clipped to the context left)
    retry_after_s: int = 1
    tools: bool = True
    step_tokens: int = 256  # tokens per scheduler step: one per decoding row plus prefill chunks
    prefix_cache_tokens: int = 8192  # KV of recent conversations kept for reuse, per replica (0: off)
    cuda_graphs: bool | None = None  # decode step from CUDA graphs (None: on when the model is on CUDA)
    first_token_timeout_s: float = 600.0  # queue wait + prefill: the longest a request waits for its first event
    step_timeout_s: float = 120.0  # the longest between two events of a running request (a decode step, a tool call)
    reply_memory_tokens: int = 1 << 20  # tokens of sent replies kept to render them exactly when sent back (~4 MB)
    exact_history: bool = True  # False: history assistant messages as plain text, the old rendering (benchmarks)


WORKER_POLL_S = 0.25  # how often a waiting handler checks that its replica's worker is still alive


class ReplicaDown(Exception):
    """The replica's worker thread is not running: nothing will ever answer the request."""


class GenerationTimeout(Exception):
    """The worker is alive but sent nothing within the request's deadline."""


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "server_busy"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus text for /metrics, written by hand: requests by status, tokens, queue depth, active rows, the prefix
    cache and a time-to-first-token histogram."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.disconnects = 0
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def request(self, status: int) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def ttft(self, seconds: float) -> None:
        with self.lock:
            i = next((i for i, b in enumerate(self.TTFT_BUCKETS) if seconds <= b), len(self.TTFT_BUCKETS))
            self.ttft_counts[i] += 1
            self.ttft_sum += seconds

    def render(self, replicas: list["Replica"], memory: ReplyMemory | None = None) -> str:
        with self.lock:
            out = ["# HELP nanochat_requests_total Chat completion requests by HTTP status.",
                   "# TYPE nanochat_requests_total counter"]
            out += [f'nanochat_requests_total{{code="{code}"}} {n}' for code, n in sorted(self.requests.items())]
            out += ["# HELP nanochat_prompt_tokens_total Prompt tokens of admitted requests.",
                    "# TYPE nanochat_prompt_tokens_total counter", f"nanochat_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP nanochat_completion_tokens_total Tokens generated.",
                    "# TYPE nanochat_completion_tokens_total counter",
                    f"nanochat_completion_tokens_total {self.completion_tokens}",
                    "# HELP nanochat_client_disconnects_total Requests cancelled because the client went away.",
                    "# TYPE nanochat_client_disconnects_total counter",
                    f"nanochat_client_disconnects_total {self.disconnects}"]
            out += ["# HELP nanochat_queue_depth Requests waiting for a batch row.",
                    "# TYPE nanochat_queue_depth gauge",
                    f"nanochat_queue_depth {sum(r.scheduler.num_waiting for r in replicas)}",
                    "# HELP nanochat_active_rows Batch rows holding a request (decoding or prefilling).",
                    "# TYPE nanochat_active_rows gauge",
                    f"nanochat_active_rows {sum(r.scheduler.num_active_rows for r in replicas)}",
                    "# HELP nanochat_batch_rows Batch rows in all replicas.", "# TYPE nanochat_batch_rows gauge",
                    f"nanochat_batch_rows {sum(r.scheduler.batch_size for r in replicas)}",
                    "# HELP nanochat_prefill_tokens_total Prompt tokens computed (not reused from the prefix cache).",
                    "# TYPE nanochat_prefill_tokens_total counter",
                    f"nanochat_prefill_tokens_total {sum(r.scheduler.prefill_tokens for r in replicas)}"]
            stores = [r.scheduler.prefix_store for r in replicas if r.scheduler.prefix_store is not None]
            lookups, hits = sum(s.lookups for s in stores), sum(s.hits for s in stores)
            out += ["# HELP nanochat_prefix_cache_lookups_total Admitted prompts looked up in the prefix cache.",
                    "# TYPE nanochat_prefix_cache_lookups_total counter",
                    f"nanochat_prefix_cache_lookups_total {lookups}",
                    "# HELP nanochat_prefix_cache_hits_total Prompts that reused held KV entries.",
                    "# TYPE nanochat_prefix_cache_hits_total counter", f"nanochat_prefix_cache_hits_total {hits}",
                    "# HELP nanochat_prefix_cache_hit_rate Hits over lookups since the start.",
                    "# TYPE nanochat_prefix_cache_hit_rate gauge",
                    f"nanochat_prefix_cache_hit_rate {hits / lookups if lookups else 0.0:.4f}",
                    "# HELP nanochat_prefix_cache_reused_tokens_total Prompt tokens copied instead of computed.",
                    "# TYPE nanochat_prefix_cache_reused_tokens_total counter",
                    f"nanochat_prefix_cache_reused_tokens_total {sum(s.reused_tokens for s in stores)}",
                    "# HELP nanochat_prefix_cache_tokens Tokens whose KV the prefix cache holds.",
                    "# TYPE nanochat_prefix_cache_tokens gauge",
                    f"nanochat_prefix_cache_tokens {sum(s.tokens_held for s in stores)}",
                    "# HELP nanochat_reply_memory_hits_total History assistant messages rendered as the tokens "
                    "this server generated for them.",
                    "# TYPE nanochat_reply_memory_hits_total counter",
                    f"nanochat_reply_memory_hits_total {memory.hits if memory else 0}",
                    "# HELP nanochat_reply_memory_misses_total History assistant messages not held (read from "
                    "their text).",
                    "# TYPE nanochat_reply_memory_misses_total counter",
                    f"nanochat_reply_memory_misses_total {memory.misses if memory else 0}",
                    "# HELP nanochat_time_to_first_token_seconds From request arrival to its first token.",
                    "# TYPE nanochat_time_to_first_token_seconds histogram"]
            cumulative = 0
            for bound, count in zip(list(self.TTFT_BUCKETS) + [math.inf], self.ttft_counts):
                cumulative += count
                le = "+Inf" if bound == math.inf else repr(bound)
                out.append(f'nanochat_time_to_first_token_seconds_bucket{{le="{le}"}} {cumulative}')
            out += [f"nanochat_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                    f"nanochat_time_to_first_token_seconds_count {cumulative}"]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Replicas


class EventRelay:
    """Moves token events from worker threads onto the event loop with one wake-up per burst (a decode step emits
    one event per row), not one `call_soon_threadsafe` per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, TokenEvent]] = []
        self.scheduled = False

    def push(self, queue: asyncio.Queue, event: TokenEvent) -> None:  # worker thread
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # event loop
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, event in items:
            queue.put_nowait(event)



class Replica:
    """One model + the engine's serving scheduler + the worker thread that runs it."""

    def __init__(self, model, tokenizer, config: ServerConfig):
        engine = Engine(model, tokenizer, tools=config.tools, prefix_cache_tokens=config.prefix_cache_tokens,
                        cuda_graphs=config.cuda_graphs, step_tokens=config.step_tokens)
        self.scheduler = engine.serving_scheduler(config.batch_size, config.max_waiting)
        self.context = self.scheduler.max_len
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.error: str | None = None  # why the worker thread died, when it did

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.stop_event.clear()
            self.error = None
            self.thread = threading.Thread(target=self._work, name=f"nanochat-replica-{self.scheduler.device}",
                                           daemon=True)
            self.thread.start()

    def _work(self) -> None:
        """The worker thread: select the replica's device (a thread starts on cuda:0, and torch's current device must
        match the replica even though the Triton wrappers follow their inputs), then serve until stopped.
        `serve_forever` survives model errors; whatever still ends it is recorded for /health."""
        try:
            if self.scheduler.device.type == "cuda":
                torch.cuda.set_device(self.scheduler.device)
            self.scheduler.serve_forever(self.stop_event)
        except BaseException as e:
            self.error = f"{type(e).__name__}: {e}"
            get_logger().exception("replica worker on %s died", self.scheduler.device)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.stop_event.is_set()

    def stop(self) -> None:
        self.stop_event.set()
        self.scheduler.wake()
        if self.thread is not None:
            self.thread.join(timeout=10)

    @property
    def load(self) -> int:
        return self.scheduler.num_active_rows + self.scheduler.num_waiting


# ---------------------------------------------------------------------------------------------------------------
# Request parsing and validation


def _check_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where} is not valid Unicode (lone surrogate)", where) from None
    return text


def parse_messages(messages, config: ServerConfig) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    if len(messages) > config.max_messages:
        raise BadRequest(f"too many messages: {len(messages)}, limit {config.max_messages}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role must be one of {list(ROLES)}, got {role!r:.40}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where}.content[{j}] must be {{'type': 'text', 'text': str}}",
                                     f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string or an array of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": _check_text(content, where)})
    if out[-1]["role"] != "user":
        raise BadRequest("the last message must have role 'user'", "messages")
    return out


def _number(payload: dict, name: str, lo: float, hi: float, default):
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}], got {value!r:.40}", name)
    return float(value)


def _integer(payload: dict, name: str, lo: int, hi: int | None, default):
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise BadRequest(f"'{name}' must be an integer in {bound}, got {value!r:.40}", name)
    return value


@dataclass
class ParsedRequest:
    messages: list[dict]
    params: SamplingParams
    max_tokens_set: bool
    n: int
    stream: bool
    include_usage: bool


def parse_request(payload, config: ServerConfig, context: int, vocab_size: int,
                  batch_rows: int | None = None) -> ParsedRequest:
    """Validate a chat completion body against the server's limits: `context` tokens and `batch_rows` decode rows
    per replica (a request's n samples decode side by side, so n cannot exceed them)."""
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = parse_messages(payload.get("messages"), config)
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    max_tokens = _integer(payload, "max_tokens", 1, context, None)
    max_tokens = _integer(payload, "max_completion_tokens", 1, context, max_tokens)
    temperature = _number(payload, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(payload, "top_p", 0.0, 1.0, None)
    top_k = _integer(payload, "top_k", 0, vocab_size, None)
    n = _integer(payload, "n", 1, min(config.max_n, batch_rows or config.max_n), 1)
    seed = _integer(payload, "seed", -(2 ** 63), 2 ** 63 - 1, None)
    stop = payload.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > config.max_stop or not all(
            isinstance(s, str) and 0 < len(s) <= config.max_stop_chars for s in stop):
        raise BadRequest(f"'stop' must be a string or an array of at most {config.max_stop} non-empty strings "
                         f"of at most {config.max_stop_chars} characters", "stop")
    for s in stop:
        _check_text(s, "stop")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    params = SamplingParams(max_tokens=max_tokens or config.default_max_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=None if seed is None else seed % (2 ** 63), stop=tuple(stop))
    return ParsedRequest(messages, params, max_tokens is not None, n, stream, bool(options.get("include_usage")))


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise BadRequest(f"request body of {declared} bytes exceeds the limit of {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes):
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None


async def next_event(queue: asyncio.Queue, replica: Replica, timeout_s: float) -> TokenEvent:
    """The next event of a request, waiting at most `timeout_s` and checking every WORKER_POLL_S that the worker
    that should send it is alive (raises ReplicaDown / GenerationTimeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not replica.alive:
            if not queue.empty():  # it may have sent the final events before it went
                return queue.get_nowait()
            raise ReplicaDown(replica.error or "the replica's worker is not running")
        left = deadline - time.monotonic()
        if left <= 0:
            raise GenerationTimeout(f"no progress from the model in {timeout_s:g} s")
        try:
            return await asyncio.wait_for(queue.get(), timeout=min(left, WORKER_POLL_S))
        except asyncio.TimeoutError:
            continue


# ---------------------------------------------------------------------------------------------------------------
# The app


FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "error"}


def stream_error(message: str, code: str) -> str:
    """An OpenAI-style error object as a server-sent event: how a stream whose status line is sent says it failed
    (the openai client raises APIError with this message)."""
    error = {"message": message, "type": "server_error", "param": None, "code": code}
    return f"data: {json.dumps({'error': error})}\n\n"


class Completion:
    """One admitted chat completion: its request in a replica's scheduler, the queue its events arrive on, and what
    both answers share (deadlines, cancelling, metrics). `stream()` yields it as server-sent events, `respond()`
    waits for every sample and answers one JSON body."""

    def __init__(self, req: GenerationRequest, queue: asyncio.Queue, replica: Replica, parsed: ParsedRequest,
                 prompt_tokens: int, t0: float, config: ServerConfig, metrics: Metrics,
                 memory: ReplyMemory | None = None, terminal: frozenset[int] = frozenset()):
        self.req, self.queue, self.replica, self.parsed = req, queue, replica, parsed
        self.prompt_tokens, self.t0, self.config, self.metrics = prompt_tokens, t0, config, metrics
        self.memory, self.terminal = memory, terminal
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.received = 0  # final events seen here (the worker sets req.finished a moment later)
        self.texts = [""] * parsed.n  # each sample's content so far, and the tokens that produced it
        self.tokens: list[list[int]] = [[] for _ in range(parsed.n)]

    def record(self, ev: TokenEvent) -> None:
        """Add an event to its sample; a sample that ended on its own or at max_tokens goes into the reply memory
        (its text -> its tokens, the terminal token left out: the renderer closes the turn). A reply cut by a stop
        string is not remembered: its text lacks the stop string its tokens hold, so it is read from its text."""
        s = ev.sample
        self.texts[s] += ev.text
        if ev.token is not None:
            self.tokens[s].append(ev.token)
        if ev.finish_reason is None or self.memory is None:
            return
        tokens = self.tokens[s]
        if ev.finish_reason == "stop" and ev.token in self.terminal:
            self.memory.remember(self.texts[s], tokens[:-1])
        elif ev.finish_reason == "length":
            self.memory.remember(self.texts[s], tokens)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.req.completion_tokens,
                "total_tokens": self.prompt_tokens + self.req.completion_tokens}

    def wait_event(self):
        """The next event, within the first-token deadline until a token came, then the per-step one."""
        started = self.req.first_token_at is not None
        timeout_s = self.config.step_timeout_s if started else self.config.first_token_timeout_s
        return next_event(self.queue, self.replica, timeout_s)

    def cancel(self) -> None:
        """Stop the samples still running (the client went away, or the answer ended early)."""
        if self.received < self.parsed.n and not self.req.cancelled:
            self.req.cancel()
            self.replica.scheduler.wake()
            with self.metrics.lock:
                self.metrics.disconnects += 1

    def finish(self) -> None:
        with self.metrics.lock:
            self.metrics.completion_tokens += self.req.completion_tokens
        if self.req.first_token_at is not None:
            self.metrics.ttft(self.req.first_token_at - self.t0)

    def chunk(self, choices: list[dict], usage=None, include_usage=False) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.config.model_name, "system_fingerprint": None, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def stream(self):
        """Server-sent events: a role chunk per sample, then each burst of tokens as one chunk per sample, a final
        chunk per sample, the usage when asked, and [DONE]. A failure after the status line is an error event."""
        parsed, done = self.parsed, False
        try:
            for i in range(parsed.n):
                yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}], None, parsed.include_usage)
            remaining = parsed.n
            while remaining:
                try:
                    batch = [await self.wait_event()]
                except (ReplicaDown, GenerationTimeout) as e:  # the status line is sent: say it in-band
                    get_logger().error("stream %s ended early: %s", self.id, e)
                    yield stream_error(str(e), "replica_down" if isinstance(e, ReplicaDown) else "timeout")
                    return
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                texts: dict[int, str] = {}
                finals = []
                for ev in batch:
                    self.record(ev)
                    if ev.text:
                        texts[ev.sample] = texts.get(ev.sample, "") + ev.text
                    if ev.finish_reason is not None:
                        finals.append(ev)
                        remaining -= 1
                        self.received += 1
                for i, t in sorted(texts.items()):  # one choice per chunk, as OpenAI does
                    yield self.chunk([{"index": i, "delta": {"content": t}, "logprobs": None,
                                       "finish_reason": None}], None, parsed.include_usage)
                for ev in finals:
                    if ev.finish_reason == "error":  # a sample failed on the server (not the client's fault)
                        get_logger().error("stream %s: sample %d failed: %s", self.id, ev.sample, ev.error)
                        yield stream_error(f"generation failed: {ev.error}", "generation_failed")
                        return
                    yield self.chunk([{"index": ev.sample, "delta": {}, "logprobs": None,
                                       "finish_reason": FINISH[ev.finish_reason]}], None, parsed.include_usage)
            if parsed.include_usage:
                yield self.chunk([], self.usage(), True)
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:
                self.cancel()
            self.finish()

    async def respond(self, request: Request) -> Response:
        """Wait for every sample, cancelling if the client disconnects meanwhile; 503 when the replica died, 504
        when a deadline passed, 500 naming the cause when a sample failed on the server."""
        async def watch_disconnect():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    self.cancel()
                    return

        n = self.parsed.n
        watcher = asyncio.create_task(watch_disconnect())
        reasons, errors = [None] * n, []
        try:
            remaining = n
            while remaining:
                ev = await self.wait_event()
                self.record(ev)
                if ev.finish_reason is not None:
                    reasons[ev.sample] = FINISH[ev.finish_reason]
                    if ev.finish_reason == "error":
                        errors.append(ev.error)
                    remaining -= 1
                    self.received += 1
        except ReplicaDown as e:
            get_logger().error("request %s: replica down: %s", self.id, e)
            return error_response(503, "the model replica stopped; retry later", code="replica_down",
                                  headers={"Retry-After": str(self.config.retry_after_s)})
        except GenerationTimeout as e:
            get_logger().error("request %s: %s", self.id, e)
            return error_response(504, f"generation timed out: {e}", code="timeout")
        finally:
            watcher.cancel()
            self.cancel()
            self.finish()
        if errors:  # a sample failed on the server (the worker logged it); not the client's fault
            return error_response(500, f"generation failed: {errors[0]}", code="generation_failed")
        body = {"id": self.id, "object": "chat.completion", "created": int(time.time()),
                "model": self.config.model_name, "system_fingerprint": None,
                "choices": [{"index": i, "message": {"role": "assistant", "content": self.texts[i], "refusal": None},
                             "logprobs": None, "finish_reason": reasons[i]} for i in range(n)],
                "usage": self.usage()}
        return JSONResponse(body)


class ChatService:
    """What the routes share: the replicas, their tokenizer, the config and the metrics. Its methods are the
    route handlers."""

    def __init__(self, models, tokenizer, config: ServerConfig):
        self.config, self.tokenizer = config, tokenizer
        self.replicas = [Replica(m, tokenizer, config) for m in models]
        self.context = min(r.context for r in self.replicas)
        self.batch_rows = min(r.scheduler.batch_size for r in self.replicas)
        self.vocab_size = tokenizer.get_vocab_size()
        self.metrics = Metrics()
        self.memory = ReplyMemory(config.reply_memory_tokens) if config.exact_history else None
        self.terminal = frozenset(tokenizer.encode_special(name) for name in TERMINAL_TOKENS)
        self.created = int(time.time())
        self.ui_page = load_ui_page()
        self.relays: dict[asyncio.AbstractEventLoop, EventRelay] = {}

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        for r in self.replicas:
            r.start()
        try:
            yield
        finally:
            for r in self.replicas:
                r.stop()

    def relay(self) -> EventRelay:
        loop = asyncio.get_running_loop()
        if self.relays.get(loop) is None:
            self.relays.clear()  # one event loop per app run; a new one (tests restarting the app) replaces the old
            self.relays[loop] = EventRelay(loop)
        return self.relays[loop]

    async def parse(self, request: Request) -> tuple[ParsedRequest, list[int]]:
        """The validated request and its prompt tokens (raises BadRequest)."""
        payload = decode_json(await read_body(request, self.config.max_body_bytes))
        parsed = parse_request(payload, self.config, self.context, self.vocab_size, self.batch_rows)
        try:  # user text is ordinary text: typing "<|assistant_end|>" gives that string's bytes, never the id
            prompt = render_prompt(self.tokenizer, parsed.messages, self.memory)
        except ValueError as e:
            raise BadRequest(str(e), "messages") from None
        if len(prompt) >= self.context:
            raise BadRequest(f"the prompt is {len(prompt)} tokens; this model's context is {self.context} tokens "
                             f"(the reply needs at least one)", "messages", "context_length_exceeded")
        return parsed, prompt

    async def chat_completions(self, request: Request) -> Response:
        """Validate, queue on the least loaded live replica (503 with none, 429 when its queue is full), answer."""
        t0 = time.monotonic()
        config, metrics = self.config, self.metrics
        try:
            parsed, prompt = await self.parse(request)
        except BadRequest as e:
            metrics.request(e.status)
            return error_response(e.status, e.message, e.param, e.code)
        parsed.params.max_tokens = min(parsed.params.max_tokens, self.context - len(prompt))
        relay = self.relay()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        req = GenerationRequest(prompt, parsed.params, n=parsed.n,
                                on_event=lambda ev: relay.push(queue, ev))  # called on the worker thread
        live = [r for r in self.replicas if r.alive]
        if not live:
            metrics.request(503)
            return error_response(503, "no model replica is running; retry later", code="replica_down",
                                  headers={"Retry-After": str(config.retry_after_s)})
        replica = min(live, key=lambda r: r.load)
        try:
            accepted = replica.scheduler.submit(req)
        except ValueError as e:  # a limit of the engine the parser above does not know: still the request's fault
            metrics.request(400)
            return error_response(400, str(e))
        if not accepted:
            metrics.request(429)
            return error_response(429, "the server is busy; retry later", code="queue_full",
                                  headers={"Retry-After": str(config.retry_after_s)})
        metrics.request(200)
        with metrics.lock:
            metrics.prompt_tokens += len(prompt)
        completion = Completion(req, queue, replica, parsed, len(prompt), t0, config, metrics, self.memory,
                                self.terminal)
        if parsed.stream:
            return StreamingResponse(completion.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await completion.respond(request)

    async def models_list(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "nanochat"}]})

    async def health(self, request: Request) -> Response:
        """ok / degraded / unhealthy, naming each replica that is down; 503 when none is up."""
        alive = [r.alive for r in self.replicas]
        status = "ok" if all(alive) else "degraded" if any(alive) else "unhealthy"
        down = [{"replica": i, "device": str(r.scheduler.device), "error": r.error}
                for i, r in enumerate(self.replicas) if not alive[i]]
        headers = None if any(alive) else {"Retry-After": str(self.config.retry_after_s)}
        return JSONResponse({"status": status, "replicas": len(self.replicas), "workers_alive": sum(alive),
                             "down": down}, status_code=200 if any(alive) else 503, headers=headers)

    async def metrics_page(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(self.replicas, self.memory),
                                 media_type="text/plain; version=0.0.4")

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.ui_page)


def load_ui_page() -> str:
    return importlib.resources.files("nanochat.serve").joinpath("ui.html").read_text(encoding="utf-8")


async def http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(exc.status_code, exc.detail or "error", headers=getattr(exc, "headers", None))


async def server_error(request: Request, exc: Exception) -> Response:
    get_logger().exception("unhandled error", exc_info=exc)
    return error_response(500, "internal server error")


def create_app(models, tokenizer, config: ServerConfig | None = None) -> Starlette:
    """The app over one model or a list of models (one replica each, e.g. one per GPU)."""
    models = models if isinstance(models, (list, tuple)) else [models]
    service = ChatService(models, tokenizer, config or ServerConfig())
    routes = [
        Route("/", service.index, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.metrics_page, methods=["GET"]),
        Route("/v1/models", service.models_list, methods=["GET"]),
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.replicas = service.replicas
    app.state.metrics = service.metrics
    app.state.config = service.config
    return app
