"""`ServerConfig`: the server's settings in one place, read by the request parser (limits), the replicas (engine
and scheduler) and the app (deadlines, reply memory). `nanochat serve` (serve/cli.py) fills it from its flags."""

from __future__ import annotations

from dataclasses import dataclass


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
