"""GPU parity of the Triton kernels: bf16 at real shapes (bench/gpu_check.sh runs these; they skip without CUDA).

Tolerance: our error against the fp32 reference at most 2x the error of torch SDPA in bf16, plus 1e-3 (the
FlashAttention test-suite criterion); Newton-Schulz against the same iteration with bf16 storage emulated in fp32.
The input builders are tests/test_kernels.py's, shared with the interpreter tests.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import _attention_case, _decode_case

import nanochat_kernels
from nanochat_kernels import reference

gpu = pytest.mark.gpu


def _sdpa_bf16_errors(q, k, v, do, causal, ref, window=None):
    """Errors of torch SDPA in bf16 against the fp32 reference: the noise floor for our kernel."""
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = reference.attention(qs, ks, vs, causal=causal, window=window)
    grads = torch.autograd.grad(out, (qs, ks, vs), do)
    return [(a.float() - b).abs().max().item() for a, b in zip((out, *grads), ref)]


@gpu
@pytest.mark.parametrize("B,T,H,H_kv,D", [(4, 2048, 10, 10, 128), (4, 2048, 10, 5, 128), (2, 1000, 8, 2, 64),
                                          (1, 4097, 4, 4, 128)])
def test_gpu_attention_bf16(B, T, H, H_kv, D, monkeypatch):
    monkeypatch.setenv("NANOCHAT_KERNELS", "triton")
    (q, k, v, do), ref = _attention_case(B, T, H, H_kv, D, torch.bfloat16, True, device="cuda")
    out = nanochat_kernels.attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    floor = _sdpa_bf16_errors(q, k, v, do, True, ref)
    for name, got, want, noise in zip(("out", "dq", "dk", "dv"), (out, *grads), ref, floor):
        err = (got.float() - want).abs().max().item()
        assert err <= 2 * noise + 1e-3, f"{name}: error {err:.3g} vs SDPA bf16 error {noise:.3g}"


@gpu
@pytest.mark.parametrize("B,T,H,H_kv,D,window", [(4, 2048, 10, 5, 128, 256), (2, 1000, 8, 2, 64, 100),
                                                 (1, 4097, 4, 4, 128, 1024), (2, 300, 4, 2, 128, 0),
                                                 (2, 2048, 6, 6, 128, 2000)])
def test_gpu_attention_window_bf16(B, T, H, H_kv, D, window, monkeypatch):
    """Sliding-window forward and backward at real shapes, against the fp32 reference with SDPA-bf16 as the floor."""
    monkeypatch.setenv("NANOCHAT_KERNELS", "triton")
    (q, k, v, do), ref = _attention_case(B, T, H, H_kv, D, torch.bfloat16, True, device="cuda", window=window)
    out = nanochat_kernels.attention(q, k, v, window=window)
    grads = torch.autograd.grad(out, (q, k, v), do)
    floor = _sdpa_bf16_errors(q, k, v, do, True, ref, window=window)
    for name, got, want, noise in zip(("out", "dq", "dk", "dv"), (out, *grads), ref, floor):
        err = (got.float() - want).abs().max().item()
        assert err <= 2 * noise + 1e-3, f"{name}: error {err:.3g} vs SDPA bf16 error {noise:.3g}"


@gpu
@pytest.mark.parametrize("window", [None, 64])
def test_gpu_attention_under_inductor(window, monkeypatch):
    """base_train runs torch.compile (inductor) on CUDA: one graph around the custom ops, same output and grads."""
    monkeypatch.setenv("NANOCHAT_KERNELS", "triton")
    (q, k, v, do), _ = _attention_case(2, 300, 8, 4, 128, torch.bfloat16, True, device="cuda")

    def loss_fn(q, k, v):
        return (nanochat_kernels.attention(q, k, v, window=window).float() * do.float()).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = loss_fn(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    assert abs(loss.item() - eager_loss.item()) <= 1e-3 * abs(eager_loss.item()) + 1e-2
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)  # same kernels; dO may round differently


@gpu
@pytest.mark.parametrize("B,T_q,num_splits", [(1, 1, None), (32, 1, None), (4, 4, None), (2, 1, 1), (2, 3, 7)])
def test_gpu_decode_bf16(B, T_q, num_splits):
    from nanochat_kernels.flash_decoding import flash_decode

    (q, k_cache, v_cache, lens), ref = _decode_case(B, T_q, 10, 5, 128, 2048, torch.bfloat16, device="cuda")
    out = flash_decode(q, k_cache, v_cache, lens, num_splits=num_splits)
    noise = (reference.decode_attention(q, k_cache, v_cache, lens).float() - ref).abs().max().item()
    err = (out.float() - ref).abs().max().item()
    assert err <= 2 * noise + 4e-3, f"error {err:.3g} vs reference-in-bf16 error {noise:.3g}"


@gpu
@pytest.mark.parametrize("B,T_q,num_splits,window", [(1, 1, None, 256), (32, 1, None, 1024), (4, 4, None, 100),
                                                     (2, 3, 7, 300), (8, 1, None, 0), (1, 1, None, 2046)])
def test_gpu_decode_window_bf16(B, T_q, num_splits, window):
    from nanochat_kernels.flash_decoding import flash_decode

    (q, k_cache, v_cache, lens), _ = _decode_case(B, T_q, 10, 5, 128, 2048, torch.bfloat16, device="cuda")
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), lens, window=window)
    out = flash_decode(q, k_cache, v_cache, lens, num_splits=num_splits, window=window)
    noise = (reference.decode_attention(q, k_cache, v_cache, lens, window=window).float() - ref).abs().max().item()
    err = (out.float() - ref).abs().max().item()
    assert err <= 2 * noise + 4e-3, f"error {err:.3g} vs reference-in-bf16 error {noise:.3g}"


BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits: one rounding is off by at most this, relatively


def newton_schulz_fp32(G: torch.Tensor, steps: int, coeffs, bf16_storage: bool = False) -> torch.Tensor:
    """The reference iteration computed in fp32 on any device (reference.newton_schulz uses bf16 on CUDA). With
    bf16_storage, every stored intermediate (X, A, B) is rounded to bf16 while products still accumulate in fp32:
    bf16 numerics emulated exactly, as the Triton kernel has them. The distance between the two is the error that
    bf16 precision alone causes on this input: the polynomial steps amplify the roundings along directions of small
    singular values, so it depends on the matrix, and a fixed tolerance would be either loose or flaky."""
    rnd = (lambda t: t.to(torch.bfloat16).float()) if bf16_storage else (lambda t: t)  # noqa: E731
    X = rnd(G.float())
    transposed = X.size(-2) > X.size(-1)
    X = X.mT if transposed else X
    X = rnd(X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7))
    for a, b, c in reference.coefficient_schedule(steps, coeffs):
        A = rnd(X @ X.mT)
        B = rnd(b * A + c * rnd(A @ A))
        X = rnd(a * X + B @ X)
    return X.mT if transposed else X


def test_newton_schulz_fp32_helper_is_the_reference():
    G = torch.randn(3, 24, 40)
    ref = reference.newton_schulz(G, steps=5)  # fp32 on CPU
    assert torch.allclose(newton_schulz_fp32(G, 5, "quintic"), ref, atol=1e-6)
    bf = newton_schulz_fp32(G.bfloat16(), 5, "quintic", bf16_storage=True)
    assert 0 < (bf - ref).abs().max().item() < 0.5 and torch.equal(bf, bf.bfloat16().float())


@gpu
@pytest.mark.parametrize("shape", [(4, 1280, 1280), (2, 1280, 5120), (2, 5120, 1280), (3, 1664, 1664)])
@pytest.mark.parametrize("coeffs", ["quintic", "polar_express"])
def test_gpu_newton_schulz_bf16(shape, coeffs, monkeypatch):
    """Element-wise against the fp32 iteration on the same bf16 inputs (fp32 accumulation, TF32 off). Per matrix:
    the largest element error at most twice that of exact bf16 rounding of the intermediates plus two roundings
    of a typical element (its RMS), and the relative Frobenius error likewise (twice the floor plus 2u)."""
    monkeypatch.setenv("NANOCHAT_KERNELS", "triton")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the fp32 reference must be fp32
    g = torch.Generator(device="cuda").manual_seed(sum(shape) + len(coeffs))
    G = torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)  # bf16 inputs, as Muon passes them
    out = nanochat_kernels.newton_schulz(G, steps=5, coeffs=coeffs).float()
    ref = newton_schulz_fp32(G, 5, coeffs)
    floor = newton_schulz_fp32(G, 5, coeffs, bf16_storage=True) - ref
    u = BF16_UNIT_ROUNDOFF
    rms = ref.pow(2).mean(dim=(-2, -1)).sqrt()
    err_max = (out - ref).abs().amax(dim=(-2, -1))
    tol_max = 2 * floor.abs().amax(dim=(-2, -1)) + 2 * u * rms
    assert (err_max <= tol_max).all(), f"max element error {err_max.tolist()} > {tol_max.tolist()}"
    ref_norm = ref.norm(dim=(-2, -1))
    err_fro = (out - ref).norm(dim=(-2, -1)) / ref_norm
    tol_fro = 2 * floor.norm(dim=(-2, -1)) / ref_norm + 2 * u
    assert (err_fro <= tol_fro).all(), f"relative Frobenius error {err_fro.tolist()} > {tol_fro.tolist()}"
