"""The OpenAI-compatible HTTP app (Starlette) and web UI over one scheduler per model replica: `create_app` wires
the routes, `nanochat serve` (serve/cli.py) runs it with uvicorn. The wire format is serve/protocol.py, the worker
threads serve/replicas.py, /metrics serve/metrics.py; this module joins them per request.

The contracts it keeps:
- The event loop only parses, validates, queues and streams (the model runs in the replicas' worker threads), so
  /health and /metrics answer at once however busy the model is.
- Nothing waits forever: every wait for a worker has a deadline (ServerConfig: first token, then each step); a dead
  worker is a 503, a missed deadline a 504, and a client that goes away cancels its request. Bad input is a 4xx
  with an OpenAI-style error object, never a 5xx.
- A reply sent back in a later request's history renders as the tokens that were generated for it, tool calls
  included (serve/history.py: the server remembers its replies' tokens by their text), so the model sees its own
  past and the prefix store hits on every turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from nanochat.common import get_logger
from nanochat.inference.scheduler import TERMINAL_TOKENS, GenerationRequest, TokenEvent
from nanochat.serve import protocol
from nanochat.serve.config import ServerConfig
from nanochat.serve.history import ReplyMemory, render_prompt
from nanochat.serve.metrics import CONTENT_TYPE, ServerMetrics
from nanochat.serve.protocol import BadRequest, ParsedRequest, error_response, stream_error
from nanochat.serve.replicas import (
    EventRelay,
    GenerationTimeout,
    Replica,
    ReplicaDown,
    health_report,
    least_loaded,
    next_event,
)


class Completion:
    """One admitted chat completion: its request in a replica's scheduler, the queue its events arrive on, and what
    both answers share (deadlines, cancelling, metrics). `stream()` yields it as server-sent events, `respond()`
    waits for every sample and answers one JSON body."""

    def __init__(self, req: GenerationRequest, queue: asyncio.Queue, replica: Replica, parsed: ParsedRequest,
                 prompt_tokens: int, t0: float, config: ServerConfig, metrics: ServerMetrics,
                 memory: ReplyMemory | None = None, terminal: frozenset[int] = frozenset()):
        self.req, self.queue, self.replica, self.parsed = req, queue, replica, parsed
        self.prompt_tokens, self.t0, self.config, self.metrics = prompt_tokens, t0, config, metrics
        self.memory, self.terminal = memory, terminal
        self.id = protocol.new_completion_id()
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
        return protocol.usage(self.prompt_tokens, self.req.completion_tokens)

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
            self.metrics.disconnects.inc()

    def finish(self) -> None:
        self.metrics.completion_tokens.inc(self.req.completion_tokens)
        if self.req.first_token_at is not None:
            self.metrics.ttft.observe(self.req.first_token_at - self.t0)

    def chunk(self, choices: list[dict], usage=None, include_usage=False) -> str:
        return protocol.chunk_event(self.id, self.config.model_name, choices, usage, include_usage)

    async def stream(self):
        """Server-sent events: a role chunk per sample, then each burst of tokens as one chunk per sample, a final
        chunk per sample, the usage when asked, and [DONE]. A failure after the status line is an error event."""
        parsed, done = self.parsed, False
        try:
            for i in range(parsed.n):
                yield self.chunk([protocol.role_choice(i)], None, parsed.include_usage)
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
                    yield self.chunk([protocol.text_choice(i, t)], None, parsed.include_usage)
                for ev in finals:
                    if ev.finish_reason == "error":  # a sample failed on the server (not the client's fault)
                        get_logger().error("stream %s: sample %d failed: %s", self.id, ev.sample, ev.error)
                        yield stream_error(f"generation failed: {ev.error}", "generation_failed")
                        return
                    yield self.chunk([protocol.final_choice(ev.sample, ev.finish_reason)], None,
                                     parsed.include_usage)
            if parsed.include_usage:
                yield self.chunk([], self.usage(), True)
            yield protocol.DONE
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
                    reasons[ev.sample] = ev.finish_reason
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
        return JSONResponse(protocol.completion_body(self.id, self.config.model_name, self.texts, reasons,
                                                     self.usage()))


class ChatService:
    """What the routes share: the replicas, their tokenizer, the config and the metrics. Its methods are the
    route handlers."""

    def __init__(self, models, tokenizer, config: ServerConfig):
        self.config, self.tokenizer = config, tokenizer
        self.replicas = [Replica(m, tokenizer, config) for m in models]
        self.context = min(r.context for r in self.replicas)
        self.batch_rows = min(r.scheduler.batch_size for r in self.replicas)
        self.vocab_size = tokenizer.get_vocab_size()
        self.memory = ReplyMemory(config.reply_memory_tokens) if config.exact_history else None
        self.metrics = ServerMetrics(self.replicas, self.memory)
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
        payload = protocol.decode_json(await protocol.read_body(request, self.config.max_body_bytes))
        parsed = protocol.parse_request(payload, self.config, self.context, self.vocab_size, self.batch_rows)
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
        replica = least_loaded(self.replicas)
        if replica is None:
            metrics.request(503)
            return error_response(503, "no model replica is running; retry later", code="replica_down",
                                  headers={"Retry-After": str(config.retry_after_s)})
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
        metrics.prompt_tokens.inc(len(prompt))
        completion = Completion(req, queue, replica, parsed, len(prompt), t0, config, metrics, self.memory,
                                self.terminal)
        if parsed.stream:
            return StreamingResponse(completion.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await completion.respond(request)

    async def models_list(self, request: Request) -> Response:
        return JSONResponse(protocol.models_list(self.config.model_name, self.created))

    async def health(self, request: Request) -> Response:
        """200 while any replica is up (status ok or degraded), else 503 with Retry-After."""
        body = health_report(self.replicas)
        up = body["workers_alive"] > 0
        headers = None if up else {"Retry-After": str(self.config.retry_after_s)}
        return JSONResponse(body, status_code=200 if up else 503, headers=headers)

    async def metrics_page(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type=CONTENT_TYPE)

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
