"""Tests of the native tokenizer nanochat._rustbpe (rust/rustbpe): parity with PyPI rustbpe (merges) and tiktoken
(ids) on real and fuzzed text, special tokens, save/load, and bad input. The scanner-vs-regex differential fuzz test
and the pure-Rust references live in the crate (`cargo test`)."""

import pickle
import random
import time
from pathlib import Path

import pytest

from nanochat import _rustbpe as R

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

# ---------------------------------------------------------------------------------------------------------------
# data


def _synthetic_texts(n=300, seed=0):
    rng = random.Random(seed)
    words = ["the", "of", "and", "tokenizer", "merge", "don't", "I'LL", "café", "naïve", "北京", "1234567", "3.14",
             "x=y+1;", "    return", "\n\n", "\t", "!!", "'s", "Über", "€5", "😀"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) for _ in range(n)]


def _real_texts():
    """Real documents: the tiny parquet shard and a slice of each book when ../shared/data exists."""
    texts = []
    tiny = DATA / "tiny" / "tiny.parquet"
    if tiny.exists():
        import pyarrow.parquet as pq
        texts += pq.read_table(tiny, columns=["text"]).column("text").to_pylist()
    books = DATA / "books" / "text"
    if books.exists():
        for p in sorted(books.glob("*.txt")):
            t = p.read_text(encoding="utf-8")
            texts += [t[i:i + 5000] for i in range(len(t) // 3, len(t) // 3 + 30000, 5000)]
    return texts or _synthetic_texts()


def _fuzz_text(rng, n):
    pieces = ["a", "Z", " ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "'ve", "'x", "ſ", "1", "123456", "٣", "½", ".",
              "...", "!?", "é", "中文", "😀", "\u0301", "\u00a0", "\u3000", "\u2028", "<|bos|>", "<|user_end|>"]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            cp = rng.randrange(0x110000)
            out.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "x")
        elif r < 0.25:
            out.append(chr(rng.randrange(0x20, 0x3000)))
        else:
            out.append(rng.choice(pieces))
    return "".join(out)


@pytest.fixture(scope="module")
def real_texts():
    return _real_texts()


@pytest.fixture(scope="module")
def trained(real_texts):
    return R.Tokenizer.train_from_iterator(real_texts, 2000, pattern="nanochat", special_tokens=SPECIALS)


def _tiktoken(tok):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {}
    for i, t in enumerate(tok.mergeable_ranks()):
        ranks.setdefault(t, i)  # a repeated byte string encodes as its lowest id
    return tiktoken.Encoding("t", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens())


# ---------------------------------------------------------------------------------------------------------------
# training parity


@pytest.mark.parametrize("pattern", ["nanochat", "gpt4", "gpt2"])
def test_merges_identical_to_pypi_rustbpe(real_texts, pattern):
    rustbpe = pytest.importorskip("rustbpe")
    vocab = 1500
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(real_texts), vocab, pattern=R.PATTERNS[pattern])
    ref_ranks = [bytes(t) for t, _ in sorted(ref.get_mergeable_ranks(), key=lambda x: x[1])]
    ours = R.Tokenizer.train_from_iterator(iter(real_texts), vocab + 3, pattern=pattern, special_tokens=["<a>", "<b>", "<c>"])
    assert ours.mergeable_ranks() == ref_ranks
    # merges() rebuilds the ranks: token 256 + i = left + right
    ranks = ours.mergeable_ranks()
    for i, (a, b) in enumerate(ours.merges()):
        assert ranks[256 + i] == ranks[a] + ranks[b]


def test_merges_identical_to_pypi_rustbpe_with_ties():
    rustbpe = pytest.importorskip("rustbpe")
    texts = ["ab ba cd dc ab ba cd dc", "xyz zyx xy yx"] * 3 + ["aaaa bbbb aaaa"]
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(texts), 300, pattern=R.PATTERNS["gpt2"])
    ref_ranks = [bytes(t) for t, _ in sorted(ref.get_mergeable_ranks(), key=lambda x: x[1])]
    assert R.Tokenizer.train_from_iterator(texts, 300, pattern="gpt2").mergeable_ranks() == ref_ranks


def test_training_is_deterministic_and_specials_take_last_ids(real_texts):
    # 340 is within reach of the synthetic fallback corpus too (it has merges for ~350 ids), so this holds with
    # and without ../shared/data
    a = R.Tokenizer.train_from_iterator(real_texts, 340, special_tokens=SPECIALS)
    b = R.Tokenizer.train_from_iterator(iter(real_texts[::-1]), 340, special_tokens=SPECIALS, buffer_size=7)
    assert a.mergeable_ranks() == b.mergeable_ranks()
    assert a.vocab_size == 340 and len(a.mergeable_ranks()) == 331
    assert a.special_tokens() == {s: 331 + j for j, s in enumerate(SPECIALS)}


def test_custom_regex_falls_back_to_the_regex_engine(real_texts):
    pattern = r"\w+|\s+|[^\w\s]+"
    tok = R.Tokenizer.train_from_iterator(real_texts[:50], 600, pattern=pattern)
    assert tok.pattern == pattern
    enc = _tiktoken(tok)
    for t in real_texts[:50]:
        assert tok.encode_ordinary(t) == enc.encode_ordinary(t)


def test_max_chars_and_doc_cap(real_texts):
    docs = real_texts[:40]
    capped = R.Tokenizer.train_from_iterator(docs, 500, doc_cap=300)
    assert capped.mergeable_ranks() == R.Tokenizer.train_from_iterator([d[:300] for d in docs], 500).mergeable_ranks()
    # max_chars: stop once the documents read so far hold at least max_chars characters
    limit = sum(len(d) for d in docs[:10]) - 1
    limited = R.Tokenizer.train_from_iterator(docs, 500, max_chars=limit)
    assert limited.mergeable_ranks() == R.Tokenizer.train_from_iterator(docs[:10], 500).mergeable_ranks()


# ---------------------------------------------------------------------------------------------------------------
# encoding parity


def test_encode_matches_tiktoken_on_real_text(trained, real_texts):
    enc = _tiktoken(trained)
    for t in real_texts:
        assert trained.encode_ordinary(t) == enc.encode_ordinary(t)
    assert trained.encode_batch(real_texts) == enc.encode_ordinary_batch(real_texts)
    assert trained.encode_batch(real_texts, num_threads=1) == trained.encode_batch(real_texts, num_threads=2)


@pytest.mark.parametrize("pattern", ["nanochat", "gpt2"])
def test_encode_matches_tiktoken_on_fuzzed_text(real_texts, pattern):
    tok = R.Tokenizer.train_from_iterator(real_texts[:100] + _synthetic_texts(50), 1200, pattern=pattern,
                                          special_tokens=SPECIALS)
    enc = _tiktoken(tok)
    rng = random.Random(1)
    for i in range(1500):
        t = _fuzz_text(rng, 1 + i % 40)
        ids = tok.encode_ordinary(t)
        assert ids == enc.encode_ordinary(t), repr(t)
        assert tok.decode_bytes(ids) == t.encode("utf-8")


def test_from_ranks_with_permuted_bytes_matches_tiktoken(trained, real_texts):
    ranks = trained.mergeable_ranks()
    order = list(range(256))
    random.Random(3).shuffle(order)
    permuted = [ranks[i] for i in order] + ranks[256:]  # single bytes in any order, tiktoken-style
    tok = R.Tokenizer.from_ranks(permuted, "gpt4", [])
    enc = _tiktoken(tok)
    for t in real_texts[:80]:
        assert tok.encode_ordinary(t) == enc.encode_ordinary(t)


# ---------------------------------------------------------------------------------------------------------------
# specials, decoding, save/load


def test_user_text_never_becomes_a_special_id(trained):
    n = len(trained.mergeable_ranks())
    text = "hi <|bos|> there <|assistant_end|><|bos|>"
    ordinary = trained.encode_ordinary(text)
    assert max(ordinary) < n and trained.encode(text) == ordinary
    assert trained.decode(ordinary) == text
    bos, end = trained.special_tokens()["<|bos|>"], trained.special_tokens()["<|assistant_end|>"]
    only_bos = trained.encode(text, allowed_special={"<|bos|>"})
    assert only_bos.count(bos) == 2 and end not in only_bos
    everything = trained.encode(text, allowed_special="all")
    assert everything.count(bos) == 2 and everything.count(end) == 1
    assert trained.decode(everything) == text
    assert everything == _tiktoken(trained).encode(text, allowed_special="all")
    with pytest.raises(ValueError, match="<\\|nope\\|>"):
        trained.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="all"):
        trained.encode(text, allowed_special="some")


def test_decode_token_bytes_and_ids(trained):
    ids = trained.encode_ordinary("héllo wörld 😀")
    assert trained.decode_bytes(ids) == "héllo wörld 😀".encode()
    assert b"".join(trained.id_to_bytes(i) for i in ids) == "héllo wörld 😀".encode()
    tb = trained.token_bytes()
    assert len(tb) == trained.vocab_size
    assert tb[:256] == [1] * 256 and all(b == 0 for b in tb[-len(SPECIALS):])
    assert all(tb[i] == len(r) for i, r in enumerate(trained.mergeable_ranks()))
    assert trained.decode([0xE2]) == "\ufffd"  # a partial UTF-8 sequence is replaced by default...
    with pytest.raises(UnicodeDecodeError):
        trained.decode([0xE2], errors="strict")  # ...and raises with errors="strict"
    with pytest.raises(ValueError, match=str(trained.vocab_size)):
        trained.decode([trained.vocab_size])
    with pytest.raises(ValueError, match="-1"):
        trained.id_to_bytes(-1)


def test_save_load_one_file_and_pickle(trained, tmp_path):
    path = tmp_path / "tok.bin"
    trained.save(str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["tok.bin"]  # no temporary left behind
    back = R.Tokenizer.load(str(path))
    assert back.mergeable_ranks() == trained.mergeable_ranks()
    assert back.merges() == trained.merges() and back.special_tokens() == trained.special_tokens()
    assert back.pattern == trained.pattern
    clone = pickle.loads(pickle.dumps(trained))
    assert clone.encode_ordinary("pickled text") == trained.encode_ordinary("pickled text")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        R.Tokenizer.load(str(bad))
    with pytest.raises(OSError, match="missing"):
        R.Tokenizer.load(str(tmp_path / "missing.bin"))


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_training_input_gets_clear_errors():
    with pytest.raises(ValueError, match="texts\\[1\\].*surrogate"):
        R.Tokenizer.train_from_iterator(["ok", "bad \ud800 text"], 300)
    with pytest.raises(TypeError, match="texts\\[2\\] must be str, got int"):
        R.Tokenizer.train_from_iterator(["a", "b", 3], 300)
    with pytest.raises(TypeError, match="iterable"):
        R.Tokenizer.train_from_iterator(42, 300)
    with pytest.raises(ValueError, match="no text"):
        R.Tokenizer.train_from_iterator(iter([]), 300)
    with pytest.raises(ValueError, match="vocab_size must be >= 256 \\+ 9 special tokens = 265, got 264"):
        R.Tokenizer.train_from_iterator(["abc"], 264, special_tokens=SPECIALS)
    with pytest.raises(ValueError, match="invalid split pattern.*\\(unclosed"):
        R.Tokenizer.train_from_iterator(["abc"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="repeated"):
        R.Tokenizer.train_from_iterator(["abc"], 300, special_tokens=["<x>", "<x>"])

    def failing():
        yield "fine"
        raise KeyError("from the iterator")

    with pytest.raises(KeyError, match="from the iterator"):
        R.Tokenizer.train_from_iterator(failing(), 300)


def test_bad_encoding_input_gets_clear_errors(trained):
    with pytest.raises(ValueError, match="surrogate"):
        trained.encode_ordinary("x\udc80y")
    with pytest.raises(ValueError, match="texts\\[1\\].*surrogate"):
        trained.encode_batch(["fine", "\ud83d"])
    with pytest.raises(TypeError, match="texts\\[0\\] must be str, got bytes"):
        trained.encode_batch([b"bytes"])
    with pytest.raises(ValueError, match="rank 255 must be a single byte.*\"ab\""):
        R.Tokenizer.from_ranks([bytes([i]) for i in range(256) if i != 7] + [b"ab"], "gpt2", [])
    with pytest.raises(ValueError, match="at least the 256"):
        R.Tokenizer.from_ranks([b"a"], "gpt2", [])


def test_long_single_document_is_linear():
    """A 4 MB document of one letter (one giant piece) and 2 MB of no-whitespace random letters, each trained on
    alone: training (incl. building the encoder, whose tokens here are up to megabytes long) and encoding must stay
    near-linear. Regression: splitting every long token at every byte once made "a" * 100_000 take 4 s."""
    rng = random.Random(0)
    docs = ["a" * 4_000_000, "".join(rng.choice("abcdefgh") for _ in range(2_000_000))]
    t0 = time.perf_counter()
    for d in docs:
        tok = R.Tokenizer.train_from_iterator([d], 256 + 300)
        assert tok.decode(tok.encode_ordinary(d)) == d
    assert time.perf_counter() - t0 < 30
