"""The pure-Python reference BPE: hand-checked cases, then parity with PyPI rustbpe (training) and tiktoken (encoding).

The native tokenizer is compared against this reference in test_tokenizer.py; here the reference itself is pinned
to the two external definitions it claims to follow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import regex

from nanochat.tokenizer.reference import PATTERNS, ReferenceBPE, split_text

rustbpe = pytest.importorskip("rustbpe")
tiktoken = pytest.importorskip("tiktoken")

BOOK_EXCERPTS = [  # (file, start, characters)
    ("en_dracula.txt", 20_000, 12_000),
    ("fr_pg2650_du_cote_de_chez_swann.txt", 30_000, 8_000),
    ("zh_pg25558_shen_yin_yu.txt", 5_000, 4_000),
]


BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "books" / "text"


@pytest.fixture(scope="module")
def book_texts():
    folder = BOOKS
    if not folder.is_dir():
        pytest.skip(f"books not found at {folder}")
    return [(folder / name).read_text(encoding="utf-8")[start:start + n] for name, start, n in BOOK_EXCERPTS]


def tiktoken_of(bpe: ReferenceBPE):
    ranks = {token: rank for rank, token in reversed(list(enumerate(bpe.mergeable_ranks())))}
    return tiktoken.Encoding("reference", pat_str=bpe.pattern, mergeable_ranks=ranks, special_tokens={})


# ---------------------------------------------------------------------------------------------------------------
# Hand-checked training


def test_highest_count_first_then_smallest_pair():
    # chunks "ab", " ab", " ab", "cd": (a,b)=3, then (" ", ab)=2, then (c,d)=1
    bpe = ReferenceBPE.train(["ab ab ab", "cd"], vocab_size=259)
    assert bpe.merges == [(97, 98), (32, 256), (99, 100)]
    # chunks "ba", " ab": every pair has count 1, so the smallest pair goes first: (32, 97) < (97, 98) < (98, 97)
    bpe = ReferenceBPE.train(["ba ab"], vocab_size=259)
    assert bpe.merges == [(32, 97), (98, 97), (256, 98)]


def test_overlapping_pairs_count_separately_and_merge_left_to_right():
    bpe = ReferenceBPE.train(["aaaa"], vocab_size=300)
    # (a,a) occurs 3 times; merging gives [aa, aa]; then (aa, aa); then nothing is left to merge
    assert bpe.merges == [(97, 97), (256, 256)]
    assert bpe.encode("aaa") == [256, 97]
    assert bpe.encode("aaaaa") == [257, 97]


def test_merges_never_cross_chunks():
    bpe = ReferenceBPE.train(["a b a b a b"], vocab_size=260)
    for left, right in bpe.merges:
        token = bpe.mergeable_ranks()[left] + bpe.mergeable_ranks()[right]
        assert split_text(token.decode(), "nanochat") == [token.decode()]


def test_encode_follows_ranks_not_merges():
    # merges (b,c) -> 256, (a,b) -> 257, (ab,c) -> 258: "xabc" merges by rank to [x, abc] although the merge
    # list alone would stop at [x, a, bc] (no (a, bc) merge); tiktoken agrees with the ranks
    bpe = ReferenceBPE(merges=[(98, 99), (97, 98), (257, 99)], pattern=r"\S+|\s+")
    assert bpe.encode("xabc") == [ord("x"), 258]
    assert bpe.encode("abc") == [258]
    assert tiktoken_of(bpe).encode_ordinary("xabc yabcz") == bpe.encode("xabc yabcz")


def test_training_stops_when_no_pair_is_left():
    bpe = ReferenceBPE.train(["ab ab"], vocab_size=1000)
    rb = rustbpe.Tokenizer()
    rb.train_from_iterator(["ab ab"], 1000)
    assert bpe.merges == [(97, 98), (32, 256)]
    assert rb.vocab_size == bpe.vocab_size == 258
    assert ReferenceBPE.train([], vocab_size=300).merges == []


def test_bad_input():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 256"):
        ReferenceBPE.train(["abc"], vocab_size=200)
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, got bytes"):
        ReferenceBPE.train(["abc", b"abc"], vocab_size=300)
    with pytest.raises(ValueError, match="lone surrogate"):
        ReferenceBPE.train(["ok", "bad \ud800 text"], vocab_size=300)
    with pytest.raises(ValueError, match="lone surrogate"):
        ReferenceBPE.train(["abc"], vocab_size=300).encode("x\udfff")
    with pytest.raises(ValueError, match="refers to an id >= 257"):
        ReferenceBPE(merges=[(97, 98), (300, 97)])


def test_builtin_patterns_compile_and_split_everything():
    text = "Hello, world! It's 12345 apples\r\n\n  \t naïve 世界 — x2"
    for name, pattern in PATTERNS.items():
        chunks = split_text(text, name)
        assert "".join(chunks) == text, name
        assert regex.compile(pattern)
    assert split_text("12345", "nanochat") == ["12", "34", "5"]
    assert split_text("12345", "gpt4") == ["123", "45"]
    assert split_text("12345", "gpt2") == ["12345"]


# ---------------------------------------------------------------------------------------------------------------
# Parity with the external definitions


@pytest.mark.parametrize("pattern", ["nanochat", "gpt4", "gpt2"])
def test_training_matches_pypi_rustbpe(book_texts, pattern):
    vocab_size = 256 + 400
    bpe = ReferenceBPE.train(book_texts, vocab_size, pattern)
    rb = rustbpe.Tokenizer()
    rb.train_from_iterator(book_texts, vocab_size, pattern=PATTERNS[pattern])
    assert len(bpe.merges) == 400
    assert [token for token, _ in rb.get_mergeable_ranks()] == bpe.mergeable_ranks()
    assert rb.encode(book_texts[0]) == bpe.encode(book_texts[0])


def test_encoding_matches_tiktoken(book_texts):
    bpe = ReferenceBPE.train(book_texts, 256 + 600)
    enc = tiktoken_of(bpe)
    for text in book_texts + ["", " ", "\n\n\n", "Don't   stop: 3.14159!\r\n\tok"]:
        ids = bpe.encode(text)
        assert ids == enc.encode_ordinary(text)
        assert bpe.decode(ids) == text
