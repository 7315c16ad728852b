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
    ``stunet.export.export_aoti`` (or ``stunet export aoti``), which carries its own weights. The package must
    match ``model``: its architecture, dtype and device, as its recorded export spec says. Every call is
    validated against ``model`` and run by ``stunet.export.aoti.Package``, which holds it to the geometry the
    package was compiled for (a static package runs only at its export's shapes, a dynamic one within its
    ranges, batch 1 as a pair), so an input the package was not compiled for is an error, never a read past
    its buffers or a wrong result."""

    name = "aoti"

    def __init__(self, model: STUNet, *, package: str | os.PathLike | None = None):
        super().__init__(model)
        reasons = self.unsupported(model, package=package)
        if reasons:
            raise ValueError("the aoti backend cannot run this model: " + "; ".join(reasons))
        from ..export.aoti import Package

        self.package = Path(package)
        self._package = Package(self.package)
        self.spec = self._package.spec
        mismatches = []
        if self.spec.config != model.config:
            mismatches.append("it was compiled from another architecture (its config differs from the model's)")
        if self.spec.dtype != model.dtype:
            mismatches.append(f"it computes in {self.spec.dtype}, the model is {model.dtype}")
        if self._package.device != model.device.type:
            mismatches.append(f"it runs on {self._package.device}, the model is on {model.device.type}")
        if mismatches:
            raise ValueError(f"package: {str(package)!r} does not match the model: " + "; ".join(mismatches))

    @classmethod
    def unsupported(cls, model: STUNet, *, package=None, **options) -> list[str]:
        reasons = super().unsupported(model, **options)
        if package is None:
            reasons.append("it needs package=PATH, a .pt2 made by stunet.export.export_aoti")
        elif not isinstance(package, (str, os.PathLike)):
            reasons.append(f"package must be a path, a .pt2 made by stunet.export.export_aoti, got "
                           f"{type(package).__name__}")
        elif not Path(package).is_file():
            reasons.append(f"no package at {str(package)!r} (make one with stunet.export.export_aoti)")
        return reasons

    def describe(self) -> str:
        return f"aoti: AOTInductor package {self.package.name}, {self.model.dtype} on {self.model.device}"

    def forward(self, x, timesteps, text, text_mask=None, *, noise_level=None):
        x, t, text, mask, level = check_forward_inputs(self.model, x, timesteps, text, text_mask, noise_level, False)
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        return self._package(x, t, text, mask, *((level,) if self.config.noise_aug else ()))
