"""Conditioning of 7-channel models: input = concat(noisy video, C, M) with C = M * source, M = 1 where known.

=================  ====================================  =================================================
mode               source video                          mask M (B, 1, T, H, W)
=================  ====================================  =================================================
image_to_video     the image on frame 0 (zeros elsewhere)  1 on frame 0, 0 elsewhere
inpaint            the input video                       0 inside the region (on every frame), 1 outside
cinemagraph        the image on every frame              1 on frame 0; elsewhere 1 outside the region
text-to-video      zeros                                 zeros
=================  ====================================  =================================================

Images and videos are given as frames in [0, 1] ((H, W, 3) / (F, H, W, 3), optionally with a leading batch);
C is in model space [-1, 1] and exactly zero wherever M is zero.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import check_size, check_volume

MODES = ("text_to_video", "image_to_video", "inpaint", "cinemagraph")


def _check_frames(num_frames: int, height: int, width: int) -> None:
    check_size("num_frames", num_frames, 1)
    check_volume(num_frames=num_frames, height=height, width=width)


def _tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be an array (numpy or torch), got the path {str(value)!r}: read the file "
                        "first with stunet.read_frames")
    if isinstance(value, torch.Tensor):
        t = value
    else:
        array = np.asarray(value)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise TypeError(f"{name} must be an array of numbers, got {type(value).__name__} of dtype {array.dtype}")
        t = torch.as_tensor(array)
    if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.bool)):
        raise TypeError(f"{name} must be floats in [0, 1] (or uint8 / bool), got dtype {t.dtype}")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"{name} must hold values in [0, 1], got [{t.min().item():.3g}, {t.max().item():.3g}]")
    return t


def _rgb(value, name: str, layout: str) -> torch.Tensor:
    """RGB frames in [0, 1] of ``layout`` ("(H, W, 3)" or "(F, H, W, 3)"), optionally batched, -> channels at
    axis 1 in model space [-1, 1]: (B, 3, H, W) or (B, 3, F, H, W)."""
    t = _tensor(value, name)
    dims = layout.count(",") + 1
    if t.dim() == dims:
        t = t[None]
    if t.dim() != dims + 1 or t.shape[-1] != 3:
        raise ValueError(f"{name} must be {layout} or (B, {layout[1:]} RGB in [0, 1], got shape {tuple(t.shape)}")
    return t.movedim(-1, 1) * 2 - 1


def _image(image, name: str = "image") -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) in [0, 1] -> (B, 3, H, W) in [-1, 1]."""
    return _rgb(image, name, "(H, W, 3)")


def _region(region, batch: int, frames: int, height: int, width: int, name: str = "region") -> torch.Tensor:
    """A 0/1 region ((H, W), (F, H, W), (B, H, W) or (B, F, H, W)) -> (B, 1, T, H, W), 1 = inside."""
    r = _tensor(region, name)
    if r.dim() == 2:
        r = r[None, None]
    elif r.dim() == 3:
        r = r[None] if r.shape[0] == frames and frames != batch else r[:, None]
    if r.dim() != 4 or r.shape[-2:] != (height, width):
        raise ValueError(f"{name} must be (H, W), (F, H, W) or (B, F, H, W) with H, W = {height}, {width}, "
                         f"got shape {tuple(region.shape if hasattr(region, 'shape') else r.shape)}")
    if not torch.all((r == 0) | (r == 1)):
        raise ValueError(f"{name} must be binary (0 outside, 1 inside)")
    return r.expand(batch, frames, height, width)[:, None].clone()


def video_frames(video, name: str = "video") -> torch.Tensor:
    """(F, H, W, 3) or (B, F, H, W, 3) frames in [0, 1] -> (B, 3, F, H, W) in model space [-1, 1]."""
    return _rgb(video, name, "(F, H, W, 3)")


def _resize(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, F, h, w) -> (B, C, F, height, width) in fp32: each frame resized bilinearly, antialiased when it
    shrinks."""
    B, C, T, h, w = video.shape
    folded = video.float().transpose(1, 2).reshape(B * T, C, h, w)
    resized = F.interpolate(folded, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(B, T, C, height, width).transpose(1, 2)


def resize_frames(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 3, F, h, w) in [-1, 1] -> (B, 3, F, height, width) in [-1, 1] (see ``_resize``)."""
    return _resize(video, height, width).clamp(-1, 1)


@dataclass
class Conditioning:
    video: torch.Tensor  # C: (B, 3, T, H, W) in [-1, 1], zero where M = 0
    mask: torch.Tensor  # M: (B, 1, T, H, W), 1 = known content
    mode: str = "text_to_video"

    @staticmethod
    def _build(source: torch.Tensor, mask: torch.Tensor, mode: str) -> "Conditioning":
        return Conditioning(video=source * mask, mask=mask, mode=mode)

    @classmethod
    def unconditional(cls, batch: int, frames: int, height: int, width: int) -> "Conditioning":
        return cls(torch.zeros(batch, 3, frames, height, width), torch.zeros(batch, 1, frames, height, width))

    @classmethod
    def image_to_video(cls, image, num_frames: int) -> "Conditioning":
        img = _image(image)
        B, _, H, W = img.shape
        _check_frames(num_frames, H, W)
        source = torch.zeros(B, 3, num_frames, H, W)
        source[:, :, 0] = img
        mask = torch.zeros(B, 1, num_frames, H, W)
        mask[:, :, 0] = 1
        return cls._build(source, mask, "image_to_video")

    @classmethod
    def inpaint(cls, video, region) -> "Conditioning":
        v = video_frames(video)
        B, _, T, H, W = v.shape
        return cls._build(v, 1 - _region(region, B, T, H, W), "inpaint")

    @classmethod
    def cinemagraph(cls, image, region, num_frames: int) -> "Conditioning":
        img = _image(image)
        B, _, H, W = img.shape
        _check_frames(num_frames, H, W)
        source = img[:, :, None].expand(B, 3, num_frames, H, W)
        inside = _region(region, B, 1, H, W).expand(B, 1, num_frames, H, W).clone()
        mask = 1 - inside
        mask[:, :, 0] = 1
        return cls._build(source, mask, "cinemagraph")

    def resized(self, height: int, width: int) -> "Conditioning":
        """The conditioning of a (height x width) video: the known pixels' colours resized (each output pixel the
        average of the known pixels it covers, bilinearly, antialiased), known only where everything it covers is
        known (so a region to generate never shrinks)."""
        cover = _resize(self.mask, height, width)
        mask = (cover >= 1 - 1e-4).float()
        video = _resize(self.video, height, width)
        video = torch.where(cover > 0, video / cover.clamp_min(1e-6), 0.0).clamp(-1, 1) * mask
        return Conditioning(video, mask, self.mode)

    def to(self, device, dtype) -> "Conditioning":
        return Conditioning(self.video.to(device, dtype), self.mask.to(device, dtype), self.mode)

    def check(self, config, batch: int, frames: int, height: int, width: int) -> "Conditioning":
        """Validate against the model and the requested geometry; a batch of 1 is broadcast to ``batch``."""
        if config.in_channels != 7:
            raise ValueError(f"{self.mode} needs a conditional model (in_channels=7: video + masked video + "
                             f"mask); this model has in_channels={config.in_channels}")
        b = self.video.shape[0]
        if self.video.shape[1:] != (3, frames, height, width) or b not in (1, batch):
            raise ValueError(f"{self.mode}: the conditioning video is {tuple(self.video.shape[2:])} (T, H, W) "
                             f"for {b} clip(s), but {batch} clip(s) of {(frames, height, width)} are generated")
        if b != batch:
            return Conditioning(self.video.expand(batch, -1, -1, -1, -1), self.mask.expand(batch, -1, -1, -1, -1),
                                self.mode)
        return self
