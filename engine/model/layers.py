"""Spatial building blocks of the STUNet trunk: the pretrained text-to-image U-Net, applied frame by frame.

Layout legend (used by every module of ``stunet.model``):

- video layout ``(B, C, T, H, W)``: what the user passes and gets back;
- folded layout ``(B*T, C, H, W)``: frames folded into the batch, frame-major within each clip
  (row ``b*T + t`` is frame ``t`` of clip ``b``). Every block takes and returns the folded layout and reads the
  clip count ``B`` from the shared :class:`Cond`, so ``T = x.shape[0] // B`` is never passed around. Its memory
  is NCHW, or (B*T, H, W, C) under a channels-last :class:`ExecutionPolicy`;
- video view ``(B, C, T, H, W)`` of the folded layout (:func:`to_clips`): a transposed view, no copy. The ops of
  ``stunet.kernels`` take it, so a channels-last trunk is a channels-last-3d video.

Each op whose fast path is a kernel calls the kernel module's ``*_ref`` (the op's one definition) or the kernel
itself, chosen by ``cond.policy.kernels`` at that single call.

Every block also has ``flops(shape, text_len)``: the analytic count of its multiply-adds x 2 (convolutions,
linear layers and attention matmuls; norms and element-wise ops are not counted, as in
``torch.utils.flop_counter``), and ``out_shape(shape)``, for ``shape = (B, T, H, W)`` of its input.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import group_norm_ref
from .policy import ExecutionPolicy

Shape = tuple[int, int, int, int]  # (B, T, H, W) of a block's input


@dataclass
class Cond:
    """What every frame shares (the clip count, the timestep embedding, the text tokens: never copied T times),
    and how this forward executes (``policy``). The policy has no default on purpose: a dataclass default is a
    constant of the generated ``__init__``, which torch.compile (2.11) cannot wrap, and it breaks the graph there."""

    batch: int
    emb: torch.Tensor  # (B, E)
    text: torch.Tensor  # (B, L, D_text)
    text_mask: torch.Tensor | None  # (B, L) bool, True = attend; None = every token
    policy: ExecutionPolicy

    def cross_kv(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (B, L, C): ``layer(text)`` split in two, kept in the policy's text K/V store if any."""
        store = self.policy.text_kv
        if store is None:
            return layer(self.text).chunk(2, dim=-1)
        kv = store.for_text(self.text)
        if layer not in kv:
            kv[layer] = layer(self.text).chunk(2, dim=-1)
        return kv[layer]


def to_clips(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Folded (B*T, C, H, W) -> video view (B, C, T, H, W) (a view-permute, no copy)."""
    bt, c, h, w = x.shape
    return x.view(batch, bt // batch, c, h, w).transpose(1, 2)


def from_clips(x: torch.Tensor) -> torch.Tensor:
    """Video (B, C, T, H, W) -> folded (B*T, C, H, W) (a view when ``x`` is a video view of a folded tensor)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, *, flip_sin_to_cos: bool = True,
                       freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` (N,) -> (N, dim), in fp32: cos then sin
    (``flip_sin_to_cos``) or sin then cos, of frequencies ``exp(-log(max_period) * i / (dim // 2 - freq_shift))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    parts = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts if flip_sin_to_cos else parts[::-1], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Block(nn.Module, abc.ABC):
    """A block of the folded trunk: ``forward(x, cond)``; shape-preserving unless it says otherwise."""

    def out_shape(self, shape: Shape) -> Shape:
        return shape

    def out_channels(self, in_channels: int) -> int:
        return in_channels

    @abc.abstractmethod
    def flops(self, shape: Shape, text_len: int) -> int:
        """Analytic FLOPs of one forward on an input of ``shape`` (B, T, H, W)."""


def conv2d_flops(conv: nn.Conv2d, n: int, h_out: int, w_out: int) -> int:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * n * h_out * w_out * conv.out_channels * conv.in_channels * k


def linear_flops(layer: nn.Linear, tokens: int) -> int:
    return 2 * tokens * layer.in_features * layer.out_features


class VideoGroupNorm(nn.GroupNorm):
    """GroupNorm on the folded layout (statistics in fp32), optionally of ``x + input_bias`` and followed by
    SiLU: the op ``stunet.kernels.group_norm`` (its ``group_norm_ref`` is the math).

    ``scope="frame"``: statistics per frame (norms never mix frames; what a per-frame T2I U-Net computes).
    ``scope="clip"``: statistics over all T frames of a clip.
    """

    def __init__(self, num_groups: int, num_channels: int, scope: str = "frame", eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.scope = scope

    def forward(self, x: torch.Tensor, cond: Cond, *, silu: bool = False,
                input_bias: torch.Tensor | None = None) -> torch.Tensor:
        norm = kernels.group_norm if cond.policy.kernels else group_norm_ref
        y = norm(to_clips(x, cond.batch), self.num_groups, self.weight, self.bias, self.eps, scope=self.scope,
                 silu=silu, input_bias=input_bias)
        return from_clips(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scope={self.scope}"


class LayerNorm32(nn.LayerNorm):
    """LayerNorm with statistics in fp32 (matches the fp32 reference when run in fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def feed_forward(x: torch.Tensor, mlp_in: nn.Linear, mlp_out: nn.Linear, kind: str) -> torch.Tensor:
    """The attention blocks' MLP: ``mlp_out(gelu(mlp_in(x)))``, or with "geglu" ``mlp_out(a * gelu(g))`` where
    ``a, g = mlp_in(x).chunk(2)`` (``mlp_in`` is then twice as wide). ``mlp_in``'s output is released before
    ``mlp_out`` allocates: the activation is its own call."""
    return mlp_out(_activation(mlp_in(x), kind))


def _activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "geglu":
        value, gate = h.chunk(2, dim=-1)
        return value * F.gelu(gate)
    return F.gelu(h)


def feed_forward_layers(dim: int, ratio: int, kind: str) -> tuple[nn.Linear, nn.Linear]:
    """(mlp_in, mlp_out) of a :func:`feed_forward` of hidden width ``ratio * dim``."""
    hidden = ratio * dim
    return nn.Linear(dim, 2 * hidden if kind == "geglu" else hidden), nn.Linear(hidden, dim)


def attention_flops(n: int, q_len: int, kv_len: int, dim: int) -> int:
    """QK^T and PV of ``n`` independent attentions (heads folded into ``dim``)."""
    return 2 * 2 * n * q_len * kv_len * dim


class ResBlock(Block):
    """Spatial ResBlock: GN-SiLU-conv3x3, + timestep embedding (broadcast over frames), GN-SiLU-conv3x3, skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, scope: str, eps: float = 1e-5):
        super().__init__()
        self.norm1 = VideoGroupNorm(groups, in_ch, scope, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = VideoGroupNorm(groups, out_ch, scope, eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def out_channels(self, in_channels: int) -> int:
        return self.conv2.out_channels

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        h = self.conv1(self.norm1(x, cond, silu=True))
        # The (B, C) timestep embedding is shared by the T frames of each clip: added inside the norm's
        # statistics and normalisation (fused by the kernel), never broadcast into a T-fold copy.
        emb = self.emb_proj(F.silu(cond.emb))
        h = self.conv2(self.norm2(h, cond, silu=True, input_bias=emb))
        return self.skip(x) + h

    def flops(self, shape: Shape, text_len: int) -> int:
        B, T, H, W = shape
        n = B * T
        total = conv2d_flops(self.conv1, n, H, W) + conv2d_flops(self.conv2, n, H, W)
        total += linear_flops(self.emb_proj, B)
        if isinstance(self.skip, nn.Conv2d):
            total += conv2d_flops(self.skip, n, H, W)
        return total


class SpatialAttention(Block):
    """Per-frame transformer block: self-attention over H*W, cross-attention to the text tokens, MLP.

    GN -> proj_in -> [LN -> self-attn] -> [LN -> cross-attn(text)] -> [LN -> MLP] -> proj_out, residual.
    Cross-attention keys and values come from the (B, L) text once per clip; the T*H*W queries of a clip
    attend to them in one call (frames folded into the query length, not the batch). This is the Stable
    Diffusion family's Transformer2DModel with one BasicTransformerBlock (``ff="geglu"``, ``eps=1e-6``).
    """

    def __init__(self, ch: int, heads: int, text_dim: int, groups: int, scope: str, mlp_ratio: int = 4,
                 ff: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.heads, self.ff = heads, ff
        self.norm = VideoGroupNorm(groups, ch, scope, eps)
        self.proj_in = nn.Linear(ch, ch)
        self.norm1 = LayerNorm32(ch)
        self.qkv = nn.Linear(ch, 3 * ch, bias=False)
        self.attn_out = nn.Linear(ch, ch)
        self.norm2 = LayerNorm32(ch)
        self.cross_q = nn.Linear(ch, ch, bias=False)
        self.cross_kv = nn.Linear(text_dim, 2 * ch, bias=False)
        self.cross_out = nn.Linear(ch, ch)
        self.norm3 = LayerNorm32(ch)
        self.mlp_in, self.mlp_out = feed_forward_layers(ch, mlp_ratio, ff)
        self.proj_out = nn.Linear(ch, ch)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (N, S, C) -> (N, heads, S, C/heads)
        n, s, c = t.shape
        return t.view(n, s, self.heads, c // self.heads).transpose(1, 2)

    @staticmethod
    def _merge(t: torch.Tensor) -> torch.Tensor:  # (N, heads, S, d) -> (N, S, heads*d)
        n, h, s, d = t.shape
        return t.transpose(1, 2).reshape(n, s, h * d)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        # Each sublayer's intermediates live in its own call: released before the next sublayer allocates.
        bt, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x, cond).flatten(2).transpose(1, 2))  # (B*T, H*W, C)
        h = h + self._self_attention(h)
        h = h + self._cross_attention(h, cond)
        h = h + feed_forward(self.norm3(h), self.mlp_in, self.mlp_out, self.ff)
        h = self.proj_out(h)
        return x + h.transpose(1, 2).reshape(bt, c, hh, ww)

    def _self_attention(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        return self.attn_out(self._merge(a))

    def _cross_attention(self, h: torch.Tensor, cond: Cond) -> torch.Tensor:
        bt, hw, c = h.shape
        q = self.cross_q(self.norm2(h)).reshape(cond.batch, -1, c)  # (B, T*H*W, C): frames share the clip's text
        k, v = cond.cross_kv(self.cross_kv)  # (B, L, C), once per generation when the backend caches them
        mask = None if cond.text_mask is None else cond.text_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), attn_mask=mask)
        return self.cross_out(self._merge(a)).reshape(bt, hw, c)

    def flops(self, shape: Shape, text_len: int) -> int:
        B, T, H, W = shape
        tokens, c = B * T * H * W, self.proj_in.in_features
        total = sum(linear_flops(m, tokens) for m in (self.proj_in, self.qkv, self.attn_out, self.cross_q,
                                                        self.cross_out, self.mlp_in, self.mlp_out, self.proj_out))
        total += linear_flops(self.cross_kv, B * text_len)
        total += attention_flops(B * T, H * W, H * W, c)
        total += attention_flops(B, T * H * W, text_len, c)
        return total


class ConvIn(Block):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def out_channels(self, in_channels: int) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.conv(x)

    def flops(self, shape: Shape, text_len: int) -> int:
        B, T, H, W = shape
        return conv2d_flops(self.conv, B * T, H, W)


class Downsample(Block):
    """Spatial 2x downsample: conv3x3, stride 2 (per frame)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.conv(x)

    def out_shape(self, shape: Shape) -> Shape:
        B, T, H, W = shape
        return B, T, H // 2, W // 2

    def flops(self, shape: Shape, text_len: int) -> int:
        B, T, H, W = shape
        return conv2d_flops(self.conv, B * T, H // 2, W // 2)


class Upsample(Block):
    """Spatial 2x upsample: nearest neighbour, then conv3x3 (per frame)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def out_shape(self, shape: Shape) -> Shape:
        B, T, H, W = shape
        return B, T, 2 * H, 2 * W

    def flops(self, shape: Shape, text_len: int) -> int:
        B, T, H, W = shape
        return conv2d_flops(self.conv, B * T, 2 * H, 2 * W)


class OutHead(Block):
    """GN -> SiLU -> conv3x3 to the output channels."""

    def __init__(self, ch: int, out_ch: int, groups: int, scope: str, eps: float = 1e-5):
        super().__init__()
        self.norm = VideoGroupNorm(groups, ch, scope, eps)
        self.conv = nn.Conv2d(ch, out_ch, 3, padding=1)

    def out_channels(self, in_channels: int) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.conv(self.norm(x, cond, silu=True))

    def flops(self, shape: Shape, text_len: int) -> int:
        B, T, H, W = shape
        return conv2d_flops(self.conv, B * T, H, W)
