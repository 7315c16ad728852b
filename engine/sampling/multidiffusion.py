"""Temporal MultiDiffusion (Bar-Tal et al. 2023) for the SSR stage: overlapping windows, blended every step.

At each denoising step every window of ``window`` frames is denoised (windows batched into model calls), and
each frame's prediction is the weighted average of the windows that cover it:

    out[f] = sum_i w_i(f) * out_i[f - s_i] / sum_i w_i(f)

Blending the *model outputs* and then taking one global sampler step over the whole clip is exactly the
MultiDiffusion update for deterministic samplers (the sampler step is affine in the prediction, so averaging
predictions equals averaging per-window steps), and for stochastic samplers as long as the noise is one global
draw for the clip, which the pipeline does. Weights are uniform as in Lumiere, or linear ramps over the overlap.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import is_choice, shown

WEIGHTINGS = ("uniform", "ramp")


def window_plan(num_frames: int, window: int, overlap: int) -> list[int]:
    """Start frames of windows of length ``window`` overlapping by at least ``overlap`` frames.

    Windows advance by ``window - overlap``; the last window is clamped to end at the last frame (so it may
    overlap its neighbour by more). ``window >= num_frames`` gives a single window at 0.
    """
    for name, value in (("num_frames", num_frames), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {shown(value)}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be a non-negative integer, got {shown(overlap)}")
    if overlap >= window:
        raise ValueError(f"overlap ({overlap}) must be smaller than window ({window}): windows must advance")
    if window >= num_frames:
        return [0]
    stride = window - overlap
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


def window_weights(num_frames: int, starts: list[int], window: int, weighting: str = "uniform") -> torch.Tensor:
    """(len(starts), window) per-window frame weights, normalised so every frame's weights sum to one.

    "uniform": every covering window counts equally (Lumiere). "ramp": a window's weight rises linearly over
    its first frames and falls over its last ones (1, 2, ... up to the centre), so each window fades into its
    neighbour across the overlap; frames covered by one window keep weight one.
    """
    if not is_choice(weighting, WEIGHTINGS):
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {shown(weighting)}")
    length = min(window, num_frames)
    if weighting == "uniform":
        raw = torch.ones(length, dtype=torch.float64)
    else:
        k = torch.arange(length, dtype=torch.float64)
        raw = torch.minimum(k + 1, length - k)
    per_window = raw.expand(len(starts), length).clone()
    total = torch.zeros(num_frames, dtype=torch.float64)
    for i, s in enumerate(starts):
        total[s:s + length] += per_window[i]
    if (total == 0).any():
        raise ValueError(f"windows {starts} of length {length} do not cover all {num_frames} frames")
    for i, s in enumerate(starts):
        per_window[i] /= total[s:s + length]
    return per_window


def blend(outputs: list[torch.Tensor], starts: list[int], weights: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Weighted sum of window outputs (each (B, C, W, H, W')) into the clip (B, C, T, H, W'), fp32."""
    first = outputs[0]
    b, c, _, h, w = first.shape
    out = torch.zeros(b, c, num_frames, h, w, dtype=torch.float32, device=first.device)
    for o, s, wt in zip(outputs, starts, weights):
        out[:, :, s:s + o.shape[2]] += o.float() * wt.to(out.device, torch.float32)[None, None, :, None, None]
    return out


def multidiffusion_predict(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: int,
                           overlap: int, batch_size: int = 4, weighting: str = "uniform",
                           blender: Callable | None = None, mapper: Callable | None = None) -> torch.Tensor:
    """Blend the predictions of ``predict`` on the temporal windows of ``x`` (B, C, T, H, W).

    ``predict`` maps k windows of the clips, stacked window-major as (k*B, C, W, H, W'), to predictions
    (k*R, C_out, W, H, W'), R rows per window in window order (R = B, or 2B for a [cond; uncond] pair per
    window); up to ``batch_size`` windows go into one call. Returns the blended (R, C_out, T, H, W').
    ``blender``: ``runtime.blend_windows`` (the C++ runtime's one-pass blend, same result bit for bit) or
    None for :func:`blend` here. ``mapper`` runs the list of window calls and returns their outputs in order
    (default: one after the other here; ``stunet.distributed.Parallel.map`` shares them among ranks). The result
    has the dtype of ``x``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {shown(batch_size)}")
    T = x.shape[2]
    starts = window_plan(T, window, overlap)
    weights = window_weights(T, starts, window, weighting)
    length = min(window, T)
    chunks = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]

    def call(chunk: list[int]) -> Callable[[], torch.Tensor]:
        return lambda: predict(torch.cat([x[:, :, s:s + length] for s in chunk], dim=0))

    calls = [call(chunk) for chunk in chunks]
    preds = mapper(calls) if mapper is not None else [c() for c in calls]
    for out, chunk in zip(preds, chunks):
        if out.shape[0] % len(chunk):
            raise ValueError(f"predict returned {out.shape[0]} rows for {len(chunk)} windows; it must return "
                             "the same number of rows for every window")
    if blender is not None:  # all windows as one (N, R, ...) tensor: no copy when one call made them all
        stacked = (preds[0] if len(preds) == 1 else torch.cat(preds)).contiguous()
        stacked = stacked.view(len(starts), -1, *stacked.shape[1:])
        return blender(stacked, T, window, overlap, weighting, x.dtype)
    rows = preds[0].shape[0] // min(batch_size, len(starts))
    outputs = [o for p in preds for o in p.split(rows, dim=0)]
    return blend(outputs, starts, weights, T).to(x.dtype)
