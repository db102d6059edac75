"""Compile every Triton kernel for an H100 (sm_90) without a GPU and report its resources.

`python -m nanochat_kernels.resource_report` runs Triton's real compiler and ptxas (both ship in the triton wheel)
on each kernel at the configurations the host code launches, and prints shared memory, registers per thread and
spill stack per config. It catches what the CPU interpreter cannot (compile-mode-only errors, shared memory over
the 227 KB an H100 block may use); it does not replace timing on a GPU (bench/kernels.py).

Arguments are specialized as Triton's JIT does at launch: pointers 16-byte aligned, integers equal to 1 become
constants, integers divisible by 16 carry that divisibility. Sample values come from the benchmark shapes
(B=8, T=2048, H=10, D in {64, 128}; decode over a 2048-token cache; Newton-Schulz on 1280-wide stacks).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

H100_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}


@dataclass
class Report:
    kernel: str
    config: dict
    shared: int
    registers: int | None
    spill_bytes: int | None


def compile_for_sm90(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> Report:
    """Compile `kernel` (a triton.jit function) for sm_90; args maps each runtime argument name to a sample value
    (a torch dtype stands for a pointer to that dtype)."""
    import triton  # the report is a GPU-side tool; the package itself must not need Triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, consts, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.dtype):
            signature[name] = _PTR[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    registers = spill = None
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
        match = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S)
        if match:
            registers, spill = int(match.group(1)), int(match.group(2))
    config = dict(constexprs, num_warps=num_warps, num_stages=num_stages)
    return Report(kernel.__name__, config, compiled.metadata.shared, registers, spill)


# ---------------------------------------------------------------------------------------------------------------
# The launch configurations of each module


def attention_reports(head_dim: int, causal: bool = True, dtype=torch.bfloat16, group: int = 1,
                      windowed: bool = False) -> list[Report]:
    from . import flash_attention as fa  # imports Triton (see compile_for_sm90)

    T, H, D = 2048, 10, head_dim  # strides of a (B, T, H, D) tensor do not depend on B
    strides = dict(b=T * H * D, t=H * D, h=D)
    kv_strides = dict(b=T * (H // group) * D, t=(H // group) * D, h=D)
    common = dict(T=T, H=H, H_KV=H // group, GROUP=group, qk_scale=1.0, sm_scale=1.0, window=256)
    for prefix, st in (("q", strides), ("o", strides), ("do", strides), ("dq", strides), ("k", kv_strides),
                       ("v", kv_strides), ("dk", kv_strides), ("dv", kv_strides)):
        for axis, value in st.items():
            common[f"stride_{prefix}{axis}"] = value
    ptrs = {name: dtype for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs.update(LSE=torch.float32, DELTA=torch.float32)
    reports = []
    for kernel, table in ((fa._fwd_kernel, fa._FWD_CONFIG), (fa._bwd_dkdv_kernel, fa._BWD_DKDV_CONFIG),
                          (fa._bwd_dq_kernel, fa._BWD_DQ_CONFIG)):
        cfg = dict(table[64] if head_dim <= 64 else table[128])
        constexprs = dict(HEAD_DIM=D, BLOCK_M=cfg.pop("BLOCK_M"), BLOCK_N=cfg.pop("BLOCK_N"), CAUSAL=causal,
                          WINDOWED=windowed)
        reports.append(compile_for_sm90(kernel, {**ptrs, **common}, constexprs, **cfg))
    delta_args = {**ptrs, **common, "stride_db": strides["b"], "stride_dt": strides["t"], "stride_dh": strides["h"]}
    reports.append(compile_for_sm90(fa._bwd_delta_kernel, delta_args, dict(HEAD_DIM=D, BLOCK_M=64), 4, 1))
    return reports


def decode_reports(head_dim: int = 128, rows: int = 16, dtype=torch.bfloat16,
                   windowed: bool = False) -> list[Report]:
    """The decode kernel (final and partial outputs), and the merge kernel unless `windowed` (it has no window)."""
    from . import flash_decoding as fd  # imports Triton (see compile_for_sm90)

    T_max, H, H_kv, D = 2048, 10, 10, head_dim
    args = dict(Q=dtype, K=dtype, V=dtype, LENS=torch.int32, O=dtype, O_PART=torch.float32, LSE_PART=torch.float32,
                stride_qb=H * D, stride_qt=H * D, stride_qh=D, stride_kb=T_max * H_kv * D, stride_kt=H_kv * D,
                stride_kh=D, stride_vb=T_max * H_kv * D, stride_vt=H_kv * D, stride_vh=D, stride_ob=H * D,
                stride_ot=H * D, stride_oh=D, T_Q=2, T_MAX=T_max, H=H, H_KV=H_kv, GROUP=2, NUM_SPLITS=16,
                SPLIT_LEN=128, qk_scale=1.0, window=256)
    reports = [compile_for_sm90(fd._decode_kernel, args, dict(HEAD_DIM=D, BLOCK_R=rows, BLOCK_N=fd._BLOCK_N,
                                                              WRITE_FINAL=final, WINDOWED=windowed),
                               fd._NUM_WARPS, fd._NUM_STAGES)
               for final in (True, False)]
    if not windowed:
        reports.append(compile_for_sm90(fd._merge_kernel, args, dict(HEAD_DIM=D, BLOCK_S=16), 4, 1))
    return reports


def newton_schulz_reports(dtype=torch.bfloat16) -> list[Report]:
    from . import newton_schulz_triton as ns  # imports Triton (see compile_for_sm90)

    M, K = 1280, 5120
    args = dict(Y=dtype, Z=dtype, OUT=dtype, TILE_I=torch.int32, TILE_J=torch.int32, M=M, K=K, stride_yb=M * K,
                stride_ym=K, stride_yk=1, stride_zb=M * M, stride_zm=M, stride_zn=1, stride_ob=M * M, stride_om=M,
                stride_on=1, alpha=1.0, beta=1.0)
    return [compile_for_sm90(ns._sym_gram_kernel, args, dict(HAS_Z=has_z, BLOCK=ns._BLOCK, BLOCK_K=ns._BLOCK_K),
                             ns._NUM_WARPS, ns._NUM_STAGES) for has_z in (False, True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the kernels for sm_90 (no GPU needed) and print "
                                                 "shared memory (bytes), registers per thread and spill stack (bytes)")
    parser.add_argument("--only", nargs="+", choices=["attention", "decode", "ns"],
                        default=["attention", "decode", "ns"], help="kernel groups to compile")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    reports: list[Report] = []
    if "attention" in args.only:
        for head_dim in (64, 128):
            reports += attention_reports(head_dim)
            reports += attention_reports(head_dim, windowed=True)
    if "decode" in args.only:
        reports += decode_reports()
        reports += decode_reports(windowed=True)
    if "ns" in args.only:
        reports += newton_schulz_reports()
    print(f"{'kernel':<18} {'shared B':>9} {'regs':>5} {'spill B':>8}  config")
    for r in reports:
        flag = "  OVER SHARED LIMIT" if r.shared > H100_SHARED_LIMIT else ""
        print(f"{r.kernel:<18} {r.shared:>9} {r.registers if r.registers is not None else '?':>5} "
              f"{r.spill_bytes if r.spill_bytes is not None else '?':>8}  {r.config}{flag}")
    return 1 if any(r.shared > H100_SHARED_LIMIT for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
