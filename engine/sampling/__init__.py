"""Sampling: noise schedules and samplers (``samplers``), temporal MultiDiffusion (``multidiffusion``), and the
C++ runtime's fused step and window blend behind the samplers' interface (``runtime``, over ``stunet._C``).

Everything here works on whole videos and model predictions; nothing here knows about the model or backends.
"""
from . import multidiffusion, runtime, samplers
from .multidiffusion import WEIGHTINGS, multidiffusion_predict, window_plan, window_weights
from .samplers import DDIM, DDPM, SAMPLERS, DPMSolverPP2M, Sampler, cfg_combine, make_sampler, sampler_class

__all__ = ["samplers", "multidiffusion", "runtime", "Sampler", "DDIM", "DDPM", "DPMSolverPP2M", "SAMPLERS",
           "make_sampler", "sampler_class", "cfg_combine", "multidiffusion_predict", "window_plan",
           "window_weights", "WEIGHTINGS"]
