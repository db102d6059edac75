"""`nanochat tok-train`: train the BPE tokenizer on the pretraining shards and save it.

- reads train-split documents with nanochat.data.shards.iter_texts (each cut to --doc-cap characters, at most
  --max-chars characters in all; nanochat's defaults: 10,000 and 2e9) and streams them to the Rust trainer
- saves one file at default_tokenizer_path() ($NANOCHAT_BASE_DIR/tokenizer/tokenizer.bin) or --output, and next to
  it tok_train.json: {"vocab_size", "train_chars", "seconds", "val_bytes_per_token", ...} for the report
- bytes per token is measured on the first --val-chars characters of the validation split (the last shard)
- --hf-json also writes a Hugging Face tokenizer.json beside the tokenizer (same ids; see nanochat.tokenizer)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from nanochat.common import atomic_write, git_commit, print0
from nanochat.data.shards import iter_texts
from nanochat.tokenizer import Tokenizer, default_tokenizer_path

SUMMARY_NAME = "tok_train.json"


@dataclass
class TokTrainConfig:
    vocab_size: int = 65536           # ids in all: 256 bytes + merges + 9 special tokens
    max_chars: int = 2_000_000_000    # characters read from the train split
    doc_cap: int = 10_000             # characters kept from the start of each document
    pattern: str = "nanochat"         # built-in name (nanochat, gpt4, gpt2) or a regex
    data_dir: str | None = None       # parquet shards; default $NANOCHAT_BASE_DIR/base_data
    output: str | None = None         # tokenizer file; default $NANOCHAT_BASE_DIR/tokenizer/tokenizer.bin
    val_chars: int = 10_000_000       # characters of the validation split for bytes/token
    hf_json: bool = False             # also write tokenizer.json (Hugging Face tokenizers) beside the tokenizer
    progress: bool = True


def _count(n: str) -> int:
    """'2e9', '2_000_000_000' or '5000' -> int; a count of characters."""
    try:
        value = float(n.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of characters like 2e9, got {n!r}") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number of characters, got {n!r}")
    return int(value)


def parse_args(argv: list[str] | None) -> TokTrainConfig:
    d = TokTrainConfig()
    p = argparse.ArgumentParser(prog="nanochat tok-train", description=__doc__.split("\n")[0])
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"total ids including the 9 special tokens (default {d.vocab_size})")
    p.add_argument("--max-chars", type=_count, default=d.max_chars,
                   help="characters to read from the train split, e.g. 2e9 (default 2e9)")
    p.add_argument("--doc-cap", type=_count, default=d.doc_cap,
                   help=f"characters kept per document (default {d.doc_cap})")
    p.add_argument("--pattern", default=d.pattern,
                   help="split pattern: nanochat (GPT-4 style, 1-2 digits), gpt4, gpt2, or a regex")
    p.add_argument("--data-dir", default=None, help="folder of parquet shards (default $NANOCHAT_BASE_DIR/base_data)")
    p.add_argument("--output", default=None,
                   help="tokenizer file to write (default $NANOCHAT_BASE_DIR/tokenizer/tokenizer.bin)")
    p.add_argument("--val-chars", type=_count, default=d.val_chars,
                   help="characters of the validation split used for bytes/token (default 1e7)")
    p.add_argument("--hf-json", action="store_true", help="also write a Hugging Face tokenizer.json beside it")
    p.add_argument("--no-progress", action="store_true", help="do not print training progress")
    a = p.parse_args(argv)
    return TokTrainConfig(vocab_size=a.vocab_size, max_chars=a.max_chars, doc_cap=a.doc_cap, pattern=a.pattern,
                          data_dir=a.data_dir, output=a.output, val_chars=a.val_chars, hf_json=a.hf_json,
                          progress=not a.no_progress)


# ---------------------------------------------------------------------------------------------------------------


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode(texts))
    return n_bytes / max(n_tokens, 1)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)

    counted = {"docs": 0, "chars": 0}

    def train_texts() -> Iterator[str]:
        for text in iter_texts("train", data_dir=cfg.data_dir, max_chars=cfg.max_chars, doc_cap=cfg.doc_cap):
            counted["docs"] += 1
            counted["chars"] += len(text)
            yield text

    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(train_texts(), vocab_size=cfg.vocab_size, pattern=cfg.pattern,
                                              progress=cfg.progress)
    seconds = time.perf_counter() - t0
    if counted["chars"] == 0:
        print(f"tok-train: the train split had no text (data dir {cfg.data_dir or 'default'})", file=sys.stderr)
        return 1

    output = Path(cfg.output) if cfg.output else default_tokenizer_path()
    tokenizer.save(output)
    if cfg.hf_json:
        tokenizer.save_hf_json(output.parent / "tokenizer.json")

    val_texts, val_chars = [], 0
    for text in iter_texts("val", data_dir=cfg.data_dir, max_chars=cfg.val_chars):
        val_texts.append(text)
        val_chars += len(text)
    val_bpt = bytes_per_token(tokenizer, val_texts)

    summary = {"vocab_size": tokenizer.vocab_size, "train_chars": counted["chars"], "train_docs": counted["docs"],
               "seconds": round(seconds, 3), "val_bytes_per_token": round(val_bpt, 4), "val_chars": val_chars,
               "config": asdict(cfg), "commit": git_commit(), "path": str(output)}
    with atomic_write(output.parent / SUMMARY_NAME, "w") as f:
        json.dump(summary, f, indent=2)

    print0(f"vocab size:           {tokenizer.vocab_size:,}")
    print0(f"train time:           {seconds:.1f} s")
    print0(f"characters processed: {counted['chars']:,} ({counted['docs']:,} documents)")
    print0(f"val bytes/token:      {val_bpt:.3f} (on {val_chars:,} characters)")
    print0(f"saved:                {output}" + (" (and tokenizer.json)" if cfg.hf_json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
