"""Checkpoints: round trip, newest-complete selection, atomicity against torn writes and stale markers,
keep-last pruning, and load_model building the GPT from meta."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
import torch

from nanochat.model import checkpoint as ck
from nanochat.model.gpt import GPT, GPTConfig
from nanochat.model.resume import initial_lrs


def tiny_state(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    return cfg, GPT(cfg)


def meta_for(cfg, step):
    return {"config": asdict(cfg), "step": step, "data_state": {"pos": step}, "metrics": {}, "commit": "x",
            "args": {}, "system": {}}


def test_checkpoint_dir(base_dir):
    assert ck.checkpoint_dir("base", "d4") == base_dir / "checkpoints" / "base" / "d4"
    with pytest.raises(ValueError, match="stage"):
        ck.checkpoint_dir("pre", "d4")
    with pytest.raises(ValueError, match="model_tag"):
        ck.checkpoint_dir("base", "../x")


def test_round_trip_and_latest(tmp_path):
    cfg, model = tiny_state()
    opt = model.setup_optimizer()
    model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)).backward()
    opt.step()
    assert ck.latest_step(tmp_path) is None
    for step in (5, 10):
        ck.save_checkpoint(tmp_path, step, model.state_dict(), opt.state_dict(), meta_for(cfg, step))
    assert ck.list_steps(tmp_path) == [5, 10]
    assert ck.latest_step(tmp_path) == 10
    assert (tmp_path / "latest").read_text().strip() == "10"
    model_state, opt_state, meta = ck.load_checkpoint(tmp_path, load_optimizer=True)
    assert meta["step"] == 10 and meta["data_state"] == {"pos": 10}
    for k, v in model.state_dict().items():
        assert torch.equal(model_state[k], v)
    assert opt_state["step_count"] == 1
    torch.testing.assert_close(opt_state["state"][0]["momentum_buffer"], opt.state[0]["momentum_buffer"])
    _, none_opt, meta5 = ck.load_checkpoint(tmp_path, step=5)
    assert none_opt is None and meta5["step"] == 5
    with pytest.raises(FileNotFoundError, match="step 7"):
        ck.load_checkpoint(tmp_path, step=7)
    with pytest.raises(FileNotFoundError, match="rank 1"):
        ck.load_checkpoint(tmp_path, load_optimizer=True, rank=1)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.load_checkpoint(tmp_path / "empty")


def test_torn_writes_are_ignored(tmp_path):
    cfg, model = tiny_state()
    ck.save_checkpoint(tmp_path, 3, model.state_dict(), None, meta_for(cfg, 3))
    # a crash mid-save leaves a temporary directory; a crash before the rename of a later step leaves no step dir
    torn = tmp_path / ".tmp_step_000006"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    # a step directory without meta (not written by us) is not complete either
    (tmp_path / "step_000009").mkdir()
    (tmp_path / "latest").write_text("9\n")  # stale marker pointing at an incomplete step
    assert ck.latest_step(tmp_path) == 3
    assert ck.load_checkpoint(tmp_path)[2]["step"] == 3
    # saving step 6 again replaces the torn temporary directory
    ck.save_checkpoint(tmp_path, 6, model.state_dict(), None, meta_for(cfg, 6))
    assert ck.latest_step(tmp_path) == 6 and not torn.exists()
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_keep_last_prunes_old_steps(tmp_path):
    cfg, model = tiny_state()
    for step in range(0, 50, 10):
        ck.save_checkpoint(tmp_path, step, model.state_dict(), {"x": torch.zeros(1)}, meta_for(cfg, step),
                           keep_last=2)
    assert ck.list_steps(tmp_path) == [30, 40]
    assert sorted(os.listdir(tmp_path / "step_000040")) == ["meta.json", "model.safetensors", "optim_rank0.pt"]
    with pytest.raises(ValueError, match="keep_last"):
        ck.save_checkpoint(tmp_path, 50, model.state_dict(), None, meta_for(cfg, 50), keep_last=0)


class FakeTokenizer:
    vocab_size = 64


def test_load_model_builds_from_meta(base_dir, monkeypatch):
    # load_model takes the tokenizer from get_tokenizer(), imported into checkpoint.py; stand in for it (the real
    # one needs a trained tokenizer file, tested in test_base_train)
    monkeypatch.setattr(ck, "get_tokenizer", lambda path=None: FakeTokenizer())
    cfg, model = tiny_state(seed=1)
    ck.save_checkpoint(ck.checkpoint_dir("base", "d1"), 7, model.state_dict(), None, meta_for(cfg, 7))
    cfg2, model2 = tiny_state(seed=2)
    ck.save_checkpoint(ck.checkpoint_dir("base", "older"), 1, model2.state_dict(), None, meta_for(cfg2, 1))
    os.utime(ck.checkpoint_dir("base", "older") / "step_000001" / "meta.json", (1, 1))
    loaded, tokenizer, meta = ck.load_model("base")  # newest tag (d1), newest step
    assert meta["step"] == 7 and not loaded.training and isinstance(tokenizer, FakeTokenizer)
    assert json.loads(json.dumps(meta["config"])) == asdict(cfg)
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(x), model(x))
    loaded2, _, meta2 = ck.load_model("base", model_tag="older")
    assert meta2["step"] == 1
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        ck.load_model("sft")


def test_resume_pairs_optimizer_groups_by_checked_names():
    """Resuming keeps this invocation's initial lrs, group by group, by name; a group without a name or an initial
    lr, or two groups of one name, is refused instead of silently mispaired."""
    _, model = tiny_state()
    opt = model.setup_optimizer()
    lrs = initial_lrs(opt)
    assert list(lrs) == [g["name"] for g in opt.param_groups] and len(lrs) == len(opt.param_groups)
    opt.param_groups[1]["name"] = opt.param_groups[0]["name"]
    with pytest.raises(ValueError, match="two optimizer groups are named"):
        initial_lrs(opt)
    del opt.param_groups[0]["initial_lr"]
    with pytest.raises(ValueError, match="needs 'name' and 'initial_lr'"):
        initial_lrs(opt)
