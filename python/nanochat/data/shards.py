"""Pretraining shards: where they live, how to list, read, write and download them (the command is nanochat.data.cli).

- shards are parquet files with one `text` column under base_dir()/"base_data"; sorted by name, the LAST is
  validation (FineWeb-Edu shuffle: shard_00000 ... shard_01821 train, shard_01822 validation)
- `download -n N`: the first N train shards and the validation shard, in parallel threads; each file streams to
  a temporary name, is verified (Content-Length and the parquet footer), then renamed; retries with exponential
  backoff; shards already present and valid are skipped. Base URL: --base-url, else $NANOCHAT_DATA_URL, else the
  Hugging Face hub. 4xx answers other than 408/429 are permanent (no retry).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import CorruptInputError, MissingInputError, atomic_write, base_dir, get_logger

HF_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
VAL_SHARD_INDEX = 1822  # the last shard of fineweb-edu-100b-shuffle is the validation split
ROW_GROUP_SIZE = 1024  # rows per parquet row group, as in the FineWeb-Edu shuffle shards


# ---------------------------------------------------------------------------------------------------------------
# Listing and reading shards


def data_dir() -> Path:
    """Where the pretraining shards live: base_dir()/"base_data"."""
    return base_dir() / "base_data"


_default_data_dir = data_dir  # the parameters below are named data_dir, as in the contract


def list_shards(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Sorted parquet shards in data_dir (temporary and hidden files excluded); the LAST one is validation."""
    folder = Path(data_dir) if data_dir is not None else _default_data_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".") and p.is_file())


def split_shards(split: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """"train" -> every shard but the last; "val" -> the last one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    shards = list_shards(data_dir)
    if len(shards) < 2:
        where = Path(data_dir) if data_dir is not None else _default_data_dir()
        raise MissingInputError(
            f"need at least 2 parquet shards (train + the last one for validation) in {where}, found {len(shards)}; "
            "run `nanochat data download -n N` (FineWeb-Edu) or `nanochat data offline` (demo corpus)")
    return shards[:-1] if split == "train" else shards[-1:]


def iter_texts(split: str = "train", data_dir: str | os.PathLike | None = None, max_chars: int | None = None,
               doc_cap: int | None = None) -> Iterator[str]:
    """Documents of a split in shard and row order, each cut to doc_cap characters; stops once max_chars
    characters (after cutting) have been yielded. For tokenizer training."""
    for name, value in (("max_chars", max_chars), ("doc_cap", doc_cap)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive number of characters or None, got {value}")
    total = 0
    for path in split_shards(split, data_dir):
        for texts in _row_group_texts(path):
            for text in texts:
                if text is None:
                    continue
                if doc_cap is not None:
                    text = text[:doc_cap]
                yield text
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return


def write_shard(path: Path, rows: list[str]) -> None:
    """One shard in the FineWeb-Edu shape (one non-null `text` column, zstd, ROW_GROUP_SIZE rows per group),
    written atomically: a crash leaves no half-written file under `path`."""

    # large_string would be needed past 2 GiB of text in one shard; shards here stay far below that
    schema = pa.schema([pa.field("text", pa.string(), nullable=False)])
    table = pa.table({"text": pa.array(rows, type=pa.string())}, schema=schema)
    with atomic_write(path) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP_SIZE)


def _row_group_texts(path: Path) -> Iterator[list]:
    """The 'text' column of each row group of a shard; an unreadable shard is a CorruptInputError naming it."""
    try:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError, KeyError) as e:
        raise CorruptInputError(f"corrupt or truncated parquet shard {path}: {e}") from e


# ---------------------------------------------------------------------------------------------------------------
# Downloading


@dataclass
class DownloadConfig:
    base_url: str = HF_BASE_URL
    workers: int = 8
    attempts: int = 5           # tries per shard
    backoff_s: float = 2.0      # wait before retry k (k = 1, 2, ...) is backoff_s * 2**(k-1) plus up to 10% jitter
    timeout_s: float = 60.0     # connect and per-read socket timeout
    chunk_bytes: int = 1 << 20


class PermanentError(Exception):
    """A failure that retrying cannot fix (404, 403, ...)."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def verify_parquet(path: Path, expected_bytes: int | None = None) -> None:
    """Raise ValueError unless path is a complete parquet file (size, magic bytes at both ends, readable footer)."""
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise ValueError(f"{path.name}: got {size} bytes, Content-Length said {expected_bytes}")
    if size < 12:
        raise ValueError(f"{path.name}: only {size} bytes, too short for a parquet file")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise ValueError(f"{path.name}: missing the parquet magic bytes (head {head!r}, tail {tail!r}): truncated?")
    try:
        pq.ParquetFile(path).metadata  # parses the footer
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a broken footer
        raise ValueError(f"{path.name}: unreadable parquet footer: {e}") from e


def _fetch_once(url: str, dest: Path, config: DownloadConfig) -> None:
    """Stream url to a temporary file next to dest, verify, rename. Leaves nothing behind on failure."""
    import requests  # only downloads need it

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
    try:
        # identity encoding: Content-Length then counts the bytes we write
        with requests.get(url, stream=True, timeout=config.timeout_s,
                          headers={"Accept-Encoding": "identity"}) as response:
            if response.status_code != 200:
                message = f"HTTP {response.status_code} for {url}"
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    raise PermanentError(message)
                raise OSError(message)
            length = response.headers.get("Content-Length")
            if response.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                length = None  # a mirror compressed it anyway: the length is of the compressed body
            with open(tmp, "wb") as f:
                for chunk in response.iter_content(chunk_size=config.chunk_bytes):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        verify_parquet(tmp, int(length) if length is not None else None)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def download_shard(index: int, out_dir: Path, config: DownloadConfig) -> str:
    """One shard with retries; returns "skipped" or "downloaded", raises RuntimeError when every try failed."""
    log = get_logger()
    dest = out_dir / shard_name(index)
    if dest.exists():
        try:
            verify_parquet(dest)
            return "skipped"
        except ValueError as e:
            log.warning(f"{dest} is present but invalid ({e}); downloading it again")
    url = f"{config.base_url.rstrip('/')}/{shard_name(index)}"
    last_error: Exception | None = None
    for attempt in range(1, config.attempts + 1):
        try:
            _fetch_once(url, dest, config)
            return "downloaded"
        except PermanentError as e:
            raise RuntimeError(f"failed to download {url}: {e} (not retried)") from e
        except Exception as e:  # network errors, truncated bodies, bad files: all worth another try
            last_error = e
            if attempt < config.attempts:
                wait = config.backoff_s * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
                log.warning(f"{shard_name(index)}: try {attempt}/{config.attempts} failed ({e}); "
                            f"retrying in {wait:.2f}s")
                time.sleep(wait)
    raise RuntimeError(f"failed to download {url} after {config.attempts} tries: {last_error}") from last_error


def download(num_train_shards: int, out_dir: str | os.PathLike | None = None, config: DownloadConfig | None = None,
             val_index: int = VAL_SHARD_INDEX) -> dict[str, list[int]]:
    """The first num_train_shards train shards (-1: all) and the validation shard, in parallel.

    Returns {"downloaded": [...], "skipped": [...]}; raises RuntimeError naming every shard that failed.
    """
    config = config or DownloadConfig()
    if num_train_shards == -1:
        num_train_shards = val_index
    if not 0 <= num_train_shards <= val_index:
        raise ValueError(f"number of train shards must be in 0..{val_index} (or -1 for all), got {num_train_shards}")
    if config.workers < 1:
        raise ValueError(f"workers must be >= 1, got {config.workers}")
    out = Path(out_dir) if out_dir is not None else data_dir()
    out.mkdir(parents=True, exist_ok=True)
    indices = list(range(num_train_shards)) + [val_index]
    result: dict[str, list[int]] = {"downloaded": [], "skipped": []}
    errors = []
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        futures = {i: pool.submit(download_shard, i, out, config) for i in indices}
        for i, future in futures.items():
            try:
                result[future.result()].append(i)
            except Exception as e:
                errors.append(f"{shard_name(i)}: {e}")
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(indices)} shard(s) failed:\n  " + "\n  ".join(errors))
    return result
