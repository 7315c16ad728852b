"""AOTInductor packages (``.pt2``): the model compiled ahead of time into one file that C++ or Python loads.

    stunet.export.export_aoti(model, "model.pt2", frames=16, height=64, width=64)
    runner = torch._inductor.aoti_load_package("model.pt2")      # or Pipeline(..., backend="aoti", ...)

``torch.export`` traces the same ``ExportedForward`` as the ONNX route (inputs of the model's ``ExportSpec``).
The kernel ops are ``torch.library.triton_op``s, so inductor sees through them: on CUDA the Triton kernels are
compiled into the package and inductor fuses the work around them; on the CPU their reference math is compiled
as C++. The package runs on the device it was compiled for.
"""
from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path

import torch
from torch.export.pt2_archive.constants import AOTINDUCTOR_DIR

from ..config import check_flags
from ..io import atomic_path
from ..model import STUNet
from ..progress import Stages
from .spec import (SPEC_KEY, TRACE_STEPS, ExportResult, ExportSpec, compare, exporter_chatter_silenced, prepare,
                   shapes_tuple)

log = logging.getLogger("stunet.export")


def export_aoti(model: STUNet, path: str | os.PathLike, *, batch: int = 2, frames: int | None = None,
                height: int | None = None, width: int | None = None, text_len: int = 77, dynamic: bool = True,
                dtype: torch.dtype = torch.float32, check: bool = False, inductor_configs: dict | None = None,
                progress: bool = False) -> ExportResult:
    """Compile ``model`` (on its device) into an AOTInductor package at ``path`` (``.pt2``, written atomically;
    the model is not modified). Geometry and ``dynamic`` as :func:`~stunet.export.export_onnx`; ``check`` runs
    the package against the reference at two geometries and raises beyond the spec's tolerance (fp32);
    ``inductor_configs`` go to ``aoti_compile_and_package`` (e.g. a faster-compiling wrapper for tests). The
    package records its spec in its metadata (``package_spec``), which the ``aoti`` backend checks calls against.
    A dynamic package runs from two steps of each axis up (batch 1 as a pair), so its own frames, height, width
    and text length must be two steps or more. ``progress`` shows the stage that runs (the compile takes
    minutes)."""
    check_flags(check=check, progress=progress)
    path, spec, module, args = prepare(model, path, ".pt2", batch=batch, frames=frames, height=height, width=width,
                                       text_len=text_len, dtype=dtype, dynamic=dynamic, min_steps=Package.MIN_STEPS,
                                       what="a dynamic AOTInductor package")
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), SPEC_KEY: spec.to_json()}
    result = ExportResult(path, spec)
    names = ["torch.export", "AOTInductor compile", *(["check"] if check else [])]
    with Stages(f"export {path.name}", names, progress) as stages, torch.no_grad(), exporter_chatter_silenced():
        with stages.stage("torch.export"):
            program = torch.export.export(module, args, dynamic_shapes=shapes_tuple(spec))
        # Compiled under the final name in a private folder (a package's archive is rooted at its file name),
        # then moved into place atomically.
        with stages.stage("AOTInductor compile"), atomic_path(path) as tmp, \
                tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as d:
            built = Path(d) / path.name
            torch._inductor.aoti_compile_and_package(program, package_path=str(built),
                                                     inductor_configs=configs)
            os.replace(built, tmp)
        if check:
            with stages.stage("check"):
                result.max_abs_error = check_aoti(path, model, spec)
    return result


COMPILED_MODEL = f"{AOTINDUCTOR_DIR}model/"
"""Where a package's compiled model lies below the archive's root folder, in torch's archive layout: the folder
of ``aoti_load_package``'s default ``model_name``, the one ``aoti_compile_and_package`` writes."""


def _holds_a_compiled_model(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(f"/{COMPILED_MODEL}" in f"/{entry.filename}" and not entry.is_dir() for entry in archive.infolist())


def load_aoti(path: str | os.PathLike):
    """The raw runner of a package: ``runner(x, timesteps, text_embeds, text_mask[, noise_level]) -> sample``,
    unchecked (``Package`` checks each call against the package's spec)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no AOTInductor package at {str(path)!r} (make one with stunet.export.export_aoti "
                                "or `stunet export aoti`)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"package: {str(path)!r} is not an AOTInductor package (a .pt2 is a zip archive); make one "
                         "with `stunet export aoti`")
    if not _holds_a_compiled_model(path):  # told here: torch's loader would leave its extraction folder behind
        raise ValueError(f"package: {str(path)!r} cannot be loaded as an AOTInductor package (the archive holds no "
                         f"compiled model, {COMPILED_MODEL}*); rebuild it with `stunet export aoti`")
    try:
        return torch._inductor.aoti_load_package(str(path))
    except RuntimeError as e:  # a zip without a compiled model in it, or one compiled for another platform
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"package: {str(path)!r} cannot be loaded as an AOTInductor package ({reason}); rebuild "
                         "it here with `stunet export aoti`") from e


def package_spec(runner) -> ExportSpec | None:
    """The ExportSpec a loaded package (``load_aoti``) was built from; None for a package made elsewhere."""
    text = runner.get_metadata().get(SPEC_KEY)
    return None if text is None else ExportSpec.from_json(text)


class Package:
    """A package made by ``export_aoti``, loaded, run only where it was compiled to be right.

    A compiled package does not check its inputs: it reads every input as contiguous, a static one reads past
    smaller inputs, and a dynamic one computes wrong results at one step of an axis (torch.export specialises
    sizes 0 and 1, so the compiled ranges start at two steps). Each call is checked against the recorded spec:
    batch 1 on a dynamic package runs as a pair (the sample twice; logged once), anything else outside the
    compiled geometry is an error naming the axis.
    """

    MIN_STEPS = TRACE_STEPS  # of every dynamic axis, as torch.export compiles it

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.runner = load_aoti(self.path)
        self.spec = package_spec(self.runner)
        if self.spec is None:
            raise ValueError(f"package: {str(path)!r} carries no stunet export spec (it was not made by "
                             "stunet.export.export_aoti); build it with `stunet export aoti`")
        self.device = self.runner.get_metadata().get("AOTI_DEVICE_KEY", "")
        self._warned = False

    def geometry_errors(self, x: torch.Tensor, text: torch.Tensor) -> list[str]:
        B, _, T, H, W = x.shape
        if self.spec.dynamic:
            B = max(B, self.MIN_STEPS)  # a batch of 1 runs as a pair
        return self.spec.geometry_errors(batch=B, frames=T, height=H, width=W, text_len=text.shape[1],
                                         min_steps=self.MIN_STEPS)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` in the spec's order (``spec.input_names``); any strides (the package reads them as the
        contiguous tensors it was traced with, so others are copied first)."""
        inputs = tuple(t.contiguous() for t in inputs)
        x, text = inputs[0], inputs[2]
        errors = self.geometry_errors(x, text)
        if errors:
            raise ValueError(f"x, text: the package {self.path.name} was not compiled for " + ", ".join(errors)
                             + "; export it at this geometry, or dynamic (`stunet export aoti` without --static)")
        if self.spec.dynamic and x.shape[0] < self.MIN_STEPS:
            if not self._warned:
                self._warned = True
                log.warning("stunet.export: %s runs batch 1 as a pair (a dynamic package is compiled for batch "
                            ">= %d)", self.path.name, self.MIN_STEPS)
            pair = [t.expand(self.MIN_STEPS, *t.shape[1:]).contiguous() for t in inputs]
            return self.runner(*pair)[:1]
        return self.runner(*inputs)


def check_aoti(path: str | os.PathLike, model: STUNet, spec: ExportSpec, geometries=None) -> float:
    """The package against the fp32 reference at the spec's geometry (and a second one when dynamic): the worst
    |difference|; raises beyond the tolerance for fp32 packages."""
    return compare(Package(path), model, spec, f"AOTInductor package {str(path)!r}", geometries)
