"""Pure-Python byte-level BPE: the slow, readable ground truth for the Rust trainer and encoder (nanochat._rustbpe).

Tests compare against it on small corpora; nothing in the pipeline uses it for real work.

- Pre-tokenization: the text is split into chunks with the `regex` module (possessive quantifiers, \\p{L}); each
  distinct chunk is a "word" of UTF-8 bytes, counted once per occurrence. BPE never merges across chunks.
- Training: repeatedly merge the adjacent pair with the highest total count; ties go to the smallest pair
  (left id, then right id). This is the rule of PyPI `rustbpe` 0.1.x, so its merges are ours given the same corpus,
  pattern and number of merges. Overlapping occurrences count separately ("aaa" holds (a, a) twice) and merging
  replaces occurrences left to right ("aaa" -> [aa, a]). Training stops early when no pair is left.
- Encoding follows tiktoken's definition (the contract for ids), not the merge list: a chunk whose bytes are a token
  is that token; otherwise the two adjacent parts whose concatenation has the lowest rank are merged, the leftmost
  first, until no concatenation is a token. The two definitions can differ: with merges (b,c) then (ab,c), the
  chunk "abc" becomes [a, bc] by merges but [abc] by ranks.
- Special tokens are not handled here; the public Tokenizer (nanochat.tokenizer) adds them after the merges.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import regex

# ---------------------------------------------------------------------------------------------------------------
# Split patterns (the same three are built into nanochat._rustbpe under the same names)

# GPT-4's pattern with digit groups of at most 2 (nanochat's choice: fewer number tokens in a small vocab).
NANOCHAT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# GPT-4 (cl100k) as PyPI rustbpe writes it: digit groups of 1-3.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# GPT-2's original pattern.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PATTERNS = {"nanochat": NANOCHAT_PATTERN, "gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}


def resolve_pattern(pattern: str) -> str:
    """A built-in pattern name -> its regex; any other string is taken as a regex itself."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str (a name in {sorted(PATTERNS)} or a regex), "
                        f"got {type(pattern).__name__}")
    return PATTERNS.get(pattern, pattern)


def split_text(text: str, pattern: str = "nanochat") -> list[str]:
    """The chunks BPE works inside: every match of the pattern, in order (text no alternative matches is dropped,
    as in tiktoken)."""
    return regex.findall(resolve_pattern(pattern), text)


def _utf8(chunk: str) -> bytes:
    try:
        return chunk.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = chunk[e.start:e.end]
        raise ValueError(f"text is not encodable as UTF-8 (lone surrogate {bad!r} at offset {e.start} of chunk "
                         f"{chunk[:40]!r}); expected valid Unicode") from None


def _merge_word(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """Replace each occurrence of `pair` in `word` by `new_id`, scanning left to right without overlaps."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# The reference BPE


@dataclass
class ReferenceBPE:
    """merges[i] is the (left id, right id) pair that made token 256 + i; ids 0..255 are the single bytes."""

    merges: list[tuple[int, int]]
    pattern: str = NANOCHAT_PATTERN
    _vocab: list[bytes] = field(init=False, repr=False)
    _ranks: dict[bytes, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.pattern = resolve_pattern(self.pattern)
        vocab = [bytes([b]) for b in range(256)]
        for i, (left, right) in enumerate(self.merges):
            if not (0 <= left < len(vocab) and 0 <= right < len(vocab)):
                raise ValueError(f"merge {i} = {(left, right)} refers to an id >= {len(vocab)}; expected earlier ids")
            vocab.append(vocab[left] + vocab[right])
        self._vocab = vocab
        self._ranks = {}
        for rank, token in enumerate(vocab):
            self._ranks.setdefault(token, rank)  # a repeated byte string keeps its first (lowest) rank

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    def mergeable_ranks(self) -> list[bytes]:
        """Token bytes of every id, in id order."""
        return list(self._vocab)

    # --- training ---

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = "nanochat") -> ReferenceBPE:
        """Learn vocab_size - 256 merges (fewer if the corpus runs out of pairs). No special tokens are counted."""
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the byte tokens), got {vocab_size!r}")
        pattern = resolve_pattern(pattern)
        compiled = regex.compile(pattern)
        chunk_counts: Counter[str] = Counter()
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
            chunk_counts.update(compiled.findall(text))

        words = [tuple(_utf8(chunk)) for chunk in chunk_counts]
        word_counts = list(chunk_counts.values())
        # pair -> total count over the corpus, and pair -> indices of the words that contain it
        pair_counts: Counter[tuple[int, int]] = Counter()
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (word, n) in enumerate(zip(words, word_counts)):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += n
                where[pair].add(w)

        merges: list[tuple[int, int]] = []
        while 256 + len(merges) < vocab_size and pair_counts:
            best = min(pair_counts, key=lambda p: (-pair_counts[p], p))  # highest count, then smallest pair
            new_id = 256 + len(merges)
            merges.append(best)
            for w in sorted(where.pop(best)):
                old, n = words[w], word_counts[w]
                new = _merge_word(old, best, new_id)
                for pair in zip(old, old[1:]):
                    pair_counts[pair] -= n
                    if pair_counts[pair] == 0:
                        del pair_counts[pair]
                for pair in zip(new, new[1:]):
                    pair_counts[pair] += n
                    where[pair].add(w)
                words[w] = new
            # words that lost a pair entirely stay in `where`; that only costs a no-op merge later
        return cls(merges=merges, pattern=pattern)

    # --- encoding ---

    def encode_chunk(self, chunk: bytes) -> list[int]:
        """tiktoken's byte-pair merge of one chunk: lowest-rank concatenation first, leftmost on ties."""
        if chunk in self._ranks:
            return [self._ranks[chunk]]
        parts = [chunk[i:i + 1] for i in range(len(chunk))]
        while len(parts) > 1:
            best_i, best_rank = -1, None
            for i in range(len(parts) - 1):
                rank = self._ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_i, best_rank = i, rank
            if best_rank is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [self._ranks[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids: list[int] = []
        for chunk in regex.findall(self.pattern, text):
            ids.extend(self.encode_chunk(_utf8(chunk)))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._vocab[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def train(texts: Iterable[str], vocab_size: int, pattern: str = "nanochat") -> ReferenceBPE:
    """Module-level shorthand for ReferenceBPE.train."""
    return ReferenceBPE.train(texts, vocab_size, pattern)
