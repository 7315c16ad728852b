"""Every Triton kernel compiles to PTX/cubin for the GPUs we target, on this CPU-only machine, and fits their
shared memory.

Triton's interpreter (tests/test_kernels.py) executes kernels with numpy and accepts code the compiler
rejects (non-constexpr globals, type mismatches across branches, unsupported dot shapes), and it has no shared
memory to run out of. Ahead-of-time compilation for sm_90 (H100/H200: fp16, bf16 and fp32), sm_80 (A100, the
Ampere family of Jetson Orin) and sm_86 (Ampere workstation and consumer cards, 99 KB of shared memory per block)
needs no GPU: ptxas ships with Triton, and the compiled kernel states its shared memory. Signatures mirror the
launchers' argument types; temporal attention's launch configurations are the launcher's own
(``temporal_attn.tiles``), over every branch it takes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stunet.kernels import _triton

pytestmark = pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")

I32, I64, F32 = "i32", "i64", "fp32"


_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# fp16 is the product path everywhere; bf16 (whose tl.dot Triton's interpreter cannot run) and the exact fp32
# path on Hopper; fp32 also on sm_86, whose 99 KB of shared memory per block is the tightest budget.
ARCH_DTYPES = {80: ("fp16",), 86: ("fp16", "fp32"), 90: ("fp16", "bf16", "fp32")}
# One sequence length per branch of temporal_attn.tiles (packed 64-row tiles, 128-row tiles, streamed), each
# with the largest head dim the branch takes (the most shared memory), with and without the bias; a head dim
# that is not a power of two; and the wide heads (129 to 256), packed and streamed.
ATTENTION_CASES = [(17, 128, False), (17, 128, True), (17, 48, False), (65, 64, False), (65, 64, True),
                   (129, 128, False), (129, 128, True), (17, 160, True), (129, 256, True)]


def _variants(arch: int):
    """(name, kernel, signature, constexprs, launch options) of every launch to compile for sm_<arch>."""
    import torch

    from stunet.kernels import groupnorm as gn
    from stunet.kernels import temporal_attn as ta

    out = []
    for dt in ARCH_DTYPES[arch]:
        attn_sig = {"qkv": f"*{dt}", "out": f"*{dt}", "bias": "*fp32", "T": I32, "S": I32, "num_seq": I32,
                    "C": I32, "qk_scale": F32,
                    **{s: I64 for s in ("s_qb", "s_qt", "s_qs", "s_qc", "s_ob", "s_ot", "s_os", "s_oc")}}
        seen = set()
        for T, head_dim, bias in ATTENTION_CASES:
            tiles = ta.tiles(T, head_dim, getattr(torch, _TORCH_DTYPES[dt]))  # the launcher's own choice
            if (tiles, head_dim, bias) in seen:  # fp32 has no 128-row tiles
                continue
            seen.add((tiles, head_dim, bias))
            kind = f"packed{tiles.seq_per_block}" if tiles.packed else "streamed"
            out.append((f"attn-{dt}-{kind}-m{tiles.block_m}n{tiles.block_n}-d{head_dim}-bias{int(bias)}",
                        ta._temporal_attn_fwd_kernel, attn_sig,
                        dict(HAS_BIAS=bias, HEAD_DIM=head_dim, **tiles.constexprs()), tiles.options()))
        if dt == "bf16" or arch == 86:
            continue  # the GroupNorm kernels use no dot and almost no shared memory: fp16 and fp32 cover them
        strides = {s: I64 for s in ("s_b", "s_c", "s_t", "s_p")}
        stats = {"part": "*fp32", "T": I32, "P": I32, "C": I32, "G": I32, "CG": I32, "rows_per_group": I32,
                 "rows_per_split": I32, **strides}
        for clip, ibias in ((False, False), (True, True), (False, True)):
            tag = f"{dt}-clip{int(clip)}-ibias{int(ibias)}"
            out.append((f"gn-partial-{tag}", gn._gn_partial_kernel, {"x": f"*{dt}", "ibias": f"*{dt}", **stats},
                        dict(CLIP_SCOPE=clip, HAS_IBIAS=ibias, BLOCK_R=256, BLOCK_CG=16), {}))
            out.append((f"gn-partial-rows-{tag}", gn._gn_partial_rows_kernel,
                        {"x": f"*{dt}", "ibias": f"*{dt}", **stats},
                        dict(CLIP_SCOPE=clip, HAS_IBIAS=ibias, BLOCK_R=16, BLOCK_G=32, BLOCK_CG=8), {}))
        for silu, ibias in ((False, False), (True, True)):
            out.append((f"gn-apply-{dt}-silu{int(silu)}-ibias{int(ibias)}", gn._gn_apply_kernel,
                        {"x": f"*{dt}", "y": f"*{dt}", "weight": f"*{dt}", "bias": f"*{dt}", "ibias": f"*{dt}",
                         "stats": "*fp32", "T": I32, "P": I32, "C": I32, "G": I32, "CG": I32, **strides,
                         **{s: I64 for s in ("y_b", "y_c", "y_t", "y_p")}},
                        dict(CLIP_SCOPE=False, SILU=silu, HAS_IBIAS=ibias, BLOCK_P=64, BLOCK_C=64), {}))
    out.append(("gn-finalize", gn._gn_finalize_kernel,
                {"part": "*fp32", "stats": "*fp32", "num_groups": I32, "splits": I32, "eps": F32},
                dict(BLOCK_G=64, BLOCK_S=16), {}))
    return out


def compile_all(arch: int) -> list[str]:
    """Compiles every variant for sm_<arch> with its launch options; returns one line per failure: a compile
    error, or shared memory over the budget every targeted GPU allows a block (a launch over the device's limit
    raises OutOfResources on the GPU, which no CPU test would see). Run in a process whose Triton was imported
    without TRITON_INTERPRET (the interpreter swaps Triton's own library functions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from stunet.kernels.temporal_attn import SHARED_MEMORY_BUDGET

    failures = []
    for name, fn, sig, constexprs, options in _variants(arch):
        params = fn.arg_names
        signature = {p: sig.get(p, "constexpr") for p in params}
        try:
            src = ASTSource(fn=fn, signature=signature,
                            constexprs={(params.index(k),): v for k, v in constexprs.items()})
            shared = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).metadata.shared
        except Exception as e:  # collect them all: one report names every kernel that fails
            lines = [line for line in str(e).splitlines() if line.strip()] or [repr(e)]
            failures.append(f"{name}: {type(e).__name__}: {lines[-1][:300]}")
            continue
        if shared > SHARED_MEMORY_BUDGET:
            failures.append(f"{name} {options}: {shared} bytes of shared memory, over the {SHARED_MEMORY_BUDGET} "
                            f"every targeted GPU allows a block")
    return failures


@pytest.mark.parametrize("arch", [80, 86, 90])
def test_every_kernel_compiles_ahead_of_time(arch):
    # Also without TRITON_DEFAULT_FP_FUSION: stunet.kernels pins FP contraction on (Triton 3.9 warns that its
    # default changes), so the compile is the one the kernels were checked with, and says nothing about it.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_kernels_compile import compile_all; print(json.dumps(compile_all({arch})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FP_FUSION" not in run.stderr, run.stderr[-3000:]
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
