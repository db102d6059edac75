"""Parity tests of the Triton kernels (nanochat_kernels) against the plain-torch references.

- On CPU the kernels run in Triton's interpreter. TRITON_INTERPRET must be set before the kernel modules are
  imported, and other test files may import them first in compiled mode, so each kernel group runs in its own
  subprocess (`test_interpreter_group`) with TRITON_INTERPRET=1 and NANOCHAT_KERNELS=triton; the `test_interp_*`
  tests skip in the parent process and run in the child. Shapes are small and dtypes fp32/fp16 (the interpreter
  mishandles bf16). Running this file with TRITON_INTERPRET=1 already set runs them inline.
- `gpu`-marked tests (skipped without CUDA) run bf16 at real shapes in tests/test_kernels_gpu.py.

Tolerances, against the fp32 reference evaluated on the same (rounded) inputs:
- fp32: outputs and gradients within 5e-5 absolute + 1e-4 relative (the interpreter's dots are exact fp32).
- fp16: outputs within 5e-3 and gradients within 1e-2 (absolute, + 1e-2 relative): P is rounded to fp16 before
  the P·V and dS·K products, ~3 significant digits.
- bf16 (GPU): our error against the fp32 reference at most 2x the error of torch SDPA in bf16, plus 1e-3
  (the FlashAttention test-suite criterion).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanochat_kernels
from nanochat_kernels import reference
from nanochat_kernels._common import interpreting

interp = pytest.mark.skipif(not interpreting(), reason="runs in the TRITON_INTERPRET=1 subprocess of "
                                                       "test_interpreter_group")
gpu = pytest.mark.gpu

TOL = {torch.float32: dict(out=5e-5, grad=5e-5, rtol=1e-4),
       torch.float16: dict(out=5e-3, grad=1e-2, rtol=1e-2)}


# ---------------------------------------------------------------------------------------------------------------
# Driver: one interpreter subprocess per kernel group


@pytest.mark.skipif(interpreting(), reason="already inside the interpreter")
@pytest.mark.parametrize("group", ["test_interp_attention", "test_interp_decode", "test_interp_ns"])
def test_interpreter_group(group):
    env = dict(os.environ, TRITON_INTERPRET="1", NANOCHAT_KERNELS="triton")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
           "-k", f"{group} and not test_interpreter_group"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter group {group} failed:\n{tail}"
    # Every selected test must have run in the child: a skip there would hide a kernel from CI.
    assert re.search(r"\d+ passed", proc.stdout) and not re.search(r"\d+ skipped", proc.stdout), tail


# ---------------------------------------------------------------------------------------------------------------
# Dispatch (parent process, no Triton kernels run)


def test_dispatch_reference_on_cpu_and_forced(monkeypatch):
    q = torch.randn(1, 5, 2, 16)
    monkeypatch.setenv("NANOCHAT_KERNELS", "reference")
    assert not nanochat_kernels.use_triton(q)
    monkeypatch.setenv("NANOCHAT_KERNELS", "auto")
    assert not nanochat_kernels.use_triton(q)  # CPU tensors never take Triton in auto mode
    monkeypatch.setenv("NANOCHAT_KERNELS", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        nanochat_kernels.attention(q, q, q)


@pytest.mark.skipif(interpreting(), reason="the interpreter legitimately allows CPU tensors")
def test_dispatch_triton_on_cpu_needs_interpreter(monkeypatch):
    q = torch.randn(1, 5, 2, 16)
    monkeypatch.setenv("NANOCHAT_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        nanochat_kernels.attention(q, q, q)


# ---------------------------------------------------------------------------------------------------------------
# Sliding-window references (parent process): against a loop written from the definition


def _windowed_loop(q, k, v, qpos, window, scale=None):
    """Attention written from the definition, one query at a time: query at position qpos[b, t] sees the keys p with
    0 <= qpos - p <= window (window None: no lower bound). q (B, T_q, H, D), k/v (B, T_k, H_kv, D), fp64."""
    B, T_q, H, D = q.shape
    group = H // k.size(2)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, T_q, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T_q):
            p = int(qpos[b, t])
            lo = 0 if window is None else max(0, p - window)
            for h in range(H):
                keys = k[b, lo:p + 1, h // group].double()
                w = torch.softmax(keys @ q[b, t, h].double() * scale, dim=0)
                out[b, t, h] = w @ v[b, lo:p + 1, h // group].double()
    return out


@pytest.mark.parametrize("T,window", [(11, 0), (11, 1), (11, 4), (11, 9), (11, 10), (11, 50), (1, 0)])
def test_reference_attention_window_matches_definition(T, window):
    g = torch.Generator().manual_seed(T + window)
    q, k, v = (torch.randn(2, T, h, 16, generator=g) for h in (4, 2, 2))
    out = reference.attention(q, k, v, window=window, scale=0.4)
    qpos = torch.arange(T).expand(2, T)
    _assert_close("out", out, _windowed_loop(q, k, v, qpos, window, scale=0.4).float(), 1e-5, 1e-5)
    if window >= T - 1:  # the window covers every earlier key: exactly full causal attention
        assert torch.equal(out, reference.attention(q, k, v, scale=0.4))
    else:
        assert not torch.allclose(out, reference.attention(q, k, v, scale=0.4), atol=1e-3)


@pytest.mark.parametrize("T_q,window", [(1, 0), (1, 3), (3, 0), (3, 2), (4, 100), (1, None)])
def test_reference_decode_window_matches_definition(T_q, window):
    """Ragged rows; query t of row b at cache_lens[b] - T_q + t, as in the engine's decode and chunked prefill."""
    g = torch.Generator().manual_seed(T_q)
    q = torch.randn(3, T_q, 4, 16, generator=g)
    k_cache, v_cache = (torch.randn(3, 13, 2, 16, generator=g) for _ in range(2))
    lens = torch.tensor([T_q, 9, 13], dtype=torch.int32)
    qpos = lens.view(3, 1) - T_q + torch.arange(T_q).view(1, T_q)
    out = reference.decode_attention(q, k_cache, v_cache, lens, window=window)
    _assert_close("out", out, _windowed_loop(q, k_cache, v_cache, qpos, window).float(), 1e-5, 1e-5)


def test_window_public_api_and_validation(monkeypatch):
    """The public functions take window=; the decode of a filled cache equals the last rows of windowed attention;
    a bad window is a clear ValueError."""
    monkeypatch.setenv("NANOCHAT_KERNELS", "auto")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 10, h, 16, generator=g) for h in (2, 1, 1))
    full = nanochat_kernels.attention(q, k, v, window=3)
    out = nanochat_kernels.decode_attention(q[:, -4:], k, v, torch.tensor([10]), window=3)
    _assert_close("out", out, full[:, -4:], 1e-5, 1e-5)
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="window must be None or an int"):
            nanochat_kernels.attention(q, k, v, window=bad)
        with pytest.raises(ValueError, match="window must be None or an int"):
            nanochat_kernels.decode_attention(q, k, v, torch.tensor([10]), window=bad)
    with pytest.raises(ValueError, match="causal=True"):
        nanochat_kernels.attention(q, k, v, causal=False, window=3)


# ---------------------------------------------------------------------------------------------------------------
# Attention


def _attention_case(B, T, H, H_kv, D, dtype, causal, device="cpu", seed=0, window=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
               for h in (H, H_kv, H_kv))
    do = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_out = reference.attention(*ref_in, causal=causal, window=window)
    ref_grads = torch.autograd.grad(ref_out, ref_in, do.float())
    return (q, k, v, do), (ref_out, *ref_grads)


def _assert_close(name, got, want, atol, rtol):
    err = (got.float() - want).abs()
    bound = atol + rtol * want.abs()
    assert bool((err <= bound).all()), f"{name}: max error {err.max().item():.3g} (atol {atol}, rtol {rtol})"


ATTENTION_CASES = [  # (B, T, H, H_kv, D, dtype, causal): odd T, GQA 1/2/4, D 64/128, fp32/fp16
    (1, 1, 2, 2, 64, torch.float32, True),
    (2, 37, 2, 2, 64, torch.float32, True),
    (1, 47, 4, 2, 128, torch.float32, True),
    (1, 33, 4, 1, 64, torch.float32, True),
    (1, 23, 4, 2, 64, torch.float32, False),
    (1, 50, 4, 4, 128, torch.float16, True),
    (1, 29, 4, 2, 64, torch.float16, True),
    (1, 45, 8, 2, 128, torch.float16, True),
    (1, 64, 2, 1, 64, torch.float16, True),
]


@interp
@pytest.mark.parametrize("B,T,H,H_kv,D,dtype,causal", ATTENTION_CASES)
def test_interp_attention_matches_reference(B, T, H, H_kv, D, dtype, causal):
    (q, k, v, do), (ref_out, *ref_grads) = _attention_case(B, T, H, H_kv, D, dtype, causal)
    out = nanochat_kernels.attention(q, k, v, causal=causal)
    assert out.shape == (B, T, H, D) and out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), do)
    tol = TOL[dtype]
    _assert_close("out", out, ref_out, tol["out"], tol["rtol"])
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype
        _assert_close(name, got, want, tol["grad"], tol["rtol"])


WINDOW_CASES = [  # (B, T, H, H_kv, D, dtype, window): T off the 16-blocks, GQA, window 0 / < block / > block /
    # T - 2 (the widest that still masks) / > T (full causal)
    (1, 37, 2, 1, 16, torch.float32, 5),
    (1, 40, 2, 2, 16, torch.float32, 0),
    (2, 45, 4, 2, 32, torch.float32, 20),
    (1, 33, 2, 1, 16, torch.float32, 31),
    (1, 21, 2, 2, 16, torch.float32, 100),
    (1, 50, 4, 1, 64, torch.float16, 17),
    (1, 29, 2, 2, 32, torch.float16, 0),
]


@interp
@pytest.mark.parametrize("B,T,H,H_kv,D,dtype,window", WINDOW_CASES)
def test_interp_attention_window_matches_reference(B, T, H, H_kv, D, dtype, window):
    """Sliding-window forward and backward (dq, dk, dv) through the public dispatch, against the reference."""
    (q, k, v, do), (ref_out, *ref_grads) = _attention_case(B, T, H, H_kv, D, dtype, True, window=window)
    out = nanochat_kernels.attention(q, k, v, window=window)
    grads = torch.autograd.grad(out, (q, k, v), do)
    tol = TOL[dtype]
    _assert_close("out", out, ref_out, tol["out"], tol["rtol"])
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype
        _assert_close(name, got, want, tol["grad"], tol["rtol"])


@interp
def test_interp_attention_window_skips_blocks_left_of_window():
    """Key blocks left of a query block's window are never read, in the forward and both backward kernels: NaN in
    v at an early key and in q at a late query stay out of every result that cannot see them (a kernel that
    visits and masks them would spread the NaN through 0 * NaN)."""
    T, W, bad_key, bad_query = 80, 5, 3, 76
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(1, T, 2, 16, generator=g) for _ in range(4))
    q_nan, v_nan = q.clone(), v.clone()
    q_nan[0, bad_query] = float("nan")
    v_nan[0, bad_key] = float("nan")
    q_nan, k_in, v_nan = (x.requires_grad_() for x in (q_nan, k.clone(), v_nan))
    out = nanochat_kernels.attention(q_nan, k_in, v_nan, window=W)
    dq, dk, dv = torch.autograd.grad(out, (q_nan, k_in, v_nan), do)
    ref_in = [x.requires_grad_() for x in (q.clone(), k.clone(), v.clone())]
    ref_out = reference.attention(*ref_in, window=W)
    rdq, rdk, rdv = torch.autograd.grad(ref_out, ref_in, do)
    # 16-row blocks: the NaN of v[3] reaches the outputs (and so delta) of the query blocks that read key block 0,
    # rows 0..31; keys 32..47 are seen by queries 32..52 only, and queries 48..75 see neither bad position.
    late, early = slice(48, bad_query), slice(32, 48)
    _assert_close("out", out[:, late], ref_out[:, late], 5e-5, 1e-4)
    _assert_close("dq", dq[:, late], rdq[:, late], 5e-5, 1e-4)
    _assert_close("dk", dk[:, early], rdk[:, early], 5e-5, 1e-4)
    _assert_close("dv", dv[:, early], rdv[:, early], 5e-5, 1e-4)


@interp
def test_interp_attention_window_dispatch(monkeypatch):
    """With a window, NANOCHAT_KERNELS=triton runs the kernel (the reference booby-trapped); a window covering the
    whole sequence gives full causal attention; a bad window is the same ValueError as the reference's."""
    (q, k, v, _), (ref_out, *_) = _attention_case(1, 24, 2, 1, 16, torch.float32, True, window=6)

    def trap(*args, **kwargs):
        raise AssertionError("reference called")

    monkeypatch.setattr(reference, "attention", trap)
    with torch.no_grad():
        _assert_close("out", nanochat_kernels.attention(q, k, v, window=6), ref_out, 5e-5, 1e-4)
        assert torch.equal(nanochat_kernels.attention(q, k, v, window=23), nanochat_kernels.attention(q, k, v))
    with pytest.raises(ValueError, match="window must be None or an int"):
        nanochat_kernels.attention(q, k, v, window=-2)


@interp
def test_interp_attention_strided_views_and_scale():
    """q, k, v as head slices of one packed projection (non-contiguous along H and T), custom scale."""
    B, T, H, H_kv, D = 2, 21, 4, 2, 64
    g = torch.Generator().manual_seed(1)
    packed = torch.randn(B, T, H + 2 * H_kv, D, generator=g).requires_grad_()
    q, k, v = packed.split([H, H_kv, H_kv], dim=2)
    do = torch.randn(B, T, H, D, generator=g)
    out = nanochat_kernels.attention(q, k, v, scale=0.3)
    (grad,) = torch.autograd.grad(out, packed, do)
    ref_packed = packed.detach().clone().requires_grad_()
    rq, rk, rv = ref_packed.split([H, H_kv, H_kv], dim=2)
    ref_out = reference.attention(rq, rk, rv, scale=0.3)
    (ref_grad,) = torch.autograd.grad(ref_out, ref_packed, do)
    _assert_close("out", out, ref_out, 5e-5, 1e-4)
    _assert_close("dpacked", grad, ref_grad, 5e-5, 1e-4)


@interp
@pytest.mark.slow
def test_interp_attention_under_torch_compile():
    """base_train compiles the model: the dispatch and the custom ops must trace in one graph, grads unchanged;
    a full-causal and a windowed layer in the same graph."""
    (q, k, v, do), _ = _attention_case(1, 20, 4, 2, 64, torch.float32, True)

    def loss_fn(q, k, v):
        out = nanochat_kernels.attention(q, k, v) + nanochat_kernels.attention(q, k, v, window=5)
        return (out * do).sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break fails
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = loss_fn(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    _assert_close("loss", loss, eager_loss.detach(), 1e-5, 1e-6)
    for name, got, want in zip(("dq", "dk", "dv"), grads, eager_grads):
        _assert_close(name, got, want, 1e-6, 1e-6)


@interp
def test_interp_attention_rejects_bad_input():
    q = torch.randn(1, 8, 3, 64)
    with pytest.raises(ValueError, match="multiple of K/V heads"):
        nanochat_kernels.attention(q, torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64))
    with pytest.raises(TypeError, match="dtype"):
        nanochat_kernels.attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="head dim"):
        nanochat_kernels.attention(torch.randn(1, 8, 2, 48), torch.randn(1, 8, 2, 48), torch.randn(1, 8, 2, 48))


@interp
def test_interp_attention_dispatch(monkeypatch):
    """NANOCHAT_KERNELS picks the implementation: each run with the other one booby-trapped."""
    from nanochat_kernels import flash_attention

    q = torch.randn(1, 9, 2, 16)

    def trap(*args, **kwargs):
        raise AssertionError("wrong implementation called")

    monkeypatch.setattr(reference, "attention", trap)
    triton_out = nanochat_kernels.attention(q, q, q)  # NANOCHAT_KERNELS=triton in this process
    monkeypatch.undo()
    monkeypatch.setattr(flash_attention, "flash_attention", trap)
    monkeypatch.setenv("NANOCHAT_KERNELS", "reference")
    ref_out = nanochat_kernels.attention(q, q, q)
    _assert_close("out", triton_out, ref_out, 5e-5, 1e-4)


def _tiny_gpt():
    from nanochat.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))  # D=16
    with torch.no_grad():  # zero-initialised projections would hide attention from the comparison
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@interp
def test_interp_attention_in_gpt_training_step(monkeypatch):
    """The model's loss and every parameter gradient are the same through the kernels as through the reference."""
    pytest.importorskip("nanochat.model.gpt")
    model = _tiny_gpt()
    idx = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("triton", "reference"):
        monkeypatch.setenv("NANOCHAT_KERNELS", mode)
        model.zero_grad()
        loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        results[mode] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    _assert_close("loss", results["triton"][0], results["reference"][0], 1e-5, 1e-5)
    for got, want in zip(results["triton"][1], results["reference"][1]):
        _assert_close("grad", got, want, 1e-5, 1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Decode attention


@interp
def test_interp_decode_in_gpt_kv_cache():
    """Prefill, a multi-token chunk and single-token steps through the KV cache reproduce the full forward."""
    pytest.importorskip("nanochat.model.gpt")
    from nanochat.inference.kv_cache import KVCache

    model = _tiny_gpt().eval()
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(2, 16, 2, 2, 16)
        pieces = [model(x[:, :5], kv_cache=cache), model(x[:, 5:8], kv_cache=cache)]
        pieces += [model(x[:, t:t + 1], kv_cache=cache) for t in range(8, 12)]
    _assert_close("logits", torch.cat(pieces, dim=1), full, 1e-4, 1e-4)


def _decode_case(B, T_q, H, H_kv, D, T_max, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T_q, H, D, generator=g).to(device=device, dtype=dtype)
    k_cache = torch.randn(B, T_max, H_kv, D, generator=g).to(device=device, dtype=dtype)
    v_cache = torch.randn(B, T_max, H_kv, D, generator=g).to(device=device, dtype=dtype)
    # Ragged: the shortest row holds only the new tokens, the longest fills the cache.
    lens = torch.randint(T_q, T_max + 1, (B,), generator=g, dtype=torch.int32)
    lens[0] = T_q
    lens[-1] = T_max
    lens = lens.to(device)
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), lens)
    return (q, k_cache, v_cache, lens), ref


DECODE_CASES = [  # (B, T_q, H, H_kv, D, T_max, dtype, num_splits); None = the automatic choice
    (3, 1, 4, 2, 64, 70, torch.float32, 1),
    (3, 1, 4, 2, 64, 70, torch.float32, 3),
    (2, 1, 4, 1, 128, 90, torch.float32, None),
    (2, 5, 4, 4, 64, 50, torch.float32, 1),
    (3, 4, 4, 2, 128, 61, torch.float32, 4),
    (2, 3, 4, 2, 64, 45, torch.float16, 2),
    (2, 1, 2, 2, 128, 33, torch.float16, 1),
]


@interp
@pytest.mark.parametrize("B,T_q,H,H_kv,D,T_max,dtype,num_splits", DECODE_CASES)
def test_interp_decode_matches_reference(B, T_q, H, H_kv, D, T_max, dtype, num_splits):
    from nanochat_kernels.flash_decoding import flash_decode

    (q, k_cache, v_cache, lens), ref = _decode_case(B, T_q, H, H_kv, D, T_max, dtype)
    out = flash_decode(q, k_cache, v_cache, lens, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_close("out", out, ref, TOL[dtype]["out"], TOL[dtype]["rtol"])


DECODE_WINDOW_CASES = [  # (B, T_q, H, H_kv, D, T_max, dtype, num_splits, window): ragged rows, chunked prefill
    # (T_q > 1), splits over the window span, window 0 / inside a block / across blocks / wider than the cache
    (3, 1, 4, 2, 16, 70, torch.float32, None, 5),
    (3, 3, 4, 2, 16, 70, torch.float32, 2, 0),
    (2, 4, 2, 1, 32, 61, torch.float32, 3, 20),
    (2, 2, 2, 2, 16, 40, torch.float32, 1, 39),
    (2, 5, 4, 1, 64, 45, torch.float16, 2, 9),
]


@interp
@pytest.mark.parametrize("B,T_q,H,H_kv,D,T_max,dtype,num_splits,window", DECODE_WINDOW_CASES)
def test_interp_decode_window_matches_reference(B, T_q, H, H_kv, D, T_max, dtype, num_splits, window):
    from nanochat_kernels.flash_decoding import flash_decode

    (q, k_cache, v_cache, lens), _ = _decode_case(B, T_q, H, H_kv, D, T_max, dtype)
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), lens, window=window)
    out = flash_decode(q, k_cache, v_cache, lens, num_splits=num_splits, window=window)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_close("out", out, ref, TOL[dtype]["out"], TOL[dtype]["rtol"])


@interp
def test_interp_decode_window_reads_only_the_window_and_slices(monkeypatch):
    """Through the public dispatch (reference booby-trapped): a wide chunk (G * T_q > 128, sliced) with a window
    equals the windowed attention rows of the full sequence, and NaN in the cache left of every window (rows 0..23
    of a 64-key prefix under window 8 for the 20 last queries) is never read."""
    B, T, H, H_kv, D, T_q, W = 1, 64, 8, 1, 16, 20, 8
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, H_kv, H_kv))
    full = reference.attention(q, k, v, window=W)
    k_cache, v_cache = torch.zeros(B, 80, H_kv, D), torch.zeros(B, 80, H_kv, D)
    k_cache[:, :T], v_cache[:, :T] = k, v
    k_cache[:, :T - T_q - W - 12] = float("nan")
    v_cache[:, :T - T_q - W - 12] = float("nan")

    def trap(*args, **kwargs):
        raise AssertionError("reference called")

    monkeypatch.setattr(reference, "decode_attention", trap)
    out = nanochat_kernels.decode_attention(q[:, -T_q:], k_cache, v_cache, torch.tensor([T]), window=W)
    _assert_close("out", out, full[:, -T_q:], 5e-5, 1e-4)


@interp
def test_interp_decode_dispatch_and_chunk_slicing(monkeypatch):
    """The public function takes the Triton path, and a chunk wider than one tile (G * T_q > 128) is sliced."""
    (q, k_cache, v_cache, lens), ref = _decode_case(2, 20, 8, 1, 16, 40, torch.float32)

    def trap(*args, **kwargs):
        raise AssertionError("reference called")

    import nanochat_kernels.flash_attention  # noqa: F401  (submodule imports must not shadow the public API)
    import nanochat_kernels.flash_decoding  # noqa: F401
    import nanochat_kernels.newton_schulz_triton  # noqa: F401

    assert all(callable(getattr(nanochat_kernels, name)) for name in ("attention", "decode_attention",
                                                                        "newton_schulz"))
    monkeypatch.setattr(reference, "decode_attention", trap)
    out = nanochat_kernels.decode_attention(q, k_cache, v_cache, lens)
    _assert_close("out", out, ref, 5e-5, 1e-4)


@interp
def test_interp_decode_matches_full_attention_prefix():
    """Decoding the last T_q tokens of a filled cache equals the same rows of causal attention over the prefix."""
    B, T, H, H_kv, D, T_q = 1, 19, 4, 2, 64, 3
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, H_kv, H_kv))
    k_cache = torch.zeros(B, 32, H_kv, D)
    v_cache = torch.zeros(B, 32, H_kv, D)
    k_cache[:, :T], v_cache[:, :T] = k, v
    out = nanochat_kernels.decode_attention(q[:, -T_q:], k_cache, v_cache, torch.tensor([T], dtype=torch.int32))
    full = reference.attention(q, k, v)
    _assert_close("out", out, full[:, -T_q:], 5e-5, 1e-4)


@interp
def test_interp_decode_rejects_bad_input():
    from nanochat_kernels.flash_decoding import flash_decode

    q = torch.randn(2, 1, 4, 64)
    cache = torch.randn(2, 16, 2, 64)
    with pytest.raises(ValueError, match="cache_lens"):
        flash_decode(q, cache, cache, torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="caches must have shape"):
        flash_decode(q, cache, torch.randn(2, 16, 2, 32), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="num_splits"):
        flash_decode(q, cache, cache, torch.tensor([3, 4]), num_splits=0)


def test_choose_num_splits():
    from importlib import import_module

    if not interpreting():
        pytest.importorskip("triton")
    choose = import_module("nanochat_kernels.flash_decoding").choose_num_splits
    assert choose(640, 2048, 132) == 1  # batch 64 x 10 heads already fills an H100 four times over
    assert choose(320, 2048, 132) == 2  # batch 32 x 10 heads: halves even out the last wave
    assert 1 < choose(10, 2048, 132) <= 2048 // 128  # batch 1: split, keeping >= 128 keys per split
    assert choose(10, 100, 132) == 1  # too short to split


# ---------------------------------------------------------------------------------------------------------------
# Newton-Schulz


def _orthogonality_error(X: torch.Tensor) -> torch.Tensor:
    """Max over the stack of ||X Xᵀ - I||_F / sqrt(m) on the wide orientation."""
    X = X.float()
    if X.size(-2) > X.size(-1):
        X = X.mT
    eye = torch.eye(X.size(-2))
    return ((X @ X.mT - eye).norm(dim=(-2, -1)) / math.sqrt(X.size(-2))).max()


NS_CASES = [  # (shape, coeffs): batched stacks, tall, wide, square, extra leading dims
    ((3, 40, 24), "quintic"),
    ((2, 24, 70), "polar_express"),
    ((33, 33), "quintic"),
    ((2, 2, 20, 36), "polar_express"),
    ((2, 48, 17), [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]),
]


@interp
@pytest.mark.parametrize("shape,coeffs", NS_CASES)
def test_interp_ns_matches_reference(shape, coeffs):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = nanochat_kernels.newton_schulz(G, steps=5, coeffs=coeffs)
    ref = reference.newton_schulz(G, steps=5, coeffs=coeffs)
    assert out.shape == G.shape and out.dtype == G.dtype
    # Polar Express multiplies by ~17 in its first step, so rounding grows to ~1e-5; 1e-4 leaves margin.
    _assert_close("X", out, ref, 1e-4, 1e-4)
    sv, sv_ref = torch.linalg.svdvals(out), torch.linalg.svdvals(ref)
    assert abs(sv.min() - sv_ref.min()) < 1e-4 and abs(sv.max() - sv_ref.max()) < 1e-4
    assert abs(_orthogonality_error(out) - _orthogonality_error(ref)) < 1e-4


@interp
def test_interp_ns_fp16_input_keeps_dtype_and_converges(monkeypatch):
    def trap(*args, **kwargs):
        raise AssertionError("reference called: the dispatch must take the Triton path here")

    monkeypatch.setattr(reference, "newton_schulz", trap)
    G = torch.randn(4, 32, 48, generator=torch.Generator().manual_seed(2)).half()
    out = nanochat_kernels.newton_schulz(G, steps=8, coeffs="polar_express")
    assert out.dtype == torch.float16
    sv = torch.linalg.svdvals(out.float())
    assert sv.min() > 0.9 and sv.max() < 1.1  # 8 Polar Express steps: all singular values near 1


@interp
def test_interp_ns_sym_gram_is_exactly_symmetric():
    from nanochat_kernels.newton_schulz_triton import sym_gram

    g = torch.Generator().manual_seed(4)
    Y = torch.randn(2, 37, 50, generator=g)
    Z = torch.randn(2, 37, 37, generator=g)
    Z = Z + Z.mT
    out = sym_gram(Y, Z, alpha=0.5, beta=2.0)
    assert torch.equal(out, out.mT)  # mirrored tiles, bit for bit
    _assert_close("gram", out, 0.5 * Y @ Y.mT + 2.0 * Z, 1e-4, 1e-5)


def _train_tiny_model(steps: int = 50) -> list[float]:
    """A 3-layer MLP on a fixed regression task; its two 16x16 matrices form one Muon stack.

    16x16 keeps each Newton-Schulz product one 16x16 tile (the interpreter costs ~10 ms per program)."""
    from nanochat.model.optim import MuonAdamW

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = torch.sin(x @ torch.randn(16, 4, generator=g))
    hidden = [(torch.randn(16, 16, generator=g) / 4).requires_grad_() for _ in range(2)]
    head = (torch.randn(4, 16, generator=g) / 4).requires_grad_()
    opt = MuonAdamW(hidden, [dict(params=[head], lr=0.01)], matrix_lr=0.02)
    losses = []
    for _ in range(steps):
        h = x
        for w in hidden:
            h = torch.relu(h @ w.T)
        loss = torch.nn.functional.mse_loss(h @ head.T, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@interp
@pytest.mark.slow
def test_interp_ns_training_loss_matches_reference(monkeypatch):
    """50 MuonAdamW steps of a tiny model: Triton Newton-Schulz gives the reference's loss curve."""
    pytest.importorskip("nanochat.model.optim")
    losses_triton = _train_tiny_model()
    monkeypatch.setenv("NANOCHAT_KERNELS", "reference")
    losses_ref = _train_tiny_model()
    assert losses_ref[-1] < 0.5 * losses_ref[0]  # the task is learnable, so the comparison means something
    for step, (a, b) in enumerate(zip(losses_triton, losses_ref)):
        assert abs(a - b) <= 1e-4 * b + 1e-6, f"step {step}: triton {a} vs reference {b}"


# ---------------------------------------------------------------------------------------------------------------
# Compiled mode without a GPU: every kernel through Triton's compiler and ptxas for sm_90


@pytest.mark.slow
@pytest.mark.skipif(interpreting(), reason="interpreted kernels cannot be compiled")
def test_kernels_compile_for_h100(monkeypatch):
    """Catches what the interpreter cannot: compile-only errors and shared memory over an H100 block's limit."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its current default
    from nanochat_kernels import resource_report

    try:
        reports = (resource_report.attention_reports(64) + resource_report.attention_reports(128, group=2)
                   + resource_report.attention_reports(128, group=2, windowed=True)
                   + resource_report.decode_reports() + resource_report.decode_reports(windowed=True)
                   + resource_report.newton_schulz_reports())
    except (FileNotFoundError, PermissionError) as exc:  # a triton build without its bundled ptxas
        pytest.skip(f"no ptxas to compile with: {exc}")
    assert len(reports) == 19
    for r in reports:
        assert 0 < r.shared <= resource_report.H100_SHARED_LIMIT, r
