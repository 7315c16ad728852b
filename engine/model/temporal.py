"""Temporal modules that inflate the per-frame trunk into a Space-Time U-Net (Lumiere, arXiv 2401.12945).

All take and return the folded layout ``(B*T, C, H, W)`` (see ``layers``) and are exactly the identity (or
exact frame selection / duplication) at initialisation, so a freshly inflated network computes what the
text-to-image U-Net computes on every frame of a static video.

- :class:`ConvInflationBlock` ``y = x + proj(act(norm(conv1d_t(act(norm(conv2d_3x3(x)))))))``, proj zero-init.
- :class:`TemporalAttentionBlock` pre-norm self-attention over T at every (b, h, w) + MLP, outputs zero-init.
- :class:`TemporalConvStack` ModelScope's temporal conv: ``y = x + 4 x (GN-SiLU-Conv1d_t)(x)``, the last conv
  zero-init.
- :class:`TemporalTransformer` the diffusers video U-Nets' temporal transformer (ModelScope's
  ``TransformerTemporalModel``, AnimateDiff's motion module): GN, proj_in, two self-attentions over T and a
  feed-forward, proj_out zero-init, plus the input.
- :class:`TemporalDown` Conv1d over time, k=3, pad 1, stride 2, identity-init: picks the even frames.
- :class:`TemporalUp` frame duplication then Conv1d k=3 identity-init: nearest-neighbour upsampling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import temporal_attention_ref, temporal_up_conv_ref
from .layers import (Block, Cond, LayerNorm32, Shape, VideoGroupNorm, attention_flops, conv2d_flops, feed_forward,
                     feed_forward_layers, from_clips, linear_flops, to_clips)


class TemporalModule(Block):
    """Marker base: the modules inflation adds. Their weights are never touched by ``interpolate_spatial``."""


class TemporalConv(nn.Module):
    """Conv1d over time applied at every pixel: weight (C_out, C_in, k), zero padding (k - 1) / 2 in time."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel))
        self.bias = nn.Parameter(torch.empty(out_ch))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv1d's default initialisation
        bound = 1 / math.sqrt(in_ch * kernel)
        nn.init.uniform_(self.bias, -bound, bound)

    def init_identity(self) -> None:
        """Centre tap = identity matrix, everything else zero: output frame t' = input frame stride * t'."""
        assert self.weight.shape[0] == self.weight.shape[1], "identity needs in_ch == out_ch"
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :, self.kernel // 2] = torch.eye(self.weight.shape[0])
            self.bias.zero_()

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        w = self.weight[:, :, :, None, None]  # (C_out, C_in, k, 1, 1): a Conv1d seen by conv3d
        y = F.conv3d(to_clips(x, batch), w, self.bias, stride=(self.stride, 1, 1), padding=(self.kernel // 2, 0, 0))
        return from_clips(y)

    def flops(self, shape: Shape) -> int:
        B, T, H, W = shape
        t_out = (T + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1
        return 2 * B * t_out * H * W * self.weight.shape[0] * self.weight.shape[1] * self.kernel


class ConvInflationBlock(TemporalModule):
    """Residual (2+1)D conv block; the zero-initialised 1x1 ``proj`` makes a fresh block the identity."""

    def __init__(self, ch: int, groups: int, scope: str):
        super().__init__()
        self.conv_s = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm_s = VideoGroupNorm(groups, ch, scope)
        self.conv_t = TemporalConv(ch, ch, kernel=3)
        self.norm_t = VideoGroupNorm(groups, ch, scope)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        h = self.norm_s(self.conv_s(x), cond, silu=True)
        h = self.norm_t(self.conv_t(h, cond.batch), cond, silu=True)
        return x + self.proj(h)

    def flops(self, shape: Shape, text_len: int) -> int:
        B, T, H, W = shape
        n = B * T
        return conv2d_flops(self.conv_s, n, H, W) + self.conv_t.flops(shape) + conv2d_flops(self.proj, n, H, W)


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """(length, dim) fp32 sinusoidal positional encoding (Vaswani et al. 2017), sin on even, cos on odd dims."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


def to_tokens(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Folded (B*T, C, H, W) -> tokens (B, T, H*W, C): a view of a channels-last trunk."""
    bt, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, bt // batch, h * w, c)


def from_tokens(tokens: torch.Tensor, like: torch.Tensor, cond: Cond) -> torch.Tensor:
    """Tokens (B, T, H*W, C') -> folded (B*T, C', H, W) shaped like ``like``, in the policy's memory format."""
    bt, _, h, w = like.shape
    return tokens.reshape(bt, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=cond.policy.memory_format)


def time_positions(pos_embed: str, tokens: torch.Tensor) -> torch.Tensor | None:
    """The (1, T, 1, C) positional encoding of (B, T, S, C) ``tokens`` (None for ``pos_embed="none"``)."""
    if pos_embed != "sinusoidal":
        return None
    _, frames, _, dim = tokens.shape
    return sinusoidal_positions(frames, dim, device=tokens.device).to(tokens.dtype)[None, :, None, :]


def attend_over_time(y: torch.Tensor, qkv: nn.Linear, out: nn.Linear, heads: int, positions: torch.Tensor | None,
                     cond: Cond) -> torch.Tensor:
    """``out(attention over T(qkv(y + positions)))`` of normed tokens ``y`` (B, T, S, C): the op
    ``stunet.kernels.temporal_attention`` (its ``temporal_attention_ref`` is the math) on the packed q|k|v."""
    if positions is not None:
        y = y + positions
    attend = kernels.temporal_attention if cond.policy.kernels else temporal_attention_ref
    return out(attend(qkv(y), heads))


class TemporalAttentionBlock(TemporalModule):
    """Self-attention over the T frames at every (b, h, w), then an MLP; pre-norm, residual.

    Works in the token layout (B, T, H*W, C): for a channels-last trunk every step is a view or a GEMM, and
    the attention op (``stunet.kernels.temporal_attention``; its ``temporal_attention_ref`` is the math) reads
    q, k, v straight from the packed projection. The optional sinusoidal positional encoding is added to the
    normed input of attention. ``attn_out`` and ``mlp_out`` are zero-initialised, so a fresh block is the
    identity.
    """

    def __init__(self, ch: int, heads: int, pos_embed: str = "sinusoidal", mlp_ratio: int = 4, ff: str = "gelu"):
        super().__init__()
        self.heads, self.pos_embed, self.ff = heads, pos_embed, ff
        self.norm1 = LayerNorm32(ch)
        self.qkv = nn.Linear(ch, 3 * ch, bias=False)  # packed q|k|v, what the fused kernel reads
        self.attn_out = nn.Linear(ch, ch)
        self.norm2 = LayerNorm32(ch)
        self.mlp_in, self.mlp_out = feed_forward_layers(ch, mlp_ratio, ff)
        for layer in (self.attn_out, self.mlp_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        tokens = to_tokens(x, cond.batch)
        positions = time_positions(self.pos_embed, tokens)
        tokens = tokens + attend_over_time(self.norm1(tokens), self.qkv, self.attn_out, self.heads, positions, cond)
        tokens = tokens + feed_forward(self.norm2(tokens), self.mlp_in, self.mlp_out, self.ff)
        return from_tokens(tokens, x, cond)

    def flops(self, shape: Shape, text_len: int) -> int:
        B, T, H, W = shape
        tokens, c = B * T * H * W, self.attn_out.in_features
        total = sum(linear_flops(m, tokens) for m in (self.qkv, self.attn_out, self.mlp_in, self.mlp_out))
        return total + attention_flops(B * H * W, T, T, c)


class TemporalDown(TemporalModule):
    """T -> T/2 by a stride-2 Conv1d over time (k=3, pad 1); identity-init picks frames 0, 2, 4, ..."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = TemporalConv(ch, ch, kernel=3, stride=2)
        self.conv.init_identity()

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.conv(x, cond.batch)

    def out_shape(self, shape: Shape) -> Shape:
        B, T, H, W = shape
        return B, (T + 1) // 2, H, W

    def flops(self, shape: Shape, text_len: int) -> int:
        return self.conv.flops(shape)


class TemporalUp(TemporalModule):
    """T -> 2T: duplicate every frame, then Conv1d over time (k=3) identity-init (nearest neighbour at init)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = TemporalConv(ch, ch, kernel=3)
        self.conv.init_identity()

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        # The kernel path folds the duplication into the conv: the doubled tensor is never materialised.
        up = kernels.temporal_up_conv if cond.policy.kernels else temporal_up_conv_ref
        return from_clips(up(to_clips(x, cond.batch), self.conv.weight, self.conv.bias))

    def out_shape(self, shape: Shape) -> Shape:
        B, T, H, W = shape
        return B, 2 * T, H, W

    def flops(self, shape: Shape, text_len: int) -> int:
        return self.conv.flops(self.out_shape(shape))


class TemporalConvStack(TemporalModule):
    """ModelScope's temporal conv (diffusers' ``TemporalConvLayer``): ``x + conv4(...conv1(x))`` where each
    ``conv_i`` is GroupNorm (over the whole clip), SiLU, Conv1d over time (k=3, pad 1). ``convs[3]`` is
    zero-initialised, so a fresh stack is the identity."""

    def __init__(self, ch: int, groups: int, eps: float = 1e-5, layers: int = 4):
        super().__init__()
        self.norms = nn.ModuleList([VideoGroupNorm(groups, ch, "clip", eps) for _ in range(layers)])
        self.convs = nn.ModuleList([TemporalConv(ch, ch, kernel=3) for _ in range(layers)])
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        h = x
        for norm, conv in zip(self.norms, self.convs):
            h = conv(norm(h, cond, silu=True), cond.batch)
        return x + h

    def flops(self, shape: Shape, text_len: int) -> int:
        return sum(conv.flops(shape) for conv in self.convs)


class TemporalTransformer(TemporalModule):
    """The diffusers video U-Nets' temporal transformer (ModelScope's ``TransformerTemporalModel``, AnimateDiff's
    motion module), one transformer block deep:

    GN (over the whole clip) -> proj_in (C -> inner) -> [LN -> self-attn over T] x 2 -> [LN -> feed-forward]
    -> proj_out (inner -> C), plus the input. The positional encoding, if any, is added to the normed input of
    both attentions. Attention runs on the packed q|k|v as in :class:`TemporalAttentionBlock`. ``proj_out`` is
    zero-initialised, so a fresh module is the identity.
    """

    def __init__(self, ch: int, heads: int, head_dim: int, groups: int, *, pos_embed: str = "none",
                 ff: str = "geglu", mlp_ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.pos_embed, self.ff = heads, pos_embed, ff
        self.norm = VideoGroupNorm(groups, ch, "clip", eps)
        self.proj_in = nn.Linear(ch, inner)
        self.norm1 = LayerNorm32(inner)
        self.qkv1 = nn.Linear(inner, 3 * inner, bias=False)
        self.attn_out1 = nn.Linear(inner, inner)
        self.norm2 = LayerNorm32(inner)
        self.qkv2 = nn.Linear(inner, 3 * inner, bias=False)
        self.attn_out2 = nn.Linear(inner, inner)
        self.norm3 = LayerNorm32(inner)
        self.mlp_in, self.mlp_out = feed_forward_layers(inner, mlp_ratio, ff)
        self.proj_out = nn.Linear(inner, ch)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        h = self.proj_in(to_tokens(self.norm(x, cond), cond.batch))  # (B, T, S, inner)
        positions = time_positions(self.pos_embed, h)  # one table for both attentions
        h = h + attend_over_time(self.norm1(h), self.qkv1, self.attn_out1, self.heads, positions, cond)
        h = h + attend_over_time(self.norm2(h), self.qkv2, self.attn_out2, self.heads, positions, cond)
        h = h + feed_forward(self.norm3(h), self.mlp_in, self.mlp_out, self.ff)
        return x + from_tokens(self.proj_out(h), x, cond)

    def flops(self, shape: Shape, text_len: int) -> int:
        B, T, H, W = shape
        tokens, inner = B * T * H * W, self.proj_in.out_features
        total = sum(linear_flops(m, tokens) for m in (self.proj_in, self.qkv1, self.attn_out1, self.qkv2,
                                                        self.attn_out2, self.mlp_in, self.mlp_out, self.proj_out))
        return total + 2 * attention_flops(B * H * W, T, T, inner)
