"""The video pipeline: text -> base STUNet (CFG) -> SSR STUNet on MultiDiffusion windows -> frames in [0, 1].

    pipe = stunet.Pipeline.from_pretrained("base_dir", ssr="ssr_dir", text_encoder="t5_dir")
    res = pipe("a teddy bear surfing", num_frames=80, num_inference_steps=32, guidance_scale=7.5, seed=0)
    res.frames                                   # numpy (B, F, H, W, 3) in [0, 1]

The pipeline checks every argument before any compute, encodes the prompts once, and runs the stages of
``stages`` (base, then SSR when it has an SSR model) on their backends. The user sees frames (B, F, H, W, 3)
in [0, 1]. All noise is drawn from CPU generators, so a seed gives the same video on every device (for the
same backend). The SSR stage draws from a generator of its own, seeded from the call's generator as it was when
the call began (``stage_generator``): its noise depends on the seed alone, not on the base stage's settings, so
``upscale(res.low_res_frames, prompt, seed=res.seed)`` repeats the SSR stage of a generation.

Conditional modes (7-channel models; see ``conditioning``): ``image_to_video``, ``inpaint``, ``cinemagraph``;
``video_to_video`` (SDEdit) works with any base model; ``upscale`` runs the SSR stage alone on a given video;
``with_style`` gives stylized generation. Their images and videos are arrays (numpy or torch) of frames in
[0, 1] (or uint8), as ``stunet.read_frames(path)`` reads them from image, video and npy files.

Latent models (``in_channels=4``, converted from diffusers checkpoints by ``stunet convert``) denoise VAE latents
and decode them with the folder's VAE (which also encodes ``video_to_video``'s input); ``height`` and ``width``
stay in pixels:

    pipe = stunet.Pipeline.from_pretrained("zeroscope-stunet")     # unet + vae + text_encoder + scheduler
    res = pipe("a panda eating bamboo", num_frames=24, height=320, width=576)
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar, cast

import numpy as np
import torch

from .. import distributed
from ..backends import BACKENDS, make_backend
from ..backends.base import own_precision
from ..config import check_flags, check_size, check_volume, is_choice, shown
from ..io import read_json
from ..model import STUNet
from ..model.validate import checked_placement
from ..sampling import runtime as cpp_runtime
from ..sampling.samplers import Sampler, make_sampler, sampler_class
from .conditioning import Conditioning, resize_frames, video_frames
from .stages import BaseStage, Prompts, SSROptions, SSRStage, StageOptions, _number, advice_on_out_of_memory
from .latent import VideoVAE
from .text import TextEncoder, check_prompts
from .video import missing_library

log = logging.getLogger(__name__)

RUNTIMES = ("cpp", "python")
OUTPUT_TYPES = ("np", "pt", "pil")


def default_runtime(device: torch.device | str = "cpu") -> str:
    """"cpp" (the C++ runtime) when stunet._C can step tensors on ``device``, else "python", saying why."""
    why = cpp_runtime.unavailable_on(device)
    if why is None:
        return "cpp"
    log.warning("stunet: sampling with the Python reference runtime: %s", why)
    return "python"


def _check_values(value: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` if it holds finite floating-point numbers; raises naming ``name`` otherwise."""
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}; convert it with .float()")
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no values; pass one on the CPU or a GPU")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")
    return value


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


def _check_given_sizes(kwargs: dict) -> None:
    """A mode's ``num_frames`` / ``height`` / ``width``, where given, are positive integers (before a mode
    compares them with its inputs' sizes)."""
    for name in ("num_frames", "height", "width"):
        if kwargs.get(name) is not None:
            check_size(name, kwargs[name], 1)


def stage_generator(generator: torch.Generator, stage: str) -> torch.Generator:
    """A CPU generator of ``stage``'s own, seeded from ``generator``'s current state without drawing from it:
    the same for ``seed=s`` and for a fresh ``torch.Generator().manual_seed(s)``, and another one once the
    generator has drawn."""
    state = generator.get_state().numpy().tobytes()
    digest = hashlib.sha256(state + stage.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2 ** 63)


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """Model space (B, 3, T, H, W) in [-1, 1] -> frames (B, T, H, W, 3) in [0, 1], fp32 on the CPU."""
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu().contiguous()


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _in_own_precision(method: _Method) -> _Method:
    """A pipeline method run with an ambient ``torch.autocast`` turned off on the pipeline's device: text encoder,
    models and VAE compute in their own dtypes (see :func:`~stunet.backends.base.own_precision`). The method
    keeps its signature, for type checkers too."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with own_precision(self.device):
            return method(self, *args, **kwargs)
    return cast(_Method, run)


class Pipeline:
    """Text-to-video cascade: a base STUNet, an optional SSR STUNet, a text encoder.

    Args:
        base_model: the base :class:`~stunet.STUNet` (3 or 7 input channels).
        text_encoder: turns prompts into the models' text tokens (:class:`~stunet.text.TextEncoder`); None
            means prompts must come as ``prompt_embeds=``.
        ssr_model: an SSR :class:`~stunet.STUNet` (6 input channels) raising the base video's resolution.
        backend: how the models run: "reference" (eager PyTorch, the source of truth), "fast" (Triton kernels,
            channels-last, CUDA graphs) or "compile" (torch.compile of the reference).
        sampler: the default sampler of both stages: a name ("ddim", "ddpm", "dpmpp2m") or a configured
            :class:`~stunet.samplers.Sampler` (e.g. ``DDIM(eta=0.5, spacing="trailing")``); None: "ddim" (in
            :meth:`from_pretrained`, a converted folder's scheduler).
        runtime: the sampler step: "cpp" (the C++ runtime's fused pass; the default where stunet._C can step the
            model's tensors: CUDA ones need an install with STUNET_CUDA=1) or "python".
        backend_options: keyword options of the backend (e.g. ``{"max_batch": 1}`` for "fast").
        progress: show progress bars (the call's ``progress=`` overrides it).
        vae: a latent base model's VAE (:class:`~stunet.pipeline.latent.VideoVAE`, or a diffusers
            ``AutoencoderKL``); required by latent models (``in_channels=4``), refused by pixel models.
        schedule: the checkpoint's scheduler settings (:meth:`~stunet.samplers.Sampler.schedule_options`) on
            which a sampler named by the caller runs; None: the model config's schedule and prediction.
        parallel: share each generation among the ranks of a ``torch.distributed`` process group
            (:mod:`stunet.distributed`): None (the default) does when the pipeline is created after
            ``init_process_group`` with more than one rank; "auto" also initialises the group from torchrun's
            environment; False never; or a :class:`stunet.distributed.Parallel`. Every rank must make the
            same calls; the video is the same on any number of ranks, and rank 0 gets the frames.

    One pipeline may serve several threads (a server's workers): each call keeps its own sampler, generator
    and guidance rows, and the backends and text encoder run one call at a time, so a call gets the video it
    makes alone. A distributed pipeline is the exception: its ranks must call it in the same order. A call gives
    the same video under ``torch.inference_mode`` or not; an ambient ``torch.autocast`` is turned off for the
    call, with a warning: the models compute in their own dtypes (convert them for another).
    """

    def __init__(self, base_model: STUNet, text_encoder: TextEncoder | None = None, ssr_model: STUNet | None = None,
                 *, backend: str = "reference", sampler: str | Sampler | None = "ddim", runtime: str | None = None,
                 backend_options: dict | None = None, progress: bool = True, parallel=None,
                 vae: VideoVAE | None = None, schedule: dict | None = None):
        if not isinstance(base_model, STUNet):
            raise TypeError(f"base_model must be a STUNet, got {type(base_model).__name__}")
        if base_model.config.is_ssr:
            raise ValueError("base_model is an SSR model (in_channels=6); pass it as ssr_model=")
        latent = base_model.config.in_channels == 4
        if vae is not None and not isinstance(vae, VideoVAE):
            vae = VideoVAE(vae)
        if latent and vae is None:
            raise ValueError("base_model is a latent model (in_channels=4): pass its VAE as vae= (a diffusers "
                             "AutoencoderKL), or load the converted folder with Pipeline.from_pretrained")
        if not latent and vae is not None:
            raise ValueError(f"vae= is for latent models (in_channels=4); this base model works in pixels "
                             f"(in_channels={base_model.config.in_channels})")
        if latent and vae.latent_channels != base_model.config.out_channels:
            raise ValueError(f"the VAE takes {vae.latent_channels}-channel latents but base_model makes "
                             f"{base_model.config.out_channels}")
        if latent and ssr_model is not None:
            raise ValueError("a latent base model decodes with its VAE; it takes no ssr_model")
        if ssr_model is not None:
            if not isinstance(ssr_model, STUNet) or not ssr_model.config.is_ssr:
                raise ValueError("ssr_model must be a STUNet with in_channels=6 (an SSR config such as lumiere-ssr)")
            if ssr_model.config.text_dim != base_model.config.text_dim:
                raise ValueError(f"ssr_model takes text_dim={ssr_model.config.text_dim} but base_model takes "
                                 f"{base_model.config.text_dim}; both must read the same text encoder")
        if text_encoder is not None and not (callable(getattr(text_encoder, "encode", None))
                                             and isinstance(getattr(text_encoder, "dim", None), int)):
            raise TypeError(f"text_encoder must be a text encoder (.encode(prompts) and .dim, as "
                            f"stunet.text.load_text_encoder(path) gives), got {type(text_encoder).__name__}")
        if text_encoder is not None and text_encoder.dim != base_model.config.text_dim:
            raise ValueError(f"text_encoder gives {text_encoder.dim}-wide tokens but the model takes "
                             f"text_dim={base_model.config.text_dim}; use the encoder the model was trained with")
        self._check_options(backend=backend, sampler=sampler, runtime=runtime, progress=progress,
                            schedule=schedule, backend_options=backend_options)
        sampler = "ddim" if sampler is None else sampler
        runtime = default_runtime(base_model.device) if runtime is None else runtime
        if runtime == "cpp" and (why := cpp_runtime.unavailable_on(base_model.device)):
            raise RuntimeError(f"runtime='cpp' but {why}; or use runtime='python'")
        emulated = [name for name, m in (("base", base_model), ("SSR", ssr_model))
                    if m is not None and m.dtype == torch.float16 and m.device.type == "cpu"]
        if emulated:
            what = " and ".join(emulated) + (" models compute" if len(emulated) > 1 else " model computes")
            log.warning("stunet: the %s in float16 on the CPU, where PyTorch's kernels emulate float16, 15 to 50 "
                        "times slower than float32 (the CPU's default: dtype=torch.float32, --dtype fp32)", what)
        self.base, self.ssr, self.text_encoder = base_model.eval(), ssr_model, text_encoder
        if self.ssr is not None:
            self.ssr.eval()
        self.backend, self.sampler, self.runtime, self.progress = backend, sampler, runtime, progress
        self.vae, self.schedule = vae, schedule
        self.backend_options = dict(backend_options or {})
        self.parallel = distributed.resolve(parallel)
        self.base_stage = BaseStage(make_backend(self.base, backend, **self.backend_options), runtime, sampler,
                                    self.parallel, schedule)
        self.ssr_stage = (SSRStage(make_backend(self.ssr, backend, **self.backend_options), runtime, sampler,
                                   self.parallel) if self.ssr is not None else None)

    @staticmethod
    def _check_options(*, backend="reference", sampler="ddim", runtime=None, progress=True, schedule=None,
                       backend_options=None, **_) -> None:
        """The options that need no model, checked before any model is built or loaded (``from_pretrained``
        checks them before it reads a file)."""
        if not is_choice(backend, BACKENDS):
            raise ValueError(f"backend must be one of {BACKENDS}, got {shown(backend)}")
        check_flags(progress=progress)
        sampler = "ddim" if sampler is None else sampler
        StageOptions(sampler=sampler)  # validates the type
        if isinstance(sampler, str):
            sampler_class(sampler)  # and the name, early
        if schedule is not None:
            if not isinstance(schedule, Mapping):
                raise TypeError(f"schedule must be a dict of sampler settings (Sampler.schedule_options()), got "
                                f"{type(schedule).__name__}")
            try:
                make_sampler("ddim", **schedule)
            except (TypeError, ValueError) as e:
                raise ValueError(f"schedule {dict(schedule)!r} is not a sampler's settings: {e}") from None
        if runtime is not None and not is_choice(runtime, RUNTIMES):
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {shown(runtime)}")
        if backend_options is not None and not isinstance(backend_options, Mapping):
            raise TypeError(f"backend_options must be a dict of the backend's keyword options (such as "
                            f"{{'max_batch': 1}}), got {type(backend_options).__name__}")

    @property
    def _rank0(self) -> bool:
        """Whether this process shows progress: the only one, or rank 0 of a shared generation."""
        return self.parallel is None or self.parallel.rank == 0

    @property
    def pixels_per_latent(self) -> int:
        """How many pixels one position of the base model's output covers along H and W (1 in pixel space)."""
        return self.vae.scale_factor if self.vae is not None else 1

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, ssr: str | os.PathLike | None = None,
                        text_encoder: str | os.PathLike | TextEncoder | None = None, *, backend: str = "reference",
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        **kwargs) -> "Pipeline":
        """Load the models saved by ``STUNet.save_pretrained`` (``base``, optional ``ssr``) and a text encoder:
        a folder in the transformers format (T5 or CLIP, with its tokenizer), an encoder object, or None (the
        ``text_encoder`` folder inside ``base`` when there is one). ``device`` defaults to CUDA when available;
        ``dtype`` applies to the models, the VAE and a text encoder loaded from a folder (None: each file's own on
        a GPU; float32 on the CPU, where PyTorch's kernels emulate float16 15 to 50 times slower, so the FP16
        weights of a ``stunet convert`` folder compute in float32 there); other keywords go to :class:`Pipeline`.

        A folder written by ``stunet convert`` from a diffusers pipeline also holds ``vae``, ``tokenizer`` and
        ``scheduler``: the VAE decodes the latents, CLIP encodes prompts as the diffusers pipeline does, and the
        scheduler's settings become the default sampler (unless ``sampler=`` is given)."""
        from ..sampling.samplers import scheduler_options
        from .latent import load_vae, vae_folder
        from .text import check_text_encoder_folder, load_text_encoder

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        checked_placement(device, dtype)
        if dtype is None and torch.device(device).type == "cpu":
            dtype = torch.float32  # not a float16 file's own: PyTorch's CPU kernels emulate float16
        unknown = sorted(set(kwargs) - FROM_PRETRAINED_OPTIONS)
        if unknown:
            raise TypeError(f"Pipeline.from_pretrained got unexpected keyword argument(s) {', '.join(unknown)}; "
                            f"it takes {', '.join(sorted(FROM_PRETRAINED_OPTIONS))} (Pipeline's options)")
        cls._check_options(backend=backend, **kwargs)
        for argument, folder in (("base", base), ("ssr", ssr)):
            if folder is None and argument == "ssr":
                continue
            if not isinstance(folder, (str, os.PathLike)):
                raise TypeError(f"{argument} must be the path of a model folder, got {type(folder).__name__}")
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"no model folder at {str(folder)!r} ({argument}=): give the folder written by "
                                        "STUNet.save_pretrained or `stunet convert`")
        if isinstance(text_encoder, (str, os.PathLike)):
            check_text_encoder_folder(text_encoder)
        base = Path(base)
        base_model = STUNet.from_pretrained(base, device=device, dtype=dtype)
        ssr_model = STUNet.from_pretrained(ssr, device=device, dtype=dtype) if ssr is not None else None
        if text_encoder is None and (base / "text_encoder").is_dir():
            text_encoder = base / "text_encoder"
        if isinstance(text_encoder, (str, os.PathLike)):
            tokenizer = base / "tokenizer"
            sd_style = Path(text_encoder) == base / "text_encoder" and tokenizer.is_dir()
            text_encoder = load_text_encoder(text_encoder, device=device, dtype=dtype,
                                             tokenizer=tokenizer if sd_style else None,
                                             sd_style=sd_style)
        if (vae := vae_folder(base)) is not None and "vae" not in kwargs:
            kwargs["vae"] = load_vae(vae, device=device, dtype=dtype)
        scheduler = base / "scheduler" / "scheduler_config.json"
        if scheduler.is_file() and "schedule" not in kwargs:
            scheduler_config = read_json(scheduler, "fix or remove the scheduler folder, or pass schedule=")
            name, options = scheduler_options(scheduler_config)
            kwargs["schedule"] = {k: v for k, v in options.items()  # what another named sampler runs on
                                  if k not in ("clip_sample", "clip_range", "fixed_stride")}
            if kwargs.get("sampler") is None:
                if name is None:
                    log.warning("stunet: %s's scheduler %s has no stunet counterpart; sampling with DDIM on its "
                                "schedule (pass sampler= to choose)", base, scheduler_config.get("_class_name"))
                kwargs["sampler"] = make_sampler(name or "ddim", **options)
        return cls(base_model, text_encoder, ssr_model, backend=backend, **kwargs)

    def with_style(self, style, alpha: float) -> "Pipeline":
        """Stylized generation: a pipeline whose base model's spatial weights are blended towards ``style``."""
        from ..model.weights import interpolate_spatial

        return Pipeline(interpolate_spatial(self.base, style, alpha), self.text_encoder, self.ssr,
                        backend=self.backend, sampler=self.sampler, runtime=self.runtime,
                        backend_options=self.backend_options, progress=self.progress,
                        parallel=self.parallel if self.parallel is not None else False, vae=self.vae,
                        schedule=self.schedule)

    @property
    def device(self) -> torch.device:
        return self.base.device

    def __repr__(self) -> str:
        def model(m: STUNet) -> str:
            params = sum(p.numel() for p in m.parameters()) / 1e6
            return f"<{m.config.in_channels}-channel STUNet, {params:.1f} M parameters, {m.dtype}>"

        models = [f"base={model(self.base)}", *([f"ssr={model(self.ssr)}"] if self.ssr is not None else [])]
        return f"Pipeline({', '.join(models)}, backend={self.backend!r}, device={str(self.device)!r})"

    def describe(self) -> str:
        """What runs: each stage's backend, the sampler and the runtime."""
        stages = [f"base {self.base_stage.backend.describe()}"]
        if self.ssr_stage is not None:
            stages.append(f"ssr {self.ssr_stage.backend.describe()}")
        split = (f"; shared among {self.parallel.world_size} rank(s)" if self.parallel is not None else "")
        return "; ".join(stages) + f"; sampler {self.sampler!r} stepped by the {self.runtime} runtime{split}"

    # -- text -----------------------------------------------------------------------------------------------
    @_in_own_precision
    def encode_prompt(self, prompts: list[str], negative: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and mask of [prompts; negative prompts], padded to one length, on the model's device."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass text_encoder= when building it (a T5 or "
                             "CLIP folder, or stunet.text.tiny_random_t5(dim) as an offline random stand-in), "
                             "or give prompt_embeds= (and negative_prompt_embeds=) to the call")
        check_prompts(prompts)
        check_prompts(negative, "negative")
        if len(negative) != len(prompts):
            raise ValueError(f"negative must hold one prompt for each of the {len(prompts)} prompts, got "
                             f"{len(negative)}")
        tokens, mask = self.text_encoder.encode([*prompts, *negative])
        return tokens.to(self.device, self.base.dtype), mask.to(self.device)

    def _check_prompts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """(prompts, negatives) as lists, or the embeddings checked; raises before any compute."""
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            if negative_prompt is not None:
                raise ValueError("negative_prompt is text, which prompt_embeds= skips encoding: pass "
                                 "negative_prompt_embeds= instead")
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3 \
                    or prompt_embeds.shape[2] != self.base.config.text_dim:
                raise ValueError(f"prompt_embeds must be a (B, L, {self.base.config.text_dim}) tensor, got "
                                 f"{tuple(getattr(prompt_embeds, 'shape', ())) or type(prompt_embeds).__name__}")
            if prompt_embeds.shape[0] == 0 or prompt_embeds.shape[1] == 0:
                raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} is empty: it needs at least one prompt "
                                 f"(B) of at least one token (L; an empty prompt still gives the end-of-sequence "
                                 f"token)")
            if negative_prompt_embeds is not None and (not isinstance(negative_prompt_embeds, torch.Tensor)
                                                       or negative_prompt_embeds.shape != prompt_embeds.shape):
                raise ValueError(f"negative_prompt_embeds must match prompt_embeds {tuple(prompt_embeds.shape)}, "
                                 f"got {tuple(getattr(negative_prompt_embeds, 'shape', ()))}")
            for name, t in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
                if t is not None:
                    _check_values(t, name)
            return None, None
        if negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds goes with prompt_embeds=; with prompts, pass negative_prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError("prompt must be a string or a non-empty list of strings (or pass prompt_embeds=)")
        B = len(prompt)
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * B if isinstance(negative, str) else negative
        if not (isinstance(negative, (list, tuple)) and len(negative) == B
                and all(isinstance(n, str) for n in negative)):
            raise ValueError(f"negative_prompt must be a string or a list of {B} strings (one per prompt), "
                             f"got {shown(negative_prompt)}")
        if self.text_encoder is None:
            self.encode_prompt([], [])  # raises, naming the ways out
        if any(not p.strip() for p in prompt):
            log.warning("stunet: an empty prompt: that video is generated unconditionally")
        return list(prompt), list(negative)

    def _encode(self, prompts, negatives, prompt_embeds, negative_prompt_embeds) -> Prompts:
        if prompts is None:
            pe = prompt_embeds.to(self.device, self.base.dtype)
            ne = (negative_prompt_embeds.to(self.device, self.base.dtype) if negative_prompt_embeds is not None
                  else torch.zeros_like(pe))
            mask = torch.ones(2 * pe.shape[0], pe.shape[1], dtype=torch.bool, device=self.device)
            return Prompts(torch.cat([pe, ne]), mask, pe.shape[0])
        tokens, mask = self.encode_prompt(prompts, negatives)
        return Prompts(tokens, mask, len(prompts))

    # -- the call ---------------------------------------------------------------------------------------------
    @_in_own_precision
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 32, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 sampler: str | Sampler | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, ssr: SSROptions | None = None,
                 conditioning: Conditioning | None = None, init_video: torch.Tensor | None = None,
                 strength: float = 1.0, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "np",
                 callback_on_step_end: Callable | None = None, progress: bool | None = None,
                 latents: torch.Tensor | None = None, low_res_video: torch.Tensor | None = None) -> PipelineOutput:
        """Generate videos; every argument is checked before any compute.

        Args:
            prompt: a prompt or a list of prompts (one video each); an empty prompt generates unconditionally.
            negative_prompt: what to steer away from (one for all, or one per prompt); default "".
            num_frames, height, width: the base video's size (default: the base model's ``sample_frames`` and
                ``sample_size``, times the VAE's scale for a latent model); multiples of the model's frame and
                spatial divisors (times the VAE's scale for a latent model).
            num_inference_steps: base denoising steps.
            guidance_scale: classifier-free guidance of the base stage (1 = none, half the compute).
            guidance_rescale: rescale of the guided prediction towards the conditional one's std, in [0, 1].
            sampler: this call's base-stage sampler (name or :class:`~stunet.samplers.Sampler`); default the
                pipeline's.
            seed: the noise seed (a random one when neither it nor ``generator`` is given; the output says it).
            generator: a CPU ``torch.Generator`` instead of ``seed``.
            ssr: :class:`SSROptions` for the SSR stage (steps, guidance, windows, noise augmentation).
            conditioning: the masked video and mask of a 7-channel model (see the mode methods).
            init_video: SDEdit input (B, 3, F, H, W) in [-1, 1] (pixels; a latent model encodes it with its VAE);
                ``strength`` in (0, 1] is how far it is noised: the last ``int(num_inference_steps * strength)``
                steps run, as diffusers counts them.
            prompt_embeds, negative_prompt_embeds: precomputed text tokens (B, L, text_dim) instead of prompts.
            output_type: "np" (numpy), "pt" (torch) or "pil" (lists of PIL images).
            callback_on_step_end: ``f(pipe, step, timestep, {"latents": x, "stage": "base"|"ssr"})`` after each
                step; it returns None or a dict, and ``{"latents": x2}`` (same shape) replaces the sample. An
                exception it raises ends the call (a cancelled request); the pipeline stays as it was.
            progress: show progress bars (default: the pipeline's setting).
            latents: the initial noise (B, C_out, T, H, W) of the base stage (latent-space H and W for a latent
                model) instead of a draw from the seed; with ``init_video``, the noise it is noised with.
            low_res_video: the base stage's video (B, 3, F, H, W) in [-1, 1] instead of generating it: only the SSR
                stage runs, raising it (see :meth:`upscale`).
        Returns:
            :class:`PipelineOutput` with ``frames`` (B, F, H, W, 3) in [0, 1] (after SSR when there is one);
            ``frames`` is None on the ranks that do not get them (see ``parallel``).
        """
        cfg = self.base.config
        check_flags(optional=True, progress=progress)
        show = self.progress if progress is None else progress
        f = self.pixels_per_latent
        T = num_frames if num_frames is not None else cfg.sample_frames
        H = height if height is not None else cfg.sample_size * f
        W = width if width is not None else cfg.sample_size * f
        self._check_geometry(T, H, W)
        H, W = H // f, W // f  # the base model's positions
        base_options = StageOptions(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    guidance_rescale=guidance_rescale, sampler=sampler)
        if isinstance(sampler, str):
            sampler_class(sampler)
        if ssr is None:
            ssr = SSROptions()
        elif not isinstance(ssr, SSROptions):
            raise TypeError(f"ssr must be an SSROptions, got {type(ssr).__name__}")
        if self.ssr_stage is not None:
            self.ssr_stage.output_size(H, W)
            ssr.geometry(self.ssr.config, T)
        if not is_choice(output_type, OUTPUT_TYPES):
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {shown(output_type)}")
        if output_type == "pil" and (problem := missing_library("PIL", "output_type='pil'", "or output_type='np'")):
            raise ImportError(problem)
        _number("", "strength", strength, 0, 1, lo_open=True)
        if generator is not None and seed is not None:
            raise ValueError("pass either seed or generator, not both")
        if generator is None:
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                     or not 0 <= seed < 2 ** 63):
                raise ValueError(f"seed must be an integer in [0, 2**63), got {shown(seed)}")
            seed = random.randrange(2 ** 63) if seed is None else seed
            if self.parallel is not None:
                seed = self.parallel.agree(seed)  # one noise draw, the same on every rank
            generator = torch.Generator().manual_seed(seed)
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (noise is drawn on the CPU so a seed gives "
                             "the same video on every device)")
        prompts, negatives = self._check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        B = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if low_res_video is not None:
            low_res_video = self._check_low_res(low_res_video, (B, 3, T, H, W), conditioning, init_video, latents)
        elif conditioning is not None:
            if not isinstance(conditioning, Conditioning):
                raise TypeError(f"conditioning must be a stunet.Conditioning (Conditioning.image_to_video, .inpaint, "
                                f".cinemagraph; or the mode methods), got {type(conditioning).__name__}")
            conditioning = conditioning.check(cfg, B, T, H, W)
        elif cfg.in_channels == 7:
            conditioning = Conditioning.unconditional(B, T, H, W)
        if init_video is not None:
            init_video = self._check_tensor(init_video, "init_video", (B, 3, T, H * f, W * f)).float()
            if int(num_inference_steps * strength) < 1:
                raise ValueError(f"strength {strength} leaves no denoising step of {num_inference_steps}; raise it "
                                 "or the step count")
        if latents is not None:
            self._check_tensor(latents, "latents", (B, cfg.out_channels, T, H, W), "B, C, T, H, W of the base model")
        callback = self._step_callback(callback_on_step_end)
        ssr_generator = stage_generator(generator, "ssr") if self.ssr_stage is not None else None

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        text = self._encode(prompts, negatives, prompt_embeds, negative_prompt_embeds)
        timings["text"] = self._elapsed(t0)

        if init_video is not None and self.vae is not None:
            t0 = time.perf_counter()
            init_video, latents = self._encode_init(init_video, latents, generator, show)
            timings["encode"] = self._elapsed(t0)

        if low_res_video is None:
            t0 = time.perf_counter()
            x = self.base_stage.run(text, (B, T, H, W), generator, base_options, conditioning=conditioning,
                                    init=init_video, strength=strength, callback=callback, progress=show,
                                    latents=latents)
            timings["base"] = self._elapsed(t0)
        else:
            x = low_res_video.to(self.ssr_stage.backend.device)

        low = x
        if self.ssr_stage is not None:
            t0 = time.perf_counter()
            x = self.ssr_stage.run(text, low, ssr_generator, ssr, ssr.num_inference_steps or num_inference_steps,
                                   callback=callback, progress=show)
            timings["ssr"] = self._elapsed(t0)

        t0 = time.perf_counter()
        frames = low_frames = None
        if self.parallel is None or self.parallel.gets_frames:
            if self.vae is not None:
                with self._vae_advice("decode"):
                    x = self.vae.decode(x, progress=show)
            frames = self._output(x, output_type)
            low_frames = self._output(low, output_type) if self.ssr_stage is not None else None
        timings["decode"] = self._elapsed(t0)
        return PipelineOutput(frames=frames, seed=seed, timings=timings, low_res_frames=low_frames)

    def _encode_init(self, video: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator,
                     progress: bool):
        """A latent model's SDEdit start: the video's latents (a posterior sample) and the noise to noise them
        with, both drawn from ``generator`` in the order and the frame-major layout of diffusers' video-to-video
        pipelines, so a seed gives their video."""
        with self._vae_advice("encode"):
            latents = self.vae.encode(video, generator, progress=progress and self._rank0)
        if noise is None:
            B, C, T, h, w = latents.shape
            noise = Sampler.draw_noise(torch.empty(B, T, C, h, w), generator).transpose(1, 2)
        return latents, noise

    def _vae_advice(self, what: str):
        """Advice for an out-of-memory error in the VAE's ``what`` ("encode" or "decode")."""
        vae, ways = self.vae, []
        if vae.chunk_frames > 1:
            ways.append(f"fewer frames per VAE call: pipe.vae.chunk_frames = {vae.chunk_frames // 2}")
        if vae.device.type == "cuda" and vae.dtype == torch.float32:
            ways.append("an FP16 VAE: Pipeline.from_pretrained(..., dtype=torch.float16) (--dtype fp16)")
        ways.append("a smaller size (height, width)")
        return advice_on_out_of_memory(f"the VAE's {what} ({vae.chunk_frames} frame(s) per call)", ways)

    @staticmethod
    def _check_tensor(value, name: str, shape, layout: str = "B, 3, T, H, W") -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise ValueError(f"{name} must be a tensor of shape {shape} ({layout}), got "
                             f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}")
        return _check_values(value, name)

    def _check_low_res(self, video, shape, conditioning, init_video, latents) -> torch.Tensor:
        if self.ssr_stage is None:
            raise ValueError("low_res_video: this pipeline has no SSR model to raise it (pass ssr_model=)")
        given = [n for n, v in (("conditioning", conditioning), ("init_video", init_video), ("latents", latents))
                 if v is not None]
        if given:
            raise ValueError(f"low_res_video replaces the base stage, which {given[0]} is for; pass one of them")
        return self._check_tensor(video, "low_res_video", shape).float()

    def _step_callback(self, callback: Callable | None):
        if callback is None:
            return None
        if not callable(callback):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}")

        def run(stage: str, i: int, t: int, x: torch.Tensor) -> torch.Tensor:
            result = callback(self, i, t, {"latents": x, "stage": stage})
            if result is None:
                return x
            if not isinstance(result, Mapping):
                raise TypeError(f"callback_on_step_end must return None or a dict (such as {{'latents': x}}), got "
                                f"{type(result).__name__}")
            new = result.get("latents")
            if new is None:
                return x
            if not isinstance(new, torch.Tensor) or new.shape != x.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"callback_on_step_end returned latents {got}; they must be a tensor of the "
                                 f"shape it was given, {tuple(x.shape)}")
            return new.to(x.device, x.dtype).contiguous()

        return run

    def _elapsed(self, t0: float) -> float:
        """Seconds since t0 once the device's queued work is done (stage timings of asynchronous GPU work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _check_geometry(self, T: int, H: int, W: int) -> None:
        self._check_frames(T)
        spatial = self.base.config.spatial_divisor * self.pixels_per_latent
        for name, value in (("height", H), ("width", W)):
            check_size(name, value, spatial, "this base model")
        check_volume(num_frames=T, height=H, width=W)

    def _check_frames(self, T: int) -> None:
        self.base.config.check_frames(T, "num_frames", "this base model")

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
        """Animate ``image`` ((H, W, 3) or (B, H, W, 3) in [0, 1]): it is frame 0 of the generated video, which has
        its size (``height`` / ``width`` as in :meth:`video_to_video`)."""
        cond = Conditioning.image_to_video(image, self._frames(kwargs))
        return self(prompt, **self._sized(kwargs, cond))

    def inpaint(self, video, region, prompt=None, **kwargs) -> PipelineOutput:
        """Regenerate ``region`` (1 = generate; (H, W), (F, H, W) or (B, F, H, W)) of ``video`` (frames in [0, 1]);
        sizes as in :meth:`video_to_video` (a resized region never shrinks)."""
        cond = Conditioning.inpaint(video, region)
        return self(prompt, **self._sized(kwargs, cond))

    def cinemagraph(self, image, region, prompt=None, **kwargs) -> PipelineOutput:
        """Animate only ``region`` (1 = animate, (H, W) or (B, H, W)) of ``image``; the rest stays still; sizes as
        in :meth:`video_to_video`."""
        cond = Conditioning.cinemagraph(image, region, self._frames(kwargs))
        return self(prompt, **self._sized(kwargs, cond))

    def video_to_video(self, video, prompt=None, strength: float = 0.6, **kwargs) -> PipelineOutput:
        """SDEdit: noise ``video`` (frames in [0, 1]) to ``strength`` and denoise it towards the prompt.

        The output has the video's frames and size. ``height`` / ``width`` (the base video's, as in ``__call__``)
        default to the video's size, over the SSR stage's scale on a cascade (which edits at the base size and
        raises the result back). Another size resizes each frame first, as ZeroScope's XL model upscales a
        576x320 clip at 1024x576."""
        init = video_frames(video)
        _, _, T, H, W = init.shape
        kwargs = self._input_sized(kwargs, T, H, W)
        if (kwargs["height"], kwargs["width"]) != (H, W):
            init = resize_frames(init, kwargs["height"], kwargs["width"])
        return self(prompt, init_video=init, strength=strength, **kwargs)

    def _input_sized(self, kwargs: dict, T: int, H: int, W: int) -> dict:
        """The call of a mode whose inputs are (T, H, W): their frames, and ``height`` / ``width`` (the base
        video's) defaulting to their size, over the SSR stage's scale on a cascade; another size is checked (the
        mode resizes its inputs to it)."""
        _check_given_sizes(kwargs)
        if kwargs.get("num_frames") not in (None, T):
            raise ValueError(f"num_frames must be the inputs' frame count ({T}) or None, got {kwargs['num_frames']}")
        kwargs = {**kwargs, "num_frames": T}
        if kwargs.get("height") is None or kwargs.get("width") is None:
            for name, size in zip(("height", "width"), self._base_size(H, W)):
                kwargs[name] = size if kwargs.get(name) is None else kwargs[name]
        if (kwargs["height"], kwargs["width"]) != (H, W):
            self._check_geometry(T, kwargs["height"], kwargs["width"])
        return kwargs

    def upscale(self, video, prompt=None, **kwargs) -> PipelineOutput:
        """The SSR stage alone: raise ``video`` (frames in [0, 1], at a base size) to the SSR model's resolution on
        MultiDiffusion windows, guided by ``prompt``; the stage's settings in ``ssr=SSROptions(...)`` (its steps
        default to ``num_inference_steps``). For a video made elsewhere, or another SSR pass over a base video
        without running the base model again (``low_res_frames`` of an output). The SSR stage draws its noise as
        in a whole generation, so ``upscale(res.low_res_frames, prompt, seed=res.seed)`` with the same settings
        repeats ``res``'s SSR stage (up to the rounding of the frames' round trip through [0, 1])."""
        low = video_frames(video)
        _, _, T, H, W = low.shape
        _check_given_sizes(kwargs)
        for name, size in (("num_frames", T), ("height", H), ("width", W)):
            if kwargs.get(name) not in (None, size):
                raise ValueError(f"{name} must be the video's ({size}) or None: upscale raises the video as it is, "
                                 f"got {kwargs[name]}")
        return self(prompt, low_res_video=low, **{**kwargs, "num_frames": T, "height": H, "width": W})

    def _base_size(self, height: int, width: int) -> tuple[int, int]:
        """The base video's (H, W) from which this pipeline makes a (height x width) video."""
        if self.ssr_stage is None:
            return height, width
        cfg, spatial = self.ssr.config, self.base.config.spatial_divisor
        h, w = height * cfg.low_res_size // cfg.sample_size, width * cfg.low_res_size // cfg.sample_size
        if (min(h, w) < 1 or (h * cfg.sample_size, w * cfg.sample_size) != (height * cfg.low_res_size,
                                                                           width * cfg.low_res_size)
                or h % spatial or w % spatial):
            raise ValueError(f"the video is {height}x{width}, which this cascade does not make: its SSR stage scales "
                             f"base videos with sides in multiples of {spatial} by "
                             f"{cfg.sample_size / cfg.low_res_size:g}; pass height= and width= (the base size to "
                             f"edit at)")
        self.ssr_stage.output_size(h, w)
        return h, w

    def _frames(self, kwargs) -> int:
        """The frames of a mode that animates one image: ``num_frames``, by default the base model's clip."""
        frames = kwargs.get("num_frames")
        if frames is None:
            return self.base.config.sample_frames
        self._check_frames(frames)
        return frames

    def _sized(self, kwargs: dict, cond: Conditioning) -> dict:
        """The call of a conditional mode (see ``_input_sized``), its conditioning resized to the base size."""
        _, _, T, H, W = cond.video.shape
        kwargs = self._input_sized(kwargs, T, H, W)
        if (kwargs["height"], kwargs["width"]) != (H, W):
            cond = cond.resized(kwargs["height"], kwargs["width"])
        return {**kwargs, "conditioning": cond}


FROM_PRETRAINED_OPTIONS = frozenset(inspect.signature(Pipeline.__init__).parameters) - {
    "self", "base_model", "text_encoder", "ssr_model", "backend"}
"""The keywords ``Pipeline.from_pretrained`` passes on to :class:`Pipeline` (it loads the models itself)."""


__all__ = ["Pipeline", "PipelineOutput", "stage_generator", "to_frames", "RUNTIMES", "OUTPUT_TYPES"]
