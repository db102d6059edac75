"""Helpers for running the server inside another program (tests, benchmarks): a real uvicorn on 127.0.0.1 in a
background thread, and a tiny randomly initialised model with a small tokenizer to serve.

The tiny model's weights are drawn with a large standard deviation (not GPT.init_weights, whose zero output
projections make every block the identity) so that its outputs depend on the whole context: a KV-cache bug changes
them.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch


class ServerThread:
    """`with ServerThread(app) as server:` serves `app` at server.url until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tiny_corpus(max_chars: int = 400_000) -> list[str]:
    """Real text for a small tokenizer: ../shared/data/tiny/tiny.parquet next to the repository when present,
    else this package's own source files."""
    root = Path(__file__).resolve().parents[3]
    tiny = root.parent / "shared" / "data" / "tiny" / "tiny.parquet"
    if tiny.is_file():
        import pyarrow.parquet as pq

        texts = pq.read_table(tiny, columns=["text"]).column("text").to_pylist()
    else:
        texts = [p.read_text(encoding="utf-8") for p in sorted(Path(__file__).resolve().parents[1].rglob("*.py"))]
    out, total = [], 0
    for t in texts:
        out.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return out


def tiny_tokenizer(vocab_size: int = 512):
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train_from_iterator(tiny_corpus(), vocab_size=vocab_size)


def tiny_model(vocab_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_kv_head: int = 1,
               sequence_len: int = 512, seed: int = 0, std: float = 0.3):
    """A random GPT whose every weight is N(0, std) (see the module docstring), in eval mode on CPU."""
    from nanochat.gpt import GPT, GPTConfig

    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd)
    model = GPT(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()
