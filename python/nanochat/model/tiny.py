"""A tiny random GPT and a small real-text tokenizer, for tests, benchmarks and demos (no checkpoint needed).

The model's weights are drawn with a large standard deviation (not GPT.init_weights, whose zero output projections
make every block the identity) so that its outputs depend on the whole context: a KV-cache bug changes them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanochat.model.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer


def tiny_corpus(max_chars: int = 400_000) -> list[str]:
    """Real text for a small tokenizer: ../shared/data/tiny/tiny.parquet next to the repository when present,
    else this package's own source files."""
    root = Path(__file__).resolve().parents[3]
    tiny = root.parent / "shared" / "data" / "tiny" / "tiny.parquet"
    if tiny.is_file():
        import pyarrow.parquet as pq  # heavy; only when the shared fixture exists

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

    return Tokenizer.train_from_iterator(tiny_corpus(), vocab_size=vocab_size)


def tiny_model(vocab_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_kv_head: int = 1,
               sequence_len: int = 512, seed: int = 0, std: float = 0.3):
    """A random GPT whose every weight is N(0, std) (see the module docstring), in eval mode on CPU."""

    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd)
    model = GPT(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()
