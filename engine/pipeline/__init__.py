"""The cascade: text -> base stage -> SSR stage -> frames, with conditioning, text encoders and video files.

- ``pipeline``: :class:`Pipeline`, the one obvious call (``pipe(prompt).frames``).
- ``stages``: the base and SSR denoising stages and their options (:class:`StageOptions`, :class:`SSROptions`).
- ``conditioning``: the masked video and mask of 7-channel models (image-to-video, inpainting, cinemagraphs).
- ``text``: text encoders (T5 / CLIP from a folder, a tiny random stand-in).
- ``video``: mp4 / gif files, written atomically.
"""
from . import text
from .conditioning import Conditioning
from .pipeline import Pipeline, PipelineOutput
from .stages import SSROptions, StageOptions
from .text import TextEncoder, load_text_encoder, tiny_random_t5
from .video import read_frames, save_video

__all__ = ["text", "Pipeline", "PipelineOutput", "StageOptions", "SSROptions", "Conditioning", "TextEncoder",
           "load_text_encoder", "tiny_random_t5", "save_video", "read_frames"]
