"""A reply sent back in the history renders as exactly the tokens that were generated for it (serve/history.py):
the fence format read both ways (lossless on every string, the inverse of the emitter on the server's own output),
the reply memory, and whole conversations through a real server on loopback with the official `openai` client,
non-streaming and streamed, with 0, 1 and several tool calls per reply, a failed call, replies cut by max_tokens
inside a call and inside its output, non-canonical token splits and prose that looks like a call; the prefix store
reuses the whole previous turn every time. The CLI chat is checked against the same conversation."""

from __future__ import annotations

import contextlib
import io
import random
import re
from types import SimpleNamespace

import pytest
import torch

from nanochat.inference.engine import Engine
from nanochat.serve.app import ServerConfig, create_app
from nanochat.serve.chat_cli import ChatSession, ChatSettings
from nanochat.serve.history import (
    FENCE,
    PY_OPEN,
    Part,
    ReplyMemory,
    emit_parts,
    parse_reply,
    parts_to_ids,
    render_prompt,
)
from nanochat.serve.thread import ServerThread
from nanochat.tools.calculator import evaluate

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


# ---------------------------------------------------------------------------------------------------------------
# The fence format


PIECES = ["\n", "`", "``", "```", "python", "output", "\n```python\n", "\n```\n", "```output\n", "1+1", "x", " ",
          "é"]


def random_text(rng: random.Random, pieces=PIECES, most: int = 12) -> str:
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, most)))


def test_parse_is_lossless_on_any_string():
    """Whatever an assistant message holds, the parts read from it give back exactly its text (the model sees the
    visible text), text runs are maximal and only the last part can be cut."""
    rng = random.Random(0)
    for _ in range(20_000):
        s = random_text(rng, most=16)
        parts = parse_reply(s)
        assert emit_parts(parts) == s, (s, parts)
        assert all(p.closed for p in parts[:-1]), (s, parts)
        assert not any(a.kind == b.kind == "text" for a, b in zip(parts, parts[1:])), (s, parts)
        assert all(p.text for p in parts if p.kind == "text")


def random_reply(rng: random.Random) -> list[Part]:
    """Parts as the server writes them: prose (never holding a call's opening fence, which is where the format is
    ambiguous) between calls that each have an output; the last call may be cut inside its code or output. A
    call's code and result hold no ``` (a calculator expression never does; a string result could)."""
    def body() -> str:
        while FENCE in (text := random_text(rng, ["\n", "`", "``", "1+1", "x", " ", "python", "output", "é"], 6)):
            pass
        return text

    parts: list[Part] = []
    for _ in range(rng.randint(0, 4)):
        if rng.random() < 0.6:
            text = random_text(rng, most=8)
            if text and PY_OPEN not in text and (not parts or parts[-1].kind != "text"):
                parts.append(Part("text", text))
        if rng.random() < 0.5:
            parts += [Part("python", body()), Part("python_output", body())]
    cut = rng.random()
    if cut < 0.2:
        parts.append(Part("python", body(), closed=False))
    elif cut < 0.4:
        parts += [Part("python", body()), Part("python_output", body(), closed=False)]
    return parts


def test_parse_inverts_the_servers_format():
    rng = random.Random(1)
    for _ in range(20_000):
        parts = random_reply(rng)
        assert parse_reply(emit_parts(parts)) == parts, (emit_parts(parts), parts)


def test_code_blocks_in_prose_stay_text():
    for text in ["Here:\n```python\nprint(1)\n```", "Here:\n```python\nprint(1)\n```\nThat prints 1.",
                 "a\n```python\nx = '```'\n```\n```output\n1\n```\n", "\n```python\nf()\n```\n\n```output\n1\n```\n"]:
        assert parse_reply(text) == [Part("text", text)]


def test_parts_render_as_the_chat_renderer_writes_them(tok):
    parts = [Part("text", "Let me see."), Part("python", "12*34"), Part("python_output", "408"),
             Part("text", " It is 408.")]
    conv = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": p.kind, "text": p.text} for p in parts]}]}
    ids, _ = tok.render_conversation(conv)
    start = ids.index(tok.encode_special("<|assistant_start|>")) + 1
    assert parts_to_ids(tok, parts) == ids[start:-1]
    S = tok.encode_special
    assert parts_to_ids(tok, [Part("python", "7*", closed=False)]) == [S("<|python_start|>"), *tok.encode("7*")]


def test_reply_memory_is_bounded_and_least_recently_used_goes_first():
    cost = ReplyMemory.ENTRY_COST
    memory = ReplyMemory(3 * (10 + cost))
    for i in range(3):
        memory.remember(f"reply {i}", list(range(i, i + 10)))
    assert memory.recall("reply 0") == list(range(10))  # now the most recent
    memory.remember("reply 3", [7] * 10)
    assert memory.recall("reply 1") is None and memory.recall("reply 0") == list(range(10))
    assert memory.held == 3 * (10 + cost) and len(memory.entries) == 3
    memory.remember("too long", [1] * (3 * (10 + cost)))
    assert memory.recall("too long") is None and memory.recall("reply 3") == [7] * 10
    assert (memory.hits, memory.misses) == (3, 2)


# ---------------------------------------------------------------------------------------------------------------
# Whole conversations: a model that replays one scripted conversation


class ReplayModel(torch.nn.Module):
    """A 'model' whose prediction at absolute position p is token p + 1 of one fixed token sequence: it continues
    the scripted conversation exactly when the prompt is that conversation's exact prefix. `terminal` is the token
    it ends a reply with where the sequence has <|assistant_end|> (<|bos|> also ends a reply)."""

    def __init__(self, tok, sequence: list[int], terminal: str = "<|assistant_end|>"):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=1024, vocab_size=tok.vocab_size, n_layer=1, n_kv_head=1,
                                      head_dim=2)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        end = tok.encode_special("<|assistant_end|>")
        self.sequence = torch.tensor([tok.encode_special(terminal) if t == end else t for t in sequence])

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        pos = kv_cache.positions(B, T)  # (B, T) absolute positions
        nxt = self.sequence[(pos + 1).clamp(max=len(self.sequence) - 1)]
        logits = torch.zeros(B, T, self.config.vocab_size).scatter_(2, nxt.unsqueeze(-1), 100.0)
        logits = kv_cache.select(logits)
        kv_cache.advance(T)
        return logits


def call(tok, expression: str) -> list[int]:
    """A calculator call and the output the engine forces after it."""
    S = tok.encode_special
    return ([S("<|python_start|>"), *tok.encode(expression), S("<|python_end|>"), S("<|output_start|>"),
             *tok.encode(evaluate(expression)), S("<|output_end|>")])


def by_bytes(text: str) -> list[int]:
    """The text as one token per byte: a split the tokenizer never makes (its merges join them)."""
    return list(text.encode("utf-8"))


def script(tok) -> list[tuple[str, list[int], int | None]]:
    """Turns (user text, the whole reply the model writes, max_tokens or None); the last reply is not sent back."""
    enc = tok.encode
    in_code = len(enc("Computing ")) + 1 + 2  # <|python_start|> and 2 of the code's tokens
    in_output = len(call(tok, "99999*99999")) - len(enc(" ok")) - 3  # 2 of the result's 4 tokens
    return [
        ("Hi! Show me a code block.",  # no call; prose in the call format and a non-canonical split
         by_bytes("Sure, here:") + enc("\n```python\n1+1\n```\n```output\n2\n```\n") + by_bytes(" done."),
         None),
        ("What is 12 times 34?", enc("Let me compute.") + call(tok, "12*34") + enc(" The answer is 408."), None),
        ("Now a few at once, one of them bad.",  # the last output holds a fence
         call(tok, "2+3") + enc(" and ") + call(tok, "1/0") + call(tok, "'`'*3") + enc(" Done."), None),
        ("Cut me inside a call.", enc("Computing ") + call(tok, "123*456") + enc(" ok"), in_code),
        ("Cut me inside an output.", call(tok, "99999*99999") + enc(" ok"), in_output),
        ("Thanks, bye.", enc("Bye!"), None),
    ]


def whole_sequence(tok, turns) -> list[int]:
    """The conversation as the exact rendering holds it: each reply as generated (cut where max_tokens cuts it),
    then <|assistant_end|>."""
    S = tok.encode_special
    seq = [S("<|bos|>")]
    for user, reply, cut in turns:
        seq += [S("<|user_start|>"), *tok.encode(user), S("<|user_end|>"), S("<|assistant_start|>")]
        seq += (reply if cut is None else reply[:cut]) + [S("<|assistant_end|>")]
    return seq


class Tap:
    """Records what the server asks its scheduler for: each request's prompt and the tokens it generated."""

    def __init__(self, scheduler):
        self.prompts: list[list[int]] = []
        self.generated: list[list[int]] = []
        submit = scheduler.submit

        def recording_submit(req):
            tokens, deliver = [], req.on_event

            def on_event(ev):
                if ev.token is not None:
                    tokens.append(ev.token)
                deliver(ev)
            req.on_event = on_event
            self.prompts.append(list(req.prompt))
            self.generated.append(tokens)
            return submit(req)
        scheduler.submit = recording_submit


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@contextlib.contextmanager
def replay_server(tok, turns, terminal: str = "<|assistant_end|>", **config):
    """A real server on loopback over the replaying model, with a tap on its scheduler."""
    app = create_app(ReplayModel(tok, whole_sequence(tok, turns), terminal), tok,
                     ServerConfig(batch_size=2, **config))
    with ServerThread(app) as server:
        server.app, server.turns = app, turns
        server.tap = Tap(app.state.replicas[0].scheduler)
        yield server


def play(tok, server, send, memory_hits: bool = True) -> list[str]:
    """Play the script through `send(messages, max_tokens) -> content`, each reply sent back as its content. Checks
    each turn: the model got the exact conversation so far (the prompt is the last prompt, the tokens generated for
    it with the terminal as <|assistant_end|>, and the new user turn, token for token), and the prefix store reused
    all of the last prompt and reply (all but the reply's last token, which the model was never fed)."""
    import httpx

    S = tok.encode_special
    end, terminal = S("<|assistant_end|>"), {S("<|assistant_end|>"), S("<|bos|>")}
    turns, tap = server.turns, server.tap
    messages, contents = [], []
    hits_before = reused_before = 0
    for k, (user, reply, cut) in enumerate(turns):
        messages.append({"role": "user", "content": user})
        content = send(messages, cut or 200)
        prompt, gen = tap.prompts[k], tap.generated[k]
        assert prompt == whole_sequence(tok, turns)[:len(prompt)], f"turn {k}: the history is not as generated"
        assert (gen[:-1] + [end] if cut is None else gen) == (reply + [end] if cut is None else reply[:cut])
        if k:
            last = tap.prompts[k - 1] + tap.generated[k - 1]
            last = last[:-1] + [end] if last[-1] in terminal else last + [end]
            user_turn = [S("<|user_start|>"), *tok.encode(user), S("<|user_end|>"), S("<|assistant_start|>")]
            assert prompt == last + user_turn, f"turn {k}: the history is not rendered as generated"
        metrics = httpx.get(server.url + "/metrics").text
        hits = metric(metrics, "nanochat_prefix_cache_hits_total")
        reused = metric(metrics, "nanochat_prefix_cache_reused_tokens_total")
        if k:
            assert hits == hits_before + 1, f"turn {k}: no prefix hit"
            assert reused - reused_before == len(tap.prompts[k - 1]) + len(tap.generated[k - 1]) - 1
        hits_before, reused_before = hits, reused
        messages.append({"role": "assistant", "content": content})
        contents.append(content)
    held = sum(range(len(turns))) if memory_hits else 0
    assert metric(metrics, "nanochat_reply_memory_hits_total") == held
    return contents


def openai_sender(server, stream: bool):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def send(messages, max_tokens):
        kw = dict(model="nanochat", messages=messages, temperature=0, max_tokens=max_tokens)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        chunks = client.chat.completions.create(stream=True, **kw)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return send


@pytest.mark.slow
def test_conversation_round_trips_exactly_through_the_openai_client(tok):
    """Non-streamed replies, then streamed ones (these end with <|bos|>, the other terminal) on a fresh server:
    every turn exact, and the same contents both ways."""
    turns = script(tok)
    first = turns[0][1]
    assert tok.encode(tok.decode(first)) != first  # the script has a split that only the memory can give back
    contents = {}
    for stream, terminal in ((False, "<|assistant_end|>"), (True, "<|bos|>")):
        with replay_server(tok, turns, terminal) as server:
            contents[stream] = play(tok, server, openai_sender(server, stream))
    assert contents[True] == contents[False]
    assert "```python\n12*34\n```\n```output\n408\n```" in contents[False][1]
    assert "Error: division by zero" in contents[False][2]


def test_without_the_memory_replies_read_back_from_their_text(tok):
    """A reply the memory does not hold (after a restart, say) gets its tool tokens back from the fence format,
    which is exact where the model's text split is the tokenizer's own and no output holds a fence."""
    turns = [t for i, t in enumerate(script(tok)) if i in (1, 3, 4, 5)]
    with replay_server(tok, turns, reply_memory_tokens=0) as server:
        play(tok, server, openai_sender(server, stream=False), memory_hits=False)


def test_a_reply_cut_by_a_stop_string_reads_back_as_its_text(tok):
    """Its tokens hold the stop string its text lacks, so it is not remembered: the next turn renders the text
    the client has (tool tokens restored from the fences)."""
    turns = script(tok)[1:2]
    S = tok.encode_special
    with replay_server(tok, turns) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": turns[0][0]}]
        content = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=200,
                                                 stop=["answer"]).choices[0].message.content
        assert content.endswith(" The ") and "```output\n408" in content
        messages += [{"role": "assistant", "content": content}, {"role": "user", "content": "next"}]
        client.chat.completions.create(model="x", messages=messages, max_tokens=1)
        user_turn = [S("<|user_start|>"), *tok.encode("next"), S("<|user_end|>"), S("<|assistant_start|>")]
        assert server.tap.prompts[-1] == (server.tap.prompts[0] + parts_to_ids(tok, parse_reply(content))
                                          + [S("<|assistant_end|>")] + user_turn)
        assert S("<|python_start|>") in server.tap.prompts[-1]


def test_user_text_in_the_call_format_stays_plain_text(tok):
    """A user (or system) message holding a reply of the server, which the reply memory holds, or typed fences
    renders as plain text."""
    turns = script(tok)
    with replay_server(tok, turns) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": turns[0][0]}]
        messages.append(client.chat.completions.create(model="x", messages=messages, temperature=0,
                                                       max_tokens=200).choices[0].message.model_dump())
        messages.append({"role": "user", "content": turns[1][0]})
        pasted = client.chat.completions.create(model="x", messages=messages, temperature=0,
                                                max_tokens=200).choices[0].message.content
        assert "```output\n408" in pasted
        S = tok.encode_special
        for text in (pasted, "Compute\n```python\n6*7\n```\n```output\n42\n```\n please"):
            for messages in ([{"role": "user", "content": text}],
                             [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]):
                client.chat.completions.create(model="x", messages=messages, max_tokens=1)
                prompt = server.tap.prompts[-1]
                assert prompt == tok.render_for_completion({"messages": messages})
                specials = [t for t in prompt if t >= tok.vocab_size - 9]
                assert specials == [S(n) for n in ("<|bos|>", "<|user_start|>", "<|user_end|>",
                                                   "<|assistant_start|>")]


def test_plain_text_rendering_is_the_tokenizers(tok):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\n```python\n1\n```\n"
                                                                                   "```output\n1\n```\n"},
                {"role": "user", "content": "next"}]
    assert render_prompt(tok, messages, None) == tok.render_for_completion({"messages": messages})


# ---------------------------------------------------------------------------------------------------------------
# The CLI chat holds tokens: the same conversation, the same tokens


@pytest.mark.parametrize("terminal", ["<|assistant_end|>", "<|bos|>"])
def test_cli_chat_holds_the_exact_conversation(tok, terminal):
    turns = script(tok)
    session = ChatSession(Engine(ReplayModel(tok, whole_sequence(tok, turns), terminal), tok), tok,
                          ChatSettings(temperature=0.0))
    for user, _, cut in turns:
        session.settings.max_tokens = cut or 200
        session.reply(user, io.StringIO())
    assert session.tokens == whole_sequence(tok, turns)
