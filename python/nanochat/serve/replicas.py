"""Model replicas: one model on one device, its engine's serving scheduler, and the worker thread that runs it.

Why threads: the scheduler's step (prefill chunks and one decode token per row) holds the device for milliseconds
to seconds; run on the event loop it would stall every other request, /health and /metrics. Each replica's worker
thread runs `Scheduler.serve_forever`; the loop only submits requests and receives their events, in bursts
(`EventRelay`: one wake-up per decode step, not one per token).

The contract with the handlers: a request waits on its queue through `next_event`, which never waits forever: it
raises `ReplicaDown` within WORKER_POLL_S of the worker dying and `GenerationTimeout` when the worker sends nothing
within the deadline. A worker that dies records why (`Replica.error`), which /health reports.
"""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from nanochat.common import get_logger
from nanochat.inference.engine import Engine
from nanochat.inference.scheduler import TokenEvent
from nanochat.serve.config import ServerConfig

WORKER_POLL_S = 0.25  # how often a waiting handler checks that its replica's worker is still alive


class ReplicaDown(Exception):
    """The replica's worker thread is not running: nothing will ever answer the request."""


class GenerationTimeout(Exception):
    """The worker is alive but sent nothing within the request's deadline."""


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


def least_loaded(replicas: list[Replica]) -> Replica | None:
    """The live replica with the fewest requests in rows or waiting; None when every worker is down."""
    live = [r for r in replicas if r.alive]
    return min(live, key=lambda r: r.load) if live else None


def health_report(replicas: list[Replica]) -> dict:
    """ok / degraded / unhealthy, naming each replica that is down, its device and why its worker died."""
    alive = [r.alive for r in replicas]
    status = "ok" if all(alive) else "degraded" if any(alive) else "unhealthy"
    down = [{"replica": i, "device": str(r.scheduler.device), "error": r.error}
            for i, r in enumerate(replicas) if not alive[i]]
    return {"status": status, "replicas": len(replicas), "workers_alive": sum(alive), "down": down}


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
