"""Debian packages as text sources: fetch with `apt-get download`, unpack with `dpkg-deb -x`, read documents.

- no installation and no root beyond apt's own rules; `apt-get update` runs only when a download fails
- each reader yields (document id, cleaned text) in a deterministic order from an unpacked package tree
- Jane Austen's novels (`r-cran-janeaustenr`) are an R lazy-load database, decoded without R by PyPI `rdata`
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

from nanochat.data.plaintext import normalize, rst_to_text

DEFAULT_PACKAGES = ("python3.11-doc", "r-cran-janeaustenr")
OPTIONAL_PACKAGES = ("fortunes", "fortunes-min", "linux-doc-6.1")


def docs_python_doc(root: Path) -> Iterator[tuple[str, str]]:
    sources = root / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(sources.rglob("*.rst.txt")):
        rel = path.relative_to(sources).as_posix()[: -len(".rst.txt")]
        yield "python-doc/" + rel, rst_to_text(path.read_text(encoding="utf-8"))


def docs_linux_doc(root: Path) -> Iterator[tuple[str, str]]:
    docs = root / "usr/share/doc/linux-doc-6.1/Documentation"
    paths = [p for p in docs.rglob("*.gz") if p.name.endswith((".rst.gz", ".txt.gz"))
             and p.relative_to(docs).parts[0] != "translations"]
    for path in sorted(paths):
        rel = path.relative_to(docs).as_posix()[:-3]
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        if rel.endswith(".rst"):
            text = rst_to_text(raw)
        else:
            text = normalize(re.sub(r"(?m)^\s*(\.\.\s*)?SPDX-License-Identifier:.*\n", "", raw))
        yield "linux-doc/" + rel, text


def _austen_chapters(lines: list[str]) -> list[list[str]]:
    """Split a novel's lines at CHAPTER headings; the title page and VOLUME headings go with the next chapter."""
    chapter_re = re.compile(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$")
    volume_re = re.compile(r"^\s*(VOLUME|Volume)\s+[0-9IVXLC]+\s*$")
    chapters, current, pending = [], [], []
    has_heading = False
    for line in lines:
        if chapter_re.match(line):
            if has_heading and any(x.strip() for x in current):
                chapters.append(current)
                current = []
            current = current + pending + [line]
            pending, has_heading = [], True
        elif volume_re.match(line) and has_heading:
            pending += [line, ""]
        else:
            current.append(line)
    if current:
        chapters.append(current + pending)
    return chapters


def austen_paragraphs(lines: list[str]) -> str:
    """Join hard-wrapped lines into one line per paragraph, drop Gutenberg _italics_ underscores."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", "\n".join(lines)):
        para = " ".join(x.strip() for x in para.split("\n") if x.strip())
        para = re.sub(r"_([^_]+)_", r"\1", re.sub(r"\s{2,}", " ", para))
        if para:
            paragraphs.append(para)
    return normalize("\n\n".join(paragraphs))


def docs_austen(root: Path) -> Iterator[tuple[str, str]]:
    """The novels live in an R lazy-load database (data/Rdata.rdb + .rdx): the gzipped .rdx is an RDS list whose
    `variables` maps a name to (offset, length) in .rdb; each .rdb entry is a 4-byte length and a zlib stream
    holding an RDS character vector (one element per line of the book)."""
    try:
        import rdata  # only the Jane Austen package needs it
    except ImportError as e:
        raise RuntimeError("decoding the Jane Austen novels needs PyPI `rdata` (pip install rdata)") from e
    index_paths = sorted(root.rglob("data/Rdata.rdx"))
    if not index_paths:
        raise FileNotFoundError(f"no data/Rdata.rdx under {root}: is this an unpacked r-cran-janeaustenr?")
    index_path = index_paths[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns about R attributes it does not convert
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(index_path.read_bytes())))
        blob = index_path.with_suffix(".rdb").read_bytes()
        for name, (offset, length) in sorted(index["variables"].items()):
            offset, length = int(offset), int(length)
            raw = zlib.decompress(blob[offset + 4:offset + length])
            vector = rdata.conversion.convert(rdata.parser.parse_data(raw))
            lines = [str(x) for x in list(vector)]
            for k, chapter in enumerate(_austen_chapters(lines), 1):
                yield f"austen/{name}/{k:02d}", austen_paragraphs(chapter)


def _overstrike(line: str) -> str:
    """Resolve typewriter overstrike (X BS _ underlines, X BS X bold) like a terminal would."""
    buf, cur = [], 0
    for ch in line:
        if ch == "\x08":
            cur = max(0, cur - 1)
        elif cur < len(buf):
            if ch != "_":
                buf[cur] = ch
            cur += 1
        else:
            buf.append(ch)
            cur += 1
    return "".join(buf)


def docs_fortunes(root: Path, chunk_chars: int = 8000) -> Iterator[tuple[str, str]]:
    """Consecutive fortunes of one cookie file, grouped into documents of <= chunk_chars, separated by `%`."""
    folder = root / "usr/share/games/fortunes"
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        if "." in path.name or path.name == "ascii-art" or path.is_symlink() or not path.is_file():
            continue
        raw = path.read_bytes().decode("utf-8", errors="replace")
        raw = "\n".join(_overstrike(line) if "\x08" in line else line for line in raw.split("\n"))
        items = [normalize(x).rstrip("\n") for x in re.split(r"(?m)^%\s*$", raw)]
        items = [x for x in items if x.strip()]
        chunk, k = [], 0
        for item in items + [None]:
            if chunk and (item is None or sum(len(c) + 3 for c in chunk) + len(item) > chunk_chars):
                k += 1
                yield f"fortunes/{root.name}/{path.name}/{k:03d}", normalize("\n%\n".join(chunk))
                chunk = []
            if item is not None:
                chunk.append(item)


SOURCES = {  # Debian package -> reader of its unpacked tree
    "python3.11-doc": docs_python_doc,
    "r-cran-janeaustenr": docs_austen,
    "fortunes": docs_fortunes,
    "fortunes-min": docs_fortunes,
    "linux-doc-6.1": docs_linux_doc,
}


# ---------------------------------------------------------------------------------------------------------------
# Fetching packages


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{cmd[0]}` is not available: building the offline corpus needs Debian's apt-get and "
                           "dpkg-deb (or pass --src with already unpacked packages)") from e


def fetch_packages(packages: list[str], dest: Path, log=print) -> Path:
    """`apt-get download` each package into dest/deb, unpack to dest/src/<package>; returns dest/src.

    Runs `apt-get update` once (and retries) only when a download fails, as happens with stale package lists.
    """
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` is not available: building the offline corpus needs Debian's apt-get and "
                               "dpkg-deb (or pass --src with already unpacked packages)")
    deb_dir, src_dir = dest / "deb", dest / "src"
    deb_dir.mkdir(parents=True, exist_ok=True)
    src_dir.mkdir(parents=True, exist_ok=True)
    for package in packages:
        if list(deb_dir.glob(f"{package}_*.deb")):
            continue
        cmd = ["apt-get", "download", "-o", "APT::Sandbox::User=root", package]
        result = _run(cmd, deb_dir)
        if result.returncode != 0:
            log(f"apt-get download {package} failed ({result.stderr.strip().splitlines()[-1:]}); "
                "running apt-get update and retrying")
            _run(["apt-get", "update"], deb_dir)
            result = _run(cmd, deb_dir)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed (exit {result.returncode}): "
                               f"{result.stderr.strip()}")
    for package in packages:
        debs = sorted(deb_dir.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {package} left no {package}_*.deb in {deb_dir}")
        target = src_dir / package
        if target.is_dir():
            continue
        tmp = src_dir / f".{package}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        result = _run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], src_dir)
        if result.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {debs[-1]} failed: {result.stderr.strip()}")
        tmp.rename(target)
    return src_dir
