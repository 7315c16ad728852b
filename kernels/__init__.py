"""stunet.kernels: Triton kernels for the video U-Net's memory-bound ops, each beside its reference math.

    from stunet import kernels
    out = kernels.temporal_attention(qkv, heads)          # (B, T, S, 3C) -> (B, T, S, C)
    y = kernels.group_norm(x, 32, w, b, silu=True)        # (B, C, T, H, W), per-frame statistics
    y = kernels.temporal_up_conv(x, weight, bias)         # frame duplication folded into the k=3 conv

These functions check their arguments (errors name the argument and the fix) and call the
``torch.ops.stunet.*`` custom ops registered in ``ops``, which pick the Triton kernel or the ``*_ref`` math.
Each ``*_ref`` is the op's semantics and the reference model's math (``stunet.model`` calls it), so an op's
meaning lives in one function.
Layout legend: B clips, C channels, T frames, H x W pixels (S = H * W); a "video" is (B, C, T, H, W) in
NCDHW or channels-last-3d memory format.
"""
from __future__ import annotations

import torch

from . import _triton
from .groupnorm import group_norm_ref
from .resample import temporal_up_conv, temporal_up_conv_ref
from .temporal_attn import temporal_attention_ref

SCOPES = ("frame", "clip")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _ops():
    from . import ops  # registers torch.ops.stunet.* on first use

    return ops


def available() -> str | None:
    """None when Triton is importable, else why not (see :func:`unavailable_on` for a device)."""
    return None if _triton.triton is not None else f"Triton is unavailable ({_triton.IMPORT_ERROR})"


def unavailable_on(device: torch.device | str) -> str | None:
    """None when the Triton kernels run on ``device``, else why not (then every op runs its ``*_ref`` math)."""
    return _ops().device_reason(torch.device(device))


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
               scope: str = "frame", silu: bool = False, input_bias: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm of a video x (B, C, T, H, W) with statistics per frame or per clip (``scope``) of
    ``x + input_bias`` (optional (B, C): a per-clip channel bias, added before the statistics), then SiLU if
    ``silu``. The output has x's strides."""
    _tensor("x", x, 5)
    B, C = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the channel count {C}, got {num_groups!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or p.shape != (C,):
            raise ValueError(f"{name} must be a ({C},) tensor, got {tuple(getattr(p, 'shape', ()))}")
    if input_bias is not None and (not isinstance(input_bias, torch.Tensor) or input_bias.shape != (B, C)):
        raise ValueError(f"input_bias must be a (B, C) = {(B, C)} tensor, got "
                         f"{tuple(getattr(input_bias, 'shape', ()))}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    _same_device(x, weight=weight, bias=bias, input_bias=input_bias)
    return _ops().group_norm(x, num_groups, weight, bias, float(eps), scope, bool(silu), input_bias)


__all__ = ["temporal_attention", "group_norm", "temporal_up_conv", "temporal_attention_ref", "group_norm_ref",
           "temporal_up_conv_ref", "available", "unavailable_on", "SCOPES"]
