"""Space-time resampling of (B, C, T, H, W) videos in either memory format (NCDHW or channels-last-3d).

- ``avg_pool_video``: average pooling with kernel = stride (kt, kh, kw) in {(2, 2, 2), (2, 1, 1), (1, 2, 2)}
  (any small kernel works), floor semantics as ``F.avg_pool3d``. One program per tile of [output positions x
  channels], every tap loaded once: bytes = input + output (1 + 1 / (kt kh kw) of the video). Stock
  ``avg_pool3d`` on channels-last video runs far below bandwidth.
- ``upsample_frames``: T -> 2T by frame duplication, each input read once and written twice.
- ``temporal_up_conv``: duplication followed by the depth-3 temporal convolution of TemporalUp, without the
  doubled tensor. With W_k the taps and x the input, the output frames are
      y[2i]   = W0 x[i-1] + (W1 + W2) x[i]
      y[2i+1] = (W0 + W1) x[i] + W2 x[i+1]
  (zero padding), i.e. two depth-2 convolutions of the original frames (4 tap-GEMMs where the materialised
  path does 6, and half the input traffic), interleaved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from ._triton import jit, tl, triton


@jit
def _decode(m, T, H, W):
    """(b, t, h, w) of flat position indices m over a (B, T, H, W) grid."""
    return m // (W * H * T), (m // (W * H)) % T, (m // W) % H, m % W


@jit
def _avg_pool_kernel(
    x, y, M, C, To, Ho, Wo,
    s_b, s_c, s_t, s_h, s_w, y_b, y_c, y_t, y_h, y_w,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output position (b, t, h, w)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (m < M)[:, None] & (c < C)[None, :]
    b, to, ho, wo = _decode(m, To, Ho, Wo)
    base = (b.to(tl.int64) * s_b + (to * KT).to(tl.int64) * s_t + (ho * KH).to(tl.int64) * s_h
            + (wo * KW).to(tl.int64) * s_w)
    ptr = x + base[:, None] + (c * s_c)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for kt in tl.static_range(KT):
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                acc += tl.load(ptr + kt * s_t + kh * s_h + kw * s_w, mask=ok, other=0.0).to(tl.float32)
    out = acc * (1.0 / (KT * KH * KW))
    y_off = b.to(tl.int64) * y_b + to.to(tl.int64) * y_t + ho.to(tl.int64) * y_h + wo.to(tl.int64) * y_w
    tl.store(y + y_off[:, None] + (c * y_c)[None, :], out.to(y.dtype.element_ty), mask=ok)


@jit
def _upsample_frames_kernel(
    x, y, M, C, T, H, W,
    s_b, s_c, s_t, s_h, s_w, y_b, y_c, y_t, y_h, y_w,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # input position (b, t, h, w)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (m < M)[:, None] & (c < C)[None, :]
    b, t, h, w = _decode(m, T, H, W)
    src = b.to(tl.int64) * s_b + t.to(tl.int64) * s_t + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
    v = tl.load(x + src[:, None] + (c * s_c)[None, :], mask=ok, other=0.0)
    dst = b.to(tl.int64) * y_b + (2 * t).to(tl.int64) * y_t + h.to(tl.int64) * y_h + w.to(tl.int64) * y_w
    dptr = y + dst[:, None] + (c * y_c)[None, :]
    tl.store(dptr, v, mask=ok)
    tl.store(dptr + y_t, v, mask=ok)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for a channels-last (B, C, T, H, W) tensor, else contiguous_format."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def avg_pool_video_ref(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    return F.avg_pool3d(x.float(), kernel, kernel).to(x.dtype).contiguous(memory_format=memory_format(x))


def upsample_frames_ref(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, dim=2).contiguous(memory_format=memory_format(x))


def temporal_up_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Duplicate frames, then conv over time with weight (C_out, C_in, 3), zero padding 1: TemporalUp."""
    return F.conv3d(x.repeat_interleave(2, dim=2), weight[:, :, :, None, None], bias, padding=(1, 0, 0))


def temporal_up_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same result with the duplication folded into two depth-2 convolutions (torch/cuDNN GEMMs)."""
    w0, w1, w2 = weight.unbind(-1)
    even_w = torch.stack([w0, w1 + w2], dim=-1)[:, :, :, None, None]  # taps on x[i-1], x[i]
    odd_w = torch.stack([w0 + w1, w2], dim=-1)[:, :, :, None, None]   # taps on x[i], x[i+1]
    even = F.conv3d(F.pad(x, (0, 0, 0, 0, 1, 0)), even_w, bias)
    odd = F.conv3d(F.pad(x, (0, 0, 0, 0, 0, 1)), odd_w, bias)
    B, C, T, H, W = even.shape
    return torch.stack([even, odd], dim=3).view(B, C, 2 * T, H, W).contiguous(memory_format=memory_format(x))


def _grid_blocks(C: int) -> tuple[int, int]:
    block_c = min(64, triton.next_power_of_2(C))
    return max(16, 2048 // block_c), block_c


def avg_pool_video(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    kt, kh, kw = kernel
    B, C, T, H, W = x.shape
    To, Ho, Wo = T // kt, H // kh, W // kw
    y = torch.empty(B, C, To, Ho, Wo, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    M = B * To * Ho * Wo
    block_m, block_c = _grid_blocks(C)
    if M and C:
        _avg_pool_kernel[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
            x, y, M, C, To, Ho, Wo, *x.stride(), *y.stride(), KT=kt, KH=kh, KW=kw, BLOCK_M=block_m, BLOCK_C=block_c)
    return y


def upsample_frames(x: torch.Tensor) -> torch.Tensor:
    B, C, T, H, W = x.shape
    y = torch.empty(B, C, 2 * T, H, W, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    M = B * T * H * W
    block_m, block_c = _grid_blocks(C)
    if M and C:
        _upsample_frames_kernel[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
            x, y, M, C, T, H, W, *x.stride(), *y.stride(), BLOCK_M=block_m, BLOCK_C=block_c)
    return y
