"""Input validation for ``STUNet.forward``, and for where models are loaded (``checked_placement``): every error
names the argument, what was given and the fix.

Validation runs before any computation, so a bad input never crashes deep inside a convolution.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import shown

if TYPE_CHECKING:
    from .unet import STUNet


def checked_placement(device, dtype=None) -> tuple[torch.device | None, torch.dtype | None]:
    """``device`` and ``dtype`` of a model to load (None: keep the file's), checked before any file is read: a
    device torch cannot parse or does not have, a dtype that is not a floating-point ``torch.dtype``."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a device such as 'cpu', 'cuda' or 'cuda:1', "
                             f"got {shown(device)}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
            raise ValueError(f"device={str(device)!r} but {why} (torch {torch.__version__}); use device='cpu'")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} does not exist: torch sees {torch.cuda.device_count()} CUDA "
                             "device(s), numbered from 0")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {shown(dtype)}")
    return device, dtype


def _as_batch_vector(name: str, value, batch: int, device: torch.device, upper: float) -> torch.Tensor:
    """A scalar or (B,) tensor of timesteps -> (B,) fp32 on ``device``, checked to lie in [0, upper]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a number or a tensor of shape ({batch},), got {type(value).__name__}")
    t = torch.as_tensor(value)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if t.dim() == 0:  # a real (B,) vector, not an expanded view: compiled callers see one layout, never re-trace
        t = t.expand(batch).clone(memory_format=torch.contiguous_format)
    elif t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},) (one per clip), got {tuple(t.shape)}")
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device} but the model is on {device}; move it with .to({str(device)!r})")
    if t.device.type == "cpu":  # checked on the host, before the move: on the GPU it would cost a sync
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
        if (t < 0).any() or (t > upper).any():
            raise ValueError(f"{name} must lie in [0, {upper:g}] (the training timesteps), "
                             f"got values in [{t.min().item():g}, {t.max().item():g}]")
    return t.to(device=device, dtype=torch.float32)


def _check_tensor_placement(name: str, t: torch.Tensor, model: "STUNet") -> None:
    if t.device != model.device:
        raise ValueError(f"{name} is on {t.device} but the model's weights are on {model.device}; "
                         f"move it with .to({str(model.device)!r}) or the model with model.to({str(t.device)!r})")
    if t.dtype != model.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the model's weights are {model.dtype}; "
                        f"cast it with .to({model.dtype}) or the model with model.to({t.dtype})")


def check_forward_inputs(model: "STUNet", x, timesteps, text_embeds, text_mask, noise_level, check_finite: bool,
                         *, temporal: bool = True):
    """The checked (x, t, text_embeds, text_mask, noise_level) for ``forward_checked``; raises on bad input.
    ``temporal=False`` (the per-frame U-Net) accepts any frame count."""
    cfg = model.config
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, T, H, W), got {type(x).__name__}")
    if x.dim() != 5:
        hint = " (add the frame axis: x[:, :, None] for a single image)" if x.dim() == 4 else ""
        raise ValueError(f"x must be 5-D (B, C, T, H, W), got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    B, C, T, H, W = x.shape
    if min(B, T, H, W) == 0:
        raise ValueError(f"x must not have an empty dimension, got shape {tuple(x.shape)}")
    if C != cfg.in_channels:
        from ..config import IN_CHANNELS

        raise ValueError(f"x has {C} channels but the model takes in_channels={cfg.in_channels} "
                         f"({IN_CHANNELS[cfg.in_channels]}); x must be (B, {cfg.in_channels}, T, H, W)")
    if temporal and T % cfg.frame_divisor:
        lo = max(cfg.frame_divisor, T // cfg.frame_divisor * cfg.frame_divisor)
        raise ValueError(f"x has T={T} frames, but the model halves time {cfg.num_temporal_downsamples} times, "
                         f"so T must be a multiple of {cfg.frame_divisor}; use e.g. T={lo} or "
                         f"{lo + cfg.frame_divisor}")
    if temporal and cfg.temporal_max_frames and T > cfg.temporal_max_frames:
        raise ValueError(f"x has T={T} frames, but the model's temporal positional encoding was trained for at "
                         f"most temporal_max_frames={cfg.temporal_max_frames}; generate at most "
                         f"{cfg.temporal_max_frames} frames (or longer videos in overlapping windows)")
    for name, size in (("H", H), ("W", W)):
        if size % cfg.spatial_divisor:
            raise ValueError(f"x has {name}={size}, but the model halves space {cfg.num_levels - 1} times, so "
                             f"{name} must be a multiple of {cfg.spatial_divisor}; resize or pad the input")
    _check_tensor_placement("x", x, model)

    if not isinstance(text_embeds, torch.Tensor):
        raise TypeError(f"text_embeds must be a torch.Tensor of shape (B, L, {cfg.text_dim}), "
                        f"got {type(text_embeds).__name__}")
    if text_embeds.dim() != 3:
        raise ValueError(f"text_embeds must be 3-D (B, L, text_dim), got shape {tuple(text_embeds.shape)}")
    if text_embeds.shape[2] != cfg.text_dim:
        raise ValueError(f"text_embeds has width {text_embeds.shape[2]} but the model's cross-attention takes "
                         f"text_dim={cfg.text_dim}; use the text encoder the model was trained with")
    if text_embeds.shape[0] != B:
        raise ValueError(f"text_embeds has batch {text_embeds.shape[0]} but x has batch {B}; pass one text "
                         f"sequence per clip (repeat it for a batch: text_embeds.expand({B}, -1, -1))")
    if text_embeds.shape[1] == 0:
        raise ValueError("text_embeds has no tokens (L=0); encode at least one token (an empty prompt still "
                         "gives the end-of-sequence token)")
    _check_tensor_placement("text_embeds", text_embeds, model)

    if text_mask is not None:
        if not isinstance(text_mask, torch.Tensor):
            raise TypeError(f"text_mask must be a tensor of shape (B, L) or None, got {type(text_mask).__name__}")
        if text_mask.shape != text_embeds.shape[:2]:
            raise ValueError(f"text_mask must have shape {tuple(text_embeds.shape[:2])} (B, L of text_embeds), "
                             f"got {tuple(text_mask.shape)}")
        if text_mask.is_floating_point() or text_mask.is_complex():
            raise TypeError(f"text_mask must be bool (True = attend) or an integer 0/1 tensor, got {text_mask.dtype}")
        if text_mask.device != x.device:
            raise ValueError(f"text_mask is on {text_mask.device} but x is on {x.device}")
        text_mask = text_mask.bool()
        if x.device.type == "cpu" and not text_mask.any(dim=1).all():
            rows = (~text_mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"text_mask masks every token of clip(s) {rows}; keep at least one token per clip")

    t = _as_batch_vector("timesteps", timesteps, B, x.device, cfg.num_train_timesteps)
    if cfg.noise_aug:
        noise_level = _as_batch_vector("noise_level", 0 if noise_level is None else noise_level, B, x.device,
                                       cfg.num_train_timesteps)
    elif noise_level is not None:
        raise ValueError("noise_level is only taken by SSR models (config.noise_aug=True); drop the argument")

    if check_finite:
        for name, tensor in (("x", x), ("text_embeds", text_embeds)):
            if not torch.isfinite(tensor).all():
                bad = (~torch.isfinite(tensor)).sum().item()
                raise ValueError(f"{name} contains {bad} NaN/inf value(s)")
    return x, t, text_embeds, text_mask, noise_level
