"""``tensorrt``: a TensorRT engine (``stunet.export.build_engine``) run on CUDA tensors.

    Pipeline(model, backend="tensorrt", backend_options={"engine": "model.plan"})

The plan is deserialised by the toolkit that built it (TensorRT, or TensorRT-RTX), and runs on the current
CUDA stream with torch tensors bound by address: inputs in the engine's dtypes, one output allocated per call.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..model import STUNet
from ..model.validate import check_forward_inputs
from .base import Backend, on_device

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "BOOL": torch.bool,
                 "INT32": torch.int32, "INT64": torch.int64}


class TensorRTBackend(Backend):
    """Runs the plan at ``engine``, built from this model's ONNX export. A plan from another architecture is
    refused by the export spec ``build_engine`` writes beside it. Inputs are validated eagerly against
    ``model`` (its config); the engine computes in its own precision."""

    name = "tensorrt"

    def __init__(self, model: STUNet, *, engine: str | os.PathLike | None = None):
        super().__init__(model)
        reasons = self.unsupported(model, engine=engine)
        if reasons:
            raise ValueError("the tensorrt backend cannot run this model: " + "; ".join(reasons))
        from ..export.tensorrt import TOOLKITS, plan_spec_path, read_plan_spec, toolkit

        self.engine_path = Path(engine)
        self.spec = read_plan_spec(engine)
        if self.spec is None:
            log.warning("stunet tensorrt backend: %s has no export spec beside it (%s): the model's architecture "
                        "is not checked against the engine's", engine, plan_spec_path(engine).name)
        plan = self.engine_path.read_bytes()
        with on_device(model.device):  # an engine and its context live on the device current at their making
            for name in TOOLKITS:  # a plan only deserialises in the toolkit that built it
                try:
                    self.toolkit, trt = toolkit(name)
                except ImportError:
                    continue
                self._logger = trt.Logger(trt.Logger.WARNING)
                self._runtime = trt.Runtime(self._logger)
                self._engine = self._runtime.deserialize_cuda_engine(plan)
                if self._engine is not None:
                    break
            else:
                raise ValueError(f"engine: no installed TensorRT toolkit can load {str(engine)!r}")
            self._context = self._engine.create_execution_context()
        self._names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._dtypes = {n: _TORCH_DTYPES[self._engine.get_tensor_dtype(n).name] for n in self._names}

    @classmethod
    def unsupported(cls, model: STUNet, *, engine=None, **options) -> list[str]:
        reasons = super().unsupported(model, **options)
        if engine is None:
            reasons.append("it needs engine=PATH, a .plan made by stunet.export.build_engine")
        elif not isinstance(engine, (str, os.PathLike)):
            reasons.append(f"engine must be a path, a .plan made by stunet.export.build_engine, got "
                           f"{type(engine).__name__}")
        elif not Path(engine).is_file():
            reasons.append(f"no engine at {str(engine)!r} (make one with `stunet export tensorrt`)")
        else:
            from ..export.tensorrt import plan_spec_path, read_plan_spec

            spec = read_plan_spec(engine)
            if spec is not None and spec.config != model.config:
                reasons.append(f"the engine at {str(engine)!r} was built from another architecture (the config "
                               f"in {plan_spec_path(engine).name} differs from the model's)")
        if model.device.type != "cuda":
            reasons.append(f"TensorRT engines run on CUDA; the model is on {model.device}")
        try:
            from ..export.tensorrt import toolkit

            toolkit()
        except ImportError as e:
            reasons.append(str(e))
        return reasons

    def describe(self) -> str:
        return f"tensorrt: {self.engine_path.name} ({self.toolkit}) on {self.model.device}"

    def forward(self, x, timesteps, text, text_mask=None, *, noise_level=None):
        x, t, text, mask, level = check_forward_inputs(self.model, x, timesteps, text, text_mask, noise_level, False)
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        given = {"x": x, "timesteps": t, "text_embeds": text, "text_mask": mask, "noise_level": level}
        keep = []  # the converted inputs live until the engine has run
        for name in self._names:
            if self._engine.get_tensor_mode(name).name != "INPUT":
                continue
            tensor = given[name].to(self._dtypes[name]).contiguous()
            keep.append(tensor)
            if not self._context.set_input_shape(name, tuple(tensor.shape)):
                low, _, high = (tuple(shape) for shape in self._engine.get_tensor_profile_shape(name, 0))
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} is outside the engine's profile ({low} to "
                                 f"{high}); build the engine from an export whose ranges cover it")
            self._context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(self._context.get_tensor_shape("sample")), dtype=self._dtypes["sample"],
                          device=x.device)
        self._context.set_tensor_address("sample", out.data_ptr())
        if not self._context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise RuntimeError(f"TensorRT could not run {self.engine_path.name} on inputs of shape {tuple(x.shape)}")
        return out.to(x.dtype)
