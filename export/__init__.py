"""stunet.export: deployment artifacts from one export spec per network.

- ``export_onnx``: ONNX (opset 18) with the kernel ops as ``stunet``-domain nodes, each carrying a local
  function of standard ops (``onnx``); checked against the reference with onnxruntime (``check_onnx``).
- ``export_aoti``: an AOTInductor package (``.pt2``; the Triton kernels compile into it on CUDA), loaded by
  ``load_aoti`` or the ``aoti`` backend (``check_aoti``; ``package_spec`` reads the spec it records).
- ``build_engine``: a TensorRT engine (``.plan``) from the ONNX file: the stunet nodes as AOT plugins of the
  Triton kernels (TensorRT 10.9+), or inlined to standard ops (TensorRT-RTX, which also builds without a GPU);
  its export spec beside it (``read_plan_spec``).
- ``ExportSpec``: the inputs, dynamic axes and ranges, sample inputs and tolerance of an exported forward.
"""
from .spec import SPEC_KEY, Axis, ExportedForward, ExportResult, ExportSpec

__all__ = ["ExportSpec", "Axis", "ExportedForward", "ExportResult", "SPEC_KEY", "export_onnx", "check_onnx", "DOMAIN",
           "export_aoti", "load_aoti", "check_aoti", "package_spec", "build_engine", "read_spec", "profile_shapes",
           "read_plan_spec", "plan_spec_path"]


def __getattr__(name):  # the routes import their tools (onnx, onnxscript, inductor) only when used
    if name in ("export_onnx", "check_onnx", "DOMAIN"):
        from . import onnx as _onnx

        return getattr(_onnx, name)
    if name in ("export_aoti", "load_aoti", "check_aoti", "package_spec"):
        from . import aoti as _aoti

        return getattr(_aoti, name)
    if name in ("build_engine", "read_spec", "profile_shapes", "read_plan_spec", "plan_spec_path"):
        from . import tensorrt as _tensorrt

        return getattr(_tensorrt, name)
    raise AttributeError(f"module 'stunet.export' has no attribute {name!r}")
