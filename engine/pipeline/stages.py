"""The cascade's two denoising stages and the options each takes.

- :class:`BaseStage`: noise (or an SDEdit-noised video) -> the base model's video, with classifier-free
  guidance, optionally conditioned (7-channel models: masked video + mask).
- :class:`SSRStage`: the low-resolution video -> high resolution, denoising overlapping temporal windows that
  MultiDiffusion blends at every step.

Both stages get their predictions from a :class:`Guided` model call (one batch holding the conditional and
unconditional rows) and take the step with the sampler's ``guided_step``: classifier-free guidance, guidance
rescale and the update in one place (the C++ runtime's fused pass, or the Python reference). The SSR stage
blends the conditional and unconditional window outputs separately and guides the whole clip, so guidance
rescale's statistics are per clip, never per window.

Videos live in model space [-1, 1] in the layout (B, C, T, H, W); all noise comes from the caller's CPU
generator (one global draw per step for the clip, as exact MultiDiffusion with stochastic samplers needs).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backends import Backend
from ..config import STUNetConfig, is_choice, shown
from ..model.memory import advice_on_out_of_memory
from ..sampling import runtime as cpp_runtime
from ..sampling.multidiffusion import WEIGHTINGS, multidiffusion_predict, window_plan
from ..sampling.samplers import Sampler, make_sampler
from .conditioning import Conditioning

StepCallback = Callable[[str, int, int, torch.Tensor], torch.Tensor]
"""(stage, step index, timestep, x) -> x: the pipeline's per-step hook (it may replace x)."""


def _number(owner: str, name: str, value, lo: float | None = None, hi: float | None = None,
            integer: bool = False, lo_open: bool = False) -> None:
    """``value`` must be a finite real (an int if ``integer``) in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{owner}{name} must be {kind}, got {shown(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}{name} must be finite, got {shown(value)}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        if hi is None:
            rule = f"> {lo:g}" if lo_open else f">= {lo:g}"
        else:
            rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{owner}{name} must be {rule}, got {shown(value)}")


@dataclass(frozen=True)
class StageOptions:
    """How a denoising stage samples. Every field is validated on construction."""

    num_inference_steps: int | None = 32
    guidance_scale: float = 7.5
    """Classifier-free guidance scale; 1 runs the conditional prediction alone (half the model batch)."""
    guidance_rescale: float = 0.0
    """Rescale the guided prediction towards the conditional one's per-clip std (Lin et al. 2023), in [0, 1]."""
    sampler: str | Sampler | None = None
    """A sampler name ("ddim", "ddpm", "dpmpp2m") or a configured :class:`~stunet.samplers.Sampler` (its
    spacing, eta and clipping are used; its schedule and prediction must be the model's). None: the
    pipeline's default."""

    def __post_init__(self):
        # A base stage's options are the pipeline call's own arguments: their errors name just the argument.
        owner = "" if type(self) is StageOptions else f"{type(self).__name__}."
        if self.num_inference_steps is not None:
            _number(owner, "num_inference_steps", self.num_inference_steps, 1, 1000, integer=True)
        _number(owner, "guidance_scale", self.guidance_scale, 0)
        _number(owner, "guidance_rescale", self.guidance_rescale, 0, 1)
        if self.sampler is not None and not isinstance(self.sampler, (str, Sampler)):
            raise TypeError(f"{owner}sampler must be a sampler name or a stunet.samplers.Sampler, got "
                            f"{type(self.sampler).__name__}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0


@dataclass(frozen=True)
class SSROptions(StageOptions):
    """The SSR stage: windows of ``window`` frames overlapping by at least ``overlap``, ``batch_size`` windows
    per model call, blended with ``weighting`` ("uniform" as in Lumiere, or "ramp")."""

    num_inference_steps: int | None = None
    """None: the base stage's step count."""
    guidance_scale: float = 1.0
    window: int | None = None
    """None: the SSR model's ``window_frames`` (16 if it has none)."""
    overlap: int | None = None
    """None: the SSR model's ``window_overlap`` (2 if it has no window)."""
    batch_size: int = 4
    noise_level: int = 0
    """Noise augmentation of the low-res input (a training timestep, 0 = none)."""
    weighting: str = "uniform"

    def __post_init__(self):
        super().__post_init__()
        if self.window is not None:
            _number("SSROptions.", "window", self.window, 1, integer=True)
        if self.overlap is not None:
            _number("SSROptions.", "overlap", self.overlap, 0, integer=True)
        _number("SSROptions.", "batch_size", self.batch_size, 1, integer=True)
        _number("SSROptions.", "noise_level", self.noise_level, 0, 999, integer=True)
        if not is_choice(self.weighting, WEIGHTINGS):
            raise ValueError(f"SSROptions.weighting must be one of {WEIGHTINGS}, got {shown(self.weighting)}")

    def geometry(self, config: STUNetConfig, num_frames: int) -> tuple[int, int]:
        """(window, overlap) for the SSR model ``config`` on a clip of ``num_frames``; raises on an impossible
        plan, or a noise level for a model without noise conditioning. A default overlap never reaches the window
        (a window of 1 frame gets overlap 0)."""
        if self.noise_level and not config.noise_aug:
            raise ValueError(f"SSROptions.noise_level={self.noise_level} needs an SSR model trained with noise "
                             f"augmentation (config.noise_aug=True); this one takes no noise level: leave it 0")
        window = self.window or config.window_frames or 16
        if self.overlap is not None:
            overlap = self.overlap
        else:
            overlap = min(config.window_overlap if config.window_frames else 2, window - 1)
        window_plan(num_frames, window, overlap)
        return window, overlap


@dataclass
class Prompts:
    """The encoded text of one generation: ``text`` (B or 2B, L, D) = [prompts; negative prompts] and its
    mask, in the dtype and on the device of the model that reads them. A mask that attends to every token is
    stored as None: the same attention, without the masked path's extra work (CLIP-conditioned models attend
    to their padding)."""

    text: torch.Tensor
    mask: torch.Tensor | None
    batch: int

    def __post_init__(self):
        if self.mask is not None and bool(self.mask.all()):
            self.mask = None

    def to(self, device: torch.device, dtype: torch.dtype) -> "Prompts":
        return Prompts(self.text.to(device, dtype), None if self.mask is None else self.mask.to(device), self.batch)


class Guided:
    """A backend's predictions for groups of B clips (one group per MultiDiffusion window; one for the base
    stage) in one batched call: each group's rows are [B conditional; B unconditional] when guided, so the
    output is (groups, 2B, ...) without a copy. Text rows are built once per generation and layout, so
    backends that key cross-attention keys/values on the text tensor reuse them across steps."""

    def __init__(self, backend: Backend, prompts: Prompts, guided: bool, mapper: Callable | None = None):
        self.backend, self.guided, self.mapper = backend, guided, mapper
        self.prompts = prompts.to(backend.device, backend.dtype)
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _text(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        if groups not in self._rows:
            B, text, mask = self.prompts.batch, self.prompts.text, self.prompts.mask
            rows = 2 * B if self.guided else B
            # Ordinary tensors under torch.inference_mode too: an inference tensor counts no writes, so a backend
            # could not know its keys/values unchanged from one step to the next.
            with torch.inference_mode(False):
                self._rows[groups] = (text[:rows].repeat(groups, 1, 1),
                                      None if mask is None else mask[:rows].repeat(groups, 1))
        return self._rows[groups]

    def __call__(self, x: torch.Tensor, t: int, noise_level: float | None = None) -> torch.Tensor:
        """x (groups * B, C, T, H, W), group-major -> predictions (groups * R, C_out, T, H, W), R = 2B or B."""
        B = self.prompts.batch
        groups = x.shape[0] // B
        if self.guided:  # [x_g; x_g] per group g of B clips
            per_clip = x.shape[1:]
            x = x.reshape(groups, 1, B, *per_clip).expand(groups, 2, B, *per_clip).reshape(2 * groups * B,
                                                                                             *per_clip)
        text, mask = self._text(groups)
        level = None if noise_level is None else torch.full((x.shape[0],), float(noise_level))
        if self.mapper is None:
            return self.backend(x, t, text, mask, noise_level=level)

        def row(i: int):  # one clip's conditional or unconditional row: a call of its own on some rank
            return lambda: self.backend(x[i:i + 1], t, text[i:i + 1], None if mask is None else mask[i:i + 1],
                                        noise_level=None if level is None else level[i:i + 1])

        return torch.cat(self.mapper([row(i) for i in range(x.shape[0])]))

    def split(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) of one group's (R, ...) prediction; uncond is None when not guided."""
        return pred.chunk(2) if self.guided else (pred, None)

    def rescale(self, options: StageOptions) -> float:
        """The guidance rescale to apply: none without guidance (there is no guided prediction to rescale)."""
        return options.guidance_rescale if self.guided else 0.0


def make_stage_sampler(config: STUNetConfig, choice: str | Sampler, runtime: str, schedule: dict | None = None):
    """A fresh sampler for one stage: the named one on ``schedule`` (a :meth:`Sampler.schedule_options` dict:
    the checkpoint's own scheduler settings) or the model's schedule and prediction, or a copy of a configured
    one (checked against the model); wrapped in the C++ runtime's fused step for ``runtime="cpp"``."""
    if isinstance(choice, Sampler):
        for name, want in (("schedule", config.schedule), ("prediction", config.prediction),
                           ("num_train_timesteps", config.num_train_timesteps)):
            if getattr(choice, name) != want:
                raise ValueError(f"sampler has {name}={getattr(choice, name)!r} but the model was trained with "
                                 f"{name}={want!r}; build it with {name}={want!r}")
        sampler = copy.deepcopy(choice)  # the caller's object keeps its state
    elif schedule is not None:
        sampler = make_sampler(choice, **schedule)
    else:
        sampler = make_sampler(choice, schedule=config.schedule, prediction=config.prediction,
                               num_train_timesteps=config.num_train_timesteps)
    return cpp_runtime.FusedSampler(sampler) if runtime == "cpp" else sampler


class _Stage:
    name = "stage"

    def __init__(self, backend: Backend, runtime: str, default_sampler: str | Sampler, parallel=None,
                 schedule: dict | None = None):
        self.backend, self.runtime, self.default_sampler = backend, runtime, default_sampler
        self.parallel = parallel
        """A ``stunet.distributed.Parallel`` sharing this stage's model calls among ranks, or None."""
        self.schedule = schedule
        """The checkpoint's scheduler settings that a sampler named by the caller runs on (None: the model's)."""

    def _shows_progress(self, progress: bool) -> bool:
        return progress and (self.parallel is None or self.parallel.rank == 0)

    def _mapper(self) -> Callable | None:
        """How this stage's model calls run: shared among ranks, or None (here, batched)."""
        return None if self.parallel is None else self.parallel.mapper(self.name)

    @property
    def config(self) -> STUNetConfig:
        return self.backend.config

    def sampler(self, options: StageOptions, steps: int):
        s = make_stage_sampler(self.config, options.sampler or self.default_sampler, self.runtime, self.schedule)
        s.set_timesteps(steps)
        return s

    @staticmethod
    def _callback(callback: StepCallback | None, stage: str, i: int, t: int, x: torch.Tensor) -> torch.Tensor:
        return x if callback is None else callback(stage, i, t, x)

    def _ways_to_need_less(self) -> list[str]:
        """What lowers this stage's memory on its backend (a stage adds its own ways)."""
        backend, ways = self.backend, []
        if backend.name != "fast":
            ways.append("the fast backend in slices of one clip: backend='fast', backend_options={'max_batch': 1} "
                        "(--backend fast --max-batch 1)")
        elif backend.max_batch != 1:
            ways.append("slices of one clip: backend_options={'max_batch': 1} (--max-batch 1)")
        if backend.device.type == "cuda" and backend.dtype == torch.float32:
            ways.append("FP16 weights: model.half() (--dtype fp16)")
        return ways


class BaseStage(_Stage):
    """Text (+ conditioning) -> the base model's video (B, C_out, T, H, W) in model space (pixels in [-1, 1],
    or a latent model's latents)."""

    name = "base"

    def run(self, prompts: Prompts, shape: tuple[int, int, int, int], generator: torch.Generator,
            options: StageOptions, *, conditioning: Conditioning | None = None, init: torch.Tensor | None = None,
            strength: float = 1.0, callback: StepCallback | None = None, progress: bool = True,
            latents: torch.Tensor | None = None) -> torch.Tensor:
        """``latents``: the initial noise (B, C_out, T, H, W) instead of a draw from ``generator``."""
        B, T, H, W = shape
        dtype, device = self.backend.dtype, self.backend.device
        s = self.sampler(options, options.num_inference_steps)
        timesteps = s.timesteps
        where = f"the base stage ({B} video(s) of {T} frames of {H}x{W}, {self.backend.name} backend)"
        ways = [*self._ways_to_need_less(), "fewer frames or a smaller size (num_frames, height, width)"]
        with advice_on_out_of_memory(where, ways):
            if latents is None:
                x = Sampler.draw_noise(torch.empty(B, self.config.out_channels, T, H, W), generator).to(device, dtype)
            else:
                x = latents.to(device, dtype).contiguous()
            if init is not None:  # SDEdit: start from the input noised to `strength`
                skip = len(timesteps) - min(int(len(timesteps) * strength), len(timesteps))
                timesteps = timesteps[skip:]
                x = s.add_noise(init.to(device, torch.float32), x.float(), int(timesteps[0])).to(dtype).contiguous()
            if conditioning is not None:
                conditioning = conditioning.to(device, dtype)
            model = Guided(self.backend, prompts, options.guided, self._mapper())  # one call per row
            for i, t in enumerate(tqdm(timesteps, desc=self.name, disable=not self._shows_progress(progress))):
                x_in = x if conditioning is None else torch.cat([x, conditioning.video, conditioning.mask], dim=1)
                cond, uncond = model.split(model(x_in, int(t)))
                x = s.guided_step(cond, uncond, t, x, options.guidance_scale, model.rescale(options), generator)
                x = self._callback(callback, self.name, i, int(t), x)
        return x


def upsample_video(low: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The SSR model's view of a low-res video (B, C, T, h, w): each frame bilinearly upsampled (fp32)."""
    B, C, T, h, w = low.shape
    folded = low.float().transpose(1, 2).reshape(B * T, C, h, w)
    up = F.interpolate(folded, size=(height, width), mode="bilinear", align_corners=False)
    return up.reshape(B, T, C, height, width).transpose(1, 2)


class SSRStage(_Stage):
    """The low-res video (B, 3, T, h, w) -> (B, 3, T, H, W) with the SSR model on MultiDiffusion windows."""

    name = "ssr"

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) this stage makes of a (height x width) base video, checked against the model."""
        cfg = self.config
        H, W = height * cfg.sample_size // cfg.low_res_size, width * cfg.sample_size // cfg.low_res_size
        if H % cfg.spatial_divisor or W % cfg.spatial_divisor:
            raise ValueError(f"the SSR model upsamples {height}x{width} to {H}x{W}, which is not a multiple of "
                             f"{cfg.spatial_divisor}; choose a base size that is")
        return H, W

    def run(self, prompts: Prompts, low: torch.Tensor, generator: torch.Generator, options: SSROptions,
            steps: int, *, callback: StepCallback | None = None, progress: bool = True) -> torch.Tensor:
        B, _, T, h, w = low.shape
        H, W = self.output_size(h, w)
        window, overlap = options.geometry(self.config, T)
        dtype, device = self.backend.dtype, self.backend.device
        s = self.sampler(options, steps)
        model = Guided(self.backend, prompts, options.guided)
        level = options.noise_level if self.config.noise_aug else None  # what the model is conditioned on
        blender = cpp_runtime.blend_windows if self.runtime == "cpp" else None
        mapper = self._mapper()  # whole window calls per rank
        where = (f"the SSR stage ({B} video(s) of {T} frames of {H}x{W}, {options.batch_size} window(s) of {window} "
                 f"frames per call, {self.backend.name} backend)")
        ways = self._ways_to_need_less()
        if options.batch_size > 1:
            ways.append("fewer windows per call: ssr=SSROptions(batch_size=1) (--ssr-batch 1)")
        with advice_on_out_of_memory(where, ways):
            up = upsample_video(low.clamp(-1, 1), H, W)  # the video the user sees: frames in [-1, 1]
            if options.noise_level:
                up = s.add_noise(up, Sampler.draw_noise(up, generator), options.noise_level)
            up = up.to(dtype)
            x = Sampler.draw_noise(torch.empty(B, 3, T, H, W), generator).to(device, dtype)
            for i, t in enumerate(tqdm(s.timesteps, desc=self.name, disable=not self._shows_progress(progress))):
                def predict(windows: torch.Tensor, t: int = int(t)) -> torch.Tensor:
                    return model(windows, t, noise_level=level)

                # Blend [cond; uncond] rows of every window into the clip, then guide the whole clip.
                pred = multidiffusion_predict(predict, torch.cat([x, up], dim=1), window, overlap,
                                              options.batch_size, options.weighting, blender, mapper)
                cond, uncond = model.split(pred)
                x = s.guided_step(cond, uncond, t, x, options.guidance_scale, model.rescale(options), generator)
                x = self._callback(callback, self.name, i, int(t), x)
        return x
