"""Tokenizer benchmark: nanochat's rustbpe against PyPI rustbpe, Hugging Face tokenizers and tiktoken.

Prints one markdown table (paste it into bench/RESULTS.md):
- training: wall time and peak RSS of each trainer on the same documents, vocab and split pattern. Each run is a
  fresh subprocess (so peak RSS is that trainer's alone); the documents are read into a list before the clock starts,
  so parquet decoding is not timed; medians over --runs runs. Ours and PyPI rustbpe must produce identical merges.
- encoding: MB/s of UTF-8 input on ~5 KB and ~200 B documents cut from the corpus, one thread (a Python loop of
  single-document calls) and a 2-thread batch call; ours vs tiktoken (built from our ranks) vs HF tokenizers (our
  ranks exported by nanochat.tokenizer.to_hf). Ids must be identical to tiktoken's.

Notable choices: thread counts are pinned with RAYON_NUM_THREADS / RAYON_RS_NUM_THREADS; medians, because the
machine these numbers come from is shared and noisy; ratios are "anchor time / our time" (higher is better for us).
Training also reports process CPU seconds (all threads, user + sys), which a busy machine disturbs less than wall
time (the ours row's CPU also includes writing its tokenizer file).

    python bench/tokenizer.py ../shared/data/corpus --runs 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


@dataclass
class Config:
    corpus: str
    vocab_size: int = 65536
    pattern: str = "nanochat"
    runs: int = 3
    threads: int = 2
    trainers: str = "ours,rustbpe,hf"
    encode_mb: float = 4.0
    max_docs: int | None = None


# ---------------------------------------------------------------------------------------------------------------
# corpus


def read_texts(path: str, max_docs: int | None = None) -> list[str]:
    """Documents from a parquet file or folder of parquet shards (`text` column), or .txt files (one document each)."""
    p = Path(path)
    files = sorted(p.glob("*.parquet")) + sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise SystemExit(f"no .parquet or .txt files in {path}")
    texts: list[str] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq
            texts += pq.read_table(f, columns=["text"]).column("text").to_pylist()
        else:
            texts.append(f.read_text(encoding="utf-8"))
        if max_docs and len(texts) >= max_docs:
            return texts[:max_docs]
    return texts


def chunk_docs(texts: list[str], doc_chars: int, total_mb: float) -> list[str]:
    """Cut the corpus into documents of about doc_chars characters, up to total_mb of UTF-8."""
    docs, size = [], 0
    for t in texts:
        for i in range(0, len(t) - doc_chars + 1, doc_chars):
            d = t[i:i + doc_chars]
            docs.append(d)
            size += len(d.encode("utf-8"))
            if size >= total_mb * 1e6:
                return docs
    return docs


# ---------------------------------------------------------------------------------------------------------------
# training (one subprocess per run)


def train_worker(which: str, cfg: Config, out: str) -> None:
    import resource
    texts = read_texts(cfg.corpus, cfg.max_docs)
    from nanochat import _rustbpe
    regex = _rustbpe.PATTERNS.get(cfg.pattern, cfg.pattern)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss_before, cpu0 = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    if which == "ours":
        tok = _rustbpe.Tokenizer.train_from_iterator(iter(texts), cfg.vocab_size, pattern=cfg.pattern,
                                                     special_tokens=SPECIALS)
        wall = time.perf_counter() - t0
        tok.save(out + ".bin")
        ranks = tok.mergeable_ranks()
    elif which == "rustbpe":
        import rustbpe
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), cfg.vocab_size - len(SPECIALS), pattern=regex)
        wall = time.perf_counter() - t0
        ranks = [bytes(t) for t, _ in sorted(tok.get_mergeable_ranks(), key=lambda x: x[1])]
    elif which == "hf":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, show_progress=False, min_frequency=0,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIALS)
        tok.train_from_iterator(iter(texts), trainer)
        wall = time.perf_counter() - t0
        ranks = []
    else:
        raise SystemExit(f"unknown trainer {which}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime - cpu0  # cpu includes saving/ranks
    Path(out).write_text(json.dumps({"wall": wall, "cpu": cpu, "peak_rss_mb": peak, "rss_before_mb": rss_before,
                                     "ranks": [r.hex() for r in ranks]}))


def run_training(cfg: Config, workdir: str) -> dict:
    results = {}
    env = dict(os.environ, RAYON_NUM_THREADS=str(cfg.threads), RAYON_RS_NUM_THREADS=str(cfg.threads),
               TOKENIZERS_PARALLELISM="true")
    for which in cfg.trainers.split(","):
        runs = []
        for r in range(cfg.runs):
            out = os.path.join(workdir, f"{which}-{r}.json")
            cmd = [sys.executable, __file__, cfg.corpus, "--train-worker", which, "--worker-out", out,
                   "--vocab-size", str(cfg.vocab_size), "--pattern", cfg.pattern]
            if cfg.max_docs:
                cmd += ["--max-docs", str(cfg.max_docs)]
            subprocess.run(cmd, env=env, check=True)
            runs.append(json.loads(Path(out).read_text()))
            print(f"  train {which} run {r}: {runs[-1]['wall']:.2f} s, peak RSS {runs[-1]['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
        results[which] = runs
    return results


# ---------------------------------------------------------------------------------------------------------------
# encoding


def throughput(fn, docs, runs) -> float:
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(docs)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e6


def run_encoding(cfg: Config, tok_path: str, texts: list[str]) -> tuple[dict, dict]:
    import tiktoken

    from nanochat import _rustbpe
    ours = _rustbpe.Tokenizer.load(tok_path)
    first: dict[bytes, int] = {}
    for i, t in enumerate(ours.mergeable_ranks()):
        first.setdefault(t, i)
    tik = tiktoken.Encoding("bench", pat_str=ours.pattern, mergeable_ranks=first, special_tokens={})
    hf = None
    try:
        from nanochat.tokenizer import Tokenizer as Public
        hf = Public(ours).to_hf()
    except Exception as e:  # the public wrapper is another engineer's; report without HF rather than fail
        print(f"  HF export unavailable ({e}); skipping HF encoding", file=sys.stderr)
    n = cfg.threads
    encoders = {
        "ours": (lambda ds: [ours.encode_ordinary(d) for d in ds], lambda ds: ours.encode_batch(ds, num_threads=n)),
        "tiktoken": (lambda ds: [tik.encode_ordinary(d) for d in ds],
                     lambda ds: tik.encode_ordinary_batch(ds, num_threads=n)),
    }
    if hf is not None:
        encoders["HF tokenizers"] = (lambda ds: [hf.encode(d, add_special_tokens=False).ids for d in ds],
                                     lambda ds: [e.ids for e in hf.encode_batch(ds, add_special_tokens=False)])
    results: dict = {name: {} for name in encoders}
    identity: dict = {}
    for label, chars in [("5 KB", 5000), ("200 B", 200)]:
        docs = chunk_docs(texts, chars, cfg.encode_mb)
        ref = tik.encode_ordinary_batch(docs, num_threads=n)
        for name, (single, batch) in encoders.items():
            if name != "tiktoken":
                same = single(docs) == ref and batch(docs) == ref
                identity[f"{name} {label}"] = (same, len(docs))
            results[name][f"{label} 1 thread"] = throughput(single, docs, cfg.runs)
            results[name][f"{label} {n}-thread batch"] = throughput(batch, docs, cfg.runs)
            print(f"  encode {name} {label}: {results[name]}", file=sys.stderr)
    return results, identity


# ---------------------------------------------------------------------------------------------------------------
# report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", help="parquet file, folder of parquet shards (text column) or of .txt files")
    ap.add_argument("--vocab-size", type=int, default=65536, help="tokens including the 9 special tokens")
    ap.add_argument("--pattern", default="nanochat", help="split pattern: nanochat, gpt4, gpt2 or a regex")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement; the table shows medians")
    ap.add_argument("--threads", type=int, default=2, help="threads for training and batch encoding")
    ap.add_argument("--trainers", default="ours,rustbpe,hf", help="comma list of ours, rustbpe, hf")
    ap.add_argument("--encode-mb", type=float, default=4.0, help="MB of text per encoding document size")
    ap.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (quick runs)")
    ap.add_argument("--train-worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = Config(args.corpus, args.vocab_size, args.pattern, args.runs, args.threads, args.trainers, args.encode_mb,
                 args.max_docs)
    if args.train_worker:
        train_worker(args.train_worker, cfg, args.worker_out)
        return 0
    os.environ.setdefault("RAYON_RS_NUM_THREADS", str(cfg.threads))  # HF's pool size, read on first use
    texts = read_texts(cfg.corpus, cfg.max_docs)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    with tempfile.TemporaryDirectory() as workdir:
        train = run_training(cfg, workdir)
        if "ours" not in train:
            raise SystemExit("--trainers must include ours (the encoding benchmark uses its tokenizer)")
        enc, identity = run_encoding(cfg, os.path.join(workdir, "ours-0.json.bin"), texts)

    load = os.getloadavg()
    print(f"\nCorpus {cfg.corpus}: {len(texts)} documents, {mb:.1f} MB; vocab {cfg.vocab_size} (9 specials), "
          f"pattern {cfg.pattern}, {cfg.threads} threads; medians of {cfg.runs} runs; "
          f"load average at the end {load[0]:.1f} on {os.cpu_count()} cores (shared machine: noisy)\n")
    anchor = train.get("rustbpe")
    print("| trainer | wall s (median) | runs (s) | CPU s (median) | peak RSS MB | wall speed-up vs PyPI rustbpe | "
          "CPU ratio | RSS vs rustbpe |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in train.items():
        wall = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        if anchor:
            a_wall = statistics.median(r["wall"] for r in anchor)
            a_cpu = statistics.median(r["cpu"] for r in anchor)
            a_rss = statistics.median(r["peak_rss_mb"] for r in anchor)
            ratio, cpu_ratio, rss_ratio = f"{a_wall / wall:.2f}x", f"{a_cpu / cpu:.2f}x", f"{rss / a_rss:.2f}"
        else:
            ratio = cpu_ratio = rss_ratio = "-"
        label = {"ours": "ours (nanochat rustbpe)", "rustbpe": "PyPI rustbpe 0.1.0", "hf": "HF tokenizers BpeTrainer"}
        walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
        print(f"| {label.get(name, name)} | {wall:.2f} | {walls} | {cpu:.2f} | {rss:.0f} | {ratio} | {cpu_ratio} | "
              f"{rss_ratio} |")
    if anchor:
        same = train["ours"][0]["ranks"] == anchor[0]["ranks"]
        print(f"\nMerges identical to PyPI rustbpe: {'yes' if same else 'NO'} ({len(anchor[0]['ranks'])} ranks)")
    cols = list(next(iter(enc.values())).keys())
    print("\n| encoder (MB/s) | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for name, res in enc.items():
        cells = []
        for c in cols:
            ratio = res[c] / enc["tiktoken"][c]
            cells.append(f"{res[c]:.1f} ({ratio:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n(x) = throughput relative to tiktoken. Ids identical to tiktoken: " +
          "; ".join(f"{k}: {'yes' if ok else 'NO'} ({n} docs)" for k, (ok, n) in identity.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
