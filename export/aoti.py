"""AOTInductor packages (``.pt2``): the model compiled ahead of time into one file that C++ or Python loads.

    stunet.export.export_aoti(model, "model.pt2", frames=16, height=64, width=64)
    runner = torch._inductor.aoti_load_package("model.pt2")      # or Pipeline(..., backend="aoti", ...)

``torch.export`` traces the same ``ExportedForward`` as the ONNX route (inputs of the model's ``ExportSpec``).
The kernel ops are ``torch.library.triton_op``s, so inductor sees through them: on CUDA the Triton kernels are
compiled into the package and inductor fuses the work around them; on the CPU their reference math is compiled
as C++. The package runs on the device it was compiled for.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..io import atomic_path
from ..model import STUNet
from .spec import SPEC_KEY, ExportResult, ExportSpec, compare, prepare, shapes_tuple


def export_aoti(model: STUNet, path: str | os.PathLike, *, batch: int = 2, frames: int | None = None,
                height: int | None = None, width: int | None = None, text_len: int = 77, dynamic: bool = True,
                dtype: torch.dtype = torch.float32, check: bool = False,
                inductor_configs: dict | None = None) -> ExportResult:
    """Compile ``model`` (on its device) into an AOTInductor package at ``path`` (``.pt2``, written atomically;
    the model is not modified). Geometry and ``dynamic`` as :func:`~stunet.export.export_onnx`; ``check`` runs
    the package against the reference at two geometries and raises beyond the spec's tolerance (fp32);
    ``inductor_configs`` go to ``aoti_compile_and_package`` (e.g. a faster-compiling wrapper for tests). The
    package records its spec in its metadata (``package_spec``), which the ``aoti`` backend checks calls against."""
    path, spec, module, args = prepare(model, path, ".pt2", batch=batch, frames=frames, height=height, width=width,
                                       text_len=text_len, dtype=dtype, dynamic=dynamic)
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), SPEC_KEY: spec.to_json()}
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=shapes_tuple(spec))
        # Compiled under the final name in a private folder (a package's archive is rooted at its file name),
        # then moved into place atomically.
        with atomic_path(path) as tmp, tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as d:
            built = Path(d) / path.name
            torch._inductor.aoti_compile_and_package(program, package_path=str(built),
                                                     inductor_configs=configs)
            os.replace(built, tmp)
    result = ExportResult(path, spec)
    if check:
        result.max_abs_error = check_aoti(path, model, spec)
    return result


def load_aoti(path: str | os.PathLike):
    """The runner of a package: ``runner(x, timesteps, text_embeds, text_mask[, noise_level]) -> sample``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no AOTInductor package at {str(path)!r} (make one with stunet.export.export_aoti "
                                "or `stunet export aoti`)")
    return torch._inductor.aoti_load_package(str(path))


def package_spec(runner) -> ExportSpec | None:
    """The ExportSpec a loaded package (``load_aoti``) was built from; None for a package made elsewhere."""
    text = runner.get_metadata().get(SPEC_KEY)
    return None if text is None else ExportSpec.from_json(text)


def package_device(runner) -> str:
    """The device type a loaded package runs on ("cpu", "cuda")."""
    return runner.get_metadata().get("AOTI_DEVICE_KEY", "")


def check_aoti(path: str | os.PathLike, model: STUNet, spec: ExportSpec, geometries=None) -> float:
    """The package against the fp32 reference at the spec's geometry (and a second one when dynamic): the worst
    |difference|; raises beyond the tolerance for fp32 packages."""
    return compare(load_aoti(path), model, spec, f"AOTInductor package {str(path)!r}", geometries)
