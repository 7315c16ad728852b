"""Noise schedules and samplers (DDPM, DDIM, DPM-Solver++(2M)), in the diffusers scheduler convention.

    s = DDIM(schedule="cosine", prediction="v", spacing="leading", eta=0.0)
    s.set_timesteps(32)
    for t in s.timesteps:
        x = s.step(model_output(x, t), t, x, generator=g)

Notation: ``abar_t`` = alphas_cumprod[t], ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``,
``x_t = alpha_t x0 + sigma_t eps``, ``v = alpha_t eps - sigma_t x0`` (Salimans & Ho 2022). The step after the
last timestep targets the clean sample (``abar = 1``). All arithmetic is fp32 on the sample's device; the
result has the sample's dtype. Noise is drawn from the caller's (CPU) generator, so a seed gives the same
video on every device.

This Python module is the reference for the C++ runtime's fused step.
"""
from __future__ import annotations

import abc
import math
import numbers

import torch

from ..config import is_choice, shown

SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("v", "eps")
MAX_TRAIN_TIMESTEPS = 100_000  # diffusion models train on 1000; the tables are built once per sampler, in Python


def _linspace(start: float, end: float, n: int) -> list[float]:
    # Written out (not torch.linspace) so the C++ runtime computes the same doubles bit for bit.
    return [start] if n == 1 else [start + (end - start) * i / (n - 1) for i in range(n)]


BETA_RANGES = {"linear": (1e-4, 2e-2), "scaled_linear": (0.00085, 0.012)}
"""The default (beta_start, beta_end) of the schedules that take them."""


def _is_number(value) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def make_betas(schedule: str, num_train_timesteps: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> torch.Tensor:
    """Betas (float64) of a named schedule: "linear" ``beta_start..beta_end`` (default 1e-4..2e-2),
    "scaled_linear" the same in sqrt space (default 0.00085..0.012), "cosine" (Nichol & Dhariwal 2021,
    s = 0.008, beta capped at 0.999; it takes no beta range).

    Every table is plain double arithmetic in a fixed order; csrc/schedule.cpp repeats it exactly.
    """
    n = num_train_timesteps
    if not is_choice(schedule, SCHEDULES):
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {shown(schedule)}")
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if value is not None and not _is_number(value):
            raise ValueError(f"{name} must be a number, got {shown(value)}")
    if schedule in BETA_RANGES:
        lo, hi = BETA_RANGES[schedule]
        lo, hi = (lo if beta_start is None else float(beta_start)), (hi if beta_end is None else float(beta_end))
        if not 0 < lo <= hi < 1:
            raise ValueError(f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, got "
                             f"{lo!r}, {hi!r}")
        if schedule == "linear":
            return torch.tensor(_linspace(lo, hi, n), dtype=torch.float64)
        return torch.tensor([b * b for b in _linspace(math.sqrt(lo), math.sqrt(hi), n)], dtype=torch.float64)
    if beta_start is not None or beta_end is not None:  # the cosine schedule
        raise ValueError("the cosine schedule takes no beta_start / beta_end")

    def abar(t: float) -> float:
        c = math.cos((t / n + 0.008) / 1.008 * math.pi / 2)
        return c * c
    return torch.tensor([min(1 - abar(i + 1) / abar(i), 0.999) for i in range(n)], dtype=torch.float64)


def make_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0,
                   solver_grid: bool = False) -> torch.Tensor:
    """Descending int64 timesteps, always ``num_inference_steps`` of them, as diffusers' ``timestep_spacing``.

    ``steps_offset`` is added to "leading" timesteps (diffusers' ``steps_offset``). ``solver_grid``: the grid of
    diffusers' multistep solvers (DPMSolverMultistepScheduler), whose "leading" and "linspace" spacings divide
    the range into ``n + 1`` points and drop the last, where DDIM's and DDPM's divide it into ``n``.
    """
    n, N = num_inference_steps, num_train_timesteps
    points = n + 1 if solver_grid else n
    if spacing == "leading":
        ts = [i * (N // points) + steps_offset for i in range(points)]
    elif spacing == "trailing":  # round(N - i N / n) - 1, i = 0..n-1 (already descending)
        return torch.tensor([round(N - i * N / n) - 1 for i in range(n)], dtype=torch.int64)
    elif spacing == "linspace":
        ts = [round(v) for v in _linspace(0.0, N - 1.0, points)]
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {shown(spacing)}")
    return torch.tensor(ts[::-1][:n], dtype=torch.int64)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance ``uncond + s * (cond - uncond)``, optionally rescaled towards the conditional
    prediction's per-sample std (Lin et al. 2023, eq. 16) by ``guidance_rescale`` in [0, 1]."""
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
        dims = tuple(range(1, cond.dim()))
        std_cond = cond.float().std(dim=dims, keepdim=True)
        std_guided = guided.float().std(dim=dims, keepdim=True)
        rescaled = guided.float() * (std_cond / std_guided)
        guided = (guidance_rescale * rescaled + (1 - guidance_rescale) * guided.float()).to(cond.dtype)
    return guided


class Sampler(abc.ABC):
    """Shared schedule tables, timestep spacing and prediction conversions; subclasses define ``_update``."""

    order = 1
    stochastic = False

    solver_grid = False
    """Whether "leading" and "linspace" timesteps follow diffusers' multistep-solver grid (n + 1 divisions)."""

    def __init__(self, schedule: str = "cosine", prediction: str = "v", spacing: str = "leading",
                 num_train_timesteps: int = 1000, clip_sample: bool = False, clip_range: float = 1.0, *,
                 beta_start: float | None = None, beta_end: float | None = None, steps_offset: int = 0,
                 set_alpha_to_one: bool = True, fixed_stride: bool = False):
        if not is_choice(prediction, PREDICTIONS):
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {shown(prediction)}")
        if not is_choice(spacing, SPACINGS):
            raise ValueError(f"spacing must be one of {SPACINGS}, got {shown(spacing)}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or not (
                2 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS):
            raise ValueError(f"num_train_timesteps must be an integer in [2, {MAX_TRAIN_TIMESTEPS}], "
                             f"got {shown(num_train_timesteps)}")
        if not (_is_number(clip_range) and 0 < clip_range < math.inf):
            raise ValueError(f"clip_range must be a positive number, got {shown(clip_range)}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {shown(steps_offset)}")
        for name, flag in (("clip_sample", clip_sample), ("set_alpha_to_one", set_alpha_to_one),
                           ("fixed_stride", fixed_stride)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {shown(flag)}")
        self.schedule, self.prediction, self.spacing = schedule, prediction, spacing
        self.num_train_timesteps = num_train_timesteps
        self.clip_sample, self.clip_range = clip_sample, float(clip_range)
        self.beta_start, self.beta_end = beta_start, beta_end
        self.steps_offset, self.set_alpha_to_one = steps_offset, set_alpha_to_one
        self.fixed_stride = fixed_stride
        """Step from t to ``t - num_train_timesteps // n`` (diffusers' DDIMScheduler) rather than to the grid's
        next timestep; the same for "leading" spacing, one timestep apart at some steps of the others."""
        self._stride = 0
        self.betas = make_betas(schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float64
        self.final_abar = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        """DDIM's abar after its last step: 1 (the clean sample), or alphas_cumprod[0] (diffusers' DDIM with
        ``set_alpha_to_one=False``, as Stable Diffusion's scheduler configs have it). The other samplers end
        on the clean sample, as diffusers' do."""
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self._index: dict[int, int] = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(schedule={self.schedule!r}, prediction={self.prediction!r}, "
                f"spacing={self.spacing!r}, steps={len(self.timesteps)})")

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def schedule_options(self) -> dict:
        """The keyword arguments that make another sampler denoise on this one's schedule and grid."""
        return dict(schedule=self.schedule, prediction=self.prediction, spacing=self.spacing,
                    num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                    beta_end=self.beta_end, steps_offset=self.steps_offset, set_alpha_to_one=self.set_alpha_to_one)

    def set_timesteps(self, num_inference_steps: int | None = None, *, timesteps=None) -> None:
        """The grid of ``num_inference_steps`` (by ``spacing``), or the explicit descending ``timesteps``."""
        N = self.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both")
            ts = [int(t) for t in timesteps]
            if not ts or any(isinstance(t, bool) for t in timesteps) or any(float(t) != int(t) for t in timesteps):
                raise ValueError(f"timesteps must be a non-empty sequence of integers, got {shown(timesteps)}")
            if any(not 0 <= t < N for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"timesteps must be strictly descending integers in [0, {N - 1}], got {ts}")
            self.timesteps = torch.tensor(ts, dtype=torch.int64)
            self._stride = 0  # explicit timesteps step to the next one given
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not (
                    1 <= num_inference_steps <= N):
                raise ValueError(f"num_inference_steps must be an integer in [1, {N}], "
                                 f"got {shown(num_inference_steps)}")
            self.timesteps = make_timesteps(num_inference_steps, N, self.spacing, self.steps_offset,
                                            self.solver_grid)
            if int(self.timesteps[0]) >= N:
                raise ValueError(f"steps_offset={self.steps_offset} puts timestep {int(self.timesteps[0])} past the "
                                 f"last training timestep {N - 1}; use fewer steps")
            self._stride = N // num_inference_steps if self.fixed_stride else 0
        self._index = {int(t): i for i, t in enumerate(self.timesteps)}
        self.reset()

    def reset(self) -> None:
        """Forget any solver history (called by ``set_timesteps``)."""

    # -- schedule lookups -----------------------------------------------------------------------------------
    def abar(self, t: int) -> float:
        """alphas_cumprod[t]; t = -1 is the clean sample (1.0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def prev_timestep(self, t: int) -> int:
        i = self._step_index(t)
        if self._stride:
            return max(int(t) - self._stride, -1)
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def _step_index(self, t) -> int:
        if not len(self.timesteps):
            raise RuntimeError(f"{type(self).__name__}.step: call set_timesteps(n) first")
        key = int(t)
        if key not in self._index:
            raise ValueError(f"timestep {key} is not in this sampler's timesteps; step through s.timesteps")
        return self._index[key]

    # -- conversions ------------------------------------------------------------------------------------------
    def predict_x0_eps(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the model's prediction at timestep t (fp32), x0 clipped if ``clip_sample``."""
        a = self.abar(t)
        alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
        out, x = model_output.float(), x.float()
        if self.prediction == "eps":
            eps = out
            x0 = (x - sigma * eps) / alpha
        else:
            x0 = alpha * x - sigma * out
            eps = alpha * out + sigma * x
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0, eps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x0): ``alpha_t x0 + sigma_t noise`` (SDEdit, noise augmentation)."""
        a = self.alphas_cumprod.to(x0.device)[torch.as_tensor(t, device=x0.device).long()].float()
        a = a.reshape(-1, *([1] * (x0.dim() - 1))) if a.dim() else a
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        a = self.abar(t)
        return math.sqrt(a) * noise - math.sqrt(1 - a) * x0

    @staticmethod
    def draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise drawn on the CPU (device-independent for a seed), moved to ``like``."""
        return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device)

    # -- the step ---------------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, t, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{t-1} (the sample at the next timestep) from the (guided) model output at ``t``."""
        if model_output.shape != x.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but the sample x has "
                             f"{tuple(x.shape)}; they must match")
        t = int(t)
        i = self._step_index(t)
        return self._update(model_output, t, self.prev_timestep(t), i, x, generator).to(x.dtype)

    def guided_step(self, cond: torch.Tensor, uncond: torch.Tensor | None, t, x: torch.Tensor,
                    guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{t-1} from the conditional and unconditional predictions (``uncond=None``: no guidance): the
        torch-op sequence that the C++ runtime's ``FusedSampler.guided_step`` does in one pass."""
        pred = cond if uncond is None else cfg_combine(cond, uncond, guidance_scale, guidance_rescale)
        return self.step(pred, t, x, generator=generator)

    @abc.abstractmethod
    def _update(self, out, t, t_prev, i, x, generator) -> torch.Tensor:
        """x at ``t_prev`` (fp32) from the prediction ``out`` at ``t``; ``i`` is the step index."""


class DDIM(Sampler):
    """DDIM (Song et al. 2021): ``x' = alpha' x0 + sqrt(1 - abar' - s^2) eps + s z``,
    ``s = eta sqrt((1 - abar')/(1 - abar)) sqrt(1 - abar/abar')``; eta = 0 is deterministic."""

    def __init__(self, *args, eta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not (_is_number(eta) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be a number in [0, 1], got {shown(eta)}")
        self.eta = float(eta)
        self.stochastic = eta > 0

    def _update(self, out, t, t_prev, i, x, generator):
        a, a_prev = self.abar(t), (self.final_abar if t_prev < 0 else self.abar(t_prev))
        x0, eps = self.predict_x0_eps(out, t, x)
        s = self.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - s * s, 0.0)) * eps
        if s > 0:
            x_prev = x_prev + s * self.draw_noise(x, generator)
        return x_prev


class DDPM(Sampler):
    """Ancestral sampling from the posterior q(x_{t'} | x_t, x0) with the "fixed small" variance
    (Ho et al. 2020, eqs. 6-7), generalised to strided timesteps t -> t'."""

    stochastic = True

    def _update(self, out, t, t_prev, i, x, generator):
        a, a_prev = self.abar(t), self.abar(t_prev)
        x0, _ = self.predict_x0_eps(out, t, x)
        alpha_step = a / a_prev  # the product of (1 - beta) between t' and t
        beta_step = 1 - alpha_step
        coef_x0 = math.sqrt(a_prev) * beta_step / (1 - a)
        coef_x = math.sqrt(alpha_step) * (1 - a_prev) / (1 - a)
        mean = coef_x0 * x0 + coef_x * x.float()
        if t_prev < 0:
            return mean
        variance = max((1 - a_prev) / (1 - a) * beta_step, 1e-20)
        return mean + math.sqrt(variance) * self.draw_noise(x, generator)


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form) in data prediction.

    With ``lambda = log(alpha / sigma)`` and ``h = lambda' - lambda``:
    first order ``x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D0``; second order adds
    ``- 0.5 alpha' (e^{-h} - 1) D1``, ``D1 = (x0 - x0_prev) / r``, ``r = h_prev / h``.
    The first step (no history) and the final step (to the clean sample: lower order, returns x0) are first
    order.
    """

    order = 2
    solver_grid = True

    def reset(self) -> None:
        self._prev_x0: torch.Tensor | None = None
        self._prev_lambda: float | None = None

    @staticmethod
    def _lambda(a: float) -> float:
        return 0.5 * math.log(a / (1 - a))

    def _update(self, out, t, t_prev, i, x, generator):
        x0, _ = self.predict_x0_eps(out, t, x)
        a, a_prev = self.abar(t), self.abar(t_prev)
        lam = self._lambda(a)
        if t_prev < 0:  # final step to sigma = 0: lower order, the update is x0 itself
            x_prev = x0
        else:
            lam_prev = self._lambda(a_prev)
            h = lam_prev - lam
            alpha_p, sigma_p, sigma = math.sqrt(a_prev), math.sqrt(1 - a_prev), math.sqrt(1 - a)
            phi = math.expm1(-h)  # e^{-h} - 1
            x_prev = (sigma_p / sigma) * x.float() - alpha_p * phi * x0
            if self._prev_x0 is not None and i > 0:
                r = (lam - self._prev_lambda) / h
                d1 = (x0 - self._prev_x0) / r
                x_prev = x_prev - 0.5 * alpha_p * phi * d1
        self._prev_x0, self._prev_lambda = x0, lam
        return x_prev


SAMPLERS: dict[str, type[Sampler]] = {"ddim": DDIM, "ddpm": DDPM, "dpmpp2m": DPMSolverPP2M}


def sampler_class(name: str) -> type[Sampler]:
    """The sampler class for a name: "ddim", "ddpm" or "dpmpp2m" (also "DPM-Solver++(2M)", "DPMSolverPP2M")."""
    if not isinstance(name, str):
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {shown(name)}")
    key = name.lower()
    for drop in ("-", "_", "(", ")", "solver"):
        key = key.replace(drop, "")
    key = key.replace("++", "pp")
    if key not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {shown(name)}")
    return SAMPLERS[key]


def make_sampler(name: str, **kwargs) -> Sampler:
    """A sampler by name (see :func:`sampler_class`); ``eta`` is only taken by DDIM."""
    cls = sampler_class(name)
    if cls is not DDIM and kwargs.pop("eta", 0.0):
        raise ValueError(f"eta is a DDIM parameter; {cls.__name__} does not take it")
    return cls(**kwargs)


# -- diffusers scheduler configurations --------------------------------------------------------------------------
_SCHEDULERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp2m"}
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
# Options whose other values change the math these samplers do.
_SCHEDULER_REQUIRED = {
    "thresholding": (False,), "rescale_betas_zero_snr": (False,), "trained_betas": (None,),
    "algorithm_type": ("dpmsolver++",), "solver_order": (2,), "solver_type": ("midpoint",),
    "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,), "use_flow_sigmas": (False,), "lower_order_final": (True,), "euler_at_final": (False,),
    "final_sigmas_type": ("zero",), "variance_type": (None, "fixed_small"), "timestep_type": ("discrete",),
    "lambda_min_clipped": (float("-inf"),),
}


def scheduler_options(config: dict) -> tuple[str | None, dict]:
    """(sampler name, keyword arguments) of a diffusers scheduler configuration (``scheduler_config.json``):
    its beta schedule and range, prediction type, timestep spacing, ``steps_offset``, ``set_alpha_to_one`` and
    clipping. The name is None for a scheduler class without a counterpart here (its schedule still maps).
    Raises ``ValueError`` naming an option these samplers cannot reproduce."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (a scheduler_config.json), got {type(config).__name__}")
    kind = config.get("_class_name")
    name = _SCHEDULERS[kind] if is_choice(kind, _SCHEDULERS) else None
    beta_schedule = config.get("beta_schedule", "linear")
    if not is_choice(beta_schedule, _BETA_SCHEDULES):
        raise ValueError(f"scheduler beta_schedule={beta_schedule!r} is not supported; one of "
                         f"{sorted(_BETA_SCHEDULES)}")
    prediction = config.get("prediction_type", "epsilon")
    if not is_choice(prediction, _PREDICTION_TYPES):
        raise ValueError(f"scheduler prediction_type={prediction!r} is not supported; one of "
                         f"{sorted(_PREDICTION_TYPES)}")
    if name is not None:
        for option, allowed in _SCHEDULER_REQUIRED.items():
            if option in config and config[option] not in allowed:
                raise ValueError(f"{kind} option {option}={config[option]!r} is not supported; this sampler "
                                 f"needs {option}={allowed[0]!r}")
    schedule = _BETA_SCHEDULES[beta_schedule]
    options = dict(schedule=schedule, prediction=_PREDICTION_TYPES[prediction],
                   spacing=config.get("timestep_spacing", "leading"),
                   num_train_timesteps=_scheduler_number(config, "num_train_timesteps", 1000, integer=True),
                   steps_offset=_scheduler_number(config, "steps_offset", 0, integer=True),
                   set_alpha_to_one=bool(config.get("set_alpha_to_one", True)) if name == "ddim" else True,
                   fixed_stride=name == "ddim")
    if schedule != "cosine":
        options.update(beta_start=_scheduler_number(config, "beta_start", 0.0001),
                       beta_end=_scheduler_number(config, "beta_end", 0.02))
    if name in ("ddim", "ddpm") and config.get("clip_sample", name == "ddpm"):
        options.update(clip_sample=True, clip_range=_scheduler_number(config, "clip_sample_range", 1.0))
    return name, options


def _scheduler_number(config: dict, key: str, default: float, integer: bool = False) -> float:
    """A scheduler config's number (an integer with ``integer``; JSON may write 1000 as 1000.0); raises naming
    the option."""
    value = config.get(key, default)
    if _is_number(value) and math.isfinite(value) and (not integer or value == int(value)):
        return int(value) if integer else float(value)
    raise ValueError(f"scheduler {key}={value!r} must be {'an integer' if integer else 'a number'}")
