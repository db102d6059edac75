"""`nanochat export` and `--model DIR`: the folder is self-contained (weights, config, both tokenizers, chat
template, card, model class); in a fresh process our engine and Hugging Face transformers give the same greedy
tokens as the original checkpoint; a corrupted safetensors file is refused with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("nanochat.tokenizer", reason="the native tokenizer is not built", exc_type=ImportError)

from nanochat.hf import export  # noqa: E402
from nanochat.inference.engine import Engine  # noqa: E402
from nanochat.model.checkpoint import checkpoint_dir, load_exported, save_checkpoint  # noqa: E402
from nanochat.model.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from nanochat.tokenizer import default_tokenizer_path  # noqa: E402

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hello there, how are you today?"}]},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is 12 + 30?"}]},
    {"messages": [{"role": "user", "content": "Count the r in strawberry."},
                  {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                                    {"type": "python", "text": "'strawberry'.count('r')"},
                                                    {"type": "python_output", "text": "3"},
                                                    {"type": "text", "text": "There are 3."}]},
                  {"role": "user", "content": "And in <|assistant_end|> raspberry?"}]},
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny GQA model saved as an SFT checkpoint (with a metrics file), exported; plus its reference tokens."""
    root = tmp_path_factory.mktemp("export")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(root / "base")
    try:
        tokenizer = tiny_tokenizer(512)
        tokenizer.save(default_tokenizer_path())
        model = tiny_model(tokenizer.vocab_size, n_layer=2, n_embd=128, n_head=4, n_kv_head=2, sequence_len=256,
                           seed=3)
        ckpt = checkpoint_dir("sft", "tiny")
        save_checkpoint(ckpt, 7, model.state_dict(), None, {"config": asdict(model.config), "step": 7})
        (ckpt / "metrics.json").write_text(json.dumps({"stage": "sft", "val_loss": 1.2345}))
        out = root / "model"
        assert export.main(["--source", "sft", "--out", str(out)]) == 0
        engine = Engine(model, tokenizer, tools=False)
        reference = []
        for conv in CONVERSATIONS:
            prompt = tokenizer.render_for_completion(conv)
            [[(tokens, _)]] = engine.generate([prompt], max_tokens=MAX_TOKENS, temperature=0.0)
            reference.append({"prompt": prompt, "tokens": tokens})
        yield {"dir": out, "root": root, "reference": reference, "tokenizer": tokenizer}
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old


def test_folder_is_self_contained(exported):
    out = exported["dir"]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.bin", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json", "configuration_nanochat.py", "modeling_nanochat.py",
            "README.md"} <= names
    assert not list(out.parent.glob(".*export-tmp"))
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanochatForCausalLM"
    assert (config["n_head"], config["n_kv_head"], config["nanochat"]["step"]) == (4, 2, 7)
    card = (out / "README.md").read_text()
    assert "val_loss | 1.2345" in card and "step 7" in card
    # the model class imports nothing from nanochat, so the folder works where nanochat is not installed
    for name in export.HF_FILES:
        imports = [line for line in (out / name).read_text().splitlines() if line.startswith(("import", "from"))]
        assert imports and not [line for line in imports if "nanochat" in line.split()[1].split(".")[0]]


def test_exported_model_loads_with_the_same_weights(exported):
    model, tokenizer, meta = load_exported(exported["dir"])
    assert (meta["stage"], meta["model_tag"], meta["step"]) == ("sft", "tiny", 7)
    assert tokenizer.mergeable_ranks() == exported["tokenizer"].mergeable_ranks()
    for conv, ref in zip(CONVERSATIONS, exported["reference"]):
        [[(tokens, _)]] = Engine(model, tokenizer, tools=False).generate([ref["prompt"]], max_tokens=MAX_TOKENS,
                                                                          temperature=0.0)
        assert tokens == ref["tokens"]


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from nanochat.model.checkpoint import load_chat_model
    from nanochat.inference.engine import Engine

    folder, conversations, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    model, tokenizer, meta, stage = load_chat_model(model_dir=folder)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    result = {"stage": stage, "ours": [], "hf": [], "template": [], "max_logit_diff": 0.0}
    for conv in conversations:
        prompt = tokenizer.render_for_completion(conv)
        [[(tokens, _)]] = Engine(model, tokenizer, tools=False).generate([prompt], max_tokens=max_tokens,
                                                                          temperature=0.0)
        result["ours"].append(tokens)
        ids = torch.tensor([prompt])
        out = hf_model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        result["hf"].append(out[0, len(prompt):].tolist())
        result["template"].append(list(hf_tok.apply_chat_template(conv["messages"], add_generation_prompt=True,
                                                                  tokenize=True, return_dict=True)["input_ids"]))
        with torch.no_grad():
            diff = (hf_model(ids).logits - model(ids)).abs().max().item()
        result["max_logit_diff"] = max(result["max_logit_diff"], diff)
    # a left-padded batch (with its attention mask) gives each row's tokens as alone
    prompts = [tokenizer.render_for_completion(conv) for conv in conversations]
    width, pad = max(map(len, prompts)), hf_model.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    batched = hf_model.generate(ids, attention_mask=mask, **kw)[:, width:].tolist()
    result["batched_equal"] = batched == [hf_model.generate(torch.tensor([p]), **kw)[0, len(p):].tolist()
                                          for p in prompts]
    print("RESULT " + json.dumps(result))
""")


@pytest.mark.slow
def test_fresh_process_engine_and_transformers_match(exported):
    pytest.importorskip("transformers")
    terminal = {exported["tokenizer"].encode_special(t) for t in export.STOP_TOKENS}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=str(exported["root"] / "hf_home"))
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(exported["dir"]), json.dumps(CONVERSATIONS),
                           str(MAX_TOKENS)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["stage"] == "sft"
    assert result["max_logit_diff"] < 1e-3 and result["batched_equal"]
    for ref, ours, hf, template in zip(exported["reference"], result["ours"], result["hf"], result["template"]):
        assert ours == ref["tokens"]
        # transformers keeps the stop token it ended on; our engine leaves it out
        assert hf[:len(ours)] == ours and all(t in terminal for t in hf[len(ours):]) and len(hf) <= len(ours) + 1
    assert sum(len(t) for t in result["ours"]) >= 10  # the comparison covered real generation
    # the chat template renders exactly like render_for_completion, except (documented in the card) that HF turns
    # special-token text typed by the user into the special token, where ours keeps it plain text
    assert result["template"][:2] == [ref["prompt"] for ref in exported["reference"][:2]]
    end = exported["tokenizer"].encode_special("<|assistant_end|>")
    assert result["template"][2].count(end) == exported["reference"][2]["prompt"].count(end) + 1


def test_corrupted_safetensors_is_rejected(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported["dir"], broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit inside a tensor: safetensors alone would not notice
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupted: its SHA-256"):
        load_exported(broken)
    # without the recorded hash, a truncated file is still refused by its header
    config = json.loads((broken / "config.json").read_text())
    del config["nanochat"]["sha256"]
    (broken / "config.json").write_text(json.dumps(config))
    weights.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_exported(broken)
    (broken / "tokenizer.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing tokenizer.bin"):
        load_exported(broken)


@pytest.mark.slow
def test_commands_accept_model_dir(exported, base_dir, capsys):
    """chat, base-eval and chat-eval load the folder with --model (a fresh NANOCHAT_BASE_DIR: no checkpoints, no tokenizer)."""
    from nanochat.evals import base_eval, chat_eval
    from nanochat.serve import chat_cli

    folder = str(exported["dir"])
    assert chat_cli.main(["--model", folder, "-p", "hello", "--temperature", "0", "--max-tokens", "4",
                          "--device", "cpu"]) == 0
    assert f"loaded sft model {folder}, step 7" in capsys.readouterr().err
    target = Path(folder) / "base_eval_step_000007.json"
    try:
        assert base_eval.main(["--model", folder, "--eval", "samples", "--max-new-tokens", "2",
                               "--device", "cpu"]) == 0
        assert json.loads(target.read_text())["model_tag"] == "tiny"
    finally:
        target.unlink(missing_ok=True)
    results = base_dir / "chat_eval.json"
    assert chat_eval.main(["--model", folder, "--tasks", "SpellingBee", "--max-problems", "2",
                           "--max-new-tokens", "4", "--device", "cpu", "--out", str(results)]) == 0
    assert json.loads(results.read_text())["model"] == {"stage": "sft", "tag": "tiny", "step": 7}


def test_export_errors_are_one_line(exported, base_dir, capsys):
    assert export.main(["--source", "sft", "--out", str(exported["dir"])]) == 2
    assert "--force" in capsys.readouterr().err
    assert export.main(["--source", "base", "--out", str(base_dir / "x")]) == 2  # no base checkpoints here
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no checkpoints under") and "\n" not in err


def test_cli_lists_export():
    from nanochat import cli

    assert "export" in cli.usage()
