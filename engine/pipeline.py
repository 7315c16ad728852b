"""The video pipeline: text -> base STUNet (CFG) -> SSR STUNet on MultiDiffusion windows -> frames in [0, 1].

    pipe = stunet.Pipeline.from_pretrained("base_dir", ssr="ssr_dir", text_encoder="t5_dir")
    res = pipe("a teddy bear surfing", num_frames=80, num_inference_steps=32, guidance_scale=7.5, seed=0)
    res.frames                                   # numpy (B, F, H, W, 3) in [0, 1]

Videos live in model space [-1, 1] in the layout (B, C, T, H, W); the user sees frames (B, F, H, W, 3) in
[0, 1]. All noise is drawn from one CPU generator, so a seed gives the same video on every device (for the
same backend). The denoising loop below is the readable reference of the C++ runtime.

Conditional modes (7-channel models; see ``conditioning``): ``image_to_video``, ``inpaint``, ``cinemagraph``;
``video_to_video`` (SDEdit) works with any base model; ``with_style`` gives stylized generation.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .conditioning import Conditioning, video_frames
from .model import STUNet
from . import runtime as cpp_runtime
from .backends import BACKENDS, Backend, make_backend
from .multidiffusion import multidiffusion_predict
from .samplers import Sampler, cfg_combine, make_sampler, sampler_class
from .text import TextEncoder

log = logging.getLogger(__name__)

RUNTIMES = ("cpp", "python")
OUTPUT_TYPES = ("np", "pt", "pil")


def default_runtime() -> str:
    """"cpp" (the C++ runtime) when stunet._C imported, else "python", saying why."""
    if cpp_runtime.available():
        return "cpp"
    log.warning("stunet: the C++ runtime is unavailable, sampling with the Python reference: %s",
                cpp_runtime.status())
    return "python"


@dataclass
class PipelineOutput:
    frames: Any
    """(B, F, H, W, 3) in [0, 1]: numpy ("np"), torch ("pt"), or per video a list of PIL images ("pil")."""
    seed: int | None
    """The seed the noise was drawn with (None when a generator was passed)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: text, base, ssr, decode."""
    low_res_frames: Any = None
    """The base model's frames when an SSR stage ran (same type as ``frames``)."""


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """Model space (B, 3, T, H, W) in [-1, 1] -> frames (B, T, H, W, 3) in [0, 1], fp32 on the CPU."""
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu().contiguous()


class Pipeline:
    """Text-to-video cascade. ``Pipeline(base_model, text_encoder, ssr_model=None)``."""

    def __init__(self, base_model: STUNet, text_encoder: TextEncoder | None = None, ssr_model: STUNet | None = None,
                 *, backend: str = "reference", sampler: str = "ddim", runtime: str | None = None,
                 backend_options: dict | None = None, progress: bool = True):
        if not isinstance(base_model, STUNet):
            raise TypeError(f"base_model must be a STUNet, got {type(base_model).__name__}")
        if base_model.config.is_ssr:
            raise ValueError("base_model is an SSR model (in_channels=6); pass it as ssr_model=")
        if ssr_model is not None:
            if not isinstance(ssr_model, STUNet) or not ssr_model.config.is_ssr:
                raise ValueError("ssr_model must be a STUNet with in_channels=6 (an SSR config such as lumiere-ssr)")
            if ssr_model.config.text_dim != base_model.config.text_dim:
                raise ValueError(f"ssr_model takes text_dim={ssr_model.config.text_dim} but base_model takes "
                                 f"{base_model.config.text_dim}; both must read the same text encoder")
        if text_encoder is not None and text_encoder.dim != base_model.config.text_dim:
            raise ValueError(f"text_encoder gives {text_encoder.dim}-wide tokens but the model takes "
                             f"text_dim={base_model.config.text_dim}; use the encoder the model was trained with")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        sampler_class(sampler)  # validate the name early
        runtime = default_runtime() if runtime is None else runtime
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "cpp" and not cpp_runtime.available():
            raise RuntimeError(f"runtime='cpp' but {cpp_runtime.status()}")
        self.base, self.ssr, self.text_encoder = base_model.eval(), ssr_model, text_encoder
        if self.ssr is not None:
            self.ssr.eval()
        self.backend, self.sampler_name, self.runtime, self.progress = backend, sampler, runtime, progress
        self.backend_options = dict(backend_options or {})
        self._base_exec: Backend = make_backend(self.base, backend, **self.backend_options)
        self._ssr_exec: Backend | None = (make_backend(self.ssr, backend, **self.backend_options)
                                          if self.ssr is not None else None)

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, ssr: str | os.PathLike | None = None,
                        text_encoder: str | os.PathLike | TextEncoder | None = None, *, backend: str = "reference",
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        **kwargs) -> "Pipeline":
        from .text import load_text_encoder

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base_model = STUNet.from_pretrained(base, device=device, dtype=dtype)
        ssr_model = STUNet.from_pretrained(ssr, device=device, dtype=dtype) if ssr is not None else None
        if isinstance(text_encoder, (str, os.PathLike)):
            text_encoder = load_text_encoder(text_encoder, device=device)
        return cls(base_model, text_encoder, ssr_model, backend=backend, **kwargs)

    def with_style(self, style, alpha: float) -> "Pipeline":
        """Stylized generation: a pipeline whose base model's spatial weights are blended towards ``style``."""
        from .weights import interpolate_spatial

        return Pipeline(interpolate_spatial(self.base, style, alpha), self.text_encoder, self.ssr,
                        backend=self.backend, sampler=self.sampler_name, runtime=self.runtime,
                        backend_options=self.backend_options, progress=self.progress)

    @property
    def device(self) -> torch.device:
        return self.base.device

    # -- text -----------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], negative: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and mask of [prompts; negative prompts], padded to one length, on the model's device."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass text_encoder= when building it, or give "
                             "prompt_embeds= (and negative_prompt_embeds=) to the call")
        tokens, mask = self.text_encoder.encode(prompts + negative)
        return tokens.to(self.device, self.base.dtype), mask.to(self.device)

    def _text(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            pe = prompt_embeds.to(self.device, self.base.dtype)
            if pe.dim() != 3:
                raise ValueError(f"prompt_embeds must be (B, L, text_dim), got {tuple(pe.shape)}")
            ne = (negative_prompt_embeds.to(self.device, self.base.dtype) if negative_prompt_embeds is not None
                  else torch.zeros_like(pe))
            if ne.shape != pe.shape:
                raise ValueError(f"negative_prompt_embeds must match prompt_embeds {tuple(pe.shape)}, "
                                 f"got {tuple(ne.shape)}")
            mask = torch.ones(2 * pe.shape[0], pe.shape[1], dtype=torch.bool, device=self.device)
            return torch.cat([pe, ne]), mask, pe.shape[0]
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError("prompt must be a non-empty string or list of strings (or pass prompt_embeds=)")
        B = len(prompt)
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * B if isinstance(negative, str) else list(negative)
        if len(negative) != B:
            raise ValueError(f"negative_prompt has {len(negative)} entries but prompt has {B}")
        tokens, mask = self.encode_prompt(list(prompt), negative)
        return tokens, mask, B

    # -- one prediction, conditional and unconditional ---------------------------------------------------------
    @staticmethod
    def _text_rows(cache: dict, text: torch.Tensor, mask: torch.Tensor, B: int, n: int, guided: bool):
        """Text and mask rows for n clips per prompt, [cond; uncond] when guided: built once per generation
        (``cache``), so backends that key cross-attention keys/values on the text tensor reuse them."""
        key = (n, guided)
        if key not in cache:
            rows_t, rows_m = [text[:B].repeat(n, 1, 1)], [mask[:B].repeat(n, 1)]
            if guided:
                rows_t.append(text[B:].repeat(n, 1, 1))
                rows_m.append(mask[B:].repeat(n, 1))
            cache[key] = (torch.cat(rows_t), torch.cat(rows_m))
        return cache[key]

    def _predict(self, model: Backend, x_in: torch.Tensor, t: int, text: torch.Tensor, mask: torch.Tensor, B: int,
                 scale: float, texts: dict, noise_level: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) predictions in one batched call; uncond is None when ``scale == 1`` (no guidance).
        ``text``/``mask`` hold [cond; uncond] (2B rows); ``x_in`` may hold several clips per prompt (N*B rows,
        N windows): text rows are repeated to match."""
        guided = scale != 1.0
        rows_t, rows_m = self._text_rows(texts, text, mask, B, x_in.shape[0] // B, guided)
        if not guided:
            return model(x_in, t, rows_t, rows_m, noise_level=noise_level), None
        level = None if noise_level is None else torch.cat([noise_level, noise_level])
        cond, uncond = model(torch.cat([x_in, x_in]), t, rows_t, rows_m, noise_level=level).chunk(2)
        return cond, uncond

    def _sampler(self, model: STUNet, name: str | None, eta: float) -> Sampler | cpp_runtime.FusedSampler:
        cfg = model.config
        s = make_sampler(name or self.sampler_name, schedule=cfg.schedule, prediction=cfg.prediction,
                         num_train_timesteps=cfg.num_train_timesteps, eta=eta)
        return cpp_runtime.FusedSampler(s) if self.runtime == "cpp" else s

    # -- the call ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 32, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 seed: int | None = None, generator: torch.Generator | None = None, output_type: str = "np",
                 callback_on_step_end: Callable | None = None, sampler: str | None = None, eta: float = 0.0,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 conditioning: Conditioning | None = None, init_video=None, strength: float = 1.0,
                 ssr_steps: int | None = None, ssr_window: int = 16, ssr_overlap: int = 2, ssr_batch_size: int = 4,
                 ssr_guidance_scale: float = 1.0, ssr_noise_level: int = 0, ssr_weighting: str = "uniform",
                 progress: bool | None = None) -> PipelineOutput:
        """Generate videos. Returns frames (B, F, H, W, 3) in [0, 1] (after SSR when the pipeline has one).

        ``conditioning`` (7-channel models) comes from the mode helpers; ``init_video`` + ``strength`` is SDEdit
        (``video_to_video``). The SSR stage denoises windows of ``ssr_window`` frames overlapping by at least
        ``ssr_overlap``, ``ssr_batch_size`` windows per model call, blended with ``ssr_weighting``.
        """
        cfg = self.base.config
        show = self.progress if progress is None else progress
        T = num_frames if num_frames is not None else cfg.sample_frames
        H = height if height is not None else cfg.sample_size
        W = width if width is not None else cfg.sample_size
        self._check_geometry(T, H, W)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if generator is not None and seed is not None:
            raise ValueError("pass either seed or generator, not both")
        if generator is None:
            seed = random.randrange(2 ** 63) if seed is None else int(seed)
            generator = torch.Generator().manual_seed(seed)
        elif generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (noise is drawn on the CPU so a seed gives "
                             "the same video on every device)")
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        text, mask, B = self._text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        timings["text"] = self._elapsed(t0)

        t0 = time.perf_counter()
        if conditioning is not None:
            conditioning = conditioning.check(cfg, B, T, H, W).to(self.device, self.base.dtype)
        elif cfg.in_channels == 7:
            conditioning = Conditioning.unconditional(B, T, H, W).to(self.device, self.base.dtype)
        s = self._sampler(self.base, sampler, eta)
        s.set_timesteps(num_inference_steps)
        timesteps = s.timesteps
        x = Sampler.draw_noise(torch.empty(B, 3, T, H, W), generator).to(self.device, self.base.dtype)
        if init_video is not None:
            init = init_video.to(self.device, torch.float32)
            if init.shape != x.shape:
                raise ValueError(f"init_video must have shape {tuple(x.shape)} (B, 3, T, H, W), "
                                 f"got {tuple(init.shape)}")
            skip = num_inference_steps - min(int(round(num_inference_steps * strength)), num_inference_steps)
            timesteps = timesteps[skip:]
            if not len(timesteps):
                raise ValueError(f"strength {strength} leaves no denoising step; raise it or the step count")
            x = s.add_noise(init, x.float(), int(timesteps[0])).to(self.base.dtype).contiguous()

        texts: dict = {}
        for i, t in enumerate(tqdm(timesteps, desc="base", disable=not show)):
            x_in = x if conditioning is None else torch.cat([x, conditioning.video, conditioning.mask], dim=1)
            cond, uncond = self._predict(self._base_exec, x_in, int(t), text, mask, B, guidance_scale, texts)
            x = s.guided_step(cond, uncond, t, x, guidance_scale, guidance_rescale, generator)
            x = self._callback(callback_on_step_end, "base", i, int(t), x)
        timings["base"] = self._elapsed(t0)

        low = x
        if self.ssr is not None:
            t0 = time.perf_counter()
            x = self._ssr(low, text, mask, B, generator, ssr_steps or num_inference_steps, ssr_window, ssr_overlap,
                          ssr_batch_size, ssr_guidance_scale, guidance_rescale, ssr_noise_level, ssr_weighting,
                          sampler, eta, callback_on_step_end, show)
            timings["ssr"] = self._elapsed(t0)

        t0 = time.perf_counter()
        frames = self._output(x, output_type)
        low_frames = self._output(low, output_type) if self.ssr is not None else None
        timings["decode"] = self._elapsed(t0)
        return PipelineOutput(frames=frames, seed=seed, timings=timings, low_res_frames=low_frames)

    def _elapsed(self, t0: float) -> float:
        """Seconds since t0 once the device's queued work is done (stage timings of asynchronous GPU work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _ssr(self, low, text, mask, B, generator, steps, window, overlap, batch_size, scale, rescale, noise_level,
             weighting, sampler, eta, callback, show) -> torch.Tensor:
        cfg = self.ssr.config
        _, _, T, h, w = low.shape
        H, W = h * cfg.sample_size // cfg.low_res_size, w * cfg.sample_size // cfg.low_res_size
        if H % cfg.spatial_divisor or W % cfg.spatial_divisor:
            raise ValueError(f"the SSR model upsamples {h}x{w} to {H}x{W}, which is not a multiple of "
                             f"{cfg.spatial_divisor}; choose a base size that is")
        dtype = self.ssr.dtype
        text = text.to(dtype)
        folded = low.float().transpose(1, 2).reshape(B * T, 3, h, w)
        up = F.interpolate(folded, size=(H, W), mode="bilinear", align_corners=False)
        up = up.reshape(B, T, 3, H, W).transpose(1, 2)
        s = self._sampler(self.ssr, sampler, eta)
        s.set_timesteps(steps)
        if noise_level:
            up = s.add_noise(up, Sampler.draw_noise(up, generator), int(noise_level))
        up = up.to(dtype)
        x = Sampler.draw_noise(torch.empty(B, 3, T, H, W), generator).to(self.device, dtype)
        level = torch.full((1,), float(noise_level), device=self.device)
        blender = cpp_runtime.blend_windows if self.runtime == "cpp" else None
        texts: dict = {}
        for i, t in enumerate(tqdm(s.timesteps, desc="ssr", disable=not show)):
            def predict(batch: torch.Tensor, t=int(t)) -> torch.Tensor:
                cond, uncond = self._predict(self._ssr_exec, batch, t, text, mask, B, scale, texts,
                                             noise_level=level.expand(batch.shape[0]))
                return cond if uncond is None else cfg_combine(cond, uncond, scale, rescale)

            pred = multidiffusion_predict(predict, torch.cat([x, up], dim=1), window, overlap, batch_size,
                                          weighting, blender)
            x = s.step(pred, t, x, generator=generator)
            x = self._callback(callback, "ssr", i, int(t), x)
        return x

    def _callback(self, callback, stage: str, i: int, t: int, x: torch.Tensor) -> torch.Tensor:
        if callback is None:
            return x
        result = callback(self, i, t, {"latents": x, "stage": stage})
        if result and "latents" in result:
            new = result["latents"]
            if new.shape != x.shape:
                raise ValueError(f"callback_on_step_end returned latents of shape {tuple(new.shape)}, "
                                 f"expected {tuple(x.shape)}")
            x = new.to(x.device, x.dtype)
        return x

    def _check_geometry(self, T: int, H: int, W: int) -> None:
        cfg = self.base.config
        for name, value, div in (("num_frames", T, cfg.frame_divisor), ("height", H, cfg.spatial_divisor),
                                 ("width", W, cfg.spatial_divisor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % div:
                raise ValueError(f"{name} must be a positive multiple of {div} for this base model, got {value!r}")

    @staticmethod
    def _output(video: torch.Tensor, output_type: str):
        frames = to_frames(video)
        if output_type == "pt":
            return frames
        array = frames.numpy()
        if output_type == "np":
            return array
        from PIL import Image

        return [[Image.fromarray((f * 255 + 0.5).astype(np.uint8)) for f in clip] for clip in array]

    # -- conditional modes -----------------------------------------------------------------------------------
    def image_to_video(self, image, prompt=None, **kwargs) -> PipelineOutput:
        """Animate ``image`` ((H, W, 3) or (B, H, W, 3) in [0, 1]): it is frame 0 of the generated video."""
        cond = Conditioning.image_to_video(image, self._frames(kwargs))
        return self(prompt, conditioning=cond, **self._sized(kwargs, cond))

    def inpaint(self, video, region, prompt=None, **kwargs) -> PipelineOutput:
        """Regenerate ``region`` (1 = generate; (H, W), (F, H, W) or (B, F, H, W)) of ``video`` (frames in [0, 1])."""
        cond = Conditioning.inpaint(video, region)
        return self(prompt, conditioning=cond, **self._sized(kwargs, cond))

    def cinemagraph(self, image, region, prompt=None, **kwargs) -> PipelineOutput:
        """Animate only ``region`` (1 = animate, (H, W) or (B, H, W)) of ``image``; the rest stays still."""
        cond = Conditioning.cinemagraph(image, region, self._frames(kwargs))
        return self(prompt, conditioning=cond, **self._sized(kwargs, cond))

    def video_to_video(self, video, prompt=None, strength: float = 0.6, **kwargs) -> PipelineOutput:
        """SDEdit: noise ``video`` (frames in [0, 1]) to ``strength`` and denoise it towards the prompt."""
        init = video_frames(video)
        kwargs.setdefault("num_frames", init.shape[2])
        kwargs.setdefault("height", init.shape[3])
        kwargs.setdefault("width", init.shape[4])
        return self(prompt, init_video=init, strength=strength, **kwargs)

    def _frames(self, kwargs) -> int:
        return kwargs.get("num_frames") or self.base.config.sample_frames

    @staticmethod
    def _sized(kwargs: dict, cond: Conditioning) -> dict:
        _, _, T, H, W = cond.video.shape
        return {**kwargs, "num_frames": T, "height": H, "width": W}
