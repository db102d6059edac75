"""`nanochat export`: a checkpoint as one self-contained folder that loads anywhere.

    DIR/model.safetensors          weights (fp32, as trained), names as in Hugging Face (model.wte, model.blocks.N,
                                   lm_head); its SHA-256 is in config.json, so a corrupted copy is refused
    DIR/config.json                GPTConfig + architecture constants, transformers' auto_map, the special ids,
                                   and a "nanochat" block (stage, tag, step, commit, sha256)
    DIR/tokenizer.bin              our tokenizer file (nanochat.tokenizer)
    DIR/tokenizer.json             the same tokenizer for Hugging Face `tokenizers`
    DIR/tokenizer_config.json      transformers' PreTrainedTokenizerFast settings and the chat template
    DIR/chat_template.jinja        the chat template alone (renders like tokenizer.render_for_completion)
    DIR/generation_config.json     stop ids (<|assistant_end|>, <|bos|>, as the engine's), greedy by default
    DIR/configuration_nanochat.py, DIR/modeling_nanochat.py   the model class for transformers (trust_remote_code)
    DIR/README.md                  the model card, with the numbers the stages and evals left beside the checkpoint

- every nanochat command that loads a model takes `--model DIR` (checkpoint.load_exported)
- the folder is written under a temporary name and renamed when complete; an existing DIR needs --force
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from nanochat.common import git_commit
from nanochat.evals.report import _eval_metrics
from nanochat.model.checkpoint import _newest_tag, checkpoint_dir, load_checkpoint
from nanochat.model.gpt import GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, get_tokenizer

HF_FILES = ("configuration_nanochat.py", "modeling_nanochat.py")
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")  # the engine's TERMINAL_TOKENS
# The pad id is <|assistant_end|>, never <|bos|>: generate() without an attention mask treats pad ids in the prompt
# as padding unless the pad id is also a stop id, and every prompt starts with <|bos|>.

# The chat template: the same tokens as Tokenizer.render_conversation / render_for_completion. Each run of text
# between special tokens is tokenized on its own, as ours is. A system message is merged into the first user turn.
CHAT_TEMPLATE = """\
{%- macro text_of(content) -%}
{%- if content is string -%}{{ content }}{%- else -%}
{%- for part in content -%}{{ part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- '<|bos|>' -}}
{%- set ns = namespace(system=none) -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{%- set ns.system = text_of(message['content']) -%}
{%- elif message['role'] == 'user' -%}
{{- '<|user_start|>' -}}
{%- if ns.system is not none -%}{{- ns.system + '\\n\\n' -}}{%- set ns.system = none -%}{%- endif -%}
{{- text_of(message['content']) + '<|user_end|>' -}}
{%- else -%}
{{- '<|assistant_start|>' -}}
{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
{%- else -%}{{- part['text'] -}}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|assistant_end|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}
"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_fp32_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write tensors as fp32 safetensors one at a time: each is converted (and copied) only while it is written,
    so a memory-mapped bf16 state costs one tensor of extra memory, not a second copy of the model.
    The layout is the format's: 8-byte little-endian header length, the JSON header (padded with spaces to a
    multiple of 8), then the tensors' bytes back to back in header order."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def card_metrics(folder: Path) -> dict:
    """The headline numbers the stages and evals wrote beside a checkpoint (as the report card reads them)."""
    metrics: dict = {}
    for path in sorted(folder.glob("*.json")):
        if "eval" in path.name or "metrics" in path.name:
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                metrics.update(_eval_metrics(data))
    return metrics


def model_card(config: dict, info: dict, metrics: dict, num_params: int, has_hf_tokenizer: bool) -> str:
    lines = [
        f"# nanochat {info['stage']} model {info['model_tag']} (step {info['step']})", "",
        "A GPT trained with [nanochat](https://github.com/karpathy/nanochat)-style code: rotary embeddings, QK-norm, "
        f"parameter-free RMSNorm, ReLU² MLP, untied head, logit soft-cap {config['logit_softcap']:g}, GQA.", "",
        "| | |", "|---|---|",
        f"| parameters | {num_params:,} |",
        f"| layers / width / heads (K/V) | {config['n_layer']} / {config['n_embd']} / {config['n_head']} "
        f"({config['n_kv_head']}) |",
        f"| context | {config['sequence_len']} tokens |",
        f"| vocabulary | {config['vocab_size']:,} |",
        f"| stage, step | {info['stage']}, {info['step']} |",
        f"| commit | `{info['commit']}` |",
        f"| exported | {info['exported']} |", "",
        "## Numbers from the report card", "",
    ]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:,.0f} |" if float(v).is_integer() else f"| {k} | {v:.4f} |"
                  for k, v in numbers.items()]
    else:
        lines.append("No evaluation results were found beside this checkpoint (run `nanochat base-eval` or "
                     "`nanochat chat-eval` before exporting to have them here).")
    lines += [
        "", "## Use", "",
        "With nanochat: `nanochat chat --model DIR`, `nanochat serve --model DIR`, `nanochat chat-eval --model DIR`.",
        "", "With Hugging Face transformers (the model class ships in this folder):", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(DIR)",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
        "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello\"}], add_generation_prompt=True,",
        "                              return_tensors=\"pt\", return_dict=True)[\"input_ids\"]",
        "out = model.generate(ids, max_new_tokens=64, do_sample=False)",
        "print(tok.decode(out[0, ids.shape[1]:]))", "```", "",
        "Greedy generations match nanochat's engine token for token (fp32). Differences to know: the Hugging Face "
        "tokenizer turns special-token text typed by a user (e.g. `<|assistant_end|>`) into the special token, while "
        "nanochat keeps it plain text; and the python tool is not run by `generate` (nanochat's engine runs it).",
    ]
    if not has_hf_tokenizer:
        lines += ["", "tokenizer.json is missing: the exporting machine had no `tokenizers` package."]
    return "\n".join(lines) + "\n"


def export(out: Path, stage: str, model_tag: str | None = None, step: int | None = None, force: bool = False,
           log=print) -> Path:
    """Write the export folder of a checkpoint; returns it."""

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    if model_tag is None:
        model_tag = _newest_tag(checkpoint_dir(stage, "x").parent)
    ckpt_dir = checkpoint_dir(stage, model_tag)
    model_state, _, meta = load_checkpoint(ckpt_dir, step=step)
    info = {"stage": stage, "model_tag": model_tag, "step": meta.get("step"),
            "commit": meta.get("commit") or git_commit()}
    write_model_folder(out, model_state, meta["config"], get_tokenizer(), info, card_metrics(ckpt_dir))
    num_params = sum(v.numel() for v in model_state.values())
    log(f"exported {stage}/{model_tag} step {meta.get('step')} ({num_params:,} parameters) to {out}")
    return out


def write_model_folder(out: Path, model_state: dict, config: dict, tokenizer, info: dict, metrics: dict,
                       extra_card: str = "") -> None:
    """Write the folder (atomically: a temporary name renamed when complete; an existing `out` is replaced).
    info: stage, model_tag, step, commit (more keys are kept in config.json's "nanochat" block)."""

    out = Path(out)
    config = asdict(GPTConfig(**config))
    if tokenizer.vocab_size > config["vocab_size"]:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {config['vocab_size']}: "
                         "the checkpoint was trained with another tokenizer")
    special = tokenizer.special_tokens
    stops = [special[name] for name in STOP_TOKENS]

    staging = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # the exported names: the embeddings and blocks under `model.`, lm_head at the top
        names = {k: (k if k.startswith("lm_head.") else "model." + k) for k in model_state}
        save_fp32_safetensors({names[k]: v for k, v in model_state.items()}, staging / "model.safetensors",
                              metadata={"format": "pt"})
        info = {**info, "exported_by_commit": git_commit(),
                "exported": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "sha256": _sha256(staging / "model.safetensors"), "gpt_config": config}
        hf_config = {
            "architectures": ["NanochatForCausalLM"], "model_type": "nanochat",
            "auto_map": {"AutoConfig": "configuration_nanochat.NanochatConfig",
                         "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"},
            **config, "rotary_len_factor": 10,
            "bos_token_id": special["<|bos|>"], "eos_token_id": stops, "pad_token_id": stops[0],
            "tie_word_embeddings": False, "torch_dtype": "float32", "dtype": "float32", "use_cache": True,
            "nanochat": info,
        }
        _write_json(staging / "config.json", hf_config)
        _write_json(staging / "generation_config.json", {
            "bos_token_id": special["<|bos|>"], "eos_token_id": stops, "pad_token_id": stops[0],
            "do_sample": False, "max_new_tokens": 256})
        tokenizer.save(staging / "tokenizer.bin")
        try:
            tokenizer.save_hf_json(staging / "tokenizer.json")
            has_hf_tokenizer = True
        except ImportError:
            print("warning: no `tokenizers` package: the export has no tokenizer.json (pip install tokenizers)")
            has_hf_tokenizer = False
        _write_json(staging / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
            "pad_token": "<|assistant_end|>",
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|bos|>"],
            "model_max_length": config["sequence_len"], "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE})
        (staging / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        for name in HF_FILES:
            shutil.copyfile(Path(__file__).parent / name, staging / name)
        num_params = sum(v.numel() for v in model_state.values())
        (staging / "README.md").write_text(model_card(config, info, metrics, num_params, has_hf_tokenizer)
                                           + extra_card)
        for path in staging.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanochat export", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=["base", "mid", "sft", "rl"], required=True, help="checkpoint stage")
    p.add_argument("--model-tag", default=None, help="checkpoint model tag, e.g. d20 (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--out", required=True, help="folder to write (a self-contained model)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        export(Path(args.out), args.source, args.model_tag, args.step, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
