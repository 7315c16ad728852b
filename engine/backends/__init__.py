"""Backends: executors of the same STUNet, ``backend(x, timesteps, text, mask, noise_level=None)``.

- ``reference``: eager PyTorch in the model's dtype; the source of truth.
- ``compile``: ``torch.compile(mode="max-autotune")`` of the reference: the peer a user could build.
- ``fast``: the Triton kernels of ``stunet.kernels`` in the same module tree, a channels-last trunk, FP16 on
  CUDA, cross-attention keys and values computed once per text, and CUDA graphs per input shape.
- ``aoti``: an AOTInductor package of the model (``stunet.export.export_aoti``), ``package=PATH``.
- ``tensorrt``: a TensorRT engine of the model (``stunet.export.build_engine``), ``engine=PATH``; CUDA only.

Data flows one way: pipeline -> sampler/runtime -> backend -> model. No backend modifies the model it is
given (see ``base``); ``make_backend`` refuses a model a backend cannot run, listing every reason.
"""
from __future__ import annotations

import inspect

from ..config import is_choice, shown
from ..model import STUNet
from .aoti import AOTIBackend
from .base import Backend, ReferenceBackend, converted_copy
from .compile import CompileBackend
from .fast import FastBackend
from .tensorrt import TensorRTBackend

BACKEND_CLASSES: dict[str, type[Backend]] = {"reference": ReferenceBackend, "fast": FastBackend,
                                             "compile": CompileBackend, "aoti": AOTIBackend,
                                             "tensorrt": TensorRTBackend}
BACKENDS = tuple(BACKEND_CLASSES)


def make_backend(model: STUNet, name: str = "reference", **options) -> Backend:
    """The executor ``name`` (one of ``BACKENDS``) of ``model``; a ValueError lists every reason it cannot."""
    if not is_choice(name, BACKEND_CLASSES):
        raise ValueError(f"backend must be one of {BACKENDS}, got {shown(name)}")
    if not isinstance(model, STUNet):
        raise TypeError(f"model must be a STUNet, got {type(model).__name__}")
    cls = BACKEND_CLASSES[name]
    takes = list(inspect.signature(cls.__init__).parameters)[2:]  # after (self, model)
    if unknown := sorted(set(options) - set(takes)):
        raise ValueError(f"the {name} backend takes no option {', '.join(map(repr, unknown))} (its options: "
                         f"{', '.join(takes) or 'none'})")
    reasons = cls.unsupported(model, **options)
    if reasons:
        raise ValueError(f"the {name} backend cannot run this model: " + "; ".join(reasons))
    return cls(model, **options)


__all__ = ["Backend", "ReferenceBackend", "CompileBackend", "FastBackend", "AOTIBackend", "TensorRTBackend", "BACKENDS",
           "BACKEND_CLASSES", "make_backend", "converted_copy"]
