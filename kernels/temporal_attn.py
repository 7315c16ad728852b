"""Temporal self-attention: softmax(q k^T / sqrt(d) + bias) v over the T frames at every (clip, pixel).

Layout: ``qkv`` is the packed projection output in the trunk's token layout, a (B, T, S, 3C) view (S = H*W;
channels-last trunks give it with unit channel stride, folded NCHW trunks with unit pixel stride; any strides
work). Channels are [q | k | v], each split into ``heads`` heads of D = C / heads. The output is (B, T, S, C),
contiguous, which is the token layout the output projection reads. No permute or copy on either side.

Why a kernel: a video U-Net has B*H*W sequences of T frames (16384 x 16 at 128x128), which SDPA kernels serve
badly (one short sequence per program, and permutes around them). Here a program holds P = BLOCK // T whole
sequences at once (block-diagonal mask; T = 17 packs 3 sequences in 64 rows), so q, k and v are read exactly
once: bytes moved = 4 * B*T*S*C * elem (+ the T x T bias per head), and the FLOPs (4 T^2 D per head and
position, more with the packing's masked part) stay far below the tensor cores' rate: memory-bound.
Longer clips (past 128 frames; past 64 for heads wider than 64, past 32 in fp32: ``tiles``) take one sequence's
query block per program and stream key blocks with an online softmax.
Softmax statistics are fp32 (exp2 with log2(e) folded into the scale).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import jit, launch, tl, triton

# A finite "minus infinity": fully masked padding rows stay NaN-free. Kernels may only read constexpr globals.
_NEG = tl.constexpr(-1.0e30) if tl is not None else -1.0e30
MAX_HEAD_DIM = 256  # wider heads run the reference math


@jit
def _temporal_attn_fwd_kernel(
    qkv, out, bias,
    T, S, num_seq, C, qk_scale,
    s_qb, s_qt, s_qs, s_qc,
    s_ob, s_ot, s_os, s_oc,
    HAS_BIAS: tl.constexpr, PACKED: tl.constexpr, SEQ_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)  # head dims that are not a power of two are padded and masked
    d_ok = d < HEAD_DIM
    if PACKED:  # rows are (sequence, frame) pairs of SEQ_PER_BLOCK whole sequences
        seq_q = pid * SEQ_PER_BLOCK + rows // T
        t_q = rows % T
        valid_q = (rows < SEQ_PER_BLOCK * T) & (seq_q < num_seq)
    else:  # one sequence, query block pid % cdiv(T, BLOCK_M)
        blocks = tl.cdiv(T, BLOCK_M)
        seq_q = pid // blocks + rows * 0
        t_q = (pid % blocks) * BLOCK_M + rows
        valid_q = t_q < T
    b_q = seq_q // S
    p_q = seq_q % S
    ch = (head * HEAD_DIM + d).to(tl.int64)  # channel offsets in int64, like every offset: a (B, T, S, 3C)
    # view's strides may each fit in int32 while their products with an index do not
    q_off = b_q.to(tl.int64) * s_qb + t_q.to(tl.int64) * s_qt + p_q.to(tl.int64) * s_qs
    q = tl.load(qkv + q_off[:, None] + (ch * s_qc)[None, :], mask=valid_q[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if PACKED:
        n_end = BLOCK_M  # the same rows: every key of these sequences is in this one block
    else:
        n_end = T
    for n0 in range(0, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if PACKED:
            seq_k = pid * SEQ_PER_BLOCK + cols // T
            t_k = cols % T
            valid_k = (cols < SEQ_PER_BLOCK * T) & (seq_k < num_seq)
        else:
            seq_k = pid // tl.cdiv(T, BLOCK_M) + cols * 0
            t_k = cols
            valid_k = t_k < T
        k_off = (seq_k // S).to(tl.int64) * s_qb + t_k.to(tl.int64) * s_qt + (seq_k % S).to(tl.int64) * s_qs
        kv_ok = valid_k[:, None] & d_ok[None, :]
        k = tl.load(qkv + k_off[:, None] + ((ch + C) * s_qc)[None, :], mask=kv_ok, other=0.0)
        v = tl.load(qkv + k_off[:, None] + ((ch + 2 * C) * s_qc)[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:  # (heads, T, T) fp32, added before the softmax (in log2 units here)
            b_ptr = bias + head * T * T + t_q[:, None] * T + t_k[None, :]
            s += tl.load(b_ptr, mask=valid_q[:, None] & valid_k[None, :], other=0.0) * 1.4426950408889634
        keep = valid_k[None, :]
        if PACKED:
            keep = keep & (seq_q[:, None] == seq_k[None, :])
        s = tl.where(keep, s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]
    o_off = b_q.to(tl.int64) * s_ob + t_q.to(tl.int64) * s_ot + p_q.to(tl.int64) * s_os
    tl.store(out + o_off[:, None] + (ch * s_oc)[None, :], o.to(out.dtype.element_ty),
             mask=valid_q[:, None] & d_ok[None, :])


def temporal_attention_ref(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None = None,
                           scale: float | None = None) -> torch.Tensor:
    """The op's semantics, in fp32: (B, T, S, 3C) packed [q | k | v] (any strides) -> (B, T, S, C) in qkv's
    dtype, softmax(q k^T * scale + bias) v per (clip, pixel, head). This is also the reference model's
    temporal attention."""
    B, T, S, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    # Each of q, k, v as (B * S, heads, T, D): 4-D, so that PyTorch's fused CPU kernel takes it (on 5-D
    # tensors SDPA falls back to its unfused math, twice as slow on a full-resolution temporal layer).
    q, k, v = qkv.float().reshape(B, T, S, 3, heads, D).permute(3, 0, 2, 4, 1, 5).flatten(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.float(),
                                       scale=scale if scale is not None else 1.0 / math.sqrt(D))
    return o.unflatten(0, (B, S)).permute(0, 3, 1, 2, 4).reshape(B, T, S, C).to(qkv.dtype)  # -> (B, T, S, C)


def unsupported(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None) -> list[str]:
    """Why the kernel cannot take these inputs (empty: it can)."""
    reasons = []
    if qkv.dtype not in (torch.float16, torch.float32, torch.bfloat16):
        reasons.append(f"dtype {qkv.dtype} (fp16, bf16, fp32 only)")
    C = qkv.shape[-1] // 3
    D = C // heads if heads else 0
    if not 1 <= D <= MAX_HEAD_DIM:
        reasons.append(f"head dim {D} (1 to {MAX_HEAD_DIM} only)")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        reasons.append("bias must be contiguous fp32")
    return reasons


# Shared memory a block may use (the opt-in maximum), by the architecture a kernel is compiled for: sm_80 and
# sm_87 (A100, Jetson Orin) 163 KB, sm_86, sm_89 and sm_120 (Ampere, Ada and Blackwell workstation and consumer
# cards) 99 KB, sm_90 and sm_100 (H100, H200, B200) 227 KB. Triton compiles a kernel for the device it runs on,
# and the same tiles take more shared memory on Hopper (wgmma reads its operands there); a tile over the device's
# limit does not fall back: Triton refuses the launch (OutOfResources).
SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                           100: 227 * 1024, 120: 99 * 1024}


@dataclass(frozen=True)
class Tiles:
    """One launch configuration of the kernel: its tile constexprs and launch options."""

    packed: bool
    block_m: int
    block_n: int
    seq_per_block: int
    block_d: int
    precision: str
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict:
        return dict(PACKED=self.packed, SEQ_PER_BLOCK=self.seq_per_block, BLOCK_M=self.block_m,
                    BLOCK_N=self.block_n, BLOCK_D=self.block_d, PRECISION=self.precision)

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


@functools.lru_cache(maxsize=None)
def tiles(T: int | None, head_dim: int, dtype: torch.dtype) -> Tiles:
    """The launch configuration for sequences of T frames (None: any T, streamed) of ``head_dim`` in ``dtype``.
    Head dims pad to a power of two of at least 16 (``tl.dot`` needs K >= 16).

    fp16 / bf16: up to 64 frames, whole sequences pack into 64-row tiles, run by one warpgroup (4 warps) up to head
    dim 128 (with 8 warps, Triton 3.7 spills a 128-wide head's registers on sm_80 and sm_86); up to 128 frames with
    head dims <= 64, one sequence fills a 128-row tile and reads its keys in two 64-key blocks (a 128 x 128 score
    tile spills registers on sm_86), two stages; longer clips (and wider heads past 64 frames) stream 64-key blocks
    (32 for heads wider than 128) past 64-query tiles, in three stages up to head dim 64 and two beyond (three
    stages of 128-wide key, value and bias blocks need 120 KB on sm_86).
    fp32 ("ieee" dots, the exact path: Triton computes them with FMAs whose operands are held in registers):
    32 x 32 tiles, packed up to 32 frames and streamed beyond, in two stages (one for heads wider than 128); 64-row
    tiles spill kilobytes of registers per thread.

    Each configuration compiles for sm_80, sm_86, sm_90, sm_100 and sm_120 within SHARED_MEMORY_PER_BLOCK and, in
    fp16 and bf16, without register spills (tests/test_kernels_compile.py compiles the launches the launcher
    makes)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        packed = T is not None and T <= 32
        return Tiles(packed, 32, 32, 32 // T if packed else 1, block_d, "ieee", num_warps=8 if block_d > 64 else 4,
                     num_stages=1 if block_d > 128 else 2)
    if T is not None and T <= 64:
        packed, block_m, block_n, per_block, stages = True, 64, 64, 64 // T, 3
        warps = 4 if block_d <= 128 else 8
    elif T is not None and T <= 128 and block_d <= 64:
        packed, block_m, block_n, per_block, stages, warps = True, 128, 64, 1, 2, 8
    else:
        packed, block_m, block_n, per_block = False, 64, 32 if block_d > 128 else 64, 1
        stages = 3 if block_d <= 64 else 2
        warps = 4 if block_d <= 64 else 8
    return Tiles(packed, block_m, block_n, per_block, block_d, "tf32", num_warps=warps, num_stages=stages)


def temporal_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None = None,
                       scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launches the kernel: qkv (B, T, S, 3C) -> (B, T, S, C). Validation is the op's (``stunet.kernels.ops``)."""
    B, T, S, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    if out is None:
        out = torch.empty(B, T, S, C, dtype=qkv.dtype, device=qkv.device)
    num_seq = B * S
    t = tiles(T, D, qkv.dtype)
    grid = (triton.cdiv(num_seq, t.seq_per_block) if t.packed else num_seq * triton.cdiv(T, t.block_m), heads)
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(D)) * 1.4426950408889634
    launch(_temporal_attn_fwd_kernel)[grid](
        qkv, out, bias if bias is not None else qkv,
        T, S, num_seq, C, qk_scale,
        *qkv.stride(), *out.stride(),
        HAS_BIAS=bias is not None, HEAD_DIM=D, **t.constexprs(), **t.options(),
    )
    return out
