"""Your own conversations (`chat-sft --data FILE[:WEIGHT]`, `mid-train --data`): every bad line is reported with
its number before anything loads; weights repeat a file inside the mixture; every 20th conversation is held out;
and (slow) SFT and midtraining run on a tiny model with the file alone or mixed with the built-in tasks."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("nanochat.tokenizer", reason="the native tokenizer is not built", exc_type=ImportError)

from nanochat.tasks.base import TaskMixture  # noqa: E402
from nanochat.tasks.custom_chat import (  # noqa: E402
    ChatData,
    ChatDataError,
    CustomChat,
    load_conversations,
    parse_data_arg,
    with_custom_data,
)


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}


TOOL = {"messages": [{"role": "system", "content": "Use the calculator."},
                     {"role": "user", "content": "What is 12 * 12?"},
                     {"role": "assistant", "content": [{"type": "text", "text": "Computing."},
                                                       {"type": "python", "text": "12 * 12"},
                                                       {"type": "python_output", "text": "144"},
                                                       {"type": "text", "text": "It is 144."}]}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    good = conversation(1)
    rows = [good, TOOL, b"\n",                                                                    # 1-3 fine
            b'{"messages": [{"role": "user", "content": "unterminated"}\n',                          # 4
            {"messages": [{"role": "assistant", "content": "hi"}]},                                  # 5
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},      # 6
            {"messages": [{"role": "user", "content": "only a question"}]},                          # 7
            {"messages": [{"role": "user", "content": [{"type": "python", "text": "1"}]},
                          {"role": "assistant", "content": "x"}]},                                    # 8
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},      # 9
            {"text": "not a conversation"},                                                           # 10
            b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',                              # 11
            {"messages": [{"role": "robot", "content": "beep"}]},                                    # 12
            good]                                                                                     # 13
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    with pytest.raises(ChatDataError) as info:
        load_conversations(path)
    message = str(info.value)
    reported = [int(line.split()[1].rstrip(":")) for line in message.splitlines()[1:]]
    assert reported == [4, 5, 6, 7, 8, 9, 10, 11, 12], message
    assert "9 bad conversation line(s)" in message and str(path) in message
    assert "line 4: not valid JSON" in message and "line 11: invalid UTF-8" in message
    assert "line 7: no assistant message" in message and "'image'" in message
    # the good lines alone load, tool parts included
    ok = write_jsonl(tmp_path / "ok.jsonl", [good, TOOL, b"  \n", good])
    assert load_conversations(ok) == [good, TOOL, good]


def test_data_argument_is_checked_at_parse_time_with_exit_2(tmp_path, capsys):
    from nanochat.training import chat_sft, mid_train

    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(1), {"messages": []}, b"{nope\n"])
    for stage in (chat_sft, mid_train):
        with pytest.raises(SystemExit) as info:  # before any model or checkpoint is needed
            stage.parse_args(["--data", str(bad)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --data" in err and "line 2:" in err and "line 3: not valid JSON" in err
    with pytest.raises(SystemExit):
        chat_sft.parse_args(["--data", f"{tmp_path / 'good.jsonl'}"])
    assert "no such conversation file" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", [conversation(i) for i in range(3)])
    args = chat_sft.parse_args(["--data", f"{good}:2.5", "--data", str(good), "--data-only"])
    assert [(d.path, d.weight, len(d.conversations)) for d in args.data] == [(good, 2.5, 3), (good, 1.0, 3)]
    with pytest.raises(SystemExit):
        chat_sft.parse_args(["--data", f"{good}:0"])


def test_weights_holdout_and_mixing(tmp_path):
    convs = [conversation(i) for i in range(45)]
    data = ChatData(tmp_path / "c.jsonl", 2.0, convs)
    train, val = CustomChat(data, "train"), CustomChat(data, "val")
    assert len(val) == 2 and [val[0], val[1]] == [convs[19], convs[39]]  # every 20th held out
    assert len(train) == 2 * 43 and train[0] == convs[0] and train[43] == convs[0]
    assert not {json.dumps(train[i]) for i in range(len(train))} & {json.dumps(val[i]) for i in range(len(val))}
    small = ChatData(tmp_path / "s.jsonl", 0.5, convs[:6])
    assert len(CustomChat(small, "train")) == 3 and len(CustomChat(small, "val")) == 0

    builtin_train = TaskMixture([CustomChat(ChatData(tmp_path / "b", 1.0, convs[:4]), "train")])
    builtin_train.skipped = ["x"]
    builtin_val = TaskMixture([CustomChat(ChatData(tmp_path / "b", 1.0, convs[:4]), "train")])
    built = []

    def builtin(split):
        built.append(split)
        return builtin_train if split == "train" else builtin_val

    mixed_train, mixed_val = with_custom_data(builtin, [data, small], seed=1)
    assert len(mixed_train) == 4 + 86 + 3 and len(mixed_val) == 4 + 2 and mixed_train.skipped == ["x"]
    assert with_custom_data(builtin, []) == (builtin_train, builtin_val)
    built.clear()
    only_train, only_val = with_custom_data(builtin, [small], data_only=True)
    assert len(only_train) == 3 and len(only_val) == 3  # nothing held out of a small file: val = its train rows
    assert built == []  # the built-in mixture is not even built
    with pytest.raises(ChatDataError, match="--data-only needs"):
        with_custom_data(builtin, [], data_only=True)


def test_parse_data_arg_keeps_colons_in_names(tmp_path):
    path = write_jsonl(tmp_path / "a:b.jsonl", [conversation(1)])
    assert parse_data_arg(str(path)).path == path and parse_data_arg(f"{path}:3").weight == 3.0


@pytest.fixture
def base_checkpoint(base_dir):
    """A tiny random base model and tokenizer in a fresh NANOCHAT_BASE_DIR."""
    from nanochat.model.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.model.tiny import tiny_model, tiny_tokenizer
    from nanochat.tokenizer import default_tokenizer_path

    tokenizer = tiny_tokenizer(512)
    tokenizer.save(default_tokenizer_path())
    model = tiny_model(tokenizer.vocab_size, n_layer=1, n_embd=64, n_head=1, n_kv_head=1, sequence_len=64, std=0.05)
    save_checkpoint(checkpoint_dir("base", "tiny"), 0, model.state_dict(), None,
                    {"config": asdict(model.config), "step": 0})
    return base_dir


@pytest.mark.slow
def test_sft_and_mid_train_on_your_file(base_checkpoint, tmp_path):
    from nanochat.model.checkpoint import checkpoint_dir
    from nanochat.training import chat_sft, mid_train

    data = write_jsonl(tmp_path / "mine.jsonl", [conversation(i) for i in range(24)] + [TOOL])
    common = ["--device", "cpu", "--eval-every", "0", "--spelling-size", "20", "--smoltalk-limit", "0"]
    # mixed with the built-in SFT tasks (offline here: only the synthetic ones and identity are present)
    assert chat_sft.main(["--source", "base", "--source-tag", "tiny", "--model-tag", "mixed", "--data",
                          f"{data}:2", "--device-batch-size", "2", "--examples-per-step", "4",
                          "--num-iterations", "2", "--eval-conversations", "4", "--max-seq-len", "64",
                          *common]) == 0
    mixed = json.loads((checkpoint_dir("sft", "mixed") / "metrics.json").read_text())
    assert mixed["train_conversations"] > 2 * 24 and mixed["steps"] == 2
    # the file alone
    assert chat_sft.main(["--source", "base", "--source-tag", "tiny", "--model-tag", "only", "--data", str(data),
                          "--data-only", "--device-batch-size", "2", "--examples-per-step", "2",
                          "--num-iterations", "2", "--eval-conversations", "4", "--max-seq-len", "64",
                          *common]) == 0
    only = json.loads((checkpoint_dir("sft", "only") / "metrics.json").read_text())
    assert only["train_conversations"] == 24  # 25 conversations, the 20th held out
    assert mid_train.main(["--source-tag", "tiny", "--model-tag", "mid", "--data", str(data), "--data-only",
                           "--device-batch-size", "2", "--max-seq-len", "32", "--num-iterations", "2",
                           "--eval-tokens", "64", *common]) == 0
    mid = json.loads((checkpoint_dir("mid", "mid") / "metrics.json").read_text())
    assert mid["train_conversations"] == 24 and mid["val_loss"] > 0
