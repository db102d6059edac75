"""`nanochat chat`: the session keeps the conversation as tokens and streams the engine's text; commands; the
one-shot -p mode loading a real checkpoint (stage preference rl > sft > mid)."""

from __future__ import annotations

import io
from dataclasses import asdict

import pytest

from nanochat.inference.engine import Engine
from nanochat.model.tiny import tiny_model
from nanochat.serve import chat_cli
from nanochat.serve.chat_cli import ChatSession, ChatSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, sequence_len=256, seed=4)


def greedy_text(model, tok, tokens, max_tokens):
    return "".join(ev.text for ev in Engine(model, tok).stream(tokens, max_tokens=max_tokens, temperature=0.0))


def test_session_keeps_the_conversation_and_streams_engine_text(model, tok):
    session = ChatSession(Engine(model, tok), tok, ChatSettings(temperature=0.0, max_tokens=20))
    out = io.StringIO()
    first = session.reply("Hello!", out)
    expected_prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "Hello!"}]})
    assert first == greedy_text(model, tok, expected_prompt, 20)
    assert out.getvalue() == first + "\n"
    assert session.tokens[:len(expected_prompt)] == expected_prompt
    assert session.tokens[-1] == tok.encode_special("<|assistant_end|>")
    S = tok.encode_special
    after_first = list(session.tokens)
    second = session.reply("And then?", out)
    prompt2 = after_first + [S("<|user_start|>"), *tok.encode("And then?"), S("<|user_end|>"), S("<|assistant_start|>")]
    assert session.tokens[:len(prompt2)] == prompt2
    assert second == greedy_text(model, tok, prompt2, 20)


def test_a_failed_reply_says_why_and_leaves_the_conversation_as_it_was(model, tok, monkeypatch):
    """A row-level failure (here: the sampler raises for this request) prints its cause; the turn is not kept."""
    engine = Engine(model, tok)
    session = ChatSession(engine, tok, ChatSettings(temperature=0.0, max_tokens=8))
    session.reply("Hi", io.StringIO())
    before = list(session.tokens)

    def broken_stream(*args, **kwargs):
        from nanochat.inference.scheduler import TokenEvent
        yield TokenEvent(sample=0, token=None, mask=0, text="", finish_reason="error",
                         error="sampling failed: boom")

    monkeypatch.setattr(engine, "stream", broken_stream)
    out = io.StringIO()
    assert session.reply("Again", out) == ""
    assert "(generation failed: sampling failed: boom)" in out.getvalue()
    assert session.tokens == before and session.turns == 1


def test_repl_commands(model, tok):
    session = ChatSession(Engine(model, tok), tok, ChatSettings(temperature=0.7, top_k=50, max_tokens=5))
    lines = iter(["hi", "/temperature 0", "/topk 3", "/topk -1", "/temperature hot", "/help", "again", "/clear",
                  "", "/quit", "never read"])
    out = io.StringIO()
    session.repl(read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert session.settings.temperature == 0.0 and session.settings.top_k == 3
    assert "(temperature 0.0)" in text and "(top-k 3)" in text
    assert "top-k must be an integer >= 0" in text and "temperature must be a number" in text
    assert "(conversation cleared)" in text and session.tokens == [tok.encode_special("<|bos|>")]
    assert next(lines) == "never read"  # /quit ended the loop
    # EOF ends the session too
    session.repl(read=lambda prompt: (_ for _ in ()).throw(EOFError), out=io.StringIO())


def test_overlong_conversation_is_refused_clearly(model, tok):
    session = ChatSession(Engine(model, tok), tok, ChatSettings(temperature=0.0, max_tokens=5))
    with pytest.raises(ValueError, match="/clear"):
        session.reply("word " * 400, io.StringIO())


def test_one_shot_prompt_from_a_checkpoint(base_dir, model, tok, capsys):
    from nanochat.model.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.tokenizer import default_tokenizer_path

    tok.save(default_tokenizer_path())
    meta = {"config": asdict(model.config), "step": 7}
    other = tiny_model(tok.vocab_size, sequence_len=256, seed=99)
    save_checkpoint(checkpoint_dir("mid", "d1"), 3, other.state_dict(), None, {**meta, "step": 3})
    save_checkpoint(checkpoint_dir("sft", "d1"), 7, model.state_dict(), None, meta)
    assert chat_cli.main(["-p", "Hello!", "--temperature", "0", "--max-tokens", "12", "--device", "cpu",
                          "--weights", "fp32"]) == 0  # the reference below is the fp32 model
    captured = capsys.readouterr()
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "Hello!"}]})
    assert captured.out == greedy_text(model, tok, prompt, 12) + "\n"
    assert "loaded sft checkpoint, step 7" in captured.err
    assert chat_cli.main(["-p", "Hello!", "--temperature", "0", "--max-tokens", "12", "--source", "mid",
                          "--device", "cpu"]) == 0
    assert "loaded mid checkpoint, step 3" in capsys.readouterr().err


def test_no_checkpoint_is_a_clear_error(base_dir):
    with pytest.raises(FileNotFoundError, match="chat-sft"):
        chat_cli.main(["-p", "hi", "--device", "cpu"])
