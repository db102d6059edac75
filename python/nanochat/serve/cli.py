"""`nanochat serve` (or `python -m nanochat.serve`): load a chat checkpoint or export, one model replica per GPU
(or one on CPU), and serve the web UI and the OpenAI-compatible API (serve/app.py) with uvicorn, on 127.0.0.1 unless
--host says otherwise."""

from __future__ import annotations

import argparse

import torch
import uvicorn

from nanochat.common import UserError, at_least, get_logger
from nanochat.model.checkpoint import add_chat_model_args, load_chat_model
from nanochat.runtime import autodetect_device
from nanochat.serve.app import create_app
from nanochat.serve.config import ServerConfig


def _port(text: str) -> int:
    value = at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [0, 65535], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanochat serve", description="`nanochat serve`: the OpenAI-compatible server "
                                "and web UI (Starlette + uvicorn) over a chat checkpoint.")
    add_chat_model_args(p)
    p.add_argument("--num-replicas", type=at_least(1), default=None,
                   help="model replicas, one per GPU (default: every visible GPU, or 1 on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="decode rows per replica (concurrent sequences)")
    p.add_argument("--max-waiting", type=at_least(1), default=64,
                   help="requests queued per replica before answering 429 (requests)")
    p.add_argument("--max-body-bytes", type=at_least(1), default=1_000_000, help="request body limit (bytes)")
    p.add_argument("--default-max-tokens", type=at_least(1), default=1024,
                   help="reply length when a request sets no max_tokens (tokens)")
    p.add_argument("--model-name", default="nanochat", help="the model id reported by /v1/models")
    p.add_argument("--no-tools", action="store_true", help="do not run the python calculator tool")
    p.add_argument("--step-tokens", type=int, default=256,
                   help="tokens per scheduler step: one per decoding row plus prefill chunks (tokens)")
    p.add_argument("--prefix-cache-tokens", type=int, default=8192,
                   help="KV of recent conversations kept for reuse, per replica (tokens; 0 = off)")
    p.add_argument("--reply-memory-tokens", type=at_least(0), default=1 << 20,
                   help="tokens of sent replies remembered, so that a reply sent back in the history renders as the "
                        "tokens generated for it (tokens, ~4 bytes each; 0 = read replies back from their text)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs (debugging)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = autodetect_device(args.device)
    if device.type == "cuda":
        n = args.num_replicas or torch.cuda.device_count()
        if n > torch.cuda.device_count():
            raise UserError(f"--num-replicas {n} needs {n} GPUs (one replica each); "
                            f"{torch.cuda.device_count()} visible")
        devices = [f"cuda:{i}" for i in range(n)]
    else:
        devices = ["cpu"] * (args.num_replicas or 1)
    models, tokenizer = [], None
    for dev in devices:
        model, tokenizer, meta, stage = load_chat_model(args.source, dev, args.model_tag, args.step, args.model,
                                                        weights=args.weights)
        models.append(model)
    get_logger().info("serving %s checkpoint (step %s, %s weights) on %s at http://%s:%d", stage, meta.get("step"),
                      meta["weights"], ", ".join(devices), args.host, args.port)
    config = ServerConfig(model_name=args.model_name, batch_size=args.batch_size, max_waiting=args.max_waiting,
                          max_body_bytes=args.max_body_bytes, default_max_tokens=args.default_max_tokens,
                          tools=not args.no_tools, step_tokens=args.step_tokens,
                          prefix_cache_tokens=args.prefix_cache_tokens, reply_memory_tokens=args.reply_memory_tokens,
                          cuda_graphs=False if args.no_cuda_graphs else None)
    app = create_app(models, tokenizer, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
