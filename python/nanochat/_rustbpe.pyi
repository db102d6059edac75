"""Type stub of the native module nanochat._rustbpe (rust/rustbpe/src/python.rs). Private: use nanochat.tokenizer.

Every error surfaces as a Python exception (ValueError, TypeError, RuntimeError); a Rust panic never crosses.
"""

from collections.abc import Iterable

# Built-in split patterns, by name: "nanochat" (GPT-4 style, digit groups of 1-2; the default), "gpt4" (1-3 digits),
# "gpt2". A pattern string equal to one of these regexes is recognised and also gets the hand-written scanner.
PATTERNS: dict[str, str]

class Tokenizer:
    @staticmethod
    def train_from_iterator(
        texts: Iterable[str],
        vocab_size: int,
        pattern: str = "nanochat",          # a built-in name or any regex (fancy-regex syntax)
        special_tokens: list[str] = [],     # appended after the merges; they take the last ids
        max_chars: int | None = None,       # stop reading the iterator once this many characters were read
        doc_cap: int | None = None,         # truncate each document to this many characters
        buffer_size: int = 8192,            # documents pulled from Python per batch (at most ~4 MB; GIL held only then)
        progress: bool = False,             # print progress to stderr on long runs
    ) -> Tokenizer:
        """vocab_size counts the specials. Merges equal PyPI rustbpe 0.1.0's (highest count, ties to the smallest
        pair). Raises ValueError for vocab_size < 256 + len(special_tokens), a pattern that does not compile, an
        empty iterator, or a str with a lone surrogate (naming texts[i]); TypeError for a non-str item (naming its
        index and type). If the text runs out of pairs to merge, the vocabulary is smaller than asked (specials
        still take the last ids); check .vocab_size. Time is linear in the text, even for one huge piece (a 100 MB
        run of one letter trains in ~6 s), but memory is ~30 bytes per byte of unique piece text (3 GB for that
        run); use doc_cap to bound it."""
    @staticmethod
    def from_ranks(mergeable_ranks: list[bytes], pattern: str, special_tokens: list[str]) -> Tokenizer:
        """Rank i is the token whose bytes are mergeable_ranks[i] (first 256 must be the single bytes in the
        byte-level order of rank). Specials get ids len(mergeable_ranks) + j."""
    @staticmethod
    def load(path: str) -> Tokenizer: ...
    def save(self, path: str) -> None:
        """One file, written atomically (temp name + rename)."""
    @property
    def pattern(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    def special_tokens(self) -> dict[str, int]: ...
    def mergeable_ranks(self) -> list[bytes]:
        """Token bytes of every non-special id, in id order."""
    def merges(self) -> list[tuple[int, int]]:
        """The (left id, right id) pair that made token 256 + i, in merge order."""
    def encode_ordinary(self, text: str) -> list[int]:
        """Never produces a special id: special-token text is encoded as ordinary bytes. Ids equal tiktoken's for
        the same ranks (a byte string repeated at several ranks encodes as its lowest id)."""
    def encode(self, text: str, allowed_special: set[str] | str = ()) -> list[int]:
        """allowed_special: a set of special-token strings, or "all"; only those become special ids."""
    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Ordinary encoding of many texts in parallel with the GIL released (0 threads = all cores)."""
    def decode_bytes(self, ids: list[int]) -> bytes: ...
    def decode(self, ids: list[int], errors: str = "replace") -> str: ...
    def id_to_bytes(self, id: int) -> bytes: ...
    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each id; 0 for special tokens (feeds bits-per-byte)."""

# The CPU int8 matmul of rust/int8mm (called only through nanochat.model.int8_cpu, which checks the tensors)
INT8_ISA: str  # "avx512", "avx2" or "scalar": the kernel this CPU runs
INT8_TILE: tuple[int, int]  # (rows per tile, columns per chunk) of the packed layout

def int8_matmul(x_ptr: int, q_ptr: int, scale_ptr: int, y_ptr: int, m: int, n: int, k: int, isa: str,
                num_threads: int = 0) -> None:
    """y (m, n) = x (m, k) @ (scale[:, None] * q (n, k)).T on raw addresses of contiguous CPU buffers (x, scale, y
    float32; q int8, packed). Null or misaligned addresses, overflowing shapes and unknown kernels: ValueError."""

def int8_use_openmp(path: str | None) -> bool:
    """Run int8_matmul's threads on the already loaded OpenMP runtime at `path` (never loads one); None detaches."""
