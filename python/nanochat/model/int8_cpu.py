"""The CPU int8 matmul (Rust crate rust/int8mm, in the native module `nanochat._rustbpe`) behind `Int8Linear`.

`y (M, N) = x (M, K) @ (scale[:, None] * q (N, K)).T` with x and y fp32: weight-only int8, the activations keep
full precision. The matrix is stored *packed*: tiles of TILE_ROWS rows, each tile chunk by chunk (CHUNK columns),
one chunk's TILE_ROWS x CHUNK bytes = one 64-byte cache line, rows padded to a multiple of TILE_ROWS and columns to
a multiple of CHUNK with zeros. A tile is then one sequential stream through memory, which is what lets one core read
the matrix at close to the DRAM bandwidth (row-major, the same kernel reads about 2x slower: bench/RESULTS.md).

The native function takes addresses; `matmul` is the only caller and checks dtype, device, layout and shape of
every tensor first (the crate checks the lengths again), so a wrong tensor is a ValueError, never a stray read.
Threads: torch's thread count, on torch's own OpenMP team when the runtime it loaded can be found (`THREADS`), so the
kernel runs on threads that are awake between torch's ops instead of waking a pool that would then compete with
them for the cores (on 2 cores that competition cost a d20 batch-16 step half its time).
`available()` is False where the crate has only its portable scalar kernel (non-x86 CPUs, x86 without AVX2): there
torch's own int8 kernel is faster and Int8Linear keeps the row-major matrix.
"""

from __future__ import annotations

import re

import torch

from nanochat import _rustbpe

TILE_ROWS, CHUNK = _rustbpe.INT8_TILE
ISA: str = _rustbpe.INT8_ISA  # the kernel this CPU runs: "avx512", "avx2" or "scalar"
ISAS = ("avx512", "avx2", "scalar")


def available() -> bool:
    return ISA in ("avx512", "avx2")


def packs_for(device) -> bool:
    """Whether an int8 matrix allocated on `device` is stored packed for this kernel: on the CPU (or the meta device
    a model is built on before it is allocated there) of a machine that runs it."""
    return available() and torch.device(device or "cpu").type in ("cpu", "meta")


def _openmp_runtime() -> str | None:
    """The OpenMP library torch loaded (libgomp in the PyPI wheels; Intel's or LLVM's elsewhere), from this
    process's memory map; None where there is none or no /proc."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    found = re.findall(r"(/\S*/lib(?:gomp|iomp5|omp)\b[^/\s]*\.so[^/\s]*)$", maps, flags=re.M)
    return found[0] if found else None


# the threads the kernel runs on: torch's OpenMP team where it can be attached, else a rayon pool
_omp = _openmp_runtime()
THREADS = "openmp" if _omp and _rustbpe.int8_use_openmp(_omp) else "rayon"


def packed_shape(n: int, k: int) -> tuple[int, int, int, int]:
    """(tiles, chunks, TILE_ROWS, CHUNK) of the packed (n, k) matrix."""
    return (-(-n // TILE_ROWS), -(-k // CHUNK), TILE_ROWS, CHUNK)


def empty_packed(n: int, k: int, device=None) -> torch.Tensor:
    return torch.zeros(packed_shape(n, k), dtype=torch.int8, device=device)


def pack(q: torch.Tensor) -> torch.Tensor:
    """The packed layout of a row-major int8 matrix q (n, k)."""
    n, k = q.shape
    p = empty_packed(n, k, q.device)
    pack_rows_into(p, 0, q)
    return p


@torch.no_grad()
def pack_rows_into(p: torch.Tensor, start: int, q: torch.Tensor) -> None:
    """Write rows start..start+len(q)-1 of the matrix into its packed form p (in place)."""
    tiles, chunks, _, _ = p.shape
    rows, k = q.shape
    if k > chunks * CHUNK or start < 0 or start + rows > tiles * TILE_ROWS:
        raise ValueError(f"rows {start}..{start + rows - 1} of {k} columns do not fit a packed {tuple(p.shape)}")
    padded = torch.zeros(rows, chunks * CHUNK, dtype=torch.int8, device=p.device)
    padded[:, :k] = q.to(p.device)
    j = torch.arange(start, start + rows, device=p.device)
    p[j // TILE_ROWS, :, j % TILE_ROWS, :] = padded.view(rows, chunks, CHUNK)


def unpack(p: torch.Tensor, n: int, k: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """The row-major (n, k) matrix of a packed one, as a new tensor of `dtype`."""
    tiles, chunks, _, _ = p.shape
    full = p.permute(0, 2, 1, 3).reshape(tiles * TILE_ROWS, chunks * CHUNK)[:n, :k]
    return full.to(dtype, memory_format=torch.contiguous_format, copy=True)


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape {shape}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")


def matmul(x: torch.Tensor, p: torch.Tensor, scale: torch.Tensor, n: int, k: int,
           isa: str | None = None) -> torch.Tensor:
    """x (M, k) fp32 @ the packed int8 (n, k) matrix with its fp32 scales (n,): y (M, n) fp32, on torch's thread
    count. `isa` picks a kernel (default: this CPU's best; the tests run each)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (rows, {k}), got shape {tuple(x.shape)}")
    m = x.size(0)
    _check(x, "x", torch.float32, (m, k))
    _check(p, "the packed matrix", torch.int8, packed_shape(n, k))
    _check(scale, "scale", torch.float32, (n,))
    y = torch.empty(m, n)
    _rustbpe.int8_matmul(x.data_ptr(), p.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k, isa or ISA,
                         torch.get_num_threads())
    return y
