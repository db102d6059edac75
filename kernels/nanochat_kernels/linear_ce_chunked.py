"""Linear + soft-cap + cross-entropy without the (N, V) logits: rows go through in chunks (the CPU path, and the
driver the Triton path plugs its per-chunk kernel into).

For a chunk of R rows: z = h Wᵀ (R, V) in the compute dtype, then one "step" turns z into per-row losses and, when
gradients are wanted, overwrites z with dL/dz; then dh = dz W and dW += dzᵀ h. Memory is one (R, V) chunk plus its
fp32 scratch, with R chosen so a chunk stays under a byte budget, instead of several (N, V) fp32 copies. Choices:

- Gradients in the forward for "mean" and "sum" (the training losses): the upstream gradient is a scalar, so dh
  and dW for a unit gradient are computed while z is at hand and scaled in the backward. That is the same three
  matmuls as the materialized path (no recomputation). "none" (per-token losses, used by RL with gradients and by
  the evals without) recomputes z chunk by chunk in the backward, with the upstream gradient as row weights.
  Recomputing costs a fourth matmul and a second pass of the step (measured: bench/RESULTS.md, "Kernel
  configurations").
- Soft-cap: s = cap * tanh(z / cap) lies in (-cap, cap), so exp(s - cap) cannot overflow: the log-sum-exp needs no
  max pass (cap 15: the smallest term exp(-30) ~ 1e-13 is still a normal fp32). Without a cap a row max is taken.
- Everything after the matmul is fp32, in place where autograd is not involved (this is inside a custom op), in
  buffers reused from chunk to chunk. The soft-cap goes through sigmoid instead of tanh (see torch_step): the step
  per 1024 x 32768 chunk went from 0.71 s to 0.30 s in fp32 and from 1.01 s to 0.63 s from bf16 logits (load ~12).
- The matmuls run in the compute dtype (autocast's dtype when autocast is on, else the inputs' dtype) with autocast
  off; dW accumulates in fp32 and comes back in the weight's dtype, dh in the hidden states' dtype.
- Autograd and torch.compile through `torch.library.custom_op` + `register_autograd` (as flash_attention does):
  compile sees one opaque op with known output shapes, no graph break and no tracing into the chunk loop.
- A vocab-chunked online log-sum-exp was not used here: the gradient needs the full softmax row, so it would cost a
  second pass (a recomputed matmul) per row chunk, while the row chunk alone already bounds the memory.
"""

from __future__ import annotations

import torch

# Rows per chunk come from a byte budget for one (R, V) chunk.
# CPU: counted in fp32 (the step's scratch is one or two fp32 chunks beside the logits). Small chunks lose because
# every chunk streams all of W (V x D) through the three matmuls again; the time per chunk size is measured in
# bench/RESULTS.md ("Kernel configurations"). 128 MB = 1024 rows at V=32768, 512 at V=65536: the fp32 scratch is
# then 1/16 to 1/32 of the materialized logits at N=16384.
# CUDA: counted in the compute dtype (the Triton step needs no scratch); 1 GiB of bf16 logits is 8192 rows at
# V=65536: full-speed cuBLAS GEMMs, 1/16 of the materialized fp32 logits at d20, 32 x 2048.
CPU_CHUNK_BYTES = 128 << 20
CUDA_CHUNK_BYTES = 1 << 30

_REDUCTIONS = ("mean", "sum", "none")


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: as many as fit the device's byte budget, at least 1 and at most n_rows."""
    if device.type == "cuda":
        budget, item = CUDA_CHUNK_BYTES, torch.empty((), dtype=dtype).element_size()
    else:
        budget, item = CPU_CHUNK_BYTES, 4
    return max(1, min(n_rows, budget // (vocab * item)))


# ---------------------------------------------------------------------------------------------------------------
# The per-chunk step, in plain torch


def torch_step(z: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor | None, softcap: float,
               ignore_index: int, scratch: dict | None = None) -> torch.Tensor:
    """Losses (R,) fp32 of the logits chunk z (R, V); with row_weight (R,) fp32, also overwrite z with
    row_weight * dL/dz (0 on ignored rows). z is scratch afterwards either way; `scratch` keeps fp32 buffers from
    one chunk to the next (fresh 100 MB buffers cost page faults on every chunk)."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(1)  # (R, 1) gather index, any id on ignored rows
    x = z if z.dtype == torch.float32 else _buffer(scratch, "x", z.shape, z.device).copy_(z)
    if softcap:
        # With sig = sigmoid(2 z / cap): tanh(z / cap) = 2 sig - 1, s - cap = 2 cap (sig - 1) and
        # 1 - tanh² = 4 sig (1 - sig). torch's CPU sigmoid is ~5x cheaper than its tanh, which was the step's
        # largest cost (bench/RESULTS.md, "Kernel configurations").
        sig = x.mul_(2.0 / softcap).sigmoid_()
        target_logit = softcap * (2.0 * sig.gather(1, safe).squeeze(1) - 1.0)
        e = torch.mul(sig, 2.0 * softcap, out=_buffer(scratch, "e", z.shape, z.device))
        e = e.sub_(2.0 * softcap).exp_()  # exp(s - cap) <= 1: no max pass
        shift = softcap
    else:
        target_logit = x.gather(1, safe).squeeze(1)
        shift = x.amax(dim=1, keepdim=True)
        e = x.sub_(shift).exp_()
        shift = shift.squeeze(1)
    sumexp = e.sum(dim=1)
    loss = torch.where(valid, sumexp.log() + shift - target_logit, 0.0)
    if row_weight is None:
        return loss
    weight = torch.where(valid, row_weight, 0.0) * (4.0 if softcap else 1.0)  # the 4 of 4 sig (1 - sig)
    e.mul_((weight / sumexp).unsqueeze(1))  # weight * softmax
    e.scatter_add_(1, safe, -weight.unsqueeze(1))  # weight * (softmax - onehot)
    if softcap:  # z (or x, when z is fp32 and x is z) <- e * sig (1 - sig), cast to z's dtype on the way
        torch.mul(e, torch.addcmul(sig, sig, sig, value=-1.0, out=sig), out=z)
    elif e.data_ptr() != z.data_ptr():
        z.copy_(e)
    return loss


def _buffer(scratch: dict | None, name: str, shape, device) -> torch.Tensor:
    """An fp32 buffer of `shape` (R, V), reused across chunks through `scratch` (views for a shorter last chunk)."""
    if scratch is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    buf = scratch.get(name)
    if buf is None or buf.shape[0] < shape[0] or buf.shape[1] != shape[1]:
        buf = scratch[name] = torch.empty(shape, dtype=torch.float32, device=device)
    return buf[:shape[0]]


def _step(impl: str):
    if impl == "triton":
        from .linear_ce_triton import triton_step  # Triton is optional: imported only when a Triton step is asked for
        return triton_step
    return torch_step


# ---------------------------------------------------------------------------------------------------------------
# The chunk loop


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.is_cuda:  # no host sync in training: the check fails the stream asynchronously
        torch._assert_async(~bad.any(), "linear_cross_entropy: target id out of [0, vocab)")
    elif bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"linear_cross_entropy: target id {value} is out of [0, {vocab}) and is not the "
                         f"ignore_index {ignore_index}")


def _run_chunks(hidden, weight, targets, row_weight, softcap, ignore_index, compute_dtype, impl, need_dh, need_dw):
    """(losses (N,) fp32, dh (N, D) or None, dW (V, D) fp32 or None) for hidden (N, D), weight (V, D)."""
    N, D = hidden.shape
    V = weight.shape[0]
    step = _step(impl)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        losses = torch.empty(N, dtype=torch.float32, device=hidden.device)
        dh = torch.empty(N, D, dtype=hidden.dtype, device=hidden.device) if need_dh else None
        dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if need_dw else None
        rows = chunk_rows(N, V, compute_dtype, hidden.device)
        logits = torch.empty(rows, V, dtype=compute_dtype, device=hidden.device)  # reused by every chunk
        scratch = {}
        for start in range(0, N, rows):
            end = min(N, start + rows)
            h_c = h[start:end]
            z = torch.mm(h_c, w.T, out=logits[:end - start])  # (R, V)
            rw = None if row_weight is None else row_weight[start:end]
            losses[start:end] = step(z, targets[start:end], rw, softcap, ignore_index, scratch)
            if rw is None:
                continue
            if need_dh:
                if dh.dtype == z.dtype:
                    torch.mm(z, w, out=dh[start:end])
                else:
                    dh[start:end] = z @ w
            if need_dw:
                if compute_dtype == torch.float32:
                    dw.addmm_(z.T, h_c)
                else:
                    dw += z.T @ h_c  # per-chunk product in the compute dtype, summed in fp32
    return losses, dh, dw


def _row_weights(targets, ignore_index, reduction):
    valid = (targets != ignore_index).float()
    if reduction == "mean":  # all rows ignored: weights 0 (no gradient), the loss is 0/0 = nan, as F.cross_entropy
        return valid / valid.sum().clamp(min=1.0)
    return valid


# ---------------------------------------------------------------------------------------------------------------
# Custom ops and autograd


@torch.library.custom_op("nanochat_kernels::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                   ignore_index: int, reduction: str, compute_dtype: torch.dtype, impl: str, need_dh: bool,
                   need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dW): loss reduced or (N,); dh, dW the gradients of a unit upstream gradient ("mean"/"sum" with
    need_dh/need_dw), else empty."""
    _check_targets(targets, weight.shape[0], ignore_index)
    grads = reduction != "none" and (need_dh or need_dw)
    row_weight = _row_weights(targets, ignore_index, reduction) if grads else None
    losses, dh, dw = _run_chunks(hidden, weight, targets, row_weight, softcap, ignore_index, compute_dtype, impl,
                                 grads and need_dh, grads and need_dw)
    if reduction == "mean":
        loss = losses.sum() / (targets != ignore_index).sum()
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    dh = hidden.new_empty(0) if dh is None else dh
    dw = weight.new_empty(0) if dw is None else dw.to(weight.dtype)
    return loss, dh, dw


@_linear_ce_fwd.register_fake
def _linear_ce_fwd_fake(hidden, weight, targets, softcap, ignore_index, reduction, compute_dtype, impl, need_dh,
                        need_dw):
    grads = reduction != "none"
    loss = hidden.new_empty(targets.shape if reduction == "none" else (), dtype=torch.float32)
    dh = hidden.new_empty(hidden.shape if grads and need_dh else (0,))
    dw = weight.new_empty(weight.shape if grads and need_dw else (0,))
    return loss, dh, dw


@torch.library.custom_op("nanochat_kernels::linear_ce_bwd_rows", mutates_args=())
def _linear_ce_bwd_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_rows: torch.Tensor,
                        softcap: float, ignore_index: int, compute_dtype: torch.dtype, impl: str, need_dh: bool,
                        need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_rows * losses) by recomputing each chunk (the backward of reduction "none")."""
    _, dh, dw = _run_chunks(hidden, weight, targets, grad_rows.float(), softcap, ignore_index, compute_dtype, impl,
                            need_dh, need_dw)
    dh = hidden.new_empty(0) if dh is None else dh
    dw = weight.new_empty(0) if dw is None else dw.to(weight.dtype)
    return dh, dw


@_linear_ce_bwd_rows.register_fake
def _linear_ce_bwd_rows_fake(hidden, weight, targets, grad_rows, softcap, ignore_index, compute_dtype, impl,
                             need_dh, need_dw):
    return (hidden.new_empty(hidden.shape if need_dh else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, softcap, ignore_index, reduction, compute_dtype, impl, need_dh, need_dw = inputs
    _, dh, dw = output
    ctx.reduction, ctx.softcap, ctx.ignore_index = reduction, softcap, ignore_index
    ctx.compute_dtype, ctx.impl, ctx.need_dh, ctx.need_dw = compute_dtype, impl, need_dh, need_dw
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets)
    else:
        ctx.save_for_backward(dh, dw)


def _backward(ctx, grad_loss, _grad_dh, _grad_dw):
    if ctx.reduction == "none":
        hidden, weight, targets = ctx.saved_tensors
        dh, dw = _linear_ce_bwd_rows(hidden, weight, targets, grad_loss, ctx.softcap, ctx.ignore_index,
                                     ctx.compute_dtype, ctx.impl, ctx.need_dh, ctx.need_dw)
    else:
        dh, dw = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype)
        dw = dw * grad_loss.to(dw.dtype)
    dh = dh if ctx.need_dh else None
    dw = dw if ctx.need_dw else None
    return dh, dw, None, None, None, None, None, None, None, None


_linear_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public entry (shared by the torch and Triton paths)


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.ndim < 1 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected hidden (..., D) and weight (V, D), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), got "
                         f"{tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if not hidden.device == weight.device == targets.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")


def compute_dtype_for(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """autocast's dtype when autocast is on for the inputs' device (as F.linear would run), else the inputs' dtype,
    which must then agree."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ ({hidden.dtype} vs {weight.dtype}) outside autocast")
    return hidden.dtype


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               softcap: float | None, ignore_index: int = -1, reduction: str = "mean",
                               impl: str = "torch") -> torch.Tensor:
    """See nanochat_kernels.linear_cross_entropy; `impl` is "torch" (chunked plain torch) or "triton"."""
    check_inputs(hidden, weight, targets, reduction)
    compute_dtype = compute_dtype_for(hidden, weight)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    D = hidden.shape[-1]
    loss, _, _ = _linear_ce_fwd(hidden.reshape(-1, D), weight, targets.reshape(-1).long(), float(softcap or 0.0),
                                int(ignore_index), reduction, compute_dtype, impl, need_dh, need_dw)
    return loss.view(targets.shape) if reduction == "none" else loss
