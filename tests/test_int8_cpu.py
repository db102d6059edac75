"""nanochat's CPU int8 kernel (rust/int8mm through nanochat._rustbpe, wrapped by nanochat.model.int8_cpu): the
packed layout against its definition, every instruction set this CPU has against the plain-torch reference at odd
shapes, the checks in front of the raw-address interface, and Int8Linear's choice of layout and path."""

from __future__ import annotations

import pytest
import torch

from nanochat import _rustbpe
from nanochat.model import int8_cpu
from nanochat.model import quantize as qz
from nanochat.model.tiny import tiny_model

CPU_ISAS = [isa for isa in int8_cpu.ISAS if isa == "scalar" or int8_cpu.ISAS.index(isa) >= int8_cpu.ISAS.index(
    int8_cpu.ISA)]  # the best this CPU runs and everything below it


def random_q(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)  # -128 too: the kernel must not care


@pytest.mark.parametrize("n,k", [(1, 1), (4, 16), (5, 17), (7, 3), (33, 100), (64, 64)])
def test_pack_is_tiles_of_rows_chunk_by_chunk_and_unpack_inverts_it(n, k):
    q = random_q(n, k)
    p = int8_cpu.pack(q)
    tiles, chunks, rows, width = p.shape
    assert (rows, width) == (int8_cpu.TILE_ROWS, int8_cpu.CHUNK) == (4, 16)
    assert tiles == -(-n // 4) and chunks == -(-k // 16)
    for j in range(n):
        for t in range(k):
            assert p[j // 4, t // 16, j % 4, t % 16] == q[j, t]
    assert int((p != 0).sum()) == int((q != 0).sum())  # the padding is zeros
    assert torch.equal(int8_cpu.unpack(p, n, k), q)
    assert torch.equal(int8_cpu.unpack(p, n, k, torch.bfloat16), q.to(torch.bfloat16))


def test_packing_rows_in_pieces_equals_packing_the_matrix():
    q = random_q(23, 41, seed=1)
    p = int8_cpu.empty_packed(23, 41)
    for start, end in [(0, 3), (3, 4), (4, 13), (13, 23)]:  # ranges that cut tiles anywhere
        int8_cpu.pack_rows_into(p, start, q[start:end])
    assert torch.equal(p, int8_cpu.pack(q))
    with pytest.raises(ValueError, match="do not fit"):
        int8_cpu.pack_rows_into(p, 22, q[:3])


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 5, 15), (2, 9, 17), (3, 13, 33), (4, 8, 64), (5, 17, 100),
                                   (9, 70, 255), (17, 45, 47), (1, 300, 1280)])
def test_every_kernel_matches_the_reference(isa, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n)[:, None]  # rows of very different scales
    q, scale = qz.quantize_rows(w)
    x = torch.randn(m, k, generator=g) * 3
    y = int8_cpu.matmul(x, int8_cpu.pack(q), scale, n, k, isa=isa)
    ref = x.double() @ qz.dequantize_rows(q, scale).double().T
    # fp32 sums of k terms: a few ulps of the sum of |terms| per output
    bound = 1e-6 * (x.double().abs() @ qz.dequantize_rows(q, scale).double().abs().T) * k ** 0.5 + 1e-30
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert bool(((y.double() - ref).abs() <= bound).all()), (y - ref).abs().max()


def test_results_do_not_depend_on_the_thread_count():
    q = random_q(4096, 320, seed=2)
    p, scale = int8_cpu.pack(q), torch.rand(4096) + 0.01
    x = torch.randn(3, 320)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_cpu.matmul(x, p, scale, 4096, 320)
        torch.set_num_threads(2)
        two = int8_cpu.matmul(x, p, scale, 4096, 320)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is one thread's sum in one fixed order


def test_wrong_tensors_are_value_errors_before_the_kernel():
    q = random_q(8, 32)
    p, scale, x = int8_cpu.pack(q), torch.ones(8), torch.randn(2, 32)
    bad = [
        ((x.double(), p, scale, 8, 32), "x must be a contiguous CPU torch.float32"),
        ((x.t().contiguous().t(), p, scale, 8, 32), "not contiguous"),
        ((x[:, :30].contiguous(), p, scale, 8, 32), r"shape \(2, 32\)"),  # 30 columns would fit the padded chunks
        ((x, p[:1], scale, 8, 32), "the packed matrix"),
        ((x, p, scale[:7], 8, 32), "scale"),
        ((x, p, scale.bfloat16(), 8, 32), "scale"),
        ((x[0], p, scale, 8, 32), "rows"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            int8_cpu.matmul(*args)
    with pytest.raises(ValueError, match="unknown instruction set"):
        int8_cpu.matmul(x, p, scale, 8, 32, isa="sse9")


def test_the_native_function_refuses_null_and_misaligned_addresses():
    y = torch.empty(1, 4)
    x, p, scale = torch.randn(1, 16), int8_cpu.pack(random_q(4, 16)), torch.ones(4)
    with pytest.raises(ValueError, match="x: address 0x0 is null"):
        _rustbpe.int8_matmul(0, p.data_ptr(), scale.data_ptr(), y.data_ptr(), 1, 4, 16, "scalar")
    with pytest.raises(ValueError, match="y: address .* misaligned"):
        _rustbpe.int8_matmul(x.data_ptr(), p.data_ptr(), scale.data_ptr(), y.data_ptr() + 1, 1, 4, 16, "scalar")
    with pytest.raises(ValueError, match="overflows"):
        _rustbpe.int8_matmul(x.data_ptr(), p.data_ptr(), scale.data_ptr(), y.data_ptr(), 2**62, 4, 2**62, "scalar")


@pytest.mark.skipif(not int8_cpu.available(), reason="this CPU runs only the scalar kernel: Int8Linear uses torch's")
def test_int8_linear_decodes_with_the_packed_kernel_and_prefills_with_bf16():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(72, 96, generator=g)
    layer = qz.Int8Linear(96, 72)
    layer.set_rows(0, w)
    row_major = qz.Int8Linear(96, 72, packed=False)
    row_major.set_rows(0, w)
    assert layer.packed and not hasattr(layer, "qweight") and layer.qpacked.shape == (18, 6, 4, 16)
    assert torch.equal(layer.int8_matrix(), row_major.qweight)
    x = torch.randn(2, 3, 96, generator=g)
    ref = qz.int8_linear_reference(x, row_major.qweight, row_major.scale)
    assert (layer(x) - ref).abs().max() <= 1e-5 * ref.abs().max()  # fp32 activations: no bf16 rounding
    assert (row_major(x) - ref).abs().max() <= 1e-2 * ref.abs().max()  # torch's kernel: bf16 activations
    big = torch.randn(qz.DEQUANT_MIN_ROWS, 96, generator=g)  # the bf16 GEMM path
    ref = qz.int8_linear_reference(big.bfloat16().float(), row_major.qweight, row_major.scale)
    assert (layer(big) - ref).abs().max() <= 1e-2 * ref.abs().max()
    model = qz.empty_model(tiny_model(256).config, "int8")  # built on the meta device, allocated on the CPU
    assert all(m.packed for m in model.modules() if isinstance(m, qz.Int8Linear))


@pytest.mark.skipif(int8_cpu._openmp_runtime() is None, reason="torch loaded no OpenMP runtime here (or no /proc)")
def test_the_kernel_runs_on_torchs_openmp_team_with_the_same_results_as_rayon():
    assert int8_cpu.THREADS == "openmp"
    assert not _rustbpe.int8_use_openmp("/nonexistent/libgomp.so.1")  # never loads a library: RTLD_NOLOAD
    q = random_q(2048, 200, seed=4)
    p, scale, x = int8_cpu.pack(q), torch.rand(2048) + 0.01, torch.randn(5, 200)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        on_omp = int8_cpu.matmul(x, p, scale, 2048, 200)
        assert not _rustbpe.int8_use_openmp(None)  # detached: rayon's pool
        on_rayon = int8_cpu.matmul(x, p, scale, 2048, 200)
    finally:
        assert _rustbpe.int8_use_openmp(int8_cpu._openmp_runtime())
        torch.set_num_threads(before)
    assert torch.equal(on_omp, on_rayon)
    ref = x.double() @ qz.dequantize_rows(q, scale).double().T
    assert (on_omp.double() - ref).abs().max() < 1e-5 * ref.abs().max()
