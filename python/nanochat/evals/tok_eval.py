"""`nanochat tok-eval`: compression (UTF-8 bytes per token) of our tokenizer against GPT-2's and GPT-4's.

- texts: the built-in samples in nanochat/evals/tok_samples (prose, code, non-English, math; written for this project),
  every *.txt of --texts-dir (one kind per file), and the first --val-chars characters of the validation shard
  when the pretraining data is present
- anchors: tiktoken's "gpt2" and "cl100k_base" (GPT-4), only when their rank files are available locally: in
  tiktoken's cache ($TIKTOKEN_CACHE_DIR, else $DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache) or given with
  --gpt2-ranks / --gpt4-ranks (.tiktoken files: base64 token and rank per line). Otherwise they are skipped with a
  message: this never touches the network
- higher bytes/token is better compression; "vs X" is how many fewer tokens we need than X (negative: more)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import MissingInputError, atomic_write
from nanochat.data.shards import iter_texts, list_shards
from nanochat.tokenizer import default_tokenizer_path, get_tokenizer

SAMPLES_DIR = Path(__file__).resolve().parent / "tok_samples"

# tiktoken's URLs for each anchor's rank files (the cache key is their sha1), and the patterns that go with them.
ANCHOR_FILES = {
    "gpt2": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"],
    "gpt4": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"],
}
TIKTOKEN_NAMES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}
ANCHOR_PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
             r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""),
}


@dataclass
class TokEvalConfig:
    tokenizer: str | None = None      # our tokenizer file; default $NANOCHAT_BASE_DIR/tokenizer/tokenizer.bin
    texts_dir: str | None = None      # extra *.txt files, one kind each
    data_dir: str | None = None       # parquet shards; the last (validation) one is sampled when present
    val_chars: int = 1_000_000        # characters of the validation shard to include
    gpt2_ranks: str | None = None     # local .tiktoken file for GPT-2 (r50k_base)
    gpt4_ranks: str | None = None     # local .tiktoken file for GPT-4 (cl100k_base)
    output_json: str | None = None    # results; default next to the tokenizer as tok_eval.json


def parse_args(argv: list[str] | None) -> TokEvalConfig:
    d = TokEvalConfig()
    p = argparse.ArgumentParser(prog="nanochat tok-eval", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file (default $NANOCHAT_BASE_DIR/tokenizer/tokenizer.bin)")
    p.add_argument("--texts-dir", default=None, help="folder of extra *.txt samples, one kind per file")
    p.add_argument("--data-dir", default=None, help="folder of parquet shards (default $NANOCHAT_BASE_DIR/base_data)")
    p.add_argument("--val-chars", type=int, default=d.val_chars,
                   help=f"characters of the validation shard to include, 0 for none (default {d.val_chars:,})")
    p.add_argument("--gpt2-ranks", default=None, help="local r50k_base.tiktoken file for the GPT-2 column")
    p.add_argument("--gpt4-ranks", default=None, help="local cl100k_base.tiktoken file for the GPT-4 column")
    p.add_argument("--output-json", default=None, help="where to write the results (default next to the tokenizer)")
    a = p.parse_args(argv)
    return TokEvalConfig(tokenizer=a.tokenizer, texts_dir=a.texts_dir, data_dir=a.data_dir, val_chars=a.val_chars,
                         gpt2_ranks=a.gpt2_ranks, gpt4_ranks=a.gpt4_ranks, output_json=a.output_json)


# ---------------------------------------------------------------------------------------------------------------
# Texts and anchors


def load_texts(cfg: TokEvalConfig) -> dict[str, str]:
    """kind -> text."""
    texts = {path.stem: path.read_text(encoding="utf-8") for path in sorted(SAMPLES_DIR.glob("*.txt"))}
    if cfg.texts_dir:
        folder = Path(cfg.texts_dir)
        if not folder.is_dir():
            raise MissingInputError(f"--texts-dir {folder} is not a folder")
        for path in sorted(folder.glob("*.txt")):
            texts[path.stem] = path.read_text(encoding="utf-8")
    if cfg.val_chars > 0:

        if len(list_shards(cfg.data_dir)) >= 2:
            texts["val-shard"] = "\n".join(iter_texts("val", data_dir=cfg.data_dir, max_chars=cfg.val_chars))
    return {kind: text for kind, text in texts.items() if text}


def tiktoken_cache_dir() -> str | None:
    """Where tiktoken keeps downloaded rank files (None: caching disabled)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A .tiktoken file: one `base64(token) rank` per line."""
    ranks = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


def load_anchor(name: str, ranks_file: str | None):
    """(tiktoken.Encoding or None, why it is missing)."""
    import tiktoken  # optional anchor: the comparison rows skip without it

    if ranks_file:
        ranks = read_tiktoken_ranks(ranks_file)
        return tiktoken.Encoding(f"{name}-local", pat_str=ANCHOR_PATTERNS[name], mergeable_ranks=ranks,
                                 special_tokens={}), ""
    cache = tiktoken_cache_dir()
    if cache is None:
        return None, "tiktoken caching is disabled (TIKTOKEN_CACHE_DIR is empty)"
    missing = [url for url in ANCHOR_FILES[name]
               if not os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))]
    if missing:
        return None, (f"rank file not in the tiktoken cache {cache} (needs {missing[0].rsplit('/', 1)[-1]}); run "
                      f"tiktoken.get_encoding({TIKTOKEN_NAMES[name]!r}) once online, or pass --{name}-ranks FILE")
    try:
        return tiktoken.get_encoding(TIKTOKEN_NAMES[name]), ""
    except Exception as e:  # a corrupt cache entry makes tiktoken try the network, which fails offline
        return None, f"tiktoken could not load {TIKTOKEN_NAMES[name]} from the cache: {e}"


# ---------------------------------------------------------------------------------------------------------------


def evaluate(encoders: dict, texts: dict[str, str]) -> dict[str, dict]:
    """kind -> {"bytes": n, "<encoder>": tokens, ...}."""
    results = {}
    for kind, text in texts.items():
        row = {"bytes": len(text.encode("utf-8"))}
        for name, encode in encoders.items():
            row[name] = len(encode(text))
        results[kind] = row
    return results


def format_table(results: dict[str, dict], names: list[str]) -> str:
    ours, anchors = names[0], names[1:]
    header = f"{'text':<14}{'bytes':>9}" + "".join(f"{n + ' tok':>12}{'B/tok':>7}" for n in names)
    header += "".join(f"{'vs ' + a:>10}" for a in anchors)
    lines = [header, "-" * len(header)]
    total = {"bytes": 0, **{n: 0 for n in names}}
    for kind, row in list(results.items()) + [("all", None)]:
        if row is None:
            row = total
        else:
            for key in total:
                total[key] += row[key]
        line = f"{kind:<14}{row['bytes']:>9,}"
        line += "".join(f"{row[n]:>12,}{row['bytes'] / max(row[n], 1):>7.2f}" for n in names)
        # fewer tokens than the anchor -> positive
        line += "".join(f"{100 * (row[a] - row[ours]) / max(row[a], 1):>+9.1f}%" for a in anchors)
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)

    tokenizer_path = Path(cfg.tokenizer) if cfg.tokenizer else default_tokenizer_path()
    tokenizer = get_tokenizer(tokenizer_path)
    encoders = {"ours": tokenizer.encode}
    for name, ranks_file in (("gpt2", cfg.gpt2_ranks), ("gpt4", cfg.gpt4_ranks)):
        encoding, why = load_anchor(name, ranks_file)
        if encoding is None:
            print(f"skipping {name}: {why}")
        else:
            encoders[name] = encoding.encode_ordinary

    texts = load_texts(cfg)
    results = evaluate(encoders, texts)
    print(f"bytes per token (higher is better); ours: vocab {tokenizer.vocab_size:,} from {tokenizer_path}")
    print(format_table(results, list(encoders)))

    output = Path(cfg.output_json) if cfg.output_json else tokenizer_path.parent / "tok_eval.json"
    with atomic_write(output, "w") as f:
        json.dump({"tokenizer": str(tokenizer_path), "vocab_size": tokenizer.vocab_size,
                   "encoders": list(encoders), "results": results}, f, indent=2)
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
