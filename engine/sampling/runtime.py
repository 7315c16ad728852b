"""The C++ denoising runtime (``stunet._C``, csrc/) behind the samplers' interface.

    s = FusedSampler(DDIM(schedule="cosine", prediction="v"))     # or FusedSampler.make("ddim", ...)
    s.set_timesteps(32)
    for t in s.timesteps:
        x = s.guided_step(cond, uncond, t, x, guidance_scale=7.5)  # CFG + (v|eps) -> x0 + update, one pass

One pass over the video per step: it reads cond, uncond, x (and the DPM-Solver++ history, the noise) and
writes x_{t-1}, where the same math as torch ops makes a pass per op. It computes every element in the Python
reference's operation order, so on the CPU it returns the reference's result bit for bit (guidance rescale
aside: its per-sample std is reduced in another order). Noise is drawn from the caller's CPU generator exactly
when the reference draws it, so a seed gives the same video with either.

``blend_windows`` is MultiDiffusion's weighted blend of window outputs in one pass (bit-identical to
``multidiffusion.blend``). Tensors go to C++ as buffers (address, element count, dtype, device), which the
binding checks against what each pass reads and writes; this module checks shapes, layout and device first,
so errors name the tensor argument.
"""
from __future__ import annotations

import functools
import logging

import torch

from ..backends.base import on_device
from .samplers import SAMPLERS, Sampler

log = logging.getLogger(__name__)

try:
    from .. import _C
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # a source checkout that was never built, or a broken build
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_KIND = {cls: name for name, cls in SAMPLERS.items()}


def available() -> bool:
    """Whether the C++ runtime (stunet._C) imported."""
    return _C is not None


def cuda_available() -> bool:
    """Whether the runtime was built with its CUDA passes (STUNET_CUDA=1 at install time)."""
    return _C is not None and _C.has_cuda()


def status() -> str:
    """One line for ``stunet env``: what the runtime was built with, or why it is missing."""
    if _C is None:
        return f"unavailable ({_IMPORT_ERROR}); reinstall with `pip install -e .` to build stunet._C"
    note = "" if _C.has_cuda() else " (CPU only: install with STUNET_CUDA=1 for the CUDA passes)"
    return _C.build_info() + note


def unavailable_on(device: torch.device | str) -> str | None:
    """Why the runtime cannot step tensors on ``device`` (None: it can)."""
    device = torch.device(device)
    if _C is None:
        return f"the C++ runtime stunet._C is not available ({_IMPORT_ERROR}); reinstall with `pip install -e .`"
    if device.type == "cuda" and not _C.has_cuda():
        return ("stunet._C was built without its CUDA passes; reinstall with STUNET_CUDA=1 "
                "(`STUNET_CUDA=1 pip install --no-build-isolation -e .`) to step CUDA tensors")
    if device.type not in ("cpu", "cuda"):
        return f"the C++ runtime steps CPU and CUDA tensors, not {device.type} ones"
    return None


def _require() -> None:
    if _C is None:
        raise RuntimeError(f"{unavailable_on('cpu')}, or use runtime='python'")


def _device(t: torch.Tensor) -> str:
    why = unavailable_on(t.device)
    if why is None:
        return t.device.type
    if t.device.type == "cuda":
        raise RuntimeError(f"{why}, or use runtime='python'")
    raise ValueError(why)


def _buffer(t: torch.Tensor | None) -> tuple[int, int, str, str] | None:
    """A contiguous tensor as the binding's buffer (address, numel, dtype, device); None stays None."""
    if t is None:
        return None
    return t.data_ptr(), t.numel(), str(t.dtype).removeprefix("torch."), t.device.type


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _checked(name: str, t: torch.Tensor | None, like: torch.Tensor, dtypes=tuple(_DTYPES)) -> None:
    """Checks ``t`` (if given) against ``like`` (shape, device), the accepted dtypes and contiguity."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but the sample has {tuple(like.shape)}; they must match")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the sample is on {like.device}; move it with .to()")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")


class FusedSampler:
    """A reference :class:`~stunet.samplers.Sampler` whose ``step`` runs in the C++ runtime.

    Schedule tables, timesteps and the multistep history are the runtime's; ``reference`` stays available
    for everything that is not a step (``add_noise``, ``abar``).
    """

    def __init__(self, reference: Sampler):
        _require()
        if type(reference) not in _KIND:
            raise TypeError(f"reference must be one of {sorted(c.__name__ for c in _KIND)}, "
                            f"got {type(reference).__name__}")
        self.reference = reference
        self._scheduler = _C.Scheduler(_KIND[type(reference)], reference.schedule, reference.prediction,
                                       reference.spacing, reference.num_train_timesteps,
                                       float(getattr(reference, "eta", 0.0)), reference.clip_sample,
                                       float(reference.clip_range), reference.beta_start, reference.beta_end,
                                       reference.steps_offset, reference.set_alpha_to_one, reference.fixed_stride)
        self._history: torch.Tensor | None = None
        self._stats: torch.Tensor | None = None
        if len(reference.timesteps):
            self.set_timesteps(timesteps=reference.timesteps.tolist())

    @classmethod
    def make(cls, name: str, **kwargs) -> "FusedSampler":
        from .samplers import make_sampler

        return cls(make_sampler(name, **kwargs))

    def __repr__(self) -> str:
        return f"FusedSampler({self.reference!r})"

    @property
    def timesteps(self) -> torch.Tensor:
        return self.reference.timesteps

    @property
    def num_inference_steps(self) -> int:
        return self.reference.num_inference_steps

    @property
    def stochastic(self) -> bool:
        return self.reference.stochastic

    def set_timesteps(self, num_inference_steps: int | None = None, *, timesteps=None) -> None:
        """As :meth:`Sampler.set_timesteps`: the grid of ``num_inference_steps``, or explicit ``timesteps``."""
        self.reference.set_timesteps(num_inference_steps, timesteps=timesteps)
        if timesteps is not None:
            self._scheduler.set_explicit_timesteps(self.reference.timesteps.tolist())
        else:
            self._scheduler.set_timesteps(num_inference_steps)
        assert self._scheduler.timesteps == self.reference.timesteps.tolist(), "C++ and Python timesteps differ"
        self.reset()

    def reset(self) -> None:
        """Forget the multistep history (the buffer stays allocated: it is only read once a step wrote it)."""
        self.reference.reset()
        self._scheduler.reset()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        return self.reference.add_noise(x0, noise, t)

    def guided_step(self, cond: torch.Tensor, uncond: torch.Tensor | None, t, x: torch.Tensor,
                    guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{t-1} from the conditional and unconditional predictions (``uncond=None``: no guidance)."""
        return self.step(cond, t, x, generator, uncond=uncond, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale)

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None, *,
             uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t-1} (dtype of ``x``; ``out`` may be ``x`` for an in-place step) from the prediction at ``t``."""
        _require()
        if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
            raise TypeError(f"x must be a float32, float16 or bfloat16 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if not x.is_contiguous():
            raise ValueError("x must be contiguous (call .contiguous())")
        if x.dim() < 1 or x.numel() == 0:
            raise ValueError(f"x must be a non-empty (B, ...) tensor, got shape {tuple(x.shape)}")
        _device(x)
        _checked("model_output", model_output, x)
        _checked("uncond", uncond, x)
        if uncond is not None and uncond.dtype != model_output.dtype:
            raise TypeError(f"uncond ({uncond.dtype}) and model_output ({model_output.dtype}) must share a dtype")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if guidance_rescale and uncond is None:
            raise ValueError("guidance_rescale needs uncond (it rescales a guided prediction)")
        if out is None:
            out = torch.empty_like(x)
        _checked("out", out, x, (x.dtype,))

        coefs = self._scheduler.step_coefs(int(t))  # validates t; advances the multistep history
        noise = Sampler.draw_noise(x, generator) if coefs.needs_noise else None
        self.launch(coefs, model_output, uncond, x, out, guidance_scale, guidance_rescale, noise)
        return out

    def launch(self, coefs, cond: torch.Tensor, uncond: torch.Tensor | None, x: torch.Tensor, out: torch.Tensor,
               guidance_scale: float = 1.0, guidance_rescale: float = 0.0, noise: torch.Tensor | None = None) -> None:
        """One fused pass with precomputed ``coefs`` (``step`` validates its arguments first and calls this;
        benchmarks and captured graphs call it directly with the coefficients of a fixed timestep)."""
        if coefs.writes_history and (self._history is None or self._history.shape != x.shape
                                     or self._history.device != x.device):
            self._history = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        stats = None
        if guidance_rescale and x.device.type == "cuda":
            if self._stats is None or self._stats.numel() < 4 * x.shape[0] or self._stats.device != x.device:
                self._stats = torch.empty(4 * x.shape[0], dtype=torch.float64, device=x.device)
            stats = self._stats
        history = self._history if coefs.writes_history or coefs.second_order else None
        _device(x)
        with on_device(x.device):  # a CUDA pass launches on the current device, with the stream of x's
            _C.fused_step(coefs, x.shape[0], _buffer(cond), _buffer(uncond), float(guidance_scale),
                          float(guidance_rescale), _buffer(x), _buffer(out), _buffer(history), _buffer(noise),
                          _buffer(stats), _stream(x))

    def step_coefs(self, t):
        """The runtime's coefficients of the step at ``t`` (advances the multistep history, as a step does)."""
        return self._scheduler.step_coefs(int(t))


@functools.lru_cache(maxsize=64)
def _blend_table(num_frames: int, window: int, overlap: int, weighting: str, device: str):
    """The per-frame (window, local frame, weight) table, on ``device``; built once per geometry (a device
    upload per call would cost a host synchronisation and break CUDA-graph capture)."""
    t = _C.BlendTable(num_frames, window, overlap, weighting)
    win = torch.tensor(t.window, dtype=torch.int32, device=device)
    local = torch.tensor(t.local, dtype=torch.int32, device=device)
    weight = torch.tensor(t.weight, dtype=torch.float32, device=device)
    return t, win, local, weight


def blend_windows(outputs: torch.Tensor | list[torch.Tensor], num_frames: int, window: int, overlap: int,
                  weighting: str = "uniform", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MultiDiffusion blend of window outputs into the clip, in one pass.

    ``outputs``: the windows of ``window_plan(num_frames, window, overlap)`` in order, as one tensor
    (N, B, C, L, H, W) or a list of N (B, C, L, H, W) (stacked first: one extra copy). Returns
    (B, C, num_frames, H, W) in ``dtype``: fp32 accumulation in window order, rounded once.
    """
    _require()
    if isinstance(outputs, (list, tuple)):
        outputs = torch.stack([o.contiguous() for o in outputs])
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 6:
        raise ValueError("outputs must be a (N, B, C, L, H, W) tensor or a list of (B, C, L, H, W) windows")
    if outputs.dtype not in _DTYPES or dtype not in _DTYPES:
        raise TypeError(f"outputs and dtype must be float32, float16 or bfloat16, got {outputs.dtype} -> {dtype}")
    if not outputs.is_contiguous():
        raise ValueError("outputs must be contiguous (call .contiguous())")
    _device(outputs)
    table, win, local, weight = _blend_table(int(num_frames), int(window), int(overlap), weighting, str(outputs.device))
    n, b, c, length, h, w = outputs.shape
    if n != table.num_windows or length != table.window_len:
        raise ValueError(f"outputs hold {n} windows of {length} frames, but the plan for {num_frames} frames "
                         f"(window {window}, overlap {overlap}) has {table.num_windows} of {table.window_len}")
    out = torch.empty(b, c, num_frames, h, w, dtype=dtype, device=outputs.device)
    with on_device(outputs.device):
        _C.blend(_buffer(win), _buffer(local), _buffer(weight), table.cover, table.num_windows, b * c,
                 table.window_len, num_frames, h * w, _buffer(outputs), _buffer(out), _stream(outputs))
    return out
