"""`nanochat chat`: talk to a chat model in the terminal.

- Loads the newest checkpoint of the most finished chat stage (rl, then sft, then mid) unless --source, --model-tag
  or --step name one.
- Keeps the conversation as token ids (tool calls and their outputs stay exactly as generated, each turn closed by
  <|assistant_end|> as the server renders it) and streams the reply token by token; the python calculator tool runs
  inside the engine.
- Commands: /clear, /temperature X, /topk K (0 = off), /help, /quit. `-p "prompt"` answers once and exits.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, TextIO

from nanochat.common import UserError
from nanochat.inference.engine import Engine
from nanochat.model.checkpoint import add_chat_model_args, load_chat_model
from nanochat.runtime import autodetect_device

HELP = "commands: /clear (new conversation), /temperature X, /topk K (0 = off), /quit"


@dataclass
class ChatSettings:
    temperature: float = 0.6
    top_k: int = 50
    max_tokens: int = 512
    seed: int | None = None


class ChatSession:
    """One conversation over an Engine: user turns in, streamed assistant turns out."""

    def __init__(self, engine, tokenizer, settings: ChatSettings | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.settings = settings or ChatSettings()
        self.context = engine.model.config.sequence_len
        S = tokenizer.encode_special
        self.bos, self.assistant_end = S("<|bos|>"), S("<|assistant_end|>")
        self.user_start, self.user_end = S("<|user_start|>"), S("<|user_end|>")
        self.assistant_start = S("<|assistant_start|>")
        self.tokens = [self.bos]
        self.turns = 0

    def clear(self) -> None:
        self.tokens = [self.bos]
        self.turns = 0

    def reply(self, text: str, out: TextIO) -> str:
        """Add a user turn, stream the assistant's reply to `out`, keep both in the conversation."""
        prompt = self.tokens + [self.user_start, *self.tokenizer.encode(text), self.user_end, self.assistant_start]
        room = self.context - len(prompt)
        if room < 1:
            raise ValueError(f"the conversation is {len(prompt)} tokens, the model's context is {self.context}; "
                             f"use /clear to start over")
        s = self.settings
        generated, pieces, finish, error = [], [], None, None
        for ev in self.engine.stream(prompt, max_tokens=min(s.max_tokens, room), temperature=s.temperature,
                                     top_k=s.top_k or None, seed=s.seed):
            if ev.token is not None:
                generated.append(ev.token)
            if ev.text:
                out.write(ev.text)
                out.flush()
                pieces.append(ev.text)
            finish = ev.finish_reason or finish
            error = ev.error or error
        out.write("\n")
        if finish == "error":  # the failed turn is not kept: the conversation stays as it was before it
            out.write(f"(generation failed: {error})\n")
            return ""
        # the turn closes with <|assistant_end|>, as the chat format (and the server's history) writes it: a reply
        # that ended with <|bos|> has it in its place, one cut by the token budget gets it appended
        if generated and finish == "stop" and generated[-1] in self.engine.terminal:
            generated[-1] = self.assistant_end
        else:
            generated.append(self.assistant_end)
        self.tokens = prompt + generated
        self.turns += 1
        return "".join(pieces)

    def command(self, line: str, out: TextIO) -> bool:
        """Handle a /command; returns False when the session should end."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/clear":
            self.clear()
            out.write("(conversation cleared)\n")
        elif name == "/temperature":
            try:
                value = float(arg)
                if not 0.0 <= value <= 2.0:
                    raise ValueError
                self.settings.temperature = value
                out.write(f"(temperature {value})\n")
            except ValueError:
                out.write(f"(temperature must be a number in [0, 2], got {arg!r})\n")
        elif name == "/topk":
            try:
                value = int(arg)
                if value < 0:
                    raise ValueError
                self.settings.top_k = value
                out.write(f"(top-k {value or 'off'})\n")
            except ValueError:
                out.write(f"(top-k must be an integer >= 0, got {arg!r})\n")
        else:
            out.write(HELP + "\n")
        return True

    def repl(self, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
        out.write(f"nanochat — {HELP}\n")
        while True:
            try:
                line = read("\nYou: ")
            except (EOFError, KeyboardInterrupt):
                out.write("\n")
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line, out):
                    return
                continue
            out.write("nanochat: ")
            try:
                self.reply(line, out)
            except ValueError as e:
                out.write(f"\n({e})\n")
            except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
                out.write("\n(interrupted)\n")


def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(prog="nanochat chat", description="Talk to a chat model in the terminal.")
    add_chat_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply (tokens)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if not 0.0 <= args.temperature <= 2.0:
        raise UserError(f"--temperature must be in [0, 2], got {args.temperature}")
    if args.top_k < 0 or args.max_tokens < 1:
        raise UserError(f"--top-k must be >= 0 and --max-tokens >= 1, got {args.top_k} and {args.max_tokens}")
    device = autodetect_device(args.device)
    model, tokenizer, meta, stage = load_chat_model(args.source, device, args.model_tag, args.step, args.model,
                                                    weights=args.weights)
    print(f"loaded {stage} {'model ' + args.model if args.model else 'checkpoint'}, step {meta.get('step')}, "
          f"{meta['weights']} weights", file=sys.stderr)
    session = ChatSession(Engine(model, tokenizer), tokenizer,
                          ChatSettings(args.temperature, args.top_k, args.max_tokens, args.seed))
    if args.prompt is not None:
        session.reply(args.prompt, sys.stdout)
        return 0
    session.repl()
    return 0


if __name__ == "__main__":
    sys.exit(main())
