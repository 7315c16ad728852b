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

import math
import numbers

import torch

from ..config import is_choice, shown
from . import _triton, resample
from .groupnorm import group_norm_ref
from .resample import temporal_up_conv_ref
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


def _parameter(name: str, t, shape: tuple[int, ...], form: str = "", optional: bool = False) -> None:
    """A parameter tensor (weight, bias, ...): of ``shape`` (``form``: its symbolic form, e.g. "(B, C)") and a
    real floating-point dtype (None too with ``optional``)."""
    if optional and t is None:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        given = tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t)
        raise ValueError(f"{name} must be a {form + ' = ' if form else ''}{shape} tensor, got {given}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _real(name: str, value, positive: bool = False) -> float:
    """A finite real number (> 0 with ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
            positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {shown(value)}")
    return float(value)


def temporal_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """Self-attention over frames at every (clip, pixel): qkv (B, T, S, 3C) packed [q | k | v] (any strides)
    -> (B, T, S, C) contiguous. ``bias``: optional additive (heads, T, T) fp32; ``scale`` default 1/sqrt(C/heads)."""
    _tensor("qkv", qkv, 4)
    B, T, S, C3 = qkv.shape
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive integer, got {shown(heads)}")
    if C3 % (3 * heads):
        raise ValueError(f"qkv's last dimension ({C3}) must be 3 * heads * head_dim; it is not divisible by "
                         f"3 * heads = {3 * heads}")
    if C3 == 0:
        raise ValueError("qkv's last dimension must be 3 * heads * head_dim with head_dim >= 1, got 0")
    _parameter("bias", bias, (heads, T, T), "(heads, T, T)", optional=True)
    if scale is not None:
        scale = _real("scale", scale)
    if qkv.numel() == 0:  # no clip, frame or pixel: nothing to attend over
        return qkv.new_empty(B, T, S, C3 // 3)
    if bias is not None:
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
        raise ValueError(f"num_groups must be a positive divisor of the channel count {C}, got {shown(num_groups)}")
    if not is_choice(scope, SCOPES):
        raise ValueError(f"scope must be one of {SCOPES}, got {shown(scope)}")
    _parameter("weight", weight, (C,))
    _parameter("bias", bias, (C,))
    _parameter("input_bias", input_bias, (B, C), "(B, C)", optional=True)
    eps = _real("eps", eps, positive=True)
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be True or False, got {shown(silu)}")
    _same_device(x, weight=weight, bias=bias, input_bias=input_bias)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _ops().group_norm(x, num_groups, weight, bias, eps, scope, silu, input_bias)


def temporal_up_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """TemporalUp on a video x (B, C, T, H, W): frame duplication then a depth-3 temporal convolution of
    ``weight`` (C_out, C, 3) and optional ``bias`` (C_out,), zero padding 1, without materialising the doubled
    video -> (B, C_out, 2T, H, W) in x's memory format."""
    _tensor("x", x, 5)
    B, C, T, H, W = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[1:] != (C, 3) or not weight.shape[0]:
        raise ValueError(f"weight must be a (C_out, C, 3) = (C_out, {C}, 3) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight!r}")
    _parameter("weight", weight, tuple(weight.shape))
    _parameter("bias", bias, (weight.shape[0],), "(C_out,)", optional=True)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"weight and bias must have x's dtype {x.dtype}, got {weight.dtype}"
                        f"{'' if bias is None else ' and ' + str(bias.dtype)}")
    _same_device(x, weight=weight, bias=bias)
    if x.numel() == 0:
        return x.new_empty(B, weight.shape[0], 2 * T, H, W)
    return resample.temporal_up_conv(x, weight, bias)


__all__ = ["temporal_attention", "group_norm", "temporal_up_conv", "temporal_attention_ref", "group_norm_ref",
           "temporal_up_conv_ref", "available", "unavailable_on", "SCOPES"]
