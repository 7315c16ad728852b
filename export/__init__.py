"""stunet.export: deployment artifacts from one export spec per network.

- ``export_onnx``: ONNX (opset 18) with the kernel ops as ``stunet``-domain nodes, each carrying a local
  function of standard ops (``onnx``); checked against the reference with onnxruntime (``check_onnx``).
- ``ExportSpec``: the inputs, dynamic axes and ranges, sample inputs and tolerance of an exported forward.
"""
from .spec import Axis, ExportSpec

__all__ = ["ExportSpec", "Axis", "export_onnx", "check_onnx", "ExportResult", "DOMAIN"]


def __getattr__(name):  # the ONNX route imports onnx/onnxscript only when it is used
    if name in ("export_onnx", "check_onnx", "ExportResult", "DOMAIN"):
        from . import onnx as _onnx

        return getattr(_onnx, name)
    raise AttributeError(f"module 'stunet.export' has no attribute {name!r}")
