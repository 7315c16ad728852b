"""One export spec per network: its inputs, their dynamic axes and ranges, sample inputs, and the tolerance its
exported artifacts are checked to.

Every export route (ONNX, AOTInductor) builds from a spec, so input names, dynamic axes and their ranges
agree across the artifacts of one network, and each artifact's parity check uses the spec's sample inputs.
"""
from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import STUNetConfig, check_size, check_volume, is_choice, shown
from ..model import ExecutionPolicy, STUNet
from ..model.memory import advice_on_out_of_memory
from ..progress import loggers_quiet


@contextmanager
def exporter_chatter_silenced():
    """Silences what torch's exporters say about themselves rather than about this export: that torchvision's
    ops are not registered (stunet has none), that axes sharing one dynamic dimension keep one name (the spec
    gives batch, frames and sides one dimension across the inputs on purpose), and a deprecation inside
    torch's pytree pickling (torch.onnx.export, AOTInductor). Every other warning and log record passes."""
    # "torchvision is not installed. Skipping torchvision::nms", ...
    with warnings.catch_warnings(), loggers_quiet(logging.ERROR, "torch.onnx._internal.exporter._registration"):
        warnings.filterwarnings("ignore", r"# The axis name: .* will not be used", UserWarning)
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        yield


TRACE_STEPS = 2
"""Steps of each dynamic axis an export traces at, at least: torch.export specialises sizes 0 and 1, so what it
compiles for a dynamic axis starts at two steps."""

SPEC_KEY = "stunet.export_spec"
"""The metadata key under which ``export_onnx`` (ONNX metadata_props) and ``export_aoti`` (the package's
metadata) record the artifact's ExportSpec (JSON)."""


@dataclass(frozen=True)
class Axis:
    """A dynamic dimension: a multiple of ``divisor`` in [min, max], ``opt`` the size to tune for."""

    name: str
    divisor: int
    min: int
    opt: int
    max: int

    def dim(self) -> "torch.export.Dim | object":
        """The torch.export dimension (``divisor`` times a free integer)."""
        k = torch.export.Dim(f"{self.name}_k" if self.divisor > 1 else self.name, min=max(1, self.min // self.divisor),
                             max=max(2, self.max // self.divisor))
        return k * self.divisor if self.divisor > 1 else k


@dataclass(frozen=True)
class ExportSpec:
    """The inputs of an exported STUNet forward and their ranges.

    Inputs: ``x`` (B, C, T, H, W) in the export dtype, ``timesteps`` (B,) float32, ``text_embeds`` (B, L, D),
    ``text_mask`` (B, L) bool, and for SSR models ``noise_level`` (B,) float32; output ``sample``
    (B, out_channels, T, H, W).
    """

    config: STUNetConfig
    batch: int
    frames: int
    height: int
    width: int
    text_len: int
    dtype: torch.dtype = torch.float32
    dynamic: bool = True
    tolerance: float = 1e-4
    """Max abs difference from the fp32 reference a parity check accepts (fp32 exports)."""

    def __post_init__(self):
        cfg = self.config
        for name, value, div in (("batch", self.batch, 1), ("frames", self.frames, cfg.frame_divisor),
                                 ("height", self.height, cfg.spatial_divisor),
                                 ("width", self.width, cfg.spatial_divisor), ("text_len", self.text_len, 1)):
            check_size(name, value, div)
        cfg.check_frames(self.frames)
        check_volume(batch=self.batch, channels=cfg.in_channels, frames=self.frames, height=self.height,
                     width=self.width)
        check_volume(batch=self.batch, text_len=self.text_len, text_dim=cfg.text_dim)
        if not isinstance(self.dynamic, bool):
            raise TypeError(f"dynamic must be True or False, got {shown(self.dynamic)}")
        if not is_choice(self.dtype, (torch.float32, torch.float16, torch.bfloat16)):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {shown(self.dtype)}")

    @classmethod
    def for_model(cls, config: STUNetConfig, *, batch: int = 2, frames: int | None = None,
                  height: int | None = None, width: int | None = None, text_len: int = 77,
                  dtype: torch.dtype = torch.float32, dynamic: bool = True) -> "ExportSpec":
        """The spec at the model's own geometry unless told otherwise (an SSR model: one window)."""
        frames = config.call_frames if frames is None else frames
        height = config.sample_size if height is None else height
        width = config.sample_size if width is None else width
        return cls(config, batch, frames, height, width, text_len, dtype, dynamic)

    def to_json(self) -> str:
        """The spec as JSON (what ``export_onnx`` records in the file's metadata under ``SPEC_KEY``)."""
        data = asdict(self)
        data.update(config=self.config.to_dict(), dtype=str(self.dtype).removeprefix("torch."))
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "ExportSpec":
        try:
            data = json.loads(text)
            data.update(config=STUNetConfig.from_dict(data["config"]), dtype=getattr(torch, data["dtype"]))
            return cls(**data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"ExportSpec.from_json: not an export spec ({type(e).__name__}: {e}); export the "
                             "model again") from None

    @property
    def input_names(self) -> list[str]:
        names = ["x", "timesteps", "text_embeds", "text_mask"]
        return names + (["noise_level"] if self.config.noise_aug else [])

    output_names = ["sample"]

    def axes(self) -> dict[str, Axis]:
        """The dynamic axes: batch 1..2*batch, frames and sides from one divisor step up to 4x the sample (frames
        no further than the model's ``temporal_max_frames``)."""
        cfg = self.config
        frames = 4 * self.frames
        if cfg.temporal_max_frames:
            frames = min(frames, cfg.temporal_max_frames // cfg.frame_divisor * cfg.frame_divisor)
        return {
            "batch": Axis("batch", 1, 1, self.batch, max(2, 2 * self.batch)),
            "frames": Axis("frames", cfg.frame_divisor, cfg.frame_divisor, self.frames, frames),
            "height": Axis("height", cfg.spatial_divisor, cfg.spatial_divisor, self.height, 4 * self.height),
            "width": Axis("width", cfg.spatial_divisor, cfg.spatial_divisor, self.width, 4 * self.width),
            "text_len": Axis("text_len", 1, 1, self.text_len, max(2, 4 * self.text_len)),
        }

    def dynamic_shapes(self) -> dict | None:
        """torch.export's dynamic_shapes for the inputs (None for a static export)."""
        if not self.dynamic:
            return None
        a = {name: axis.dim() for name, axis in self.axes().items()}
        shapes = {"x": {0: a["batch"], 2: a["frames"], 3: a["height"], 4: a["width"]}, "timesteps": {0: a["batch"]},
                  "text_embeds": {0: a["batch"], 1: a["text_len"]}, "text_mask": {0: a["batch"], 1: a["text_len"]}}
        if self.config.noise_aug:
            shapes["noise_level"] = {0: a["batch"]}
        return shapes

    def trace_geometry(self) -> dict[str, int]:
        """The sizes an export traces at: the spec's, with every dynamic axis at two steps or more. torch.export
        specialises a size of 0 or 1 to a constant, so a dynamic axis traced at one step (batch 1, a single
        frame step, one token) would not be dynamic; the artifact's ranges still start at the axis's minimum."""
        sizes = dict(batch=self.batch, frames=self.frames, height=self.height, width=self.width,
                     text_len=self.text_len)
        if not self.dynamic:
            return sizes
        axes = self.axes()
        return {name: min(max(size, TRACE_STEPS * axes[name].divisor), axes[name].max)
                for name, size in sizes.items()}

    def second_geometry(self) -> dict[str, int]:
        """Where a dynamic artifact's parity check runs besides the spec's geometry: batch 1, another clip length
        (twice the frames where the range allows, else its longest clip, else one step fewer), a taller frame,
        three more text tokens."""
        frames = self.axes()["frames"]
        other = min(2 * self.frames, frames.max)
        if other == self.frames:
            other = max(frames.min, self.frames - frames.divisor)
        return dict(batch=1, frames=other, height=self.height + self.config.spatial_divisor,
                    text_len=self.text_len + 3)

    def geometry_errors(self, *, min_steps: int = 1, **sizes: int) -> list[str]:
        """Why an artifact of this spec cannot run at ``sizes`` (batch, frames, height, width, text_len; any
        subset): a static one runs only at its own geometry, a dynamic one within its axes' ranges and steps,
        from ``min_steps`` steps of each axis up."""
        axes = self.axes()
        errors = []
        for name, size in sizes.items():
            axis = axes[name]
            low = max(axis.min, min_steps * axis.divisor)
            if not self.dynamic:
                if size != axis.opt:
                    errors.append(f"{name} {size} (static: {axis.opt})")
            elif not low <= size <= axis.max or size % axis.divisor:
                step = f" in steps of {axis.divisor}" if axis.divisor > 1 else ""
                errors.append(f"{name} {size} (dynamic: {low}..{axis.max}{step})")
        return errors

    def sample_inputs(self, *, batch: int | None = None, frames: int | None = None, height: int | None = None,
                      width: int | None = None, text_len: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded inputs (on the CPU, in the export dtype) at the spec's geometry or another one."""
        cfg = self.config
        B, T = self.batch if batch is None else batch, self.frames if frames is None else frames
        H, W = self.height if height is None else height, self.width if width is None else width
        L = self.text_len if text_len is None else text_len
        g = torch.Generator().manual_seed(seed)
        inputs = {
            "x": torch.randn(B, cfg.in_channels, T, H, W, generator=g).to(self.dtype),
            "timesteps": torch.randint(0, cfg.num_train_timesteps, (B,), generator=g).float(),
            "text_embeds": torch.randn(B, L, cfg.text_dim, generator=g).to(self.dtype),
            "text_mask": torch.ones(B, L, dtype=torch.bool),
        }
        inputs["text_mask"][0, L // 2 + 1:] = False  # a padded prompt
        if cfg.noise_aug:
            inputs["noise_level"] = torch.randint(0, 250, (B,), generator=g).float()
        return inputs


class ExportedForward(nn.Module):
    """The exported signature: (x, timesteps, text_embeds, text_mask[, noise_level]) -> sample, with the kernel
    ops as graph nodes (``ExecutionPolicy(kernels=True)``) and no host-side validation in the graph."""

    def __init__(self, model: STUNet):
        super().__init__()
        self.model = model
        self.policy = ExecutionPolicy(kernels=True)

    def forward(self, x, timesteps, text_embeds, text_mask, noise_level=None):
        return self.model.forward_checked(x, timesteps.float(), text_embeds, text_mask.bool(),
                                          None if noise_level is None else noise_level.float(), self.policy)


@dataclass
class ExportResult:
    path: Path
    spec: ExportSpec
    max_abs_error: float | None = None
    """The parity check's worst |artifact - reference| over its geometries (when checked)."""
    external_data: Path | None = None
    """An ONNX file's weights, when they are kept beside it (a model past protobuf's 2 GB limit)."""


def shapes_tuple(spec: ExportSpec):
    """The dynamic shapes in input order (what torch.export takes for positional inputs)."""
    shapes = spec.dynamic_shapes()
    return None if shapes is None else tuple(shapes[name] for name in spec.input_names)


SMALLER_EXAMPLE = ("a smaller example geometry (batch, frames, height, width, text_len: a dynamic export still runs "
                   "at other sizes within its ranges)")
"""What needs less memory when an export runs out of it."""


def prepare(model: STUNet, path, suffix: str, *, device: torch.device | None = None, min_steps: int = 1,
            what: str = "", **geometry):
    """What every route starts from: the checked ``path``, the spec, the ``ExportedForward`` of a converted copy
    of ``model`` (the caller's model is not modified) on ``device``, and the sample inputs to trace with, in
    input order (at ``spec.trace_geometry()``). ``min_steps``: the steps of each dynamic axis (but the batch)
    that ``what``, the artifact, needs its own geometry to have to run it."""
    from ..backends.base import converted_copy

    if not isinstance(model, STUNet):
        raise TypeError(f"model must be a STUNet, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"path must end in {suffix}, got {str(path)!r}")
    spec = ExportSpec.for_model(model.config, **geometry)
    if spec.dynamic and min_steps > 1:
        axes = spec.axes()
        short = [f"{name} must be at least {min_steps * axes[name].divisor} for {what}, got {size}"
                 for name, size in dict(frames=spec.frames, height=spec.height, width=spec.width,
                                        text_len=spec.text_len).items() if size < min_steps * axes[name].divisor]
        if short:
            raise ValueError("; ".join(short) + f" (torch.export compiles a dynamic size from {min_steps} steps of "
                             "its axis up; a static export takes any size)")
    device = device or model.device
    example = (f"batch {spec.batch}, {spec.frames} frames of {spec.height}x{spec.width}, {spec.text_len} text "
               "tokens")
    with advice_on_out_of_memory(f"the export's copy of the model and its example inputs ({example})",
                                 [SMALLER_EXAMPLE]):
        module = ExportedForward(converted_copy(model, spec.dtype).to(device)).eval()
        inputs = spec.sample_inputs(**spec.trace_geometry())
        return path, spec, module, tuple(inputs[name].to(device) for name in spec.input_names)


def compare(run, model: STUNet, spec: ExportSpec, what: str, geometries=None,
            device: torch.device | None = None) -> float:
    """The worst |run(*inputs) - fp32 reference| at the spec's geometry and, for a dynamic artifact, a second
    one (or at ``geometries``); raises beyond the spec's tolerance for fp32 artifacts."""
    from ..backends.base import converted_copy

    if not isinstance(spec, ExportSpec):
        raise TypeError(f"spec must be the artifact's ExportSpec (the export's result.spec), got {type(spec).__name__}")
    if not isinstance(model, STUNet):
        raise TypeError(f"model must be a STUNet, got {type(model).__name__}")
    if model.config != spec.config:
        raise ValueError(f"{what} was exported from another architecture than this model's; check it against the "
                         "model it was exported from")
    if geometries is None:
        geometries = [{}]
        if spec.dynamic:
            geometries.append(spec.second_geometry())
    for geometry in geometries:
        if not isinstance(geometry, dict) or not set(geometry) <= set(spec.axes()):
            raise ValueError(f"geometries must be dicts of sizes by {sorted(spec.axes())}, got {shown(geometry)}")
        errors = spec.geometry_errors(**geometry)
        if errors:
            raise ValueError(f"{what} cannot run at {geometry}: " + "; ".join(errors))
    device = device or model.device
    reference = converted_copy(model, torch.float32).to(device)
    worst = 0.0
    for i, geometry in enumerate(geometries):
        with advice_on_out_of_memory(f"the check of {what} against the reference", [SMALLER_EXAMPLE]), \
                torch.no_grad():
            inputs = {k: v.to(device) for k, v in spec.sample_inputs(seed=i + 1, **geometry).items()}
            got = run(*(inputs[name] for name in spec.input_names)).float()
            want = reference(inputs["x"].float(), inputs["timesteps"], inputs["text_embeds"].float(),
                             inputs["text_mask"], noise_level=inputs.get("noise_level"))
        worst = max(worst, float((got - want).abs().max()))
    if spec.dtype == torch.float32 and worst > spec.tolerance:
        raise AssertionError(f"{what} differs from the reference by {worst:.3g} (tolerance {spec.tolerance})")
    return worst
