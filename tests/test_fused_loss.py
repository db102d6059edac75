"""Parity of the fused linear + soft-cap + cross-entropy loss (nanochat_kernels.linear_cross_entropy) against the
materialized reference (reference.linear_cross_entropy, the model's loss before fusion).

- CPU: the chunked torch path, with the chunk budget shrunk so odd shapes span several chunks and a remainder.
- Triton's interpreter: the Triton step in fp32/fp16 at small shapes, in a TRITON_INTERPRET=1 subprocess
  (`test_interpreter_linear_ce`), as tests/test_kernels.py does for the other kernels.
- `gpu`: bf16 autocast at a d20 model's shapes.

Tolerances, against the fp32 reference on the same (rounded) inputs: fp32 1e-5 absolute + 1e-4 relative (the
paths differ only in summation order; the Triton tanh adds ~2e-6 on the logits); fp16/bf16 inputs: the reference
run in that dtype sets the scale, ours may be at most 2x its error plus a small floor.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanochat_kernels
from nanochat_kernels import linear_ce_chunked, reference
from nanochat_kernels._common import interpreting

interp = pytest.mark.skipif(not interpreting(), reason="runs in the TRITON_INTERPRET=1 subprocess of "
                                                       "test_interpreter_linear_ce")
not_interp = pytest.mark.skipif(interpreting(), reason="CPU path tests run in the parent process")

REDUCTIONS = ["mean", "sum", "none"]


def _case(N, D, V, dtype=torch.float32, seed=0, ignore_every=5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 2 * D ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -1
    return hidden, weight, targets.to(device)


def _loss_and_grads(fn, hidden, weight, targets, softcap, reduction, upstream_seed=1, upcast=False):
    """loss and (dhidden, dweight) of fn; for "none" the upstream gradient is random, else 1. upcast: run on fp32
    copies of the inputs (the reference on rounded inputs)."""
    h, w = hidden, weight
    if upcast:
        h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = fn(h, w, targets, softcap, reduction=reduction)
    g = torch.ones_like(loss)
    if reduction == "none":
        g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(loss.device)
    dh, dw = torch.autograd.grad(loss, (h, w), g)
    return loss.detach(), dh, dw


def _assert_close(name, got, want, atol, rtol=1e-4):
    err = (got.float() - want.float()).abs()
    bound = atol + rtol * want.float().abs()
    assert bool((err <= bound).all()), f"{name}: max error {err.max().item():.3g} (atol {atol}, rtol {rtol})"


@pytest.fixture
def small_chunks(monkeypatch):
    """A CPU chunk budget of 8 rows at V=101 (fp32), so 37 rows run as 8+8+8+8+5."""
    monkeypatch.setattr(linear_ce_chunked, "CPU_CHUNK_BYTES", 8 * 101 * 4)


# ---------------------------------------------------------------------------------------------------------------
# CPU chunked path


@not_interp
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("softcap", [15.0, None, 2.0])
def test_chunked_matches_reference_fp32(reduction, softcap, small_chunks):
    hidden, weight, targets = _case(37, 24, 101)
    got = _loss_and_grads(nanochat_kernels.linear_cross_entropy, hidden, weight, targets, softcap, reduction)
    want = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, softcap, reduction)
    for name, a, b in zip(("loss", "dhidden", "dweight"), got, want):
        _assert_close(name, a, b, atol=1e-5)
    if reduction == "none":
        assert got[0].shape == (37,) and bool((got[0][targets == -1] == 0).all())


@not_interp
def test_chunk_size_bounds_the_logits(small_chunks, monkeypatch):
    """Every logits chunk the step sees fits the budget (8 rows here); the (N, V) matrix never exists."""
    seen = []
    step = linear_ce_chunked.torch_step

    def spy(z, *args):
        seen.append(tuple(z.shape))
        return step(z, *args)

    monkeypatch.setattr(linear_ce_chunked, "torch_step", spy)
    hidden, weight, targets = _case(37, 24, 101)
    nanochat_kernels.linear_cross_entropy(hidden, weight, targets, 15.0).backward()
    assert seen == [(8, 101)] * 4 + [(5, 101)]
    assert linear_ce_chunked.chunk_rows(16384, 32768, torch.float32, torch.device("cpu")) * 32768 * 4 <= 128 << 20


@not_interp
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_rows_fully_ignored(reduction, small_chunks):
    hidden, weight, targets = _case(37, 24, 101)
    targets[:20] = -1  # whole chunks ignored
    got = _loss_and_grads(nanochat_kernels.linear_cross_entropy, hidden, weight, targets, 15.0, reduction)
    want = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, 15.0, reduction)
    for name, a, b in zip(("loss", "dhidden", "dweight"), got, want):
        _assert_close(name, a, b, atol=1e-5)
    assert bool((got[1][:20] == 0).all())  # ignored rows get no gradient


@not_interp
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored_matches_cross_entropy(reduction):
    """mean over zero targets is nan with zero gradients, as F.cross_entropy; sum is 0; none is all zeros."""
    hidden, weight, targets = _case(6, 8, 11)
    targets[:] = -1
    loss, dh, dw = _loss_and_grads(nanochat_kernels.linear_cross_entropy, hidden, weight, targets, 15.0, reduction)
    ref_loss = reference.linear_cross_entropy(hidden, weight, targets, 15.0, reduction=reduction)
    assert torch.equal(loss.isnan(), ref_loss.isnan()) and bool((loss.nan_to_num() == 0).all())
    assert bool((dh == 0).all()) and bool((dw == 0).all())


@not_interp
def test_other_ignore_index_and_leading_dims():
    hidden, weight, targets = _case(24, 16, 50, ignore_every=0)
    targets[::3] = 7  # an ignore_index that is also a valid id
    h3, t3 = hidden.view(2, 12, 16), targets.view(2, 12)
    for reduction in REDUCTIONS:
        got = nanochat_kernels.linear_cross_entropy(h3, weight, t3, 15.0, ignore_index=7, reduction=reduction)
        want = reference.linear_cross_entropy(h3, weight, t3, 15.0, ignore_index=7, reduction=reduction)
        assert got.shape == want.shape
        _assert_close(reduction, got.detach(), want.detach(), atol=1e-5)


@not_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_half_inputs(dtype, reduction, small_chunks):
    hidden, weight, targets = _case(37, 24, 101, dtype=dtype)
    got = _loss_and_grads(nanochat_kernels.linear_cross_entropy, hidden, weight, targets, 15.0, reduction)
    low = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, 15.0, reduction)
    exact = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, 15.0, reduction, upcast=True)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, a, lo, ex in zip(("loss", "dhidden", "dweight"), got, low, exact):
        ref_err = (lo.float() - ex).abs().max().item()
        _assert_close(name, a, ex, atol=2 * ref_err + 1e-3, rtol=0)


@not_interp
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunked_under_cpu_bf16_autocast(reduction, small_chunks):
    """fp32 parameters under bf16 autocast: the matmuls in bf16, gradients back in fp32, close to the reference
    under the same autocast (which rounds its logits to bf16, so it sets the error scale)."""
    hidden, weight, targets = _case(37, 24, 101)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(nanochat_kernels.linear_cross_entropy, hidden, weight, targets, 15.0, reduction)
        low = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, 15.0, reduction)
    exact = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, 15.0, reduction)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, a, lo, ex in zip(("loss", "dhidden", "dweight"), got, low, exact):
        ref_err = (lo.float() - ex).abs().max().item()
        _assert_close(name, a, ex, atol=2 * ref_err + 1e-3, rtol=0)


@not_interp
def test_gradients_only_where_asked():
    hidden, weight, targets = _case(9, 8, 13)
    frozen = weight.detach()
    loss = nanochat_kernels.linear_cross_entropy(hidden, frozen, targets, 15.0)
    (dh,) = torch.autograd.grad(loss, (hidden,))
    ref = reference.linear_cross_entropy(hidden, frozen, targets, 15.0)
    _assert_close("dhidden", dh, torch.autograd.grad(ref, (hidden,))[0], atol=1e-5)
    with torch.no_grad():
        loss = nanochat_kernels.linear_cross_entropy(hidden, weight, targets, 15.0, reduction="none")
    assert not loss.requires_grad and loss.shape == (9,)


@not_interp
def test_bad_input_is_a_clear_error():
    hidden, weight, targets = _case(6, 8, 11)
    fn = nanochat_kernels.linear_cross_entropy
    with pytest.raises(ValueError, match="reduction"):
        fn(hidden, weight, targets, 15.0, reduction="avg")
    with pytest.raises(ValueError, match="targets must have shape"):
        fn(hidden, weight, targets[:4], 15.0)
    with pytest.raises(ValueError, match=r"hidden \(\.\.\., D\) and weight \(V, D\)"):
        fn(hidden, weight[:, :4], targets, 15.0)
    with pytest.raises(ValueError, match="out of"):
        fn(hidden, weight, torch.full_like(targets, 11), 15.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        fn(hidden.double(), weight, targets, 15.0)
    with pytest.raises(ValueError, match="int64 or int32"):
        fn(hidden, weight, targets.float(), 15.0)


@not_interp
def test_dispatch(monkeypatch):
    hidden, weight, targets = _case(6, 8, 11)
    calls = []
    monkeypatch.setattr(reference, "linear_cross_entropy", lambda *a, **k: calls.append("reference") or 0)
    monkeypatch.setenv("NANOCHAT_KERNELS", "reference")
    nanochat_kernels.linear_cross_entropy(hidden, weight, targets, 15.0)
    monkeypatch.setenv("NANOCHAT_KERNELS", "auto")
    loss = nanochat_kernels.linear_cross_entropy(hidden, weight, targets, 15.0)
    assert calls == ["reference"] and loss.grad_fn is not None  # auto on CPU: the chunked path
    monkeypatch.setenv("NANOCHAT_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        nanochat_kernels.linear_cross_entropy(hidden, weight, targets, 15.0)


@not_interp
def test_under_torch_compile():
    """The custom op traces as one node: fullgraph compile (aot_eager, no C++ toolchain needed) gives the same loss
    and gradients as eager."""
    hidden, weight, targets = _case(37, 24, 101)

    def f(h, w, t):
        return nanochat_kernels.linear_cross_entropy(h, w, t, 15.0) * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = _loss_and_grads(lambda h, w, t, *_, **__: compiled(h, w, t), hidden, weight, targets, 15.0, "mean")
    want = _loss_and_grads(lambda h, w, t, *_, **__: f(h, w, t), hidden, weight, targets, 15.0, "mean")
    for name, a, b in zip(("loss", "dhidden", "dweight"), got, want):
        _assert_close(name, a, b, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Triton step in the interpreter


@not_interp
def test_interpreter_linear_ce():
    env = dict(os.environ, TRITON_INTERPRET="1", NANOCHAT_KERNELS="triton")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
           "-k", "test_interp_"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed:\n{tail}"
    assert re.search(r"\d+ passed", proc.stdout) and not re.search(r"\d+ skipped", proc.stdout), tail


INTERP_CASES = [  # (N, D, V, dtype, softcap, reduction): V spans several 64-wide slices with a remainder
    (37, 16, 150, torch.float32, 15.0, "mean"),
    (37, 16, 150, torch.float32, None, "sum"),
    (21, 16, 200, torch.float32, 15.0, "none"),
    (37, 16, 150, torch.float16, 15.0, "mean"),
    (21, 32, 129, torch.float16, 15.0, "none"),
]


@interp
@pytest.mark.parametrize("N,D,V,dtype,softcap,reduction", INTERP_CASES)
def test_interp_linear_ce_matches_reference(N, D, V, dtype, softcap, reduction, monkeypatch):
    monkeypatch.setattr(linear_ce_chunked, "CPU_CHUNK_BYTES", 8 * V * 4)  # 8-row chunks
    hidden, weight, targets = _case(N, D, V, dtype=dtype)
    targets[:9] = -1  # a fully ignored chunk
    got = _loss_and_grads(nanochat_kernels.linear_cross_entropy, hidden, weight, targets, softcap, reduction)
    exact = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, softcap, reduction, upcast=True)
    if dtype == torch.float32:
        for name, a, b in zip(("loss", "dhidden", "dweight"), got, exact):
            _assert_close(name, a, b, atol=2e-5)
    else:  # the step stores dz in fp16 and the matmuls run in fp16, as the reference's would
        low = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, softcap, reduction)
        for name, a, lo, ex in zip(("loss", "dhidden", "dweight"), got, low, exact):
            ref_err = (lo.float() - ex).abs().max().item()
            _assert_close(name, a, ex, atol=2 * ref_err + 2e-3, rtol=0)


@interp
def test_interp_linear_ce_step_rejects_bad_input():
    from nanochat_kernels.linear_ce_triton import triton_step

    z = torch.randn(4, 10)
    with pytest.raises(ValueError, match="unit last stride"):
        triton_step(z.T, torch.zeros(10, dtype=torch.long), None, 15.0, -1)
    with pytest.raises(ValueError, match="int64"):
        triton_step(z, torch.zeros(4, dtype=torch.int32), None, 15.0, -1)


@pytest.mark.slow
@not_interp
def test_triton_step_compiles_for_h100(monkeypatch):
    """Compile-mode errors the interpreter cannot see: the step for sm_90 at its launch configuration, every
    variant (bf16/fp32, cap on/off, gradient on/off), without spills."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from nanochat_kernels import linear_ce_triton, resource_report

    monkeypatch.setitem(resource_report._PTR, torch.int64, "*i64")  # the targets
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for cap in (True, False):
                for grad in (True, False):
                    args = dict(Z=dtype, TARGETS=torch.int64, ROW_WEIGHT=torch.float32, LOSS=torch.float32,
                                V=65536, stride_z=65536, softcap=15.0, ignore_index=-1)
                    r = resource_report.compile_for_sm90(
                        linear_ce_triton._softcap_ce_kernel, args,
                        dict(HAS_CAP=cap, COMPUTE_GRAD=grad, BLOCK_V=linear_ce_triton._BLOCK_V),
                        linear_ce_triton._NUM_WARPS, 1)
                    assert r.shared <= resource_report.H100_SHARED_LIMIT and not r.spill_bytes, r
    except (FileNotFoundError, PermissionError) as exc:  # a triton build without its bundled ptxas
        pytest.skip(f"no ptxas to compile with: {exc}")


# ---------------------------------------------------------------------------------------------------------------
# GPU: bf16 autocast at a d20 model's shapes


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_linear_ce_bf16(reduction, monkeypatch):
    monkeypatch.delenv("NANOCHAT_KERNELS", raising=False)
    hidden, weight, targets = _case(8192, 1280, 65536, device="cuda")
    bf16_hidden = hidden.detach().bfloat16().requires_grad_()  # the model's bf16 residual stream
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _loss_and_grads(nanochat_kernels.linear_cross_entropy, bf16_hidden, weight, targets, 15.0, reduction)
        low = _loss_and_grads(reference.linear_cross_entropy, bf16_hidden, weight, targets, 15.0, reduction)
    exact = _loss_and_grads(reference.linear_cross_entropy, bf16_hidden, weight, targets, 15.0, reduction,
                            upcast=True)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, a, lo, ex in zip(("loss", "dhidden", "dweight"), got, low, exact):
        ref_err = (lo.float() - ex).abs().max().item()
        _assert_close(name, a, ex, atol=2 * ref_err + 1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The model's loss


@not_interp
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpt_fused_loss_matches_materialized(reduction):
    """GPT.forward with targets: the fused loss (default) and fused_loss=False give the same loss and gradients."""
    from nanochat.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # logits well inside and beyond the soft-cap's linear range
    idx = torch.randint(0, 300, (3, 16))
    targets = torch.randint(0, 300, (3, 16))
    targets[1, 5:] = -1
    assert model.fused_loss
    results = []
    for fused in (True, False):
        model.fused_loss = fused
        model.zero_grad()
        loss = model(idx, targets, loss_reduction=reduction)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum().backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (fused_loss, fused_grads), (ref_loss, ref_grads) = results
    assert fused_loss.shape == ref_loss.shape == ((48,) if reduction == "none" else ())
    _assert_close("loss", fused_loss, ref_loss, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), fused_grads, ref_grads):
        _assert_close(name, a, b, atol=1e-5 * b.abs().max().item())  # fp32 noise, through two blocks' backward
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, targets, loss_reduction="avg")


@not_interp
def test_core_loss_scoring_uses_the_fused_loss(monkeypatch):
    """CORE's loss-only forward (multiple choice, schema) gives the losses of the logits path without logits."""
    from nanochat.evals import core
    from nanochat.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    model.eval()
    seqs = [[256, 5, 9, 77, 3, 1], [256, 8, 8], [256]]
    calls = []
    fused = nanochat_kernels.linear_cross_entropy
    monkeypatch.setattr(nanochat_kernels, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    by_loss = core.model_forward(model, "cpu", predictions=False)(seqs)
    assert calls == [1]
    by_logits = core.model_forward(model, "cpu")(seqs)
    assert calls == [1]  # the predictions path runs the lm_head on its own
    for (loss_a, preds_a), (loss_b, preds_b), s in zip(by_loss, by_logits, seqs):
        assert preds_a is None and loss_a.shape == preds_b.shape == (len(s),)
        _assert_close("losses", loss_a, loss_b, atol=1e-5)
