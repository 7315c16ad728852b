"""stunet.kernels: Triton kernels for the video U-Net's memory-bound ops, each beside its reference math.

    from stunet import kernels
    out = kernels.temporal_attention(qkv, heads)          # (B, T, S, 3C) -> (B, T, S, C)
    y = kernels.group_norm(x, 32, w, b, silu=True)        # (B, C, T, H, W), per-frame statistics
    y = kernels.avg_pool_video(x, (2, 2, 2)); y = kernels.upsample_frames(x)
    y = kernels.temporal_up_conv(x, weight, bias)         # frame duplication folded into the k=3 conv

These functions check their arguments (errors name the argument and the fix) and call the
``torch.ops.stunet.*`` custom ops registered in ``ops``, which pick the Triton kernel or the ``*_ref`` math.
Layout legend: B clips, C channels, T frames, H x W pixels (S = H * W); a "video" is (B, C, T, H, W) in
NCDHW or channels-last-3d memory format.
"""
from __future__ import annotations

import torch

from . import _triton
from .groupnorm import group_norm_ref
from .resample import avg_pool_video_ref, temporal_up_conv, temporal_up_conv_ref, upsample_frames_ref
from .temporal_attn import temporal_attention_ref

SCOPES = ("frame", "clip")
POOL_KERNELS = ((2, 2, 2), (2, 1, 1), (1, 2, 2))
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _ops():
    from . import ops  # registers torch.ops.stunet.* on first use

    return ops


def available() -> str | None:
    """None when the Triton kernels can run here, else why not."""
    return None if _triton.triton is not None else f"Triton is unavailable ({_triton.IMPORT_ERROR})"


def _tensor(name: str, t, dims: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def _same_device(x: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move it with .to()")


def temporal_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """Self-attention over frames at every (clip, pixel): qkv (B, T, S, 3C) packed [q | k | v] (any strides)
    -> (B, T, S, C) contiguous. ``bias``: optional additive (heads, T, T) fp32; ``scale`` default 1/sqrt(C/heads)."""
    _tensor("qkv", qkv, 4)
    B, T, S, C3 = qkv.shape
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive integer, got {heads!r}")
    if C3 % (3 * heads):
        raise ValueError(f"qkv's last dimension ({C3}) must be 3 * heads * head_dim; it is not divisible by "
                         f"3 * heads = {3 * heads}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (heads, T, T):
            raise ValueError(f"bias must be a (heads, T, T) = {(heads, T, T)} tensor, got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        _same_device(qkv, bias=bias)
        bias = bias.float().contiguous()
    return _ops().temporal_attention(qkv, heads, bias, scale)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
               scope: str = "frame", silu: bool = False, residual: torch.Tensor | None = None,
               scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm of a video x (B, C, T, H, W) with statistics per frame or per clip (``scope``), then optional
    ``y * (1 + scale) + shift`` (each (B, C)), SiLU and ``+ residual`` (x's shape); x's memory format."""
    _tensor("x", x, 5)
    B, C = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the channel count {C}, got {num_groups!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or p.shape != (C,):
            raise ValueError(f"{name} must be a ({C},) tensor, got {tuple(getattr(p, 'shape', ()))}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift go together: pass both or neither")
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None and p.shape != (B, C):
            raise ValueError(f"{name} must be (B, C) = {(B, C)}, got {tuple(p.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    _same_device(x, weight=weight, bias=bias, residual=residual, scale=scale, shift=shift)
    return _ops().group_norm(x, num_groups, weight, bias, float(eps), scope, bool(silu), residual, scale, shift)


def avg_pool_video(x: torch.Tensor, kernel: tuple[int, int, int] = (2, 2, 2)) -> torch.Tensor:
    """Average pooling with kernel = stride ``kernel`` = (kt, kh, kw) of a video (B, C, T, H, W); sizes that do
    not divide are floored (as ``F.avg_pool3d``). The output keeps x's memory format."""
    _tensor("x", x, 5)
    if len(kernel) != 3 or not all(isinstance(k, int) and k >= 1 for k in kernel):
        raise ValueError(f"kernel must be three positive integers (kt, kh, kw), got {kernel!r}")
    for name, size, k in zip(("T", "H", "W"), x.shape[2:], kernel):
        if size < k:
            raise ValueError(f"x has {name} = {size}, smaller than the pooling kernel's {k}")
    return _ops().avg_pool_video(x, *kernel)


def upsample_frames(x: torch.Tensor) -> torch.Tensor:
    """T -> 2T by frame duplication (nearest neighbour in time) of a video (B, C, T, H, W)."""
    _tensor("x", x, 5)
    return _ops().upsample_frames(x)


__all__ = ["temporal_attention", "group_norm", "avg_pool_video", "upsample_frames", "temporal_up_conv",
           "temporal_attention_ref", "group_norm_ref", "avg_pool_video_ref", "upsample_frames_ref",
           "temporal_up_conv_ref", "available", "SCOPES", "POOL_KERNELS"]
