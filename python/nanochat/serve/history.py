"""History assistant messages back to tokens: a reply the server produced, sent back by the client in the next
request's history, renders as exactly the tokens the model generated (tool calls and their outputs included), so
the model sees its own past and the prefix store, which holds those tokens, is hit on every later turn.

Notable choices:
- OpenAI clients echo a reply as its `content` text, and the text is not enough: the calculator's calls and outputs
  show as Markdown fences (text_stream.SPECIAL_TEXT) that a plain code block in the model's prose can equal, and
  the model may sample a non-canonical split of a word that re-encoding the text would not give back. So the
  server remembers what it generated: `ReplyMemory` maps each reply's text to its tokens (LRU, bounded in tokens),
  and a history assistant message whose text it holds renders as those tokens. Nothing changes on the wire and
  unmodified clients (and the web UI, which sends back exactly the text it received) get the exact round trip.
  Rejected: an unambiguous text format (it needs an escape in the model's prose, or a marker in each tool fence
  that breaks Markdown in clients, and still cannot carry a non-canonical split) and a structured field for
  clients to echo (unmodified OpenAI clients send back only role and content). The memory is per server process
  (its replicas share it); a reply cut by a stop string is not remembered (its tokens hold the stop string).
- A text the memory does not hold (a server restart, an evicted or foreign reply) is read with `parse_reply`, the
  inverse of the fence format on what the server emits: a call is `\\n```python\\n` code `\\n```\\n` directly
  followed by ```` ```output\\n```` result `\\n```\\n`; a reply cut by max_tokens may end inside the code or the
  output. A fenced block that is not followed by an output, or whose body holds ```` ``` ````, stays text, so a
  model's own code blocks are not mistaken for calls. Every string reads back losslessly (`emit_parts(parse_reply
  (s)) == s`): the model sees the visible text, with the tool tokens restored where the text has the call format.
- Only assistant messages are read this way. User and system text is always plain text: typing the fences (or
  "<|python_start|>") in a user message never yields a tool or special token.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from dataclasses import dataclass

from nanochat.inference.text_stream import SPECIAL_TEXT

PY_OPEN, PY_CLOSE = SPECIAL_TEXT["<|python_start|>"], SPECIAL_TEXT["<|python_end|>"]
OUT_OPEN, OUT_CLOSE = SPECIAL_TEXT["<|output_start|>"], SPECIAL_TEXT["<|output_end|>"]
FENCE = "```"


# ---------------------------------------------------------------------------------------------------------------
# The fence format, both ways


@dataclass(frozen=True)
class Part:
    """A piece of an assistant reply: "text", "python" (a calculator call) or "python_output" (its result).
    `closed` is False only for a call or output cut by max_tokens, which then ends the reply."""
    kind: str
    text: str
    closed: bool = True


def emit_parts(parts: list[Part]) -> str:
    """The text the server streams for these parts (what TextStream writes for their tokens): the format's forward
    direction, the reference that tests check `parse_reply` against."""
    out = []
    for p in parts:
        if p.kind == "text":
            out.append(p.text)
        elif p.kind == "python":
            out += [PY_OPEN, p.text, PY_CLOSE if p.closed else ""]
        else:
            out += [OUT_OPEN, p.text, OUT_CLOSE if p.closed else ""]
    return "".join(out)


def _fenced(text: str, start: int, close: str) -> tuple[str, int, bool] | None:
    """The body of a fence that opened just before `start`: (body, index after the closing fence, closed); an
    unclosed body runs to the end of the text. None when the body holds ``` (not a call's fence)."""
    end = text.find(close, start)
    body = text[start:] if end < 0 else text[start:end]
    if FENCE in body:
        return None
    return (body, len(text), False) if end < 0 else (body, end + len(close), True)


def _call_at(text: str, i: int) -> tuple[list[Part], int] | None:
    """The call whose python fence opens at text[i] and the index after it, or None when it is not a call."""
    code = _fenced(text, i + len(PY_OPEN), PY_CLOSE)
    if code is None:
        return None
    body, j, closed = code
    if not closed:  # cut inside the code: nothing follows
        return [Part("python", body, False)], j
    if not text.startswith(OUT_OPEN, j):  # a code block without an output is the model's prose
        return None
    result = _fenced(text, j + len(OUT_OPEN), OUT_CLOSE)
    if result is None:
        return None
    out, k, out_closed = result
    return [Part("python", body), Part("python_output", out, out_closed)], k


def parse_reply(text: str) -> list[Part]:
    """An assistant reply's text -> its parts (see the module docstring); emit_parts gives the text back."""
    parts: list[Part] = []
    plain, pos = 0, 0  # start of the pending text, where to look for the next call
    while (i := text.find(PY_OPEN, pos)) >= 0:
        call = _call_at(text, i)
        if call is None:
            pos = i + 1
            continue
        if i > plain:
            parts.append(Part("text", text[plain:i]))
        parts += call[0]
        plain = pos = call[1]
    if plain < len(text):
        parts.append(Part("text", text[plain:]))
    return parts


def parts_to_ids(tokenizer, parts: list[Part]) -> list[int]:
    """The tokens of a reply's parts, as the chat renderer writes them (a cut part has no end token)."""
    S = tokenizer.encode_special
    ids: list[int] = []
    for p in parts:
        if p.kind == "text":
            ids += tokenizer.encode(p.text)
            continue
        start, end = ("<|python_start|>", "<|python_end|>") if p.kind == "python" else \
            ("<|output_start|>", "<|output_end|>")
        ids += [S(start), *tokenizer.encode(p.text)] + ([S(end)] if p.closed else [])
    return ids


# ---------------------------------------------------------------------------------------------------------------
# What the server generated


class ReplyMemory:
    """Reply text -> the tokens that produced it, for the replies this server sent (LRU, at most `max_tokens` held).

    Keyed by a 128-bit BLAKE2b digest of the text (no text is kept); tokens are stored as uint32. Each entry also
    costs ENTRY_COST tokens, its bookkeeping (~130 bytes at 4 bytes a token), so many tiny replies stay bounded too.
    Used from the event loop only (no lock)."""

    ENTRY_COST = 32

    def __init__(self, max_tokens: int):
        if max_tokens < 0:
            raise ValueError(f"ReplyMemory max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self.entries: collections.OrderedDict[bytes, array] = collections.OrderedDict()  # least recent first
        self.held = 0
        self.hits = 0  # counters for /metrics
        self.misses = 0

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def remember(self, text: str, tokens: list[int]) -> None:
        cost = len(tokens) + self.ENTRY_COST
        if not text or cost > self.max_tokens:
            return
        key = self._key(text)
        old = self.entries.pop(key, None)
        if old is not None:
            self.held -= len(old) + self.ENTRY_COST
        self.entries[key] = array("I", tokens)
        self.held += cost
        while self.held > self.max_tokens:
            _, dropped = self.entries.popitem(last=False)
            self.held -= len(dropped) + self.ENTRY_COST

    def recall(self, text: str) -> list[int] | None:
        key = self._key(text)
        tokens = self.entries.get(key)
        if tokens is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return tokens.tolist()


def render_prompt(tokenizer, messages: list[dict], memory: ReplyMemory | None) -> list[int]:
    """The prompt for the next reply: the tokenizer's chat rendering (validation, the system message, user text as
    plain text), with each assistant message's tokens from `memory` or `parse_reply` (`memory` None: the old plain
    text reading, kept for benchmarks).

    The tokenizer renders the conversation with every assistant content empty, which leaves each assistant turn as
    the adjacent pair <|assistant_start|> <|assistant_end|>: the reply's tokens go between. User text never encodes
    to a special id, so those pairs are exactly the assistant turns, in order."""
    if memory is None:
        return tokenizer.render_for_completion({"messages": messages})
    replies = []
    for m in messages:
        if m["role"] == "assistant":
            ids = memory.recall(m["content"])
            replies.append(ids if ids is not None else parts_to_ids(tokenizer, parse_reply(m["content"])))
    skeleton = [{**m, "content": ""} if m["role"] == "assistant" else m for m in messages]
    frame = tokenizer.render_for_completion({"messages": skeleton})
    start, end = tokenizer.encode_special("<|assistant_start|>"), tokenizer.encode_special("<|assistant_end|>")
    prompt, turn = [], 0
    for i, t in enumerate(frame):
        prompt.append(t)
        if t == start and i + 1 < len(frame) and frame[i + 1] == end:
            prompt += replies[turn]
            turn += 1
    assert turn == len(replies), f"{len(replies)} assistant messages but {turn} assistant turns in the rendering"
    return prompt
