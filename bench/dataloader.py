"""Data loader throughput: tokens/s of nanochat.data.loader alone vs what one GPU consumes training a depth-20 model.

The anchor (what the loader must beat by 5x): a d20 GPT trained at 47% MFU on one H100 SXM (989 TFLOP/s dense bf16
peak) consumes 0.47 * 989e12 / (6 N) tokens/s, N = all parameters incl. embeddings (our GPT(from_depth(20)), built on
the meta device; ~561 M as in nanochat), i.e. ~138k tokens/s. The model's own estimate_flops() (attention included,
embedding lookup excluded) is printed beside it.

Measured: steady-state tokens/s (after the first batch, which waits for the buffer to fill; that start-up time is
reported separately), median of --repeats runs, for each --threads value, with the fast best-fit buffer; the O(n)
reference buffer is a row of its own. Run from the repository root:

    python bench/dataloader.py --data-dir ../shared/data/corpus --threads 1,2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

H100_BF16_PEAK = 989e12
MFU = 0.47


def d20_tokens_per_s(vocab_size: int = 65536) -> tuple[float, float, int]:
    """(tokens/s by 6N, tokens/s by the model's estimate_flops, N) for d20 on one H100 at 47% MFU."""
    import torch

    from nanochat.model.gpt import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(20, vocab_size=vocab_size, sequence_len=2048))
    n = model.num_params()
    return MFU * H100_BF16_PEAK / (6 * n), MFU * H100_BF16_PEAK / model.estimate_flops(), n


def get_tokenizer(args):
    from nanochat.data.shards import iter_texts
    from nanochat.tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer.load(args.tokenizer), f"loaded {args.tokenizer}"
    cache = Path(tempfile.gettempdir()) / f"nanochat-bench-tok-{args.vocab_size}-{args.train_chars}.bin"
    if cache.exists():
        return Tokenizer.load(cache), f"cached {cache}"
    t0 = time.time()
    tok = Tokenizer.train_from_iterator(iter_texts("train", args.data_dir, max_chars=args.train_chars),
                                        vocab_size=args.vocab_size)
    tok.save(cache)
    return tok, f"trained on {args.train_chars:,} chars in {time.time() - t0:.0f}s ({cache})"


def measure(tokenizer, args, threads: int, reference: bool) -> tuple[float, float, float]:
    """(steady tokens/s, seconds to the first batch, dropped fraction) of one run."""
    from nanochat.data.loader import DataLoader

    t0 = time.perf_counter()
    loader = DataLoader(tokenizer, args.batch_size, args.seq_len, "train", data_dir=args.data_dir, threads=threads,
                        reference=reference)
    next(loader)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    seconds = time.perf_counter() - t0
    loader.close()
    return args.batches * args.batch_size * args.seq_len / seconds, first, loader.dropped_fraction


def main(argv: list[str] | None = None) -> int:
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(default_data), help="folder of parquet shards (last = val)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file; default: train one (cached in /tmp)")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocab of the trained tokenizer")
    parser.add_argument("--train-chars", type=int, default=20_000_000, help="characters to train it on")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (d20's device batch)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    parser.add_argument("--batches", type=int, default=100, help="timed batches per run (after the first)")
    parser.add_argument("--threads", default="1,2", help="comma-separated loader thread counts")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported)")
    parser.add_argument("--no-reference", action="store_true", help="skip the O(n) reference packer row")
    args = parser.parse_args(argv)

    from nanochat.common import system_info

    tokenizer, how = get_tokenizer(args)
    by_6n, by_model, n_params = d20_tokens_per_s(tokenizer.vocab_size)
    print(f"tokenizer: vocab {tokenizer.vocab_size}, {how}")
    print(f"data: {args.data_dir}; batch {args.batch_size} x {args.seq_len}; {args.batches} timed batches x "
          f"{args.repeats} runs; system {system_info()['platform']}, {system_info()['cpu_count']} CPUs")
    print(f"anchor: d20 (N = {n_params / 1e6:.0f} M params) at {MFU:.0%} MFU on one H100 ({H100_BF16_PEAK / 1e12:.0f} "
          f"TFLOP/s bf16) consumes {by_6n:,.0f} tokens/s by 6N ({by_model:,.0f} by estimate_flops); target 5x = "
          f"{5 * by_6n:,.0f} tokens/s")
    configs = [(int(t), False) for t in args.threads.split(",")]
    if not args.no_reference:
        configs.append((max(c[0] for c in configs), True))
    print(f"\n{'loader':<28} {'tokens/s (median)':>18} {'min..max':>22} {'first batch s':>14} {'dropped':>8} "
          f"{'x d20 need':>10}")
    worst = float("inf")
    for threads, reference in configs:
        runs = [measure(tokenizer, args, threads, reference) for _ in range(args.repeats)]
        rates = [r[0] for r in runs]
        median = statistics.median(rates)
        name = f"threads={threads}" + (" reference packer" if reference else "")
        print(f"{name:<28} {median:>18,.0f} {min(rates):>10,.0f}..{max(rates):<11,.0f} "
              f"{statistics.median(r[1] for r in runs):>14.2f} {runs[-1][2]:>8.1%} {median / by_6n:>9.1f}x")
        if not reference:
            worst = min(worst, median / by_6n)
    print(f"\nslowest fast-path configuration: {worst:.1f}x the d20 consumption ({'meets' if worst >= 5 else 'MISSES'}"
          " the 5x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
