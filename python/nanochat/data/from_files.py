"""Pretraining shards from your own files: `nanochat data from-files PATH... [--out DIR]`.

- inputs: files and folders (folders are walked recursively, in sorted path order; hidden names are skipped).
  By extension, each optionally gzip'd (`.gz`): .txt/.md/.markdown/.rst/.text (one document per file, or split on
  --separator), .jsonl/.ndjson (one document per line, from the `text` field or --field), .parquet (the `text`
  column or --field). Anything else is skipped with its reason, as are empty and binary (NUL bytes) files.
- text is kept byte for byte (no normalisation), so a shard's texts round-trip to the inputs; invalid UTF-8 is
  replaced by U+FFFD and reported with the file (and line), or stops the build with --strict
- documents longer than --doc-cap characters (default 4,000, ~1k tokens) are cut into consecutive pieces at
  paragraph, then line, then space boundaries; the pieces concatenate back to the document. The loader starts
  every row at a document and crops what does not fit a row, so a 50 MB document kept whole would give one row
  of text (the cropping measured: bench/RESULTS.md, "Document length and cropping")
- --dedup drops exact duplicate documents (SHA-256 of the text, before cutting)
- deterministic: the same inputs and --seed give the same shards. Documents are shuffled, then the first ones
  whose characters fit in --val-fraction of the total go to the validation shard (the LAST shard, as the loader
  expects), so pieces of one document never straddle train and validation
- memory: the documents are held once (plus one shard's Arrow copy while it is written); shards are written to a
  staging folder with the atomic shard writer of shards.py, and replace the old shards only when all are done
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.data.shards import data_dir, list_shards, write_shard

TEXT_EXTENSIONS = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)
DEFAULT_DOC_CAP = 4_000
DEFAULT_SHARD_CHARS = 100_000_000   # ~100 M characters per train shard (FineWeb-Edu's are ~250 M)
BINARY_SNIFF_BYTES = 8192           # a NUL byte in the first 8 KiB marks a file as binary (as git and grep do)
PROGRESS_MIN_BYTES = 256 << 20      # without a terminal, progress lines are printed only for inputs this large
MAX_LISTED = 10                     # file names listed per skip reason in the summary


class InputError(ValueError):
    """A problem with the user's input that stops the build (one line, exit status 2)."""


# ---------------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class BuildStats:
    files: int = 0
    input_bytes: int = 0
    documents: int = 0          # after de-duplication, before cutting
    pieces: int = 0             # rows written
    chars: int = 0
    duplicates: int = 0
    skipped_files: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> files
    skipped_records: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> file:line
    replaced_utf8: list[str] = field(default_factory=list)  # "file" or "file:line" where bytes were replaced
    shards: dict[str, dict] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"files": self.files, "input_bytes": self.input_bytes, "documents": self.documents,
                "rows": self.pieces, "chars": self.chars, "duplicates": self.duplicates,
                "skipped_files": dict(self.skipped_files), "skipped_records": dict(self.skipped_records),
                "replaced_utf8": self.replaced_utf8, "shards": self.shards}

    def summary(self) -> list[str]:
        lines = [f"read {self.files:,} file(s), {self.input_bytes:,} bytes: {self.documents:,} documents, "
                 f"{self.chars:,} characters, {self.pieces:,} rows"
                 + (f"; {self.duplicates:,} duplicate documents dropped" if self.duplicates else "")]
        for title, table in (("skipped files", self.skipped_files), ("skipped records", self.skipped_records)):
            for reason, where in sorted(table.items()):
                more = f" ... and {len(where) - MAX_LISTED} more" if len(where) > MAX_LISTED else ""
                lines.append(f"{title} ({reason}): {len(where)}: {', '.join(where[:MAX_LISTED])}{more}")
        if self.replaced_utf8:
            where = self.replaced_utf8
            more = f" ... and {len(where) - MAX_LISTED} more" if len(where) > MAX_LISTED else ""
            lines.append(f"invalid UTF-8 replaced by U+FFFD in {len(where)} place(s): "
                         f"{', '.join(where[:MAX_LISTED])}{more} (--strict stops instead)")
        return lines


# ---------------------------------------------------------------------------------------------------------------
# Finding and reading the inputs


def list_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Every file named or under a named folder, in a deterministic order (folders sorted by relative path);
    hidden files and folders (".git", ".DS_Store") inside folders are left out."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = []
            for child in path.rglob("*"):
                rel = child.relative_to(path)
                if child.is_file() and not any(part.startswith(".") for part in rel.parts):
                    found.append(child)
            files += sorted(found, key=lambda p: p.relative_to(path).as_posix())
        else:
            raise InputError(f"no such file or folder: {path}")
    return files


def kind_of(path: Path) -> tuple[str | None, bool]:
    """("text" | "jsonl" | "parquet" | None, gzipped) from the file name."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[:-3]
    for kind, extensions in (("text", TEXT_EXTENSIONS), ("jsonl", JSONL_EXTENSIONS),
                             ("parquet", PARQUET_EXTENSIONS)):
        if name.endswith(extensions):
            return kind, gzipped
    return None, gzipped


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode(data: bytes, where: str, strict: bool, stats: BuildStats, line: int | None = None) -> str:
    """UTF-8 -> str. Invalid bytes: InputError naming file and line when strict, else U+FFFD and a note."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line if line is not None else _line_of(data, e.start)
        if strict:
            raise InputError(f"{where}:{at}: invalid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}"
                             f"{'' if line is None else ' of the line'}); fix the file or drop --strict to "
                             "replace bad bytes with U+FFFD") from None
        stats.replaced_utf8.append(f"{where}:{at}")
        return data.decode("utf-8", errors="replace")


def read_bytes(path: Path, gzipped: bool) -> bytes:
    if not gzipped:
        return path.read_bytes()
    with gzip.open(path, "rb") as f:
        return f.read()


def docs_of_text(data: bytes, where: str, separator: str | None, strict: bool, stats: BuildStats) -> list[str]:
    text = decode(data, where, strict, stats)
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the text
        text = text[1:]
    pieces = text.split(separator) if separator else [text]
    return [p for p in pieces if p.strip()]


def docs_of_jsonl(data: bytes, where: str, field_name: str, strict: bool, stats: BuildStats) -> list[str]:
    docs = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        line = decode(raw, where, strict, stats, line=lineno)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg} at column {e.colno})"
        else:
            value = record.get(field_name) if isinstance(record, dict) else None
            if isinstance(value, str) and value.strip():
                docs.append(value)
                continue
            if not isinstance(record, dict):
                problem = f"not a JSON object (a {type(record).__name__})"
            elif field_name not in record:
                problem = f"no {field_name!r} field"
            elif not isinstance(value, str):
                problem = f"{field_name!r} is not a string"
            else:
                problem = f"empty {field_name!r}"
        if strict:
            raise InputError(f"{where}:{lineno}: {problem}")
        stats.skipped_records[problem.split(" (")[0]].append(f"{where}:{lineno}")
    return docs


def docs_of_parquet(data: bytes | Path, where: str, field_name: str, stats: BuildStats) -> list[str] | None:
    import pyarrow.parquet as pq  # heavy; only parquet inputs need it

    try:
        pf = pq.ParquetFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise InputError(f"not a readable parquet file: {e}") from e
    if field_name not in pf.schema_arrow.names:
        stats.skipped_files[f"no {field_name!r} column"].append(where)
        return None
    docs = []
    for rg in range(pf.num_row_groups):
        for text in pf.read_row_group(rg, columns=[field_name]).column(field_name).to_pylist():
            if isinstance(text, str) and text.strip():
                docs.append(text)
    return docs


def read_documents(path: Path, where: str, args, stats: BuildStats) -> list[str] | None:
    """The documents of one file, or None when the file is skipped (the reason goes into stats)."""
    kind, gzipped = kind_of(path)
    if kind is None:
        suffix = "".join(path.suffixes[-2:]) if gzipped else path.suffix
        stats.skipped_files[f"unknown extension {suffix or '(none)'}"].append(where)
        return None
    try:
        data = path if kind == "parquet" and not gzipped else read_bytes(path, gzipped)
        if kind == "parquet":
            return docs_of_parquet(data, where, args.field, stats)
    except (OSError, EOFError, zlib.error, InputError) as e:  # gzip.BadGzipFile is an OSError
        if args.strict:
            raise InputError(f"{where}: unreadable ({e})") from e
        stats.skipped_files["unreadable"].append(f"{where} ({e})")
        return None
    if not data.strip():
        stats.skipped_files["empty"].append(where)
        return None
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        stats.skipped_files["binary"].append(where)
        return None
    if kind == "jsonl":
        return docs_of_jsonl(data, where, args.field, args.strict, stats)
    return docs_of_text(data, where, args.separator, args.strict, stats)


# ---------------------------------------------------------------------------------------------------------------
# Cutting, splitting, sharding


def cut_document(text: str, cap: int | None) -> list[str]:
    """Consecutive pieces of at most `cap` characters whose concatenation is `text`: each cut goes after the last
    blank line, else line end, else space in the second half of the window; a hard cut when there is none."""
    if not cap or len(text) <= cap:
        return [text]
    pieces, start, n = [], 0, len(text)
    while n - start > cap:
        end = start + cap
        cut = -1
        for boundary in ("\n\n", "\n", " "):
            at = text.rfind(boundary, start + cap // 2, end)
            if at >= 0:
                cut = at + len(boundary)
                break
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def split_train_val(docs: list[list[str]], val_fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """Shuffle the documents (each a list of pieces); the first ones that fit in val_fraction of the characters
    go to validation. When every document is bigger than that share, the last pieces of the last document do."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    total = sum(len(p) for pieces in docs for p in pieces)
    target = val_fraction * total
    train, val, val_chars = [], [], 0
    for i in order:
        chars = sum(len(p) for p in docs[i])
        if val_chars + chars <= target:
            val += docs[i]
            val_chars += chars
        else:
            train += docs[i]
    if not val:
        # a few huge documents: take whole pieces from the end of the train list (the last document's tail)
        while train and (not val or val_chars + len(train[-1]) <= target) and len(train) > 1:
            val_chars += len(train[-1])
            val.insert(0, train.pop())
    if not train or not val:
        raise InputError(f"need at least 2 rows (train + validation), got {len(train) + len(val)}: give more text, "
                         "or a smaller --doc-cap so a document is cut into several rows")
    rng.shuffle(train)
    return train, val


def group_shards(train: list[str], shard_chars: int) -> list[list[str]]:
    shards, current, chars = [], [], 0
    for text in train:
        current.append(text)
        chars += len(text)
        if chars >= shard_chars:
            shards.append(current)
            current, chars = [], 0
    if current:
        shards.append(current)
    return shards


class Progress:
    """Bytes read out of the total, on stderr: a live line on a terminal; on a pipe, a line per 10% for inputs
    over PROGRESS_MIN_BYTES; nothing otherwise."""

    def __init__(self, total_bytes: int, stream=None):
        stream = sys.stderr if stream is None else stream
        self.total, self.done, self.stream = max(total_bytes, 1), 0, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.enabled = self.tty or total_bytes >= PROGRESS_MIN_BYTES
        self.t0, self.last_tenth, self.last_draw = time.time(), -1, 0.0

    def update(self, nbytes: int, files: int, docs: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        fraction = self.done / self.total
        line = f"reading: {fraction:6.1%} of {self.total / 1e6:,.1f} MB, {files:,} files, {docs:,} documents"
        if self.tty:
            now = time.time()
            if now - self.last_draw > 0.1 or self.done >= self.total:
                bar = "#" * int(30 * fraction)
                self.stream.write(f"\r[{bar:<30}] {line}")
                self.stream.flush()
                self.last_draw = now
        elif int(fraction * 10) > self.last_tenth:
            self.last_tenth = int(fraction * 10)
            self.stream.write(line + f" ({time.time() - self.t0:.0f}s)\n")

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


def build(paths: list[str], out: Path, args, log=print) -> BuildStats:
    """Read, de-duplicate, cut, split and write the shards into `out` (which should be a fresh folder)."""
    stats = BuildStats()
    files = list_inputs(paths)
    if not files:
        raise InputError(f"no files found in {', '.join(map(str, paths))}")
    progress = Progress(sum(p.stat().st_size for p in files))
    seen: set[bytes] = set()
    docs: list[list[str]] = []
    for path in files:
        where = str(path)
        new = read_documents(path, where, args, stats)
        if new == []:  # readable, but every record or piece was blank (or, in JSONL, reported above)
            stats.skipped_files["no text"].append(where)
        stats.files += 1
        size = path.stat().st_size
        stats.input_bytes += size
        for text in new or []:
            if args.dedup:
                digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()
                if digest in seen:
                    stats.duplicates += 1
                    continue
                seen.add(digest)
            docs.append(cut_document(text, args.doc_cap))
            stats.documents += 1
        del new
        progress.update(size, stats.files, stats.documents)
    progress.close()
    if not docs:
        raise InputError(f"no documents in {len(files)} file(s): " + "; ".join(stats.summary()[1:]))
    train, val = split_train_val(docs, args.val_fraction, random.Random(args.seed))
    del docs
    stats.pieces = len(train) + len(val)
    stats.chars = sum(map(len, train)) + sum(map(len, val))
    shards = group_shards(train, args.shard_chars) + [val]
    del train, val
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(shards)):
        rows = shards[i]
        name = f"shard_{i:05d}.parquet"
        write_shard(out / name, rows)
        stats.shards[name] = {"split": "val" if i == len(shards) - 1 else "train", "rows": len(rows),
                              "chars": sum(map(len, rows))}
        shards[i] = None  # written: free its text
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("from-files", help="build pretraining shards from your own .txt/.md/.jsonl/.parquet files",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="files and folders (folders are read recursively)")
    p.add_argument("--out", default=None, help="output folder (default $NANOCHAT_BASE_DIR/base_data)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the characters that goes to the validation shard (the last one)")
    p.add_argument("--doc-cap", type=int, default=DEFAULT_DOC_CAP,
                   help="cut documents into pieces of at most this many characters (0: never cut)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (by SHA-256)")
    p.add_argument("--field", default="text", help="the JSON field / parquet column that holds the text")
    p.add_argument("--separator", default=None,
                   help=r"split .txt/.md files into documents on this string (e.g. '\n\n\n'; \n and \t are "
                        "understood); default: one document per file")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first invalid UTF-8 or malformed record instead of replacing / skipping it")
    p.add_argument("--seed", type=int, default=1234, help="shuffle seed")
    p.add_argument("--shard-chars", type=int, default=DEFAULT_SHARD_CHARS, help="characters per train shard")
    p.add_argument("--force", action="store_true", help="replace shards already in the output folder")
    return p


def run(args) -> int:
    """`nanochat data from-files ...` (args from add_parser); returns the exit status."""
    if not 0.0 < args.val_fraction < 1.0:
        return _fail(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.doc_cap < 0 or args.shard_chars < 1:
        return _fail(f"--doc-cap must be >= 0 and --shard-chars >= 1, got {args.doc_cap} and {args.shard_chars}")
    if args.separator is not None:
        args.separator = args.separator.replace("\\n", "\n").replace("\\t", "\t")
        if not args.separator:
            return _fail("--separator must not be empty")
    out = Path(args.out) if args.out else data_dir()
    existing = list_shards(out)
    if existing and not args.force:
        return _fail(f"{out} already holds {len(existing)} shard(s) ({existing[0].name} ...); pass --force to "
                     "replace them, or --out to write elsewhere")
    staging = out.parent / f".{out.name}.from-files-build"  # the old shards stay until the new ones are complete
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stats = build(args.paths, staging, args)
        with open(staging / "from_files.json", "w") as f:
            json.dump({"inputs": [str(p) for p in args.paths], "seed": args.seed, "doc_cap": args.doc_cap,
                       "val_fraction": args.val_fraction, "dedup": args.dedup, **stats.as_json()}, f, indent=1)
    except InputError as e:
        shutil.rmtree(staging, ignore_errors=True)
        return _fail(str(e))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for path in existing:
        path.unlink()
    for marker in ("offline_corpus.json", "from_files.json"):  # describes shards that are gone
        (out / marker).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, out / path.name)
    staging.rmdir()
    for line in stats.summary():
        print(line)
    for name, shard in stats.shards.items():
        print(f"  {name}: {shard['split']:<5} {shard['rows']:>8,} rows {shard['chars']:>14,} chars")
    print(f"wrote {len(stats.shards)} shards to {out} (the last is validation); next: `nanochat tok-train`"
          + ("" if args.out is None else f" and `nanochat base-train` with --data-dir {out}"))
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
