"""Latent video models: their VAE (diffusers' ``AutoencoderKL``, the optional ``stunet[diffusers]``).

A latent STUNet (``in_channels=4``: ModelScope / ZeroScope, AnimateDiff, an inflated Stable Diffusion)
denoises VAE latents (B, 4, T, H/8, W/8). :class:`VideoVAE` turns them into the video (B, 3, T, H, W) in
[-1, 1], and a video into latents (video-to-video), frame by frame in chunks of ``chunk_frames`` frames, which
bounds the VAE's memory whatever the clip length.

An FP16 VAE whose config sets ``force_upcast`` (the default of ``AutoencoderKL``: Stable Diffusion's VAE can
overflow FP16 when it encodes) encodes in FP32, as diffusers' AnimateDiff video-to-video pipeline does (its
ModelScope one encodes in FP16); it decodes in its own dtype, as diffusers' text-to-video pipelines do.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import shown
from ..io import folder_load_errors
from ..model.validate import checked_placement

log = logging.getLogger(__name__)


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("latent models run their VAE with diffusers' AutoencoderKL: "
                          "pip install 'stunet[diffusers]'") from None
    return diffusers


def vae_scale_factor(block_out_channels) -> int:
    """Pixels per latent along H and W of an AutoencoderKL with these ``block_out_channels`` (8 for Stable
    Diffusion's VAE: each level but the last halves the sides)."""
    return 2 ** (len(block_out_channels) - 1)


def vae_folder(model_dir: str | os.PathLike) -> Path | None:
    """The ``vae`` folder of a ``stunet convert``ed latent pipeline in ``model_dir``; None for a pixel model."""
    folder = Path(model_dir) / "vae"
    return folder if folder.is_dir() else None


def folder_scale_factor(model_dir: str | os.PathLike) -> int:
    """Pixels per position of the model in ``model_dir``: its ``vae`` folder's scale factor for a ``stunet
    convert``ed latent pipeline (read from the VAE's config.json, nothing loaded), else 1."""
    from ..io import read_json

    vae = vae_folder(model_dir)
    if vae is None:
        return 1
    config = vae / "config.json"
    data = read_json(config, "fix or remove the vae folder")
    widths = data.get("block_out_channels") if isinstance(data, dict) else None
    if not isinstance(widths, list) or not widths:
        raise ValueError(f"{str(config)!r} has no block_out_channels list: it is not an AutoencoderKL config")
    return vae_scale_factor(widths)


def diffusers_load_options() -> dict:
    """Keyword arguments for a diffusers ``from_pretrained`` of a local folder. ``low_cpu_mem_usage`` is asked
    for only where accelerate is installed: diffusers' default asks for it everywhere and warns on every load
    without accelerate that it loads the ordinary way, which is what it then does."""
    from diffusers.utils import is_accelerate_available

    return dict(local_files_only=True, low_cpu_mem_usage=is_accelerate_available())


class VideoVAE:
    """Encodes and decodes videos with a diffusers ``AutoencoderKL`` (``vae``), ``chunk_frames`` frames at a
    time."""

    def __init__(self, vae, chunk_frames: int = 8):
        if not all(hasattr(vae, a) for a in ("encode", "decode", "config")):
            raise TypeError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer, got {shown(chunk_frames)}")
        self.vae = vae.eval()
        self.chunk_frames = chunk_frames
        self.latent_channels = int(vae.config.latent_channels)
        self.scale_factor = vae_scale_factor(vae.config.block_out_channels)
        """Pixels per latent along H and W (8 for Stable Diffusion's VAE)."""
        self.scaling_factor = float(vae.config.scaling_factor)
        self.upcast_encode = bool(getattr(vae.config, "force_upcast", False))
        """Whether an FP16 VAE encodes in FP32 (the config's ``force_upcast``)."""

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _chunks(self, frames: torch.Tensor, what: str, progress: bool):
        """``frames`` in chunks of ``chunk_frames``, with a progress bar (in frames) when asked."""
        bar = tqdm(total=frames.shape[0], desc=what, unit="frame", disable=not progress)
        for chunk in frames.split(self.chunk_frames):
            yield chunk
            bar.update(chunk.shape[0])
        bar.close()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """(B, C, T, h, w) latents -> (B, 3, T, h * f, w * f) video in [-1, 1] (fp32, on the VAE's device)."""
        B, C, T, h, w = latents.shape
        if C != self.latent_channels:
            raise ValueError(f"latents have {C} channels but the VAE takes {self.latent_channels}")
        frames = (latents / self.scaling_factor).transpose(1, 2).reshape(B * T, C, h, w)
        frames = frames.to(self.device, self.dtype)
        images = [self.vae.decode(chunk).sample.float() for chunk in self._chunks(frames, "decode", progress)]
        video = torch.cat(images)
        return video.reshape(B, T, *video.shape[1:]).transpose(1, 2)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None,
               progress: bool = False) -> torch.Tensor:
        """(B, 3, T, H, W) video in [-1, 1] -> (B, C, T, H / f, W / f) latents (fp32, on the VAE's device), scaled
        as the model sees them.

        With a CPU ``generator``, a sample of each frame's posterior, drawn as diffusers' video-to-video
        pipelines draw it: one standard normal (B * T, C, h, w) tensor in the dtype it encodes in, frame-major,
        whatever the chunking. Without one, the posterior's mean. An FP16 VAE with ``force_upcast`` encodes (and draws)
        in FP32, on a temporary FP32 copy: the VAE itself is left as it is.
        """
        B, C, T, H, W = video.shape
        f = self.scale_factor
        if C != 3 or H % f or W % f:
            raise ValueError(f"video must be (B, 3, T, H, W) with H and W multiples of {f} (the VAE's scale), "
                             f"got {tuple(video.shape)}")
        vae = self._encoder()
        frames = video.transpose(1, 2).reshape(B * T, C, H, W).to(self.device, next(vae.parameters()).dtype)
        posteriors = [vae.encode(chunk).latent_dist for chunk in self._chunks(frames, "encode", progress)]
        latents = torch.cat([p.mean for p in posteriors])
        if generator is not None:
            eps = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
            latents = latents + torch.cat([p.std for p in posteriors]) * eps
        latents = (self.scaling_factor * latents).float()
        return latents.reshape(B, T, *latents.shape[1:]).transpose(1, 2)

    def _encoder(self):
        """The VAE that encodes: the VAE, or an FP32 copy of an FP16 one whose config asks for upcasting."""
        if self.dtype != torch.float16 or not self.upcast_encode:
            return self.vae
        log.info("stunet: the FP16 VAE encodes in FP32 (its config sets force_upcast)")
        return copy.deepcopy(self.vae).float()


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             chunk_frames: int = 8) -> VideoVAE:
    """The ``AutoencoderKL`` saved in ``path`` (a diffusers ``vae`` folder), as a :class:`VideoVAE`."""
    checked_placement(device, dtype)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"VAE directory {str(path)!r} has no config.json (a diffusers AutoencoderKL folder)")
    diffusers = _require_diffusers()
    with folder_load_errors("VAE", path):
        vae = diffusers.AutoencoderKL.from_pretrained(path, torch_dtype=dtype, **diffusers_load_options())
    return VideoVAE(vae.to(device), chunk_frames)


__all__ = ["VideoVAE", "load_vae"]
