"""TemporalUp (T -> 2T: frame duplication, then a depth-3 temporal convolution) without the doubled tensor.

With W_k the taps and x the input frames, the output frames are

    y[2i]   = W0 x[i-1] + (W1 + W2) x[i]
    y[2i+1] = (W0 + W1) x[i] + W2 x[i+1]

(zero padding), i.e. two depth-2 convolutions of the original frames, interleaved: 4 tap-GEMMs where the
materialised path does 6, and half its input traffic. The GEMMs are cuDNN's (torch convolutions); only the
algebra is ours, so there is no Triton kernel here.

The model has no pooling to fuse: its spatial downsample is the pretrained strided 3x3 convolution and its
TemporalDown a strided temporal convolution (identity-initialised, i.e. frame selection), both GEMMs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for a channels-last (B, C, T, H, W) tensor, else contiguous_format."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def temporal_up_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Duplicate the frames of x (B, C, T, H, W), then convolve over time with weight (C_out, C_in, 3), zero
    padding 1: TemporalUp's semantics, (B, C_out, 2T, H, W) in x's memory format."""
    y = F.conv3d(x.repeat_interleave(2, dim=2), weight[:, :, :, None, None], bias, padding=(1, 0, 0))
    return y.contiguous(memory_format=memory_format(x))


def temporal_up_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same result with the duplication folded into two depth-2 convolutions (torch/cuDNN GEMMs)."""
    w0, w1, w2 = weight.unbind(-1)
    even_w = torch.stack([w0, w1 + w2], dim=-1)[:, :, :, None, None]  # taps on x[i-1], x[i]
    odd_w = torch.stack([w0 + w1, w2], dim=-1)[:, :, :, None, None]   # taps on x[i], x[i+1]
    even = F.conv3d(F.pad(x, (0, 0, 0, 0, 1, 0)), even_w, bias)
    odd = F.conv3d(F.pad(x, (0, 0, 0, 0, 0, 1)), odd_w, bias)
    B, C, T, H, W = even.shape
    return torch.stack([even, odd], dim=3).view(B, C, 2 * T, H, W).contiguous(memory_format=memory_format(x))
