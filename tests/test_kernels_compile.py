"""Every Triton kernel compiles to PTX/cubin for the GPUs we target, on this CPU-only machine, fits their shared
memory and, on the product path (fp16 and bf16 on the channels-last trunk), keeps its registers and moves its
data in vectors.

Triton's interpreter (tests/test_kernels.py) executes kernels with numpy and accepts code the compiler
rejects (non-constexpr globals, type mismatches across branches, unsupported dot shapes), and it has no shared
memory to run out of and no registers to spill. Ahead-of-time compilation for sm_90 (H100/H200: fp16, bf16 and
fp32), sm_80 (A100, the Ampere family of Jetson Orin), sm_86 (Ampere and Ada workstation and consumer cards,
99 KB of shared memory per block), sm_100 (B200, whose tensor cores take tcgen05 instructions) and sm_120
(Blackwell workstation and consumer cards) needs no GPU: ptxas and cuobjdump ship with Triton, and the compiled kernel
states its shared and local memory. What is compiled is what runs: the launchers themselves are called on meta
tensors in the model's layouts, their launches recorded instead of run, and each launch specialised as Triton's
JIT specialises it (unit strides as constants, 16-divisible integers and aligned pointers marked), which
decides the vectorised loads, their pipelining and with them the shared memory and the registers.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stunet.kernels import _triton

pytestmark = pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")

_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# fp16 is the product path everywhere; bf16 (whose tl.dot Triton's interpreter cannot run) and the exact fp32
# path on Hopper; fp32 also on sm_86, whose 99 KB of shared memory per block is the tightest budget (sm_120's too).
ARCH_DTYPES = {80: ("fp16",), 86: ("fp16", "fp32"), 90: ("fp16", "bf16", "fp32"), 100: ("fp16",), 120: ("fp16",)}
# (frames, heads, head dim, bias): one sequence length per branch of temporal_attn.tiles (packed 64-row tiles,
# 128-row tiles, streamed), each with the largest head dim the branch takes (the most shared memory), with and
# without the bias; a head dim that is not a power of two; the wide heads (129 to 256), packed and streamed;
# a streamed 64-wide head; lumiere-base's (5 and 10 frames of 16 heads of 64 at its temporal-attention levels)
# and an 80-frame clip.
ATTENTION_CASES = [(17, 4, 128, False), (17, 4, 128, True), (17, 8, 48, False), (65, 8, 64, False),
                   (65, 8, 64, True), (129, 4, 128, False), (129, 4, 128, True), (200, 8, 64, True),
                   (17, 8, 160, True), (129, 5, 256, True), (5, 16, 64, True), (10, 16, 64, False),
                   (80, 16, 64, True)]
# (C, T, H, W, groups) of videos the GroupNorm kernels normalise: lumiere-base's first level, and a tiny one with
# odd frame, height and width counts.
GROUP_NORM_CASES = [(256, 80, 128, 128, 32), (64, 3, 5, 7, 8)]
# Programs the GroupNorm statistics aim for: 4 per SM of each architecture's data-centre part (A100, RTX 3090's
# 82 on sm_86, H100 SXM, B200, RTX 5090's 170 on sm_120), as the launcher computes on the device.
STATS_PROGRAMS = {80: 4 * 108, 86: 4 * 82, 90: 4 * 132, 100: 4 * 148, 120: 4 * 170}
# The trunk's two memory formats (ExecutionPolicy.channels_last): the fast backend's, and the reference's.
LAYOUTS = ("channels-last", "folded NCHW")


def _trunk(B: int, C: int, T: int, H: int, W: int, dtype, layout: str):
    """A meta (B*T, C, H, W) trunk tensor in ``layout``: no memory, the strides of the real one."""
    import torch

    trunk = torch.empty(B * T, C, H, W, dtype=dtype, device="meta")
    return trunk.contiguous(memory_format=torch.channels_last) if layout == "channels-last" else trunk


def _model_launches(arch: int):
    """(name, kernel, grid, positional args, keyword args) of every launch the op launchers make for the cases above
    on sm_<arch>, recorded instead of run: the launchers' own tiles, grids and arguments, on meta tensors with
    the model's layouts (the token view of the trunk for attention, its video view for GroupNorm)."""
    import torch
    from utils import recorded_launches

    from stunet.kernels import groupnorm as gn
    from stunet.kernels import temporal_attn as ta

    launches = []
    for dt in ARCH_DTYPES[arch]:
        dtype = getattr(torch, _TORCH_DTYPES[dt])
        for layout in LAYOUTS if dt == "fp16" else LAYOUTS[:1]:  # the product dtype in both
            for T, heads, head_dim, bias in ATTENTION_CASES:
                C, (H, W) = heads * head_dim, (5, 9)  # 45 pixels: no stride of the folded trunk divides by 16
                trunk = _trunk(2, 3 * C, T, H, W, dtype, layout)
                qkv = trunk.permute(0, 2, 3, 1).unflatten(0, (2, T)).flatten(2, 3)  # (B, T, S, 3C) tokens
                b = torch.empty(heads, T, T, device="meta") if bias else None
                with recorded_launches(ta, f"attn-{dt}-{layout}-T{T}-d{head_dim}-bias{int(bias)}") as recorded:
                    ta.temporal_attention(qkv, heads, b)
                launches += recorded
            if dt == "bf16":
                continue  # the GroupNorm kernels use no dot: fp16 and fp32 cover them
            for C, T, H, W, G in GROUP_NORM_CASES:
                x = _trunk(2, C, T, H, W, dtype, layout).unflatten(0, (2, T)).transpose(1, 2)  # (B, C, T, H, W)
                w = torch.empty(C, dtype=dtype, device="meta")
                for scope, silu, ibias in (("frame", True, False), ("clip", False, False), ("frame", True, True)):
                    name = f"gn-{dt}-{layout}-C{C}xT{T}x{H}x{W}-{scope}-silu{int(silu)}-ibias{int(ibias)}"
                    with recorded_launches(gn, name) as recorded:
                        gn.group_norm(x, G, w, w, 1e-5, scope, silu, torch.empty(2, C, dtype=dtype, device="meta")
                                      if ibias else None, num_programs=STATS_PROGRAMS[arch])
                    launches += recorded
    return launches


def specialised(kernel, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) of a launch as Triton's JIT specialises it (its own
    ``native_specialize_impl``): an integer equal to 1 becomes a constant, one divisible by 16 and a 16-byte
    aligned pointer carry ``tt.divisibility``, an integer is i32 or i64 by its value. A compile from a
    hand-written signature misses all of this, and with it the vectorised loads, their pipelining (shared memory)
    and the register pressure of the kernel that runs."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs).arguments
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, key = native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = key
        elif key:
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs, options


SCALAR_HALF_ACCESS = re.compile(r"\b(?:ld|st)\.global(?:\.(?!v\d)[\w:]+)*?\.[bfu]16\b")
"""A PTX global load or store of a single 16-bit value (``ld.global.b16``), where vector accesses (``.v4.b32``)
should be: on the channels-last trunk every fp16 / bf16 tensor a kernel reads or writes is channel-contiguous."""


TENSOR_CORE_MMA = re.compile(r"\b(?:tcgen05\.mma|wgmma\.mma_async|mma\.sync)\b")
"""A tensor-core matrix instruction in PTX (Blackwell's tcgen05.mma, Hopper's wgmma, Ampere's mma.sync): fp16 and
bf16 attention's dots must compile to them (fp32's exact "ieee" dots run on FMAs)."""


def local_memory(cubin: bytes) -> int:
    """Bytes of per-thread local memory (stack: register spills, local arrays) a compiled kernel uses, as
    cuobjdump (shipped with Triton) reports it."""
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    return max(int(n) for n in re.findall(r"STACK:(\d+)", usage))


def compile_all(arch: int) -> dict:
    """Compiles every recorded launch (once per distinct specialisation) for sm_<arch>; returns the failures
    (a compile error; shared memory over what the architecture allows a block, which raises OutOfResources at
    launch on the GPU and no CPU test would otherwise see; on the product path, fp16 and bf16 on the
    channels-last trunk, register spills and 2-byte scalar memory accesses; fp16 and bf16 attention without
    tensor cores) and each kernel's shared and local memory. Run in a process whose Triton was imported without
    TRITON_INTERPRET (the interpreter swaps Triton's own library functions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from stunet.kernels.temporal_attn import SHARED_MEMORY_PER_BLOCK

    failures, usage, seen = [], {}, set()
    for name, kernel, _, args, kwargs in _model_launches(arch):
        signature, constexprs, attrs, options = specialised(kernel, args, dict(kwargs))
        key = repr((kernel.fn.__name__, signature, constexprs, attrs, options))
        if key in seen:
            continue
        seen.add(key)
        name = f"{name}:{kernel.fn.__name__}"
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as e:  # collect them all: one report names every kernel that fails
            lines = [line for line in str(e).splitlines() if line.strip()] or [repr(e)]
            failures.append(f"{name}: {type(e).__name__}: {lines[-1][:300]}")
            continue
        shared = compiled.metadata.shared
        if shared > SHARED_MEMORY_PER_BLOCK[arch]:
            failures.append(f"{name} {options}: {shared} bytes of shared memory, over the "
                            f"{SHARED_MEMORY_PER_BLOCK[arch]} sm_{arch} allows a block")
        local = local_memory(compiled.asm["cubin"])
        if name.startswith("attn-") and "fp32" not in name and not TENSOR_CORE_MMA.search(compiled.asm["ptx"]):
            failures.append(f"{name}: its dots run without tensor cores (no mma.sync / wgmma in its PTX)")
        if "fp32" not in name and "channels-last" in name:  # the fast backend's launches
            if local:
                failures.append(f"{name} {options}: spills registers ({local} bytes of local memory per thread)")
            scalar = len(SCALAR_HALF_ACCESS.findall(compiled.asm["ptx"]))
            if scalar:
                failures.append(f"{name}: {scalar} global loads or stores of one 2-byte element; the channels are "
                                "contiguous and aligned here, so they should move as vectors")
        usage[name] = dict(shared=shared, local=local, options=options)
    return dict(failures=failures, usage=usage)


@pytest.mark.parametrize("arch", sorted(ARCH_DTYPES))
def test_every_kernel_compiles_ahead_of_time(arch):
    # Also without TRITON_DEFAULT_FP_FUSION: stunet.kernels pins FP contraction on (Triton 3.9 warns that its
    # default changes), so the compile is the one the kernels were checked with, and says nothing about it.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_kernels_compile import compile_all; print(json.dumps(compile_all({arch})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FP_FUSION" not in run.stderr, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(result["failures"])
    kernels = {name.split(":")[1] for name in result["usage"]}
    assert kernels == {"_temporal_attn_fwd_kernel", "_gn_partial_kernel", "_gn_partial_rows_kernel",
                       "_gn_finalize_kernel", "_gn_apply_kernel"}, kernels  # every kernel, in both layouts
