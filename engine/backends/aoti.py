"""``aoti``: a model compiled ahead of time by AOTInductor (``stunet.export.export_aoti``), run from its ``.pt2``."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..model import STUNet
from ..model.validate import check_forward_inputs
from .base import Backend


class AOTIBackend(Backend):
    """Runs the package at ``package``, compiled from this model's architecture with
    ``stunet.export.export_aoti`` (or ``stunet export aoti``). Inputs are validated eagerly against ``model``
    (its config and dtype); the package runs on the device it was compiled for."""

    name = "aoti"

    def __init__(self, model: STUNet, *, package: str | os.PathLike | None = None):
        super().__init__(model)
        reasons = self.unsupported(model, package=package)
        if reasons:
            raise ValueError("the aoti backend cannot run this model: " + "; ".join(reasons))
        from ..export import load_aoti

        self.package = Path(package)
        self._runner = load_aoti(self.package)

    @classmethod
    def unsupported(cls, model: STUNet, *, package=None, **options) -> list[str]:
        reasons = super().unsupported(model, **options)
        if package is None:
            reasons.append("it needs package=PATH, a .pt2 made by stunet.export.export_aoti")
        elif not Path(package).is_file():
            reasons.append(f"no package at {str(package)!r} (make one with stunet.export.export_aoti)")
        return reasons

    def describe(self) -> str:
        return f"aoti: AOTInductor package {self.package.name}, {self.model.dtype} on {self.model.device}"

    def __call__(self, x, timesteps, text, text_mask=None, *, noise_level=None):
        x, t, text, mask, level = check_forward_inputs(self.model, x, timesteps, text, text_mask, noise_level, False)
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        args = (x, t, text, mask) + ((level,) if self.config.noise_aug else ())
        return self._runner(*args)
