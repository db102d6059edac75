"""The `nanochat` console command: one subcommand per stage, each dispatched to that stage's `main(argv)`.

Stages are imported lazily so `nanochat --help` is instant and a missing optional dependency of one stage never
breaks another.

Expected user mistakes (nanochat.common.UserError: no checkpoint, tokenizer or data yet, a corrupt file, a flag value
out of range) end with one line on stderr and exit status 2, as argparse's own errors do; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "tok-train": ("nanochat.training.tok_train", "train the BPE tokenizer on the pretraining shards"),
    "tok-eval": ("nanochat.evals.tok_eval", "compare bytes/token against GPT-2 and GPT-4 tokenizers"),
    "data": ("nanochat.data.cli", "download FineWeb-Edu, build shards from your files, the offline corpus or eval data"),
    "base-train": ("nanochat.training.base_train", "pretrain the GPT (use torchrun -m nanochat.training.base_train for many GPUs)"),
    "base-eval": ("nanochat.evals.base_eval", "bits per byte, CORE and samples of a base model"),
    "mid-train": ("nanochat.training.mid_train", "midtrain on the conversation mixture"),
    "chat-sft": ("nanochat.training.chat_sft", "supervised finetuning on conversations"),
    "chat-rl": ("nanochat.training.chat_rl", "reinforcement learning on GSM8K"),
    "chat-eval": ("nanochat.evals.chat_eval", "ARC, MMLU, GSM8K, HumanEval and ChatCORE of a chat model"),
    "chat": ("nanochat.serve.chat_cli", "talk to a chat model in the terminal"),
    "serve": ("nanochat.serve.cli", "OpenAI-compatible server with a web UI"),
    "report": ("nanochat.evals.report", "write report.md from the stages' results"),
    "export": ("nanochat.hf.export", "write a checkpoint as a self-contained folder (safetensors, HF-loadable)"),
    "import": ("nanochat.hf.importer", "convert a checkpoint of Karpathy's nanochat (folder, base dir or hub id)"),
}


def usage() -> str:
    lines = ["usage: nanochat <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`nanochat <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nanochat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    from nanochat.common import UserError  # after the stage: `nanochat --help` must not import torch

    try:
        result = module.main(rest)
    except UserError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"nanochat {name}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
