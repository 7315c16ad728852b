"""Every Triton kernel compiles to PTX/cubin for the GPUs we target, on this CPU-only machine.

Triton's interpreter (tests/test_kernels.py) executes kernels with numpy and accepts code the compiler
rejects (non-constexpr globals, type mismatches across branches, unsupported dot shapes). Ahead-of-time
compilation for sm_90 (H100/H200: fp16 and fp32) and sm_80 (A100, the Ampere family of Jetson Orin: fp16)
needs no GPU: ptxas ships with Triton. Signatures mirror the launchers' argument types; the constexpr
combinations cover every branch the launchers take.
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


def _variants(arch: int):
    from stunet.kernels import groupnorm as gn
    from stunet.kernels import temporal_attn as ta

    out = []
    for dt in ("fp16", "fp32") if arch >= 90 else ("fp16",):  # fp16 is the product path; fp32 the exact one
        attn_sig = {"qkv": f"*{dt}", "out": f"*{dt}", "bias": "*fp32", "T": I32, "S": I32, "num_seq": I32, "C": I32,
                    "qk_scale": F32, **{s: I64 for s in ("s_qb", "s_qt", "s_qs", "s_qc", "s_ob", "s_ot", "s_os", "s_oc")}}
        tiles = [(True, 64, 4, 64, 64), (False, 64, 1, 128, 128), (True, 64, 3, 8, 16), (True, 64, 2, 48, 64)]
        if dt != "fp32":  # _blocks: 128-row tiles only below fp32
            tiles.append((True, 128, 1, 64, 64))
        for packed, bm, per, head_dim, block_d in tiles:
            for bias in (False, True):
                out.append((f"attn-{dt}-{'packed' if packed else 'streamed'}-m{bm}-d{head_dim}-bias{int(bias)}",
                            ta._temporal_attn_fwd_kernel, attn_sig,
                            dict(HAS_BIAS=bias, PACKED=packed, SEQ_PER_BLOCK=per, BLOCK_M=bm, BLOCK_N=bm,
                                 HEAD_DIM=head_dim, BLOCK_D=block_d, PRECISION="ieee" if dt == "fp32" else "tf32")))
        strides = {s: I64 for s in ("s_b", "s_c", "s_t", "s_p")}
        stats = {"part": "*fp32", "T": I32, "P": I32, "C": I32, "G": I32, "CG": I32, "rows_per_group": I32,
                 "rows_per_split": I32, **strides}
        for clip, ibias in ((False, False), (True, True), (False, True)):
            tag = f"{dt}-clip{int(clip)}-ibias{int(ibias)}"
            out.append((f"gn-partial-{tag}", gn._gn_partial_kernel, {"x": f"*{dt}", "ibias": f"*{dt}", **stats},
                        dict(CLIP_SCOPE=clip, HAS_IBIAS=ibias, BLOCK_R=256, BLOCK_CG=16)))
            out.append((f"gn-partial-rows-{tag}", gn._gn_partial_rows_kernel,
                        {"x": f"*{dt}", "ibias": f"*{dt}", **stats},
                        dict(CLIP_SCOPE=clip, HAS_IBIAS=ibias, BLOCK_R=16, BLOCK_G=32, BLOCK_CG=8)))
        for silu, ibias in ((False, False), (True, True)):
            out.append((f"gn-apply-{dt}-silu{int(silu)}-ibias{int(ibias)}", gn._gn_apply_kernel,
                        {"x": f"*{dt}", "y": f"*{dt}", "weight": f"*{dt}", "bias": f"*{dt}", "ibias": f"*{dt}",
                         "stats": "*fp32", "T": I32, "P": I32, "C": I32, "G": I32, "CG": I32, **strides,
                         **{s: I64 for s in ("y_b", "y_c", "y_t", "y_p")}},
                        dict(CLIP_SCOPE=False, SILU=silu, HAS_IBIAS=ibias, BLOCK_P=64, BLOCK_C=64)))
    out.append(("gn-finalize", gn._gn_finalize_kernel,
                {"part": "*fp32", "stats": "*fp32", "num_groups": I32, "splits": I32, "eps": F32},
                dict(BLOCK_G=64, BLOCK_S=16)))
    return out


def compile_all(arch: int) -> list[str]:
    """Compiles every variant for sm_<arch>; returns one line per failure. Run in a process whose Triton was
    imported without TRITON_INTERPRET (the interpreter swaps Triton's own library functions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for name, fn, sig, constexprs in _variants(arch):
        params = fn.arg_names
        signature = {p: sig.get(p, "constexpr") for p in params}
        try:
            src = ASTSource(fn=fn, signature=signature,
                            constexprs={(params.index(k),): v for k, v in constexprs.items()})
            triton.compile(src, target=GPUTarget("cuda", arch, 32))
        except Exception as e:  # collect them all: one report names every kernel that fails
            lines = [line for line in str(e).splitlines() if line.strip()] or [repr(e)]
            failures.append(f"{name}: {type(e).__name__}: {lines[-1][:300]}")
    return failures


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles_ahead_of_time(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_kernels_compile import compile_all; print(json.dumps(compile_all({arch})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
