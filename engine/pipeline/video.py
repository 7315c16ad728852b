"""Video files: ``save_video(frames, path, fps)`` writes mp4 (PyAV, imageio-ffmpeg as fallback) or gif (Pillow),
atomically (a temporary file beside the target, renamed on success)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..io import atomic_path

log = logging.getLogger(__name__)
SUFFIXES = (".mp4", ".gif")


def to_uint8(frames) -> np.ndarray:
    """(F, H, W, 3) floats in [0, 1] (or uint8) -> uint8, validated."""
    try:
        import torch

        if isinstance(frames, torch.Tensor):
            frames = frames.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {frames.shape}; pass res.frames[0] for the first "
                         "video of a batch")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty (F = 0)")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(f"frames must be floats in [0, 1] or uint8, got dtype {frames.dtype}")
    if not np.isfinite(frames).all():
        raise ValueError("frames contain NaN or inf")
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    try:
        import av
    except ImportError:
        av = None
    if av is None:
        try:
            import imageio.v3 as iio
        except ImportError:
            raise ImportError("writing mp4 needs PyAV or imageio-ffmpeg: pip install 'stunet[video]'") from None
        log.warning("PyAV is not installed; writing %s through imageio-ffmpeg", path)
        iio.imwrite(path, frames, fps=fps, codec="libx264")
        return
    h, w = frames.shape[1:3]
    # yuv420p needs even sides: pad by one pixel (edge) rather than fail.
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w + pw, h + ph, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(frames: np.ndarray, path: Path, fps: int) -> None:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("writing gif needs Pillow: pip install 'stunet[video]'") from None
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def save_video(frames, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write (F, H, W, 3) frames (floats in [0, 1] or uint8) to ``path``; the suffix picks mp4 or gif."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"path must end in one of {SUFFIXES}, got {str(path)!r}")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    data = to_uint8(frames)
    writer = _write_mp4 if path.suffix.lower() == ".mp4" else _write_gif
    with atomic_path(path) as tmp:
        writer(data, tmp, fps)
    return path
