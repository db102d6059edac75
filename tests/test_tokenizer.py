"""The public Tokenizer over nanochat._rustbpe: parity of the Rust trainer and encoder with the pure-Python reference,
tiktoken and the Hugging Face export; special-token safety; chat rendering and its loss mask; save/load; token_bytes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nanochat import _rustbpe
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, default_tokenizer_path, get_token_bytes, get_tokenizer
from nanochat.tokenizer.reference import PATTERNS, ReferenceBPE

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "books" / "text"
BOOK_EXCERPTS = {  # language -> (file, start, characters)
    "en": ("en_pg2701_moby_dick.txt", 50_000, 12_000),
    "fr": ("fr_pg2650_du_cote_de_chez_swann.txt", 40_000, 8_000),
    "zh": ("zh_pg25558_shen_yin_yu.txt", 8_000, 4_000),
}
N_MERGES = 500
VOCAB = 256 + N_MERGES + len(SPECIAL_TOKENS)


def random_text(rng: random.Random, n: int) -> str:
    """Fuzz input: ASCII, digits, contractions, every kind of whitespace, and code points from the whole of Unicode
    (mostly the BMP), never a lone surrogate."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            out.append(chr(rng.randrange(32, 127)))
        elif r < 0.4:
            out.append(rng.choice(" \n\t\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2003\u2028\u2029\u3000\u200b\u180e\ufeff"))
        elif r < 0.55:
            out.append(rng.choice("0123456789'sSdDtTmMlLvVeErR<|>_"))
        elif r < 0.85:
            c = rng.randrange(0x80, 0x10000)
            out.append(chr(c if not 0xD800 <= c < 0xE000 else c - 0x800))
        else:
            c = rng.randrange(0x10000, 0x110000)
            out.append(chr(c))
    return "".join(out)


@pytest.fixture(scope="module")
def books() -> dict[str, str]:
    if not BOOKS.is_dir():
        pytest.skip(f"books not found at {BOOKS}")
    return {lang: (BOOKS / name).read_text(encoding="utf-8")[start:start + n]
            for lang, (name, start, n) in BOOK_EXCERPTS.items()}


@pytest.fixture(scope="module")
def trained(books) -> tuple[Tokenizer, ReferenceBPE]:
    texts = list(books.values())
    return Tokenizer.train_from_iterator(texts, vocab_size=VOCAB), ReferenceBPE.train(texts, 256 + N_MERGES)


@pytest.fixture(scope="module")
def tok(trained) -> Tokenizer:
    return trained[0]


# ---------------------------------------------------------------------------------------------------------------
# Training parity


def test_vocab_layout(tok):
    assert tok.vocab_size == tok.get_vocab_size() == VOCAB
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    assert tok.bos_token_id == tok.get_bos_token_id() == VOCAB - 9
    assert tok.pattern == PATTERNS["nanochat"] == _rustbpe.PATTERNS["nanochat"]
    with pytest.raises(ValueError, match="unknown special token '<|eos|>'"):
        tok.encode_special("<|eos|>")


def test_builtin_patterns_agree_with_reference():
    assert _rustbpe.PATTERNS == PATTERNS


def test_rust_trainer_matches_reference(trained):
    tok, ref = trained
    assert tok.mergeable_ranks() == ref.mergeable_ranks()
    assert tok._native.merges() == ref.merges


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_rust_trainer_matches_reference_other_patterns(books, pattern):
    texts = [books["en"][:6000], books["fr"][:3000]]
    tok = Tokenizer.train_from_iterator(texts, vocab_size=256 + 200 + 9, pattern=pattern)
    ref = ReferenceBPE.train(texts, 256 + 200, pattern)
    assert tok.pattern == PATTERNS[pattern]
    assert tok._native.merges() == ref.merges


def test_rust_trainer_matches_reference_on_fuzzed_unicode():
    rng = random.Random(1)
    texts = [random_text(rng, rng.randrange(0, 400)) for _ in range(60)]
    texts += ["aaaaaaa bbbb aaaa", "12345678901234", "x" * 500]
    tok = Tokenizer.train_from_iterator(texts, vocab_size=256 + 300 + 9)
    ref = ReferenceBPE.train(texts, 256 + 300)
    assert tok._native.merges() == ref.merges


def test_rust_trainer_matches_pypi_rustbpe(books):
    rustbpe = pytest.importorskip("rustbpe")
    texts = [text[i:i + 500] for text in books.values() for i in range(0, len(text), 500)]  # many documents
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=256 + 1000 + 9)
    rb = rustbpe.Tokenizer()
    rb.train_from_iterator(texts, 256 + 1000, pattern=PATTERNS["nanochat"])
    assert tok.mergeable_ranks() == [token for token, _ in rb.get_mergeable_ranks()]


def test_train_caps(books):
    """doc_cap cuts every document; max_chars stops reading the iterator."""
    texts = [books["en"][i:i + 1000] for i in range(0, 8000, 1000)]

    def merges(tokenizer):
        return tokenizer._native.merges()

    capped = Tokenizer.train_from_iterator(texts, vocab_size=256 + 100 + 9, doc_cap=300)
    assert merges(capped) == ReferenceBPE.train([t[:300] for t in texts], 256 + 100).merges
    limited = Tokenizer.train_from_iterator(iter(texts), vocab_size=256 + 100 + 9, max_chars=2500)
    # the trainer reads whole documents until it has at least max_chars characters: 3 of them here
    assert merges(limited) == ReferenceBPE.train(texts[:3], 256 + 100).merges


def test_training_bad_input():
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 265 .* got 264"):
        Tokenizer.train_from_iterator(["abc"], vocab_size=264)
    with pytest.raises(TypeError, match="str"):
        Tokenizer.train_from_iterator(["abc", 7], vocab_size=300)
    with pytest.raises(TypeError, match="single str"):
        Tokenizer.train_from_iterator("abc", vocab_size=300)
    with pytest.raises(ValueError, match=r"texts\[1\] .*lone surrogate"):
        Tokenizer.train_from_iterator(["ok", "lone \ud800 surrogate"], vocab_size=300)
    with pytest.raises(ValueError, match="invalid split pattern"):
        Tokenizer.train_from_iterator(["abc"], vocab_size=300, pattern="(unclosed")
    with pytest.raises(ValueError, match="no text to train on"):
        Tokenizer.train_from_iterator(iter([]), vocab_size=1000)


def test_small_corpus_gives_a_smaller_vocab():
    """Training stops when no pair is left; the specials still take the last ids."""
    tok = Tokenizer.train_from_iterator(["hello"], vocab_size=1000)
    assert tok.vocab_size == 256 + 4 + 9
    assert tok.encode("hello") == [256 + 3]
    assert tok.encode_special("<|output_end|>") == tok.vocab_size - 1


# ---------------------------------------------------------------------------------------------------------------
# Encoding parity: Rust == reference == tiktoken == Hugging Face


@pytest.fixture(scope="module")
def exports(tok):
    return tok.to_tiktoken(), tok.to_hf()


@pytest.mark.parametrize("lang", list(BOOK_EXCERPTS))
def test_encode_parity_on_books(trained, exports, books, lang):
    tok, ref = trained
    enc, hf = exports
    text = books[lang]
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert ids == enc.encode_ordinary(text)
    assert ids == hf.encode(text).ids
    assert tok.decode(ids) == text


def test_encode_parity_on_unseen_text(trained, exports):
    if not BOOKS.is_dir():
        pytest.skip(f"books not found at {BOOKS}")
    tok, ref = trained
    enc, hf = exports
    for name in ("es_pg2000_don_quijote.txt", "tl_pg20228_noli_me_tangere.txt", "en_tinyshakespeare.txt"):
        text = (BOOKS / name).read_text(encoding="utf-8")[100_000:110_000]
        ids = tok.encode(text)
        assert ids == ref.encode(text) == enc.encode_ordinary(text) == hf.encode(text).ids, name


def test_encode_parity_on_fuzzed_unicode(trained, exports):
    tok, ref = trained
    enc, hf = exports
    rng = random.Random(0)
    texts = [random_text(rng, rng.randrange(0, 80)) for _ in range(600)]
    batch = tok.encode(texts, num_threads=2)
    for text, ids in zip(texts, batch):
        assert ids == tok.encode(text) == ref.encode(text) == enc.encode_ordinary(text), repr(text)
        assert ids == hf.encode(text).ids, repr(text)
        assert tok.decode(ids) == text


def test_batch_prepend_append(tok):
    texts = ["hello world", "", "bonjour"]
    batch = tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"))
    for text, ids in zip(texts, batch):
        assert ids == [tok.bos_token_id] + tok.encode(text) + [tok.encode_special("<|assistant_end|>")]
    assert tok.encode(("a", "b")) == [tok.encode("a"), tok.encode("b")]
    with pytest.raises(TypeError, match=r"text\[1\] must be str, got int"):
        tok.encode(["a", 1])
    with pytest.raises(TypeError, match="text must be a str or a list of str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="prepend must be a token id"):
        tok.encode("x", prepend=tok.vocab_size)
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("x", append="<|endoftext|>")


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("abc \udc80 def")
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode(["fine", "abc \ud800"])


def test_decode_accepts_tensors(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode("tensor round trip", prepend="<|bos|>")
    assert tok.decode(torch.tensor(ids)) == "<|bos|>tensor round trip"


# ---------------------------------------------------------------------------------------------------------------
# Special tokens typed by users stay text


def test_special_token_text_is_never_special(tok, exports):
    enc, hf = exports
    text = "".join(SPECIAL_TOKENS) + " and <|bos|>hi<|user_end|> <|assistant_end|>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(VOCAB - 9, VOCAB))
    assert tok.decode(ids) == text
    assert ids == enc.encode_ordinary(text) == hf.encode(text).ids
    # only an explicit allow turns the text into special ids; tiktoken agrees
    allowed = tok._native.encode(text, allowed_special="all")
    assert allowed == enc.encode(text, allowed_special="all")
    assert allowed[0] == tok.bos_token_id
    assert tok._native.encode(text) == ids


# ---------------------------------------------------------------------------------------------------------------
# Exports


def test_tiktoken_export_has_identical_ids(tok):
    enc = tok.to_tiktoken()
    assert enc.n_vocab == tok.vocab_size
    assert {s: enc.encode_single_token(s) for s in SPECIAL_TOKENS} == tok.special_tokens
    for i in range(tok.vocab_size - 9):
        assert enc.decode_single_token_bytes(i) == tok.id_to_bytes(i)


def test_hf_json_round_trip(tok, tmp_path, books):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    tok.save_hf_json(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.get_vocab_size() == tok.vocab_size
    assert {s: hf.token_to_id(s) for s in SPECIAL_TOKENS} == tok.special_tokens
    text = books["en"][:3000] + books["zh"][:500]
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    # the file cannot carry encode_special_tokens: loaded, HF splits special-token text like allowed_special="all"
    typed = "hi <|bos|> there"
    assert hf.encode(typed).ids == tok._native.encode(typed, allowed_special="all")
    hf.encode_special_tokens = True
    assert hf.encode(typed).ids == tok.encode(typed)


# ---------------------------------------------------------------------------------------------------------------
# Save / load, token_bytes, defaults


def test_save_load_round_trip(tok, tmp_path, books):
    path = tmp_path / "sub" / "tok.bin"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.pattern == tok.pattern
    assert loaded.mergeable_ranks() == tok.mergeable_ranks()
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.encode(books["fr"]) == tok.encode(books["fr"])
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing.bin")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a tokenizer at all")
    with pytest.raises(ValueError, match="bad tokenizer file"):
        Tokenizer.load(garbage)


def test_load_rejects_other_special_tokens(tmp_path):
    native = _rustbpe.Tokenizer.train_from_iterator(["hello world"], 300, special_tokens=["<|endoftext|>"])
    path = tmp_path / "other.bin"
    native.save(str(path))
    with pytest.raises(ValueError, match="differ from the expected"):
        Tokenizer.load(path)


def test_from_ranks_round_trip(tok):
    rebuilt = Tokenizer.from_ranks(tok.mergeable_ranks(), tok.pattern)
    text = "Round trip through from_ranks: 12345, naïve, 世界."
    assert rebuilt.encode(text) == tok.encode(text)
    assert rebuilt.special_tokens == tok.special_tokens


def test_token_bytes(tok, base_dir):
    lengths = tok.token_bytes()
    assert len(lengths) == tok.vocab_size
    assert lengths[-9:] == [0] * 9
    assert lengths == [len(tok.id_to_bytes(i)) for i in range(tok.vocab_size - 9)] + [0] * 9
    assert lengths[:256] == [1] * 256
    tok.save(default_tokenizer_path())
    tensor = get_token_bytes("cpu")
    assert tensor.dtype.is_floating_point is False and str(tensor.dtype) == "torch.int32"
    assert tensor.tolist() == lengths


def test_get_tokenizer_default_path(tok, base_dir):
    assert default_tokenizer_path() == base_dir / "tokenizer" / "tokenizer.bin"
    with pytest.raises(FileNotFoundError, match="nanochat tok-train"):
        get_tokenizer()
    tok.save(default_tokenizer_path())
    assert get_tokenizer().mergeable_ranks() == tok.mergeable_ranks()


# ---------------------------------------------------------------------------------------------------------------
# Chat rendering


def special(tok, name):
    return tok.encode_special(f"<|{name}|>")


def test_render_conversation_ids_and_mask(tok):
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3? <|assistant_end|>"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conversation)
    s = lambda name: special(tok, name)  # noqa: E731
    e = tok.encode
    expected = [
        ([s("bos"), s("user_start")], 0),
        (e("Be brief.\n\nWhat is 2+3? <|assistant_end|>"), 0),  # system merged; typed special text stays text
        ([s("user_end"), s("assistant_start")], 0),
        (e("Let me compute."), 1),
        ([s("python_start")] + e("2+3") + [s("python_end")], 1),
        ([s("output_start")] + e("5") + [s("output_end")], 0),
        (e("It is 5."), 1),
        ([s("assistant_end")], 1),
        ([s("user_start")] + e("Thanks") + [s("user_end"), s("assistant_start")], 0),
        (e("You're welcome."), 1),
        ([s("assistant_end")], 1),
    ]
    assert ids == [t for tokens, _ in expected for t in tokens]
    assert mask == [m for tokens, m in expected for _ in tokens]
    assert len(ids) == len(mask)
    # the only assistant_end id in the sequence comes from the renderer, not from the user's text
    assert ids.count(s("assistant_end")) == 2


def test_render_truncates(tok):
    conversation = {"messages": [{"role": "user", "content": "word " * 50},
                                 {"role": "assistant", "content": "reply " * 50}]}
    full_ids, full_mask = tok.render_conversation(conversation, max_tokens=10_000)
    ids, mask = tok.render_conversation(conversation, max_tokens=20)
    assert ids == full_ids[:20] and mask == full_mask[:20]
    with pytest.raises(ValueError, match="max_tokens must be a positive int, got 0"):
        tok.render_conversation(conversation, max_tokens=0)


def test_render_list_messages_and_user_parts(tok):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    ids, mask = tok.render_conversation({"messages": messages})
    assert ids == [tok.bos_token_id, special(tok, "user_start")] + tok.encode("ab") + [special(tok, "user_end")]
    assert set(mask) == {0}
    assert tok.render_conversation(messages) == (ids, mask)


U, A, S = "user", "assistant", "system"


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant', expected 'user'"),
    ([{"role": U, "content": "a"}, {"role": U, "content": "b"}], "message 1 has role 'user', expected 'assistant'"),
    ([{"role": S, "content": "s"}, {"role": A, "content": "x"}], "system message must be followed by a user"),
    ([{"role": "system", "content": "s"}], "system message must be followed by a user message, got nothing"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     "message 2 has role 'system', expected 'user'"),
    ([{"role": "bot", "content": "a"}], r"message 0 must be a dict with 'role' in"),
    ([{"role": "user"}], r"message 0 must be a dict with 'role' in"),
    ([{"role": "user", "content": 5}], r"message 0 \(user\): content must be a str or a list of parts, got int"),
    ([{"role": U, "content": [{"type": "python", "text": "1"}]}],
     r"part 0 has type 'python'; expected one of \['text'\]"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     r"message 1 \(assistant\): part 0 has type 'image'"),
    ([{"role": U, "content": "a"}, {"role": A, "content": [{"type": "text"}]}], "must be a dict with a str 'text'"),
])
def test_render_errors(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_for_completion(tok):
    conversation = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    prompt = tok.render_for_completion(conversation)
    ids, _ = tok.render_conversation(conversation)
    cut = len(ids) - len(tok.encode("4")) - 1  # without the final answer and its assistant_end
    assert prompt == ids[:cut]
    assert prompt[-1] == special(tok, "assistant_start")
    # a conversation that already ends with the user's turn gives the same prompt
    assert tok.render_for_completion({"messages": conversation["messages"][:3]}) == prompt
    assert conversation["messages"][-1]["content"] == "4"  # the input is not modified
    with pytest.raises(ValueError, match="ends with a user message"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "a"},
                                                {"role": "assistant", "content": "b"},
                                                {"role": "assistant", "content": "c"}]})


# ---------------------------------------------------------------------------------------------------------------
# A larger vocabulary on every book


@pytest.mark.slow
def test_encode_parity_large_vocab_all_books():
    """vocab 8,192 trained on 1.5 MB of mixed books; ours == tiktoken == HF on 100 KB of each of the 23 books."""
    if not BOOKS.is_dir():
        pytest.skip(f"books not found at {BOOKS}")
    books = {path.name: path.read_text(encoding="utf-8") for path in sorted(BOOKS.glob("*.txt"))}
    train = [text[i:i + 5000] for text in books.values() for i in range(0, 65_000, 5000)]
    tok = Tokenizer.train_from_iterator(train, vocab_size=8192)
    assert tok.vocab_size == 8192
    enc, hf = tok.to_tiktoken(), tok.to_hf()
    for name, text in books.items():
        docs = [text[i:i + 5000] for i in range(100_000, min(len(text), 200_000), 5000)]
        ours = tok.encode(docs, num_threads=2)
        assert ours == enc.encode_ordinary_batch(docs), name
        assert ours == [e.ids for e in hf.encode_batch(docs)], name
