"""The public tokenizer: byte-level BPE over the native `nanochat._rustbpe`, plus everything chat needs.

- Vocabulary: 256 byte tokens, then the learned merges, then the 9 special tokens of SPECIAL_TOKENS as the LAST ids
  (65,536 ids in all by default). Split pattern: nanochat's GPT-4-style pattern with digit groups of 1-2.
- `encode` never turns text into a special id: "<|assistant_end|>" typed by a user is encoded as plain bytes. Special
  ids enter only through `prepend`/`append`, `encode_special` and the chat renderer.
- Chat rendering (`render_conversation`): <|bos|>, then <|user_start|>…<|user_end|> and
  <|assistant_start|>…<|assistant_end|> turns; a system message is merged into the first user turn (joined by a blank
  line); assistant content may be parts: text, python (<|python_start|>…<|python_end|>) and python_output
  (<|output_start|>…<|output_end|>). The loss mask is 1 exactly on what the assistant must produce: its text, its
  python calls (with their delimiters) and <|assistant_end|>; 0 on <|bos|>, the start tokens, user text and tool
  outputs (the engine injects those).
- Exports: `to_tiktoken()` (same ranks, pattern and special ids) and `save_hf_json()` (a Hugging Face `tokenizers`
  tokenizer.json: our split pattern as a Split pre-tokenizer, then ByteLevel). The HF file lists, for each token,
  every split of its bytes into two tokens as a merge (a superset of the training merges), ordered by the token's
  rank, so HF's merge-driven BPE follows tiktoken's rank-driven one by construction; `ignore_merges` reproduces
  tiktoken's whole-chunk lookup. Measured: with the training merges alone, a 65,536 vocab on the corpus gave the
  same ids on 1,354 book documents too (141,679 merges instead of 65,271; 3.4 MB file), so the superset is
  insurance, not a fix. In memory `encode_special_tokens` keeps special-token text plain as in `encode`; the
  file cannot store that flag, so a loaded tokenizer.json splits special-token text out unless it is set again.
- Save/load: one file, written by the native module (atomically).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from nanochat.common import CorruptInputError, MissingInputError, atomic_write, base_dir

try:
    from nanochat import _rustbpe
except ImportError as e:  # the package was installed without building the native module
    raise ImportError(f"nanochat._rustbpe is not built ({e}); install the package with `maturin develop --release` "
                      f"or `pip install -e .` from the repository root") from e

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _byte_level_alphabet() -> list[str]:
    """GPT-2's reversible byte -> printable character map, used by HF's ByteLevel pre-tokenizer and decoder.

    Bytes that are visible Latin-1 characters map to themselves; the other 68 (controls, space, 0x7f-0xa0, 0xad)
    map, in byte order, to U+0100, U+0101, ...
    """
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    alphabet, shifted = [], 0
    for b in range(256):
        if b in visible:
            alphabet.append(chr(b))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def _text_of(part: object, where: str) -> str:
    if not isinstance(part, dict) or not isinstance(part.get("text"), str):
        raise ValueError(f"{where} must be a dict with a str 'text', got {part!r:.80}")
    return part["text"]


def _parts_of(content: object, role: str, index: int) -> list[tuple[str, str]]:
    """Message content -> [(type, text)]; a str is one text part."""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise ValueError(f"message {index} ({role}): content must be a str or a list of parts, "
                         f"got {type(content).__name__}")
    allowed = PART_TYPES if role == "assistant" else ("text",)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise ValueError(f"message {index} ({role}): part {j} has type {kind!r}; expected one of {list(allowed)}")
        parts.append((kind, _text_of(part, f"message {index} ({role}) part {j}")))
    return parts


def _turns(conversation: dict | list) -> list[tuple[str, list[tuple[str, str]]]]:
    """Validate a conversation and return its turns [(role, parts)], the system message merged into the first
    user turn. Roles must be: optional system, then user, assistant, user, ... ."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"conversation must be {{'messages': [...]}} with at least one message, "
                         f"got {conversation!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' in {list(ROLES)} and 'content', "
                             f"got {message!r:.80}")
    system = None
    if messages[0]["role"] == "system":
        system = "".join(text for _, text in _parts_of(messages[0]["content"], "system", 0))
        if len(messages) < 2 or messages[1]["role"] != "user":
            got = messages[1]["role"] if len(messages) > 1 else "nothing"
            raise ValueError(f"message 1: a system message must be followed by a user message, got {got}")
    turns = []
    start = 1 if system is not None else 0
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i} has role {role!r}, expected {expected!r}: roles must alternate "
                             f"user/assistant, starting with user (after an optional system message first)")
        parts = _parts_of(messages[i]["content"], role, i)
        if role == "user":
            text = "".join(t for _, t in parts)
            if system is not None and i == start:
                text = system + "\n\n" + text
            parts = [("text", text)]
        turns.append((role, parts))
    return turns


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """Byte-level BPE with nanochat's special tokens. Build with `train_from_iterator`, `load` or `from_ranks`."""

    def __init__(self, native: _rustbpe.Tokenizer):
        specials = native.special_tokens()
        n_ordinary = native.vocab_size - len(SPECIAL_TOKENS)
        expected = {name: n_ordinary + j for j, name in enumerate(SPECIAL_TOKENS)}
        if specials != expected:
            raise ValueError(f"tokenizer special tokens {specials} differ from the expected {expected} "
                             f"(nanochat's 9 special tokens as the last ids)")
        self._native = native
        self._special_ids = expected

    # --- construction ---

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int = 65536, pattern: str = "nanochat",
                            max_chars: int | None = None, doc_cap: int | None = None,
                            progress: bool = False) -> Tokenizer:
        """Train on an iterable of documents. vocab_size counts the 256 bytes, the merges and the 9 specials."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(f"vocab_size must be an int >= {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special "
                             f"tokens), got {vocab_size!r}")
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str (a built-in name {sorted(_rustbpe.PATTERNS)} or a regex), "
                            f"got {type(pattern).__name__}")
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of str documents, got a single "
                            f"{type(texts).__name__}; wrap it in a list")
        native = _rustbpe.Tokenizer.train_from_iterator(texts, vocab_size, pattern=pattern,
                                                        special_tokens=list(SPECIAL_TOKENS), max_chars=max_chars,
                                                        doc_cap=doc_cap, progress=progress)
        return cls(native)

    @classmethod
    def from_ranks(cls, mergeable_ranks: list[bytes], pattern: str = "nanochat") -> Tokenizer:
        """From token bytes in id order (the first 256 are the single bytes); the specials are appended."""
        return cls(_rustbpe.Tokenizer.from_ranks(list(mergeable_ranks), pattern, list(SPECIAL_TOKENS)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"no tokenizer file at {path}")
        try:
            native = _rustbpe.Tokenizer.load(str(path))
        except (ValueError, OSError) as e:  # truncated or not a tokenizer file
            raise CorruptInputError(f"tokenizer file {path} is unreadable: {e}; train it again with "
                                    f"`nanochat tok-train`") from e
        return cls(native)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._native.save(str(path))

    # --- vocabulary ---

    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size

    @property
    def bos_token_id(self) -> int:
        return self._special_ids["<|bos|>"]

    @property
    def pattern(self) -> str:
        return self._native.pattern

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_ids)

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode_special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown special token {name!r}; expected one of {SPECIAL_TOKENS}") from None

    def mergeable_ranks(self) -> list[bytes]:
        """Token bytes of every ordinary (non-special) id, in id order."""
        return self._native.mergeable_ranks()

    def id_to_bytes(self, token_id: int) -> bytes:
        return self._native.id_to_bytes(token_id)

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each id; 0 for the special tokens."""
        return self._native.token_bytes()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pattern={self.pattern[:30]!r}...)"

    # --- encoding and decoding ---

    def _special_id(self, token: int | str | None, arg: str) -> int | None:
        if token is None:
            return None
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.vocab_size:
            return token
        raise ValueError(f"{arg} must be a token id in [0, {self.vocab_size}) or a special token name, got {token!r}")

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 0) -> list[int] | list[list[int]]:
        """Ordinary text -> ids (never a special id). A list of texts is encoded in parallel (num_threads=0: all
        cores). prepend/append: an id or a special token name added to each result."""
        first, last = self._special_id(prepend, "prepend"), self._special_id(append, "append")
        if isinstance(text, str):
            rows, single = [self._native.encode_ordinary(text)], True
        elif isinstance(text, (list, tuple)):
            for i, item in enumerate(text):
                if not isinstance(item, str):
                    raise TypeError(f"text[{i}] must be str, got {type(item).__name__}")
            rows, single = self._native.encode_batch(list(text), num_threads), False
        else:
            raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        if first is not None:
            rows = [[first] + row for row in rows]
        if last is not None:
            for row in rows:
                row.append(last)
        return rows[0] if single else rows

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids) -> str:
        """ids (list or tensor) -> text; special ids become their names; broken UTF-8 becomes U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._native.decode(list(ids))

    # --- chat ---

    def _render_turns(self, turns) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], learn: int) -> None:
            ids.extend(tokens)
            mask.extend([learn] * len(tokens))

        special = self._special_ids
        add([special["<|bos|>"]], 0)
        for role, parts in turns:
            if role == "user":
                add([special["<|user_start|>"]], 0)
                add(self.encode(parts[0][1]), 0)
                add([special["<|user_end|>"]], 0)
                continue
            add([special["<|assistant_start|>"]], 0)
            for kind, text in parts:
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":  # the assistant writes the call: learned, delimiters included
                    add([special["<|python_start|>"]] + self.encode(text) + [special["<|python_end|>"]], 1)
                else:  # python_output comes from the tool at inference time: never learned
                    add([special["<|output_start|>"]] + self.encode(text) + [special["<|output_end|>"]], 0)
            add([special["<|assistant_end|>"]], 1)
        return ids, mask

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """conversation {"messages": [...]} -> (ids, mask), both cut to max_tokens."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        ids, mask = self._render_turns(_turns(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt for the next assistant turn: drops a final assistant message, ends with <|assistant_start|>."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        turns = _turns({"messages": messages})
        if turns[-1][0] != "user":
            raise ValueError("render_for_completion needs a conversation that ends with a user message "
                             "(optionally followed by the assistant message to drop)")
        ids, _ = self._render_turns(turns)
        return ids + [self._special_ids["<|assistant_start|>"]]

    # --- exports ---

    def _first_ranks(self) -> dict[bytes, int]:
        """bytes -> id; if two ids share bytes the lower one wins (as in the encoder)."""
        ranks: dict[bytes, int] = {}
        for rank, token in enumerate(self.mergeable_ranks()):
            ranks.setdefault(token, rank)
        return ranks

    def to_tiktoken(self, name: str = "nanochat"):
        """A tiktoken.Encoding with identical ids (use its encode_ordinary, or encode(..., allowed_special=...))."""
        import tiktoken  # optional: only this conversion needs it

        return tiktoken.Encoding(name=name, pat_str=self.pattern, mergeable_ranks=self._first_ranks(),
                                 special_tokens=self.special_tokens)

    def to_hf(self):
        """A Hugging Face `tokenizers.Tokenizer` that reproduces our ids (see the module docstring)."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers  # optional: only this conversion
        from tokenizers import Tokenizer as HFTokenizer

        alphabet = _byte_level_alphabet()
        ranks = self.mergeable_ranks()
        first = self._first_ranks()

        def as_str(token: bytes) -> str:
            return "".join(alphabet[b] for b in token)

        vocab = {as_str(token): rank for token, rank in first.items()}
        for rank, token in enumerate(ranks):  # a repeated byte string keeps its id under a name HF never produces
            if first[token] != rank:
                vocab[f"\u2400duplicate-{rank}"] = rank
        merges = []  # every split of each token into two tokens, in the token's rank order
        for rank, token in enumerate(ranks):
            if len(token) < 2 or first[token] != rank:
                continue
            for k in range(1, len(token)):
                if token[:k] in first and token[k:] in first:
                    merges.append((as_str(token[:k]), as_str(token[k:])))
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
        hf.encode_special_tokens = True  # special-token text in input stays text, as in our encode
        for name, token_id in self._special_ids.items():
            if hf.token_to_id(name) != token_id:
                raise RuntimeError(f"HF export put {name} at id {hf.token_to_id(name)}, expected {token_id}")
        return hf

    def save_hf_json(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face tokenizer.json (load with tokenizers.Tokenizer.from_file)."""
        text = self.to_hf().to_str(pretty=False)
        with atomic_write(path, "w") as f:
            f.write(text)


# ---------------------------------------------------------------------------------------------------------------
# The project's tokenizer on disk


def default_tokenizer_path() -> Path:
    return base_dir() / "tokenizer" / "tokenizer.bin"


def get_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load the trained tokenizer (by default from $NANOCHAT_BASE_DIR/tokenizer/tokenizer.bin)."""
    path = Path(path) if path is not None else default_tokenizer_path()
    if not path.is_file():
        raise MissingInputError(f"no tokenizer at {path}; train one with `nanochat tok-train` "
                                f"(it writes to $NANOCHAT_BASE_DIR/tokenizer/, default ~/.cache/nanochat)")
    return Tokenizer.load(path)


def get_token_bytes(device="cpu", path: str | os.PathLike | None = None):
    """int32 tensor (V,): UTF-8 byte length of each id, 0 for specials (for bits per byte)."""
    import torch  # heavy; training and using the tokenizer never need it

    return torch.tensor(get_tokenizer(path).token_bytes(), dtype=torch.int32, device=device)

