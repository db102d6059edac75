"""Two processes under a real `torchrun --standalone --nproc_per_node=2` (gloo, CPU) end with the same parameters
as one process with the same global batch, and a rank-sharded optimizer checkpoint resumes exactly.

This file is also the worker script: torchrun runs it as __main__.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 4
SAVE_AT = 2
GLOBAL_BATCH = 4
VOCAB = 61  # odd: the AdamW row shards need padding


def build():
    from nanochat.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    # 3 layers: the MLP stacks hold 3 matrices each, so the Muon stacks need padding on 2 ranks
    return GPT(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=3, n_head=2, n_kv_head=1, n_embd=64))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, 17), generator=gen) for _ in range(STEPS)]


def run_steps(model, opt, data, steps, rank=0, world_size=1):
    from nanochat.model.schedules import lr_multiplier, muon_momentum

    rows = GLOBAL_BATCH // world_size
    for step in steps:
        x = data[step][rank * rows:(rank + 1) * rows]
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier(step, STEPS, warmdown_ratio=0.5)
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step, warmup_steps=3)
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def worker(out_dir: Path) -> None:
    import torch.distributed as dist

    from nanochat.common import init_process_group
    from nanochat.model.checkpoint import load_checkpoint, save_checkpoint

    init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    data = batches()
    model = build()
    opt = model.setup_optimizer()
    assert opt.world_size == world_size == 2
    run_steps(model, opt, data, range(SAVE_AT), rank, world_size)
    save_checkpoint(out_dir / "ckpt", SAVE_AT, model.state_dict(), opt.state_dict(), {"step": SAVE_AT}, rank=rank)
    run_steps(model, opt, data, range(SAVE_AT, STEPS), rank, world_size)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    # resume from the sharded checkpoint into fresh objects: must land on exactly the same parameters
    model = build()
    opt = model.setup_optimizer()
    model_state, opt_state, _ = load_checkpoint(out_dir / "ckpt", load_optimizer=True, rank=rank)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    run_steps(model, opt, data, range(SAVE_AT, STEPS), rank, world_size)
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), f"rank {rank}: {k} differs after resume"
    # the shards really are shards: this rank's Muon state holds half of each padded stack
    assert opt.state[0]["momentum_buffer"].shape[0] == len(opt.param_groups[0]["params"]) // 2
    if rank == 0:
        torch.save(straight, out_dir / "params.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=str(tmp_path / "base"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    distributed = torch.load(tmp_path / "params.pt", weights_only=True)
    assert sorted(os.listdir(tmp_path / "ckpt" / "step_000002")) == ["meta.json", "model.safetensors",
                                                                     "optim_rank0.pt", "optim_rank1.pt"]

    model = build()
    opt = model.setup_optimizer()
    assert opt.world_size == 1
    run_steps(model, opt, batches(), range(STEPS))
    moved = 0
    for name, p in model.state_dict().items():
        torch.testing.assert_close(distributed[name], p, atol=2e-5, rtol=1e-4, msg=name)
        moved += int(not torch.equal(p, build().state_dict()[name]))
    assert moved == len(distributed)  # every parameter trained (incl. the zero-initialised projections)


TEARDOWN = """
import os, sys, torch, torch.distributed as dist
from nanochat.common import init_process_group
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
assert threads() > before, "gloo started no worker thread: this test no longer sees the teardown"
import torch._dynamo  # what a model forward's first custom-op call does
dist.barrier()
dist.destroy_process_group()
assert threads() == before, f"{threads() - before} gloo threads outlive destroy_process_group"
"""


def test_destroy_process_group_joins_gloo_threads_after_dynamo_import():
    """A model forward (custom ops) imports torch._dynamo after the group exists; destroy must still join gloo's
    threads, or one of them can abort the interpreter's exit after a successful run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", TEARDOWN, str(port)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
