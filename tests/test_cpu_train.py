"""The CPU training path's speed choices: bf16 autocast (chosen from the CPU's flags), compilation and threads.

- the automatic choices follow the CPU flags, the device and the run length, and explicit flags win
- training under bf16 autocast tracks the fp32 loss curve: 40 steps of a tiny model on a learnable synthetic
  language, per-step losses within 0.01 nats of fp32's (observed: 0.0008), the curve falling well below ln(vocab), with
  the matmuls really in bf16 and the weights, gradients and optimizer state still fp32
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from nanochat.model.gpt import GPT, GPTConfig
from nanochat.runtime import (
    CPU_COMPILE_MIN_STEPS,
    autocast,
    choose_compile,
    choose_dtype,
    configure_threads,
    cpu_flags,
    native_bf16_flags,
)
from nanochat.training.loop import accumulate_gradients

CPU = torch.device("cpu")
STEPS = 40
TOLERANCE = 0.01  # nats, per step; observed 0.0008 (each loss averages the matmuls' bf16 rounding over 512 tokens)


def test_dtype_choice_follows_the_cpu_flags():
    assert choose_dtype("auto", CPU, {"avx2", "avx512f", "avx512_bf16"})[0] == torch.bfloat16
    assert choose_dtype("auto", CPU, {"amx_bf16", "amx_tile"})[0] == torch.bfloat16
    assert choose_dtype("auto", CPU, {"fp", "asimd", "bf16"})[0] == torch.bfloat16  # aarch64 Features
    dtype, reason = choose_dtype("auto", CPU, {"avx2", "avx512f"})
    assert dtype == torch.float32 and "no native bf16" in reason
    assert choose_dtype("fp32", CPU, {"avx512_bf16"})[0] == torch.float32  # an explicit flag wins
    dtype, reason = choose_dtype("bf16", CPU, set())
    assert dtype == torch.bfloat16 and "emulated" in reason
    with pytest.raises(ValueError, match="always runs under bf16"):
        choose_dtype("fp32", torch.device("cuda"))
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        choose_dtype("fp16", CPU)
    assert native_bf16_flags({"avx512_bf16", "amx_bf16"}) == ["avx512_bf16", "amx_bf16"]
    assert isinstance(cpu_flags(), set)


def test_compile_choice():
    assert choose_compile(None, torch.device("cuda"), 1)[0]
    assert not choose_compile(None, CPU, CPU_COMPILE_MIN_STEPS - 1)[0]
    assert choose_compile(True, CPU, 1) == (True, "--compile")
    assert choose_compile(False, torch.device("cuda"), 10**6) == (False, "--no-compile")


def test_thread_choice(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(1, CPU).startswith("1 ") and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more processes than cores: one thread each
        assert "auto" in configure_threads(None, CPU) and torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            configure_threads(0, CPU)
    finally:
        torch.set_num_threads(before)


def synthetic_batches(vocab: int, batch: int, seq: int, seed: int = 0):
    """A learnable language: each token follows from the previous one by one of two fixed successor tables,
    picked at random per position, so the best possible loss is ln 2 and an untrained model scores ln(vocab)."""
    gen = torch.Generator().manual_seed(seed)
    tables = torch.randint(0, vocab, (2, vocab), generator=gen)
    while True:
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        choice = torch.randint(0, 2, (batch, seq), generator=gen)
        for t in range(seq):
            x[:, t + 1] = tables[choice[:, t], x[:, t]]
        yield x[:, :-1], x[:, 1:]


def loss_curve(dtype: torch.dtype) -> tuple[list[float], GPT, object, set]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=256, sequence_len=64))
    optimizer = model.setup_optimizer()
    seen = set()  # dtypes of an MLP matmul's output: bf16 proves autocast reached the matmuls
    model.blocks[0].mlp.c_fc.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    loader = synthetic_batches(256, 8, 64)
    forward_context = functools.partial(autocast, CPU, dtype)
    losses = []
    for _ in range(STEPS):
        losses.append(accumulate_gradients(model, loader, 2, CPU, 1, forward_context))
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients to check their dtype
    return losses, model, optimizer, seen


@pytest.mark.slow
def test_bf16_autocast_tracks_the_fp32_loss_curve():
    # one thread: tiny matmuls gain nothing from more, and on a busy machine OpenMP's spinning threads made this
    # test an order of magnitude slower (bench/RESULTS.md, "Machine notes moved out of code comments")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_bf16_tracks_fp32()
    finally:
        torch.set_num_threads(before)


def _check_bf16_tracks_fp32():
    fp32, _, _, seen32 = loss_curve(torch.float32)
    bf16, model, optimizer, seen16 = loss_curve(torch.bfloat16)
    assert seen32 == {torch.float32} and seen16 == {torch.bfloat16}
    assert fp32[-1] < 0.6 * math.log(256), f"fp32 did not learn: {fp32}"
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(gaps) < TOLERANCE, f"bf16 strays from fp32 by up to {max(gaps):.4f} nats:\n{fp32}\n{bf16}"
    # fp32 master weights, gradients and optimizer state (Muon momentum, AdamW moments)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    state = optimizer.state_dict()
    tensors = [t for t in torch.utils._pytree.tree_leaves(state)
               if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
