"""TensorRT engines (``.plan``) built from the exported ONNX file.

    stunet.export.export_onnx(model, "model.onnx", dtype=torch.float16)
    stunet.export.build_engine("model.onnx", "model.plan")            # profiles from the export spec

The network is strongly typed: its precision is the ONNX file's (an FP16 export gives an FP16 engine), and the
optimisation profile spans the export spec's dynamic ranges (batch, frames, height, width, text length: min,
opt = the export geometry, max), which ``export_onnx`` records in the file's metadata.

Two toolkits build engines, and they differ in how the ``stunet`` nodes become kernels:

- **TensorRT** (module ``tensorrt``, 10.9 or newer): each ``stunet`` node becomes an ahead-of-time Python plugin
  (``tensorrt.plugin``: ``register`` + ``aot_impl``) whose implementation is the Triton kernel of
  ``stunet.kernels.plugin`` compiled to PTX for the GPU the engine is built on. The plan then needs neither
  Python nor Triton at run time. Where the Triton kernels cannot run (a GPU older than compute capability 8.0,
  or no Triton), the nodes are inlined as for TensorRT-RTX, with a warning that says why.
- **TensorRT-RTX** (module ``tensorrt_rtx_bindings``; wheels ``tensorrt-rtx-cu13-bindings`` and
  ``tensorrt-rtx-cu13-libs``, ``pip install 'stunet[tensorrt-rtx]'``): it has no plugins, so the ``stunet``
  nodes are replaced by their ONNX local functions (standard ops) before parsing. It builds without a GPU for
  the compute capabilities it is told (``compute_capabilities=[86, 89, 120]``: SM 7.5 to 12.x; it has no SM 9.0
  target), and specialises the engine for the GPU it first runs on.

What is verified where is in the README ("Export: TensorRT").
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import check_flags, is_choice, shown
from ..io import atomic_path
from ..kernels import unavailable_on
from ..progress import Stages
from .spec import SPEC_KEY, ExportSpec

log = logging.getLogger(__name__)

TOOLKITS = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
_INSTALL = {"tensorrt": "install TensorRT 10.9 or newer from NVIDIA (pip install tensorrt, with a CUDA driver)",
            "tensorrt-rtx": "pip install 'stunet[tensorrt-rtx]'"}


# -- the export spec, carried by the ONNX file -----------------------------------------------------------------
def read_spec(onnx_path: str | os.PathLike) -> ExportSpec | None:
    """The ExportSpec recorded in an ONNX file by ``export_onnx`` (None for a file from elsewhere)."""
    proto = _load_onnx(Path(onnx_path))
    text = next((p.value for p in proto.metadata_props if p.key == SPEC_KEY), None)
    return None if text is None else ExportSpec.from_json(text)


def _load_onnx(onnx_path: Path):
    """The ModelProto of ``onnx_path`` without its external weights; a file that is not ONNX is refused by name."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except DecodeError as e:
        raise ValueError(f"onnx_path: {str(onnx_path)!r} is not an ONNX model ({e}); make one with "
                         "`stunet export onnx`") from None


def plan_spec_path(plan_path: str | os.PathLike) -> Path:
    """Where ``build_engine`` records a plan's export spec: beside it, ``<plan>.json`` (a plan has no room for
    metadata of its own)."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def read_plan_spec(plan_path: str | os.PathLike) -> ExportSpec | None:
    """The ExportSpec of the ONNX file a plan was built from (``plan_spec_path``), or None when the plan has
    none beside it (built elsewhere, or copied without it)."""
    path = plan_spec_path(plan_path)
    if not path.is_file():
        return None
    try:
        return ExportSpec.from_json(path.read_text())
    except ValueError as e:
        raise ValueError(f"engine: the export spec beside it, {str(path)!r}, is unreadable ({e}); build the plan "
                         "again with `stunet export tensorrt`, or remove the file") from None


def profile_shapes(spec: ExportSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """One optimisation profile: (min, opt, max) shape per input over the spec's dynamic ranges (the export
    geometry for every one of them when the spec is static)."""
    cfg = spec.config
    if spec.dynamic:
        axes = spec.axes()
        pick = [{name: getattr(axis, which) for name, axis in axes.items()} for which in ("min", "opt", "max")]
    else:
        pick = [dict(batch=spec.batch, frames=spec.frames, height=spec.height, width=spec.width,
                     text_len=spec.text_len)] * 3
    shapes = {}
    for name, shape_of in (
        ("x", lambda d: (d["batch"], cfg.in_channels, d["frames"], d["height"], d["width"])),
        ("timesteps", lambda d: (d["batch"],)),
        ("text_embeds", lambda d: (d["batch"], d["text_len"], cfg.text_dim)),
        ("text_mask", lambda d: (d["batch"], d["text_len"])),
    ) + ((("noise_level", lambda d: (d["batch"],)),) if cfg.noise_aug else ()):
        shapes[name] = tuple(shape_of(d) for d in pick)
    return shapes


# -- the toolkits --------------------------------------------------------------------------------------------
def toolkit(name: str | None = None):
    """(name, module) of the TensorRT toolkit to use: ``name``, or TensorRT when it is importable, else
    TensorRT-RTX. Raises ImportError saying how to install one."""
    import importlib

    if name is not None and not is_choice(name, TOOLKITS):
        raise ValueError(f"toolkit must be one of {TOOLKITS}, got {shown(name)}")
    errors = []
    for candidate in (name,) if name else TOOLKITS:
        try:
            module = importlib.import_module(_MODULES[candidate])
        except ImportError as e:
            errors.append(f"{candidate}: {e} ({_INSTALL[candidate]})")
            continue
        if candidate == "tensorrt" and _version(module) < (10, 9):
            errors.append(f"tensorrt {module.__version__} is older than 10.9, which AOT plugins need")
            continue
        return candidate, module
    raise ImportError("no TensorRT toolkit to build with: " + "; ".join(errors))


def _version(module) -> tuple[int, ...]:
    return tuple(int(p) for p in module.__version__.split(".")[:2] if p.isdigit())


@dataclass
class EngineResult:
    path: Path
    toolkit: str
    version: str
    profiles: list[dict] = field(default_factory=list)
    compute_capabilities: list[int] = field(default_factory=list)
    """The SMs the plan was built for (TensorRT-RTX); empty: the GPU it was built on (TensorRT)."""
    seconds: float = 0.0
    bytes: int = 0
    spec: ExportSpec | None = None
    """The export spec of the ONNX file, recorded beside the plan (``plan_spec_path``); None if it had none."""


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, profiles: list[dict] | None = None,
                 fp16: bool = True, compute_capabilities: list[int] | None = None, toolkit_name: str | None = None,
                 workspace_gb: float | None = None, progress: bool = False) -> EngineResult:
    """Build a TensorRT engine from ``onnx_path`` (made by ``export_onnx``) and write it to ``plan_path``
    (atomically).

    ``profiles``: optimisation profiles, each ``{input: (min_shape, opt_shape, max_shape)}``; by default one
    profile over the export spec's ranges (``profile_shapes``). ``fp16``: the engine is FP16, which a strongly
    typed network takes from an FP16 export; pass False to build an fp32 export as it is.
    ``compute_capabilities`` (TensorRT-RTX): the SMs to build for, e.g. ``[86, 89]``; default: the GPU present.
    ``toolkit_name``: "tensorrt" or "tensorrt-rtx" (default: TensorRT when installed, else TensorRT-RTX).
    The ONNX file's export spec is written beside the plan (``<plan>.json``, atomically), and the ``tensorrt``
    backend refuses a model of another architecture with it. ``progress`` shows the stage that runs (a build
    takes minutes).
    """
    check_flags(fp16=fp16, progress=progress)
    if workspace_gb is not None and (isinstance(workspace_gb, bool) or not isinstance(workspace_gb, (int, float))
                                     or not 0 < workspace_gb < float("inf")):
        raise ValueError(f"workspace_gb must be a positive number of GiB (or None: TensorRT's default), got "
                         f"{workspace_gb!r}")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path: no ONNX file at {str(onnx_path)!r} (make one with `stunet export onnx`)")
    if plan_path.suffix not in (".plan", ".engine"):
        raise ValueError(f"plan_path must end in .plan or .engine, got {str(plan_path)!r}")
    name, trt = toolkit(toolkit_name)
    proto = _load_onnx(onnx_path)
    _check_external_data(proto, onnx_path)
    _check_precision(proto, fp16, onnx_path)
    spec = next((ExportSpec.from_json(p.value) for p in proto.metadata_props if p.key == SPEC_KEY), None)
    if profiles is None:
        if spec is None:
            raise ValueError(f"profiles: {str(onnx_path)!r} carries no stunet export spec (it was not "
                             "written by export_onnx): re-export it (`stunet export onnx`), or pass "
                             "profiles=[{input: (min, opt, max)}]")
        profiles = [profile_shapes(spec)]
    _check_profiles(profiles, proto)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    capabilities = []
    start = time.perf_counter()
    if name == "tensorrt-rtx":
        proto = _inline_stunet_functions(proto)
        capabilities = _set_compute_capabilities(trt, config, compute_capabilities)
    else:
        if compute_capabilities:
            raise ValueError("compute_capabilities: TensorRT builds for the GPU it runs on; name SMs only with "
                             "toolkit_name='tensorrt-rtx'")
        obstacle = unavailable_on("cuda")  # the plugins' kernels are the Triton kernels, built for this GPU
        if obstacle:
            log.warning("stunet export: the stunet plugins cannot be built here (%s); the engine computes the "
                        "stunet nodes from their standard-op bodies instead", obstacle)
            proto = _inline_stunet_functions(proto)
        else:
            from . import tensorrt_plugins

            tensorrt_plugins.register()
            proto = tensorrt_plugins.route_to_plugins(proto)
            override = getattr(getattr(trt, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)
            if override is not None:
                parser.set_flag(override)
    with Stages(f"build {plan_path.name}", ["parse", f"{name} build"], progress) as stages:
        with stages.stage("parse"):
            _parse(parser, proto, onnx_path)
        if workspace_gb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2 ** 30))
        for shapes in profiles:
            profile = builder.create_optimization_profile()
            for input_name, (lo, opt, hi) in shapes.items():
                profile.set_shape(input_name, lo, opt, hi)
            config.add_optimization_profile(profile)
        with stages.stage(f"{name} build"):
            plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{name} could not build an engine from {str(onnx_path)!r} (its log above says why)")
    with atomic_path(plan_path) as tmp:
        Path(tmp).write_bytes(memoryview(plan))
    if spec is not None:  # what the tensorrt backend checks a model against
        with atomic_path(plan_spec_path(plan_path)) as tmp:
            Path(tmp).write_text(spec.to_json())
    else:  # a spec left by an earlier plan at this path would describe another network
        plan_spec_path(plan_path).unlink(missing_ok=True)
    result = EngineResult(plan_path, name, trt.__version__, [dict(p) for p in profiles], capabilities,
                          time.perf_counter() - start, plan.nbytes, spec)
    log.info("stunet export: built %s (%s %s, %.1f MB) in %.1f s", plan_path, name, trt.__version__,
             result.bytes / 2 ** 20, result.seconds)
    return result


_ONNX_TYPES = {1: "float32", 10: "float16", 16: "bfloat16"}


def _check_external_data(proto, onnx_path: Path) -> None:
    """The weights files a model keeps beside it (a model past 2 GB) must be there: the parser would fail deep
    inside the build otherwise."""
    import onnx

    locations = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    missing = sorted(name for name in locations if not (onnx_path.parent / name).is_file())
    if missing:
        raise FileNotFoundError(f"onnx_path: {str(onnx_path)!r} keeps its weights in {', '.join(missing)}, which "
                                f"is not beside it in {str(onnx_path.parent)!r}; copy it there with the file")


def _check_precision(proto, fp16: bool, onnx_path: Path) -> None:
    import onnx

    x = next((i for i in proto.graph.input if i.name == "x"), None)
    if x is None:
        raise ValueError(f"onnx_path: {str(onnx_path)!r} has no input named 'x'; export it with export_onnx")
    elem = x.type.tensor_type.elem_type
    if fp16 and elem != onnx.TensorProto.FLOAT16:
        raise ValueError(f"fp16=True builds a strongly typed FP16 network, but {str(onnx_path)!r} is "
                         f"{_ONNX_TYPES.get(elem, elem)}: export it with dtype=torch.float16 "
                         "(`stunet export onnx --dtype fp16`), or pass fp16=False (--fp32) to build it as it is")


def _check_profiles(profiles: list[dict], proto) -> None:
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in proto.graph.input}
    if not isinstance(profiles, (list, tuple)) or not profiles or not all(isinstance(p, dict) for p in profiles):
        raise ValueError("profiles must be a non-empty list of {input: (min, opt, max)} dicts")
    for k, shapes in enumerate(profiles):
        if set(shapes) != set(ranks):
            raise ValueError(f"profiles[{k}] must give every input of the file {sorted(ranks)}, got {sorted(shapes)}")
        for input_name, triple in shapes.items():
            where = f"profiles[{k}][{input_name!r}]"
            if not (isinstance(triple, (list, tuple)) and len(triple) == 3 and all(
                    isinstance(s, (list, tuple)) and len(s) == ranks[input_name]
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in s) for s in triple)):
                raise ValueError(f"{where} must be (min, opt, max) shapes of {ranks[input_name]} positive integers "
                                 f"each (the input's rank), got {shown(triple)}")
            lo, opt, hi = triple
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ValueError(f"{where}: need min <= opt <= max per axis, got {triple}")


def _inline_stunet_functions(proto):
    """The file with every local function inlined: TensorRT-RTX has no plugins, so the stunet nodes become
    their standard-op bodies."""
    import onnx.inliner

    return onnx.inliner.inline_local_functions(proto)


def _set_compute_capabilities(trt, config, capabilities: list[int] | None) -> list[int]:
    supported = {int(n[2:]): v for n, v in trt.ComputeCapability.__members__.items() if n.startswith("SM")}
    if capabilities is None:
        if not torch.cuda.is_available():
            raise ValueError("compute_capabilities: no GPU here to build for; name the targets, e.g. [86, 89] "
                             f"(`--sm 86 89`; TensorRT-RTX builds for {sorted(supported)})")
        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
        major, minor = torch.cuda.get_device_capability()
        return [major * 10 + minor]
    capabilities = [int(c) for c in capabilities]
    bad = [c for c in capabilities if c not in supported]
    if bad or not capabilities:
        raise ValueError(f"compute_capabilities: TensorRT-RTX {trt.__version__} builds for {sorted(supported)}, "
                         f"got {capabilities}")
    config.num_compute_capabilities = len(capabilities)
    for i, c in enumerate(capabilities):
        config.set_compute_capability(supported[c], i)
    return capabilities


def _parse(parser, proto, onnx_path: Path) -> None:
    """Parses the (rewritten) model; external weights are found beside the original file."""
    import tempfile

    import onnx

    with tempfile.NamedTemporaryFile(suffix=".onnx", dir=onnx_path.parent, delete=False) as f:
        tmp = Path(f.name)
    try:
        onnx.save_model(proto, str(tmp))
        ok = parser.parse_from_file(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    if not ok:
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 5)))
        raise RuntimeError(f"the TensorRT parser rejected {str(onnx_path)!r}: {errors}")
