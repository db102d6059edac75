"""Every Triton launch runs under a device guard for its inputs' GPU (kernels/_common.on_device): Triton launches on
the thread's current device, so without it a server replica on cuda:1 would run its kernels on cuda:0.

On CPU the launches are replaced by recorders and the guard by a recording context manager: each launch must
happen inside a guard entered for a tensor on the device of the tensors it is given. On a machine with two GPUs (gpu-marked) the
kernels run on cuda:1 from a thread whose current device is cuda:0 and must match the references."""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

import nanochat_kernels  # noqa: E402
from nanochat_kernels import _common, flash_attention, flash_decoding, linear_ce_triton, newton_schulz_triton, reference  # noqa: E402


class Recorder:
    """Stands in for `on_device` (records the guarded tensor) and for kernel launches (records whether a guard for
    their tensors' device is held)."""

    def __init__(self):
        self.guarded: list[torch.Tensor] = []
        self.launches: list[tuple[str, bool]] = []

    @contextlib.contextmanager
    def on_device(self, tensor):
        self.guarded.append(tensor)
        try:
            yield
        finally:
            self.guarded.pop()

    def kernel(self, name: str):
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    tensors = [a for a in args if isinstance(a, torch.Tensor)]
                    inside = bool(recorder.guarded) and all(t.device == recorder.guarded[-1].device
                                                            for t in tensors)
                    recorder.launches.append((name, inside))
                return run
        return Launch()


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    for module, kernels in ((flash_attention, ("_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel",
                                               "_bwd_dq_kernel")),
                            (flash_decoding, ("_decode_kernel", "_merge_kernel")),
                            (newton_schulz_triton, ("_sym_gram_kernel",)),
                            (linear_ce_triton, ("_softcap_ce_kernel",))):
        monkeypatch.setattr(module, "on_device", rec.on_device)
        for name in kernels:
            monkeypatch.setattr(module, name, rec.kernel(name))
    return rec


def test_every_launch_is_guarded(recorder):
    q, k = torch.randn(1, 16, 2, 16), torch.randn(1, 16, 1, 16)
    for window in (-1, 4):  # full causal, sliding window
        o, lse = flash_attention._flash_forward(q, k, k, True, 0.25, window)
        flash_attention._flash_backward(torch.randn_like(o), q, k, k, o, lse, True, 0.25, window)
    cache = torch.randn(1, 256, 1, 16)  # long enough for two splits: decode + merge
    for window in (None, 100):
        flash_decoding.flash_decode(q[:, :2], cache, cache, torch.tensor([200]), num_splits=2, window=window)
    newton_schulz_triton.newton_schulz_triton(torch.randn(8, 12), steps=1)
    linear_ce_triton.triton_step(torch.randn(4, 32), torch.tensor([1, 2, 3, -1]), None, 0.0, -1)
    names = [name for name, _ in recorder.launches]
    assert set(names) == {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                          "_decode_kernel", "_merge_kernel", "_sym_gram_kernel", "_softcap_ce_kernel"}, names
    assert all(inside for _, inside in recorder.launches), recorder.launches


def test_on_device_selects_the_tensors_gpu():
    cm = _common.on_device(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(cm, torch.cuda.device) and cm.idx == 1
    assert isinstance(_common.on_device(torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_kernels_run_on_their_inputs_device_from_any_thread(monkeypatch):
    monkeypatch.setenv("NANOCHAT_KERNELS", "triton")
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(2, 128, 4, 64, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, 128, 2, 64, device=dev, dtype=torch.bfloat16, generator=g)
    lens = torch.tensor([100, 37], device=dev)
    G = torch.randn(256, 384, device=dev, dtype=torch.bfloat16, generator=g)
    results = {}

    def work():  # a new thread's current device is cuda:0
        torch.cuda.set_device(0)
        results["attn"] = nanochat_kernels.attention(q, k, k)
        results["decode"] = nanochat_kernels.decode_attention(q[:, :1], k, k, lens)
        results["attn_window"] = nanochat_kernels.attention(q, k, k, window=32)
        results["decode_window"] = nanochat_kernels.decode_attention(q[:, :1], k, k, lens, window=32)
        results["ns"] = nanochat_kernels.newton_schulz(G)
        torch.cuda.synchronize(dev)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert all(r.device == dev for r in results.values())
    ref_attn = reference.attention(q.float(), k.float(), k.float())
    assert (results["attn"].float() - ref_attn).abs().max().item() < 3e-2
    ref_dec = reference.decode_attention(q[:, :1].float(), k.float(), k.float(), lens)
    assert (results["decode"].float() - ref_dec).abs().max().item() < 3e-2
    ref_attn_w = reference.attention(q.float(), k.float(), k.float(), window=32)
    assert (results["attn_window"].float() - ref_attn_w).abs().max().item() < 3e-2
    ref_dec_w = reference.decode_attention(q[:, :1].float(), k.float(), k.float(), lens, window=32)
    assert (results["decode_window"].float() - ref_dec_w).abs().max().item() < 3e-2
    assert torch.isfinite(results["ns"].float()).all()
    sv = torch.linalg.svdvals(results["ns"].float())
    assert sv.max().item() < 1.5 and sv.min().item() > 0.3  # orthogonalised, not garbage from the wrong GPU
