"""Video files: ``save_video(frames, path, fps)`` writes mp4 (PyAV), gif (Pillow)
or npy (the frames themselves, float32 in [0, 1]: lossless), atomically (a temporary file beside the target,
renamed on success). ``read_frames`` reads a video, an image or npy frames back as floats in [0, 1] (what the
pipeline's video and image arguments take); ``load_npy`` reads an npy file, checked."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from ..config import shown
from ..io import atomic_path

log = logging.getLogger(__name__)
SUFFIXES = (".mp4", ".gif", ".npy")
LIBRARIES = {"av": "PyAV", "PIL": "Pillow"}  # the [video] extra: modules and the packages that hold them
WRITER_NEEDS = {".mp4": "av", ".gif": "PIL"}  # .npy needs numpy alone
VIDEO_SUFFIXES = (".mp4", ".gif", ".mov", ".webm")  # read with PyAV; any other suffix but .npy is an image


def to_uint8(frames) -> np.ndarray:
    """(F, H, W, 3) floats in [0, 1] (or uint8) -> uint8, validated."""
    frames = _checked(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_float32(frames) -> np.ndarray:
    """(F, H, W, 3) floats in [0, 1] (or uint8) -> float32 in [0, 1], validated (floats clipped to [0, 1])."""
    frames = _checked(frames)
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return np.clip(frames, 0.0, 1.0).astype(np.float32)


def _checked(frames) -> np.ndarray:
    """(F, H, W, 3) frames as a numpy array of floats or uint8, or a ValueError / TypeError naming the problem."""
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
    if 0 in frames.shape:
        raise ValueError(f"frames is empty: shape {frames.shape} (F, H, W, 3)")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(f"frames must be floats in [0, 1] or uint8, got dtype {frames.dtype}")
    if not np.isfinite(frames).all():
        raise ValueError("frames contain NaN or inf")
    lo, hi = float(frames.min()), float(frames.max())
    if lo < -1 / 255 or hi > 1 + 1 / 255:  # past what rounding to 8 bits hides
        log.warning("stunet: the frames hold values in [%.3g, %.3g], which are clipped to [0, 1]; frames are "
                    "floats in [0, 1] (divide [0, 255] values by 255, map [-1, 1] ones by (x + 1) / 2)", lo, hi)
    return frames


def missing_library(module: str, what: str, instead: str) -> str | None:
    """Why ``what`` cannot be done here (``module``, a library of the [video] extra, is not installed), or None:
    known before a generation, not after it."""
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{what} needs {LIBRARIES[module]}: pip install 'stunet[video]' ({instead})"


def missing_writer(path: str | os.PathLike) -> str | None:
    """Why ``path``'s format cannot be written here (its library is not installed), or None."""
    suffix = Path(path).suffix.lower()
    module = WRITER_NEEDS.get(suffix)
    return None if module is None else missing_library(module, f"writing {suffix[1:]}", "or write .npy frames")


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    import av

    h, w = frames.shape[1:3]  # even: save_video pads odd sides
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(frames: np.ndarray, path: Path, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def _write_npy(frames: np.ndarray, path: Path, fps: int) -> None:
    with open(path, "wb") as f:  # np.save on a path would add a second ".npy" to the temporary name
        np.save(f, frames, allow_pickle=False)


def save_video(frames, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write (F, H, W, 3) frames (floats in [0, 1] or uint8) to ``path``; the suffix picks mp4, gif or npy
    (float32 frames in [0, 1], as given: no codec between a generation and the next stage; ``fps`` unused)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"path must end in one of {SUFFIXES}, got {str(path)!r}")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {shown(fps)}")
    if problem := missing_writer(path):
        raise ImportError(problem)
    data = to_float32(frames) if suffix == ".npy" else to_uint8(frames)
    writer = {".mp4": _write_mp4, ".gif": _write_gif, ".npy": _write_npy}[suffix]
    h, w = data.shape[1:3]
    if suffix == ".mp4" and (h % 2 or w % 2):  # yuv420p needs even sides: pad by one pixel (edge), and say so
        log.warning("%s: H.264 (yuv420p) takes even sides only, so the %dx%d frames are padded to %dx%d (edge "
                    "pixels repeated); save a .gif or .npy for the exact size", path.name, w, h, w + w % 2, h + h % 2)
        data = np.pad(data, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with atomic_path(path) as tmp:
        writer(data, tmp, fps)
    return path


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """The frames of an npy file: (F, H, W, 3) or one (H, W, 3) image, float32 in [0, 1] (uint8 files are
    scaled by 1/255). Raises ValueError naming what the file holds when it is not frames."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:  # not an npy file, a pickle, or an empty one
        raise ValueError(f"{str(path)!r} is not a numpy array file ({str(e) or 'empty'})") from None
    if data.ndim not in (3, 4) or data.shape[-1] != 3 or 0 in data.shape:
        raise ValueError(f"{str(path)!r} holds an array of shape {data.shape}, not frames (F, H, W, 3) or an image "
                         "(H, W, 3)")
    if data.dtype == np.uint8:
        return data.astype(np.float32) / 255.0
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"{str(path)!r} holds {data.dtype} values; frames are floats in [0, 1] or uint8")
    if not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
        raise ValueError(f"{str(path)!r} holds values outside [0, 1] (or NaN); frames are floats in [0, 1]")
    return data.astype(np.float32)


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """A video (mp4, gif, mov, webm: PyAV) -> (F, H, W, 3), an image (png, jpg, ...: Pillow) -> (H, W, 3), or the
    frames of an npy file (:func:`load_npy`); float32 in [0, 1]. Raises FileNotFoundError for no file and
    ValueError naming the file for one that cannot be read."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is a directory; give a video or image file in it")
    if not path.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}")
    if path.suffix.lower() == ".npy":  # frames as stunet writes them: no codec in between
        return load_npy(path)
    try:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            import av

            with av.open(str(path)) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            if not frames:
                raise ValueError("no video frames")
            return np.stack(frames).astype(np.float32) / 255.0
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except ImportError as e:
        module = e.name or "a library"
        raise ImportError(f"reading {path.suffix} files needs {LIBRARIES.get(module, module)}: "
                          "pip install 'stunet[video]'") from None
    except Exception as e:  # a decoder's own error: the file is not what its name says
        raise ValueError(f"cannot read {str(path)!r} ({e})") from None
