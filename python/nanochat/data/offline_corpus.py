"""The offline default corpus: real English text from Debian packages, written as pretraining shards.

This is a PIPELINE DEMO corpus (about 13 M characters, ~3 M tokens), not FineWeb-Edu: it lets the whole
pipeline run on a machine that reaches only the package registries. Real runs use `nanochat data download`.

- sources (debian_sources.py): the reST sources of the Python 3.11 documentation and Jane Austen's six novels;
  optionally the fortune cookie files and the Linux kernel documentation
- same shape as the FineWeb-Edu shuffle shards (dataset.write_shard); the LAST shard is validation (~5% of each
  source's characters, split per original document so the pieces of one chapter never straddle train and val)
- deterministic: sorted inputs and a seeded shuffle give the same rows in the same order on every build
- documents are cut into pieces of <= 4,000 characters (plaintext.split_long): the loader starts every row at a
  document and crops what does not fit a row, so whole pages would lose most of their tokens (measured in
  bench/RESULTS.md, "Document length and cropping")
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import atomic_write
from nanochat.data.debian_sources import DEFAULT_PACKAGES, OPTIONAL_PACKAGES, SOURCES, fetch_packages
from nanochat.data.plaintext import MAX_DOC_CHARS, split_long
from nanochat.data.shards import write_shard

__all__ = ["DEFAULT_PACKAGES", "OPTIONAL_PACKAGES", "DEMO_NOTICE", "CorpusConfig", "build_corpus", "build_offline"]

DEMO_NOTICE = ("NOTE: this is the offline PIPELINE DEMO corpus (Python docs + Jane Austen from Debian packages, "
               "~3 M tokens), NOT FineWeb-Edu. It is enough to see a model learn, not to train a useful one; "
               "use `nanochat data download -n N` for real pretraining data.")

MIN_DOC_CHARS = 300          # shorter ones (toctree-only index pages, ...) are dropped
VAL_FRACTION = 0.05          # share of each source's characters that goes to the validation shard


@dataclass
class CorpusConfig:
    seed: int = 1234
    train_shard_chars: int = 4_000_000   # target characters per train shard (the default build gives 3 + val)
    max_doc_chars: int = MAX_DOC_CHARS
    min_doc_chars: int = MIN_DOC_CHARS
    val_fraction: float = VAL_FRACTION


def split_documents(docs: list[tuple[str, list[str]]], rng: random.Random, val_fraction: float):
    """Shuffle the original documents (each a list of pieces) and move ~val_fraction of the characters to val."""
    docs = sorted(docs, key=lambda d: d[0])
    rng.shuffle(docs)
    total = sum(len(p) for _, pieces in docs for p in pieces)
    train, val, val_chars = [], [], 0
    for _, pieces in docs:
        chars = sum(len(p) for p in pieces)
        if val_chars < val_fraction * total and val_chars + chars <= val_fraction * total * 1.02:
            val += pieces
            val_chars += chars
        else:
            train += pieces
    return train, val


def build_corpus(src_dir: Path, out_dir: Path, packages: list[str], config: CorpusConfig | None = None,
                 log=print) -> dict:
    """Read the unpacked packages under src_dir/<package>, write out_dir/shard_XXXXX.parquet (last = val) and
    out_dir/offline_corpus.json (stats); returns the stats."""

    config = config or CorpusConfig()
    rng = random.Random(config.seed)
    seen: set[str] = set()
    train: list[str] = []
    val: list[str] = []
    stats: dict = {"notice": DEMO_NOTICE, "packages": list(packages), "seed": config.seed, "sources": {},
                   "shards": {}}
    for package in packages:
        if package not in SOURCES:
            raise ValueError(f"unknown offline corpus package {package!r}; expected one of {sorted(SOURCES)}")
        root = Path(src_dir) / package
        if not root.is_dir():
            raise FileNotFoundError(f"{root} does not exist: expected the unpacked package {package}")
        docs, dropped_small, dropped_dup = [], 0, 0
        for doc_id, text in SOURCES[package](root):
            if len(text) < config.min_doc_chars:
                dropped_small += 1
                continue
            digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
            if digest in seen:
                dropped_dup += 1
                continue
            seen.add(digest)
            docs.append((doc_id, split_long(text, config.max_doc_chars)))
        if not docs:
            raise RuntimeError(f"package {package} gave no documents under {root}")
        s_train, s_val = split_documents(docs, rng, config.val_fraction)
        train += s_train
        val += s_val
        stats["sources"][package] = {"documents": len(docs), "dropped_small": dropped_small,
                                     "dropped_duplicate": dropped_dup, "train_rows": len(s_train),
                                     "val_rows": len(s_val), "chars": sum(map(len, s_train + s_val))}
        log(f"{package}: {len(docs)} documents, {len(s_train)} train / {len(s_val)} val rows")
    rng.shuffle(train)
    rng.shuffle(val)
    if not val:  # tiny inputs: still give validation one document
        val.append(train.pop())
    n_train_shards = max(1, round(sum(map(len, train)) / config.train_shard_chars))
    per_shard = sum(map(len, train)) / n_train_shards
    shards, current, chars = [], [], 0
    for text in train:
        current.append(text)
        chars += len(text)
        if chars >= per_shard and len(shards) < n_train_shards - 1:
            shards.append(current)
            current, chars = [], 0
    if current:
        shards.append(current)
    shards.append(val)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(shards):
        path = out_dir / f"shard_{i:05d}.parquet"
        write_shard(path, rows)
        stats["shards"][path.name] = {"split": "val" if i == len(shards) - 1 else "train", "rows": len(rows),
                                      "chars": sum(map(len, rows))}
    with atomic_write(out_dir / "offline_corpus.json", "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def build_offline(out_dir: Path, packages: list[str] | None = None, src_dir: Path | None = None,
                  config: CorpusConfig | None = None, log=print) -> dict:
    """Fetch (unless src_dir is given) and build. The downloaded .debs live in a temporary folder."""
    packages = list(packages or DEFAULT_PACKAGES)
    if src_dir is not None:
        return build_corpus(Path(src_dir), out_dir, packages, config, log)
    with tempfile.TemporaryDirectory(prefix="nanochat-offline-") as tmp:
        log(f"fetching {', '.join(packages)} with apt-get download into {tmp}")
        src = fetch_packages(packages, Path(tmp), log)
        return build_corpus(src, out_dir, packages, config, log)
