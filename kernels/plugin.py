"""The kernel ops as TensorRT ahead-of-time plugin kernels: one launch each, contiguous tensors, no scratch.

A TensorRT AOT plugin (``tensorrt.plugin.aot_impl``) hands TensorRT a kernel's PTX, its launch geometry and
its scalar arguments as shape expressions; TensorRT launches it with the parameters in one fixed order:

    (input pointers..., int32 scalars..., output pointers...)

so the entry points here take exactly that order, read the plugin's linear (contiguous) tensors, and need no
workspace (one launch; nothing in global scratch). Everything else is a constexpr fixed when the engine is
built (the op's attributes, the tile shape). The math is the op's (``group_norm_ref``,
``temporal_attention_ref``); ``tests/test_tensorrt.py`` runs these entry points in Triton's interpreter in
that parameter order against the references, and compiles them to PTX for sm_86, sm_90, sm_100 and
sm_120.

| plugin | inputs | int32 scalars | outputs | grid |
|---|---|---|---|---|
| ``stunet::GroupNorm`` | x, weight, bias | C, T, HW | y | B * G (per clip) or B * T * G (per frame) |
| ``stunet::BiasGroupNorm`` | x, weight, bias, input_bias | C, T, HW | y | the same |
| ``stunet::TemporalAttention`` | qkv | T, S, num_seq = B * S, C | out | attention's grid x heads |

The GroupNorm entry is one program per statistics group reading it three times (mean, centred variance,
apply): simple and exact, but with B * G programs it fills a large GPU poorly; the engine's own multi-pass
kernel (``groupnorm.py``) is the fast one and needs a scratch buffer, which AOT plugins do not provide.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..config import shown
from ._triton import jit, tl, triton
from .temporal_attn import _temporal_attn_fwd_kernel, tiles


@jit
def _group_element(x, ibias, b, C, g, CG, base, frame_len, row_len, i, n, HAS_IBIAS: tl.constexpr):
    """Elements ``i`` of a statistics group (+ the input bias) in fp32: (values, in range, channel, offset)."""
    ok = i < n
    row = i // row_len
    offset = base + row * frame_len + i % row_len
    v = tl.load(x + offset, mask=ok, other=0.0).to(tl.float32)
    if HAS_IBIAS:
        v += tl.load(ibias + b * C + g * CG + row, mask=ok, other=0.0).to(tl.float32)
    return v, ok, g * CG + row, offset


@jit
def _group_norm_plugin_kernel(
    x, weight, bias, ibias,
    C, T, HW,
    y,
    NUM_GROUPS: tl.constexpr, EPS: tl.constexpr, CLIP_SCOPE: tl.constexpr, SILU: tl.constexpr,
    HAS_IBIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # (b, g) per clip; (b, t, g) per frame
    g = pid % NUM_GROUPS
    CG = C // NUM_GROUPS
    frame_len = T.to(tl.int64) * HW  # a channel's stride in the contiguous (B, C, T, H, W) tensor
    if CLIP_SCOPE:
        b = pid // NUM_GROUPS
        base = b.to(tl.int64) * C * frame_len
        row_len = frame_len
    else:
        bt = pid // NUM_GROUPS
        b = bt // T
        base = b.to(tl.int64) * C * frame_len + (bt % T).to(tl.int64) * HW
        row_len = HW.to(tl.int64)
    base += g.to(tl.int64) * CG * frame_len
    n = CG * row_len  # elements of this statistics group: CG channel rows of row_len
    idx = tl.arange(0, BLOCK)

    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        v, ok, _, _ = _group_element(x, ibias, b, C, g, CG, base, frame_len, row_len, start + idx, n, HAS_IBIAS)
        total += tl.where(ok, v, 0.0)
    mean = tl.sum(total, 0) / n

    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        v, ok, _, _ = _group_element(x, ibias, b, C, g, CG, base, frame_len, row_len, start + idx, n, HAS_IBIAS)
        d = tl.where(ok, v - mean, 0.0)
        total += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(total, 0) / n + EPS)

    for start in range(0, n, BLOCK):
        v, ok, channel, offset = _group_element(x, ibias, b, C, g, CG, base, frame_len, row_len, start + idx, n,
                                                HAS_IBIAS)
        w = tl.load(weight + channel, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(bias + channel, mask=ok, other=0.0).to(tl.float32)
        out = (v - mean) * rstd * w + s
        if SILU:
            out = out * tl.sigmoid(out)
        tl.store(y + offset, out.to(y.dtype.element_ty), mask=ok)


@jit
def _temporal_attention_plugin_kernel(
    qkv,
    T, S, num_seq, C,
    out,
    QK_SCALE: tl.constexpr, PACKED: tl.constexpr, SEQ_PER_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # Contiguous (B, T, S, 3C) in, (B, T, S, C) out: the strides follow from the sizes.
    s_qs = 3 * C
    s_qt = S.to(tl.int64) * s_qs
    s_os = C
    s_ot = S.to(tl.int64) * s_os
    _temporal_attn_fwd_kernel(qkv, out, qkv, T, S, num_seq, C, QK_SCALE,
                              T * s_qt, s_qt, s_qs, 1, T * s_ot, s_ot, s_os, 1,
                              False, PACKED, SEQ_PER_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, PRECISION)


# -- host side: what a plugin launches, shared by TensorRT's aot_impl and the interpreter tests -------------------
_LOG2E = 1.4426950408889634
_DTYPES = ("fp16", "fp32")


@dataclass(frozen=True)
class PluginKernel:
    """One plugin's kernel: its entry point, the names of its pointer and scalar parameters in TensorRT's order,
    the constexprs fixed at build time, and its launch geometry."""

    fn: object
    inputs: tuple[str, ...]
    scalars: tuple[str, ...]
    outputs: tuple[str, ...]
    dtype: str
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    grid_of: object = None
    """``grid_of(dims, cdiv) -> (grid_x, grid_y)`` over the scalars' values (ints, or TensorRT shape
    expressions with ``cdiv`` their ceiling division)."""

    @property
    def params(self) -> tuple[str, ...]:
        return self.inputs + self.scalars + self.outputs

    def signature(self) -> dict[str, str]:
        """Triton's signature: pointers in the plugin dtype, int32 scalars, the rest constexpr."""
        sig = {name: f"*{self.dtype}" for name in self.inputs + self.outputs}
        sig.update({name: "i32" for name in self.scalars})
        return {name: sig.get(name, "constexpr") for name in self.fn.arg_names}

    def grid(self, dims: dict, cdiv=None) -> tuple:
        return self.grid_of(dims, cdiv or (lambda a, b: -(-a // b)))

    def launch(self, tensors: dict, dims: dict) -> None:
        """Launches the entry point (on a GPU, or in the interpreter) exactly as TensorRT would: every pointer
        and scalar by name, in the plugin's order, over ``grid(dims)``."""
        args = {**{name: tensors[name] for name in self.inputs + self.outputs},
                **{name: int(dims[name]) for name in self.scalars}, **self.constexprs}
        self.fn[self.grid(dims)](**args, num_warps=self.num_warps, num_stages=self.num_stages)


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"plugin dtype must be one of {_DTYPES}, got {shown(dtype)}")


def group_norm_plugin(dtype: str, *, num_groups: int, eps: float, per_clip: bool, silu: bool,
                      input_bias: bool) -> PluginKernel:
    """The kernel of ``stunet::GroupNorm`` (``input_bias=False``) or ``stunet::BiasGroupNorm``."""
    _check_dtype(dtype)
    inputs = ("x", "weight", "bias") + (("ibias",) if input_bias else ())
    constexprs = dict(NUM_GROUPS=int(num_groups), EPS=float(eps), CLIP_SCOPE=bool(per_clip), SILU=bool(silu),
                      HAS_IBIAS=bool(input_bias), BLOCK=1024)
    if not input_bias:
        constexprs["ibias"] = None

    def grid(dims, cdiv):
        return (dims["B"] * num_groups if per_clip else dims["B"] * dims["T"] * num_groups, 1)

    return PluginKernel(_group_norm_plugin_kernel, inputs, ("C", "T", "HW"), ("y",), dtype, constexprs, grid_of=grid)


def temporal_attention_plugin(dtype: str, *, channels: int, heads: int, scale: float,
                              frames: int | None = None) -> PluginKernel:
    """The kernel of ``stunet::TemporalAttention`` for ``channels`` (C, static) in ``heads`` heads. With the
    frame count known at build time (``frames``), short clips take the packed tiles; otherwise the streamed
    tiles, which serve any T."""
    _check_dtype(dtype)
    if channels % heads:
        raise ValueError(f"channels ({channels}) must be a multiple of heads ({heads})")
    head_dim = channels // heads
    t = tiles(frames, head_dim, torch.float32 if dtype == "fp32" else torch.float16)
    constexprs = dict(QK_SCALE=float(scale) * _LOG2E, HEAD_DIM=head_dim, **t.constexprs())

    def grid(dims, cdiv):
        x = cdiv(dims["num_seq"], t.seq_per_block) if t.packed else dims["num_seq"] * cdiv(dims["T"], t.block_m)
        return (x, heads)

    return PluginKernel(_temporal_attention_plugin_kernel, ("qkv",), ("T", "S", "num_seq", "C"), ("out",), dtype,
                        constexprs, t.num_warps, t.num_stages, grid)


@dataclass(frozen=True)
class CompiledPlugin:
    """PTX for one SM, ready for ``aot_impl``: the entry's name, its text, and its launch needs."""

    name: str
    ptx: str
    params: tuple[str, ...]
    """The PTX entry's parameter kinds in order: ``"ptr"`` (a 64-bit pointer) or ``"u32"``."""
    num_warps: int
    shared: int
    arch: int


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)
_PARAM = re.compile(r"\.param\s+\.(\w+)(\s+\.ptr)?[^,]*?\s(\w+)\s*(?:,|$)")


def entry_params(ptx: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(entry name, ((kind, param name), ...)) of the PTX's kernel."""
    m = _ENTRY.search(ptx)
    if m is None:
        raise ValueError("no .entry in the PTX")
    params = tuple(("ptr" if p.group(2) else p.group(1), p.group(3)) for p in _PARAM.finditer(m.group(2) + ","))
    return m.group(1), params


def compile_plugin(kernel: PluginKernel, arch: int) -> CompiledPlugin:
    """Compiles the entry point to PTX for sm_<arch> (no GPU needed). Triton appends scratch-buffer pointers to
    every entry; a plugin has none, so they must be unused (zero scratch sizes, never loaded) and are removed,
    leaving exactly the plugin's parameter order. Raises if the kernel would need scratch or TMA."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = kernel.fn.arg_names
    constexprs = {(params.index(k),): v for k, v in kernel.constexprs.items()}
    compiled = triton.compile(ASTSource(fn=kernel.fn, signature=kernel.signature(), constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages))
    meta = compiled.metadata
    for what in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, what, 0):
            raise RuntimeError(f"{kernel.fn.__name__} needs {what}={getattr(meta, what)}; a plugin has no scratch")
    if getattr(meta, "tensordesc_meta", None):
        raise RuntimeError(f"{kernel.fn.__name__} uses TMA descriptors, which a plugin cannot pass")
    ptx = compiled.asm["ptx"]
    name, found = entry_params(ptx)
    wanted = len(kernel.params)
    for kind, extra in found[wanted:]:
        if kind != "ptr" or re.search(rf"\b{extra}\b", ptx[ptx.index(")", ptx.index(".entry")):]):
            raise RuntimeError(f"{name}: unexpected parameter {extra!r} ({kind}) after the plugin's {wanted}")
    if found[wanted:]:
        head, body = ptx.split(".entry", 1)
        open_, close = body.index("("), body.index(")")
        extras = [re.compile(rf"\b{p}\b") for _, p in found[wanted:]]
        kept = [line for line in body[open_ + 1:close].split(",") if not any(e.search(line) for e in extras)]
        ptx = head + ".entry" + body[:open_ + 1] + ",".join(kept) + "\n)" + body[close + 1:]
    kinds = tuple(kind for kind, _ in entry_params(ptx)[1])
    return CompiledPlugin(name, ptx, kinds, kernel.num_warps, meta.shared, arch)
