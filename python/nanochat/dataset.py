"""Pretraining shards: where they live, how to list and read them, how to get them (`nanochat data ...`).

- shards are parquet files with one `text` column under base_dir()/"base_data"; sorted by name, the LAST is
  validation (FineWeb-Edu shuffle: shard_00000 ... shard_01821 train, shard_01822 validation)
- `download -n N`: the first N train shards and the validation shard, in parallel threads; each file streams to
  a temporary name, is verified (Content-Length and the parquet footer), then renamed; retries with exponential
  backoff; shards already present and valid are skipped. Base URL: --base-url, else $NANOCHAT_DATA_URL, else the
  Hugging Face hub. 4xx answers other than 408/429 are permanent (no retry).
- `offline`: builds the offline demo corpus from Debian packages (nanochat.offline_corpus); not FineWeb
- `evals`: the eval/task data, delegated to nanochat.tasks.offline_data
- `from-files`: shards from your own text files, JSONL or parquet (nanochat.data_files)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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
    import pyarrow as pa
    import pyarrow.parquet as pq

    # large_string would be needed past 2 GiB of text in one shard; shards here stay far below that
    schema = pa.schema([pa.field("text", pa.string(), nullable=False)])
    table = pa.table({"text": pa.array(rows, type=pa.string())}, schema=schema)
    with atomic_write(path) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP_SIZE)


def _row_group_texts(path: Path) -> Iterator[list]:
    """The 'text' column of each row group of a shard; an unreadable shard is a CorruptInputError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    import pyarrow.parquet as pq

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
    import requests

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


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanochat data", description="get pretraining and evaluation data")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download FineWeb-Edu shuffle shards (train shards + the validation shard)")
    dl.add_argument("-n", "--num-shards", type=int, required=True,
                    help="number of train shards (~100 MB, ~55 M tokens each; -1 = all 1822); "
                         "the validation shard is always added")
    dl.add_argument("--base-url", default=None,
                    help=f"where shard_XXXXX.parquet live (default $NANOCHAT_DATA_URL or {HF_BASE_URL})")
    dl.add_argument("--workers", type=int, default=8, help="parallel downloads (threads)")
    dl.add_argument("--attempts", type=int, default=5, help="tries per shard before giving up")
    dl.add_argument("--backoff", type=float, default=2.0, help="first retry wait in seconds (doubles each try)")
    dl.add_argument("--data-dir", default=None, help="output folder (default $NANOCHAT_BASE_DIR/base_data)")
    off = sub.add_parser("offline", help="build the offline PIPELINE DEMO corpus from Debian packages (not FineWeb)")
    off.add_argument("--data-dir", default=None, help="output folder (default $NANOCHAT_BASE_DIR/base_data)")
    off.add_argument("--extra", action="store_true",
                     help="also use fortunes, fortunes-min and linux-doc-6.1 (~38 MB more .debs, ~4x the text)")
    off.add_argument("--packages", default=",".join(("python3.11-doc", "r-cran-janeaustenr")),
                     help="comma-separated Debian packages to read (known: python3.11-doc, r-cran-janeaustenr, "
                          "fortunes, fortunes-min, linux-doc-6.1)")
    off.add_argument("--src", default=None,
                     help="folder holding already unpacked packages as SRC/<package>/ (skips apt-get)")
    off.add_argument("--seed", type=int, default=1234, help="shuffle seed")
    off.add_argument("--shard-chars", type=int, default=4_000_000, help="target characters per train shard")
    off.add_argument("--force", action="store_true", help="replace shards already in the data folder")
    from nanochat import data_files

    data_files.add_parser(sub)
    ev = sub.add_parser("evals", help="build/fetch the evaluation and task data (nanochat.tasks.offline_data)",
                        add_help=False)
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _offline(args) -> int:
    from nanochat import offline_corpus

    out = Path(args.data_dir) if args.data_dir else data_dir()
    existing = list_shards(out)
    packages = [p.strip() for p in args.packages.split(",") if p.strip()]
    packages += [p for p in offline_corpus.OPTIONAL_PACKAGES if args.extra and p not in packages]
    marker = out / "offline_corpus.json"
    if existing and not args.force and marker.exists():  # already built: done, so recipes can call this every time
        built = json.loads(marker.read_text())
        if (built.get("packages"), built.get("seed")) == (packages, args.seed) and \
                [p.name for p in existing] == sorted(built.get("shards", {})):
            print(f"{out} already holds the offline demo corpus ({len(existing)} shards); --force rebuilds it")
            print(offline_corpus.DEMO_NOTICE)
            return 0
    if existing and not args.force:
        print(f"error: {out} already holds {len(existing)} shard(s) ({existing[0].name} ...); pass --force to "
              "replace them with the offline demo corpus", file=sys.stderr)
        return 1
    print(offline_corpus.DEMO_NOTICE)
    config = offline_corpus.CorpusConfig(seed=args.seed, train_shard_chars=args.shard_chars)
    staging = out.parent / f".{out.name}.offline-build"  # old shards stay until the new ones are complete
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stats = offline_corpus.build_offline(staging, packages, src_dir=args.src, config=config)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in existing:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, out / path.name)
    staging.rmdir()
    for name, shard in stats["shards"].items():
        print(f"  {name}: {shard['split']:<5} {shard['rows']:>6} rows {shard['chars']:>12,} chars")
    print(f"wrote {len(stats['shards'])} shards to {out} (the last is validation)")
    print(offline_corpus.DEMO_NOTICE)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evals"]:  # everything after `evals` belongs to the other module's parser
        from nanochat.tasks import offline_data

        return int(offline_data.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    if args.command == "download":
        config = DownloadConfig(base_url=args.base_url or os.environ.get("NANOCHAT_DATA_URL") or HF_BASE_URL,
                                workers=args.workers, attempts=args.attempts, backoff_s=args.backoff)
        out = Path(args.data_dir) if args.data_dir else data_dir()
        print(f"downloading {args.num_shards} train shard(s) + the validation shard from {config.base_url} to {out}")
        try:
            result = download(args.num_shards, out, config)
        except (RuntimeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"done: {len(result['downloaded'])} downloaded, {len(result['skipped'])} already present")
        return 0
    if args.command == "offline":
        return _offline(args)
    if args.command == "from-files":
        from nanochat import data_files

        return data_files.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
