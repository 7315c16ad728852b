"""Every ``torch.ops.stunet.*`` registration, each with its fake (meta) implementation, and its dispatch.

An op runs its Triton kernel when the tensors are on a CUDA device (or on the CPU under TRITON_INTERPRET=1)
and the kernel declares no reason against the inputs; otherwise it runs the kernel file's ``*_ref`` math,
logging the reason once per op and reason (a fallback on a GPU is never silent). Registered with
``torch.library.triton_op`` (kernels launched through ``wrap_triton``), the ops work eagerly, inside CUDA-graph
capture (launches only; no host synchronisation, no allocation outside torch's allocator), as single nodes
under torch.export (what the ONNX exporter translates), and transparently to inductor: torch.compile fuses
around the kernels and AOTInductor compiles them (or, on the CPU, their reference math) into its package.

Public wrappers with argument checks are in ``stunet.kernels`` (``__init__``).
"""
from __future__ import annotations

import logging

import torch
from torch.library import triton_op

from ..progress import loggers_quiet
from . import _triton
from . import groupnorm as _gn
from . import temporal_attn as _ta

log = logging.getLogger("stunet.kernels")
_warned: set[tuple[str, str]] = set()


# The kernels are built and checked (tests/test_kernels_compile.py) for compute capability 8.0 and newer:
# Ampere, Ada, Hopper and Blackwell. Below it Triton compiles their dots without tensor cores, the product
# path spills kilobytes of registers per thread and the widest tiles need more shared memory than a Turing
# block has (64 KB), so a launch would be slow or refused: the ops run their reference math there instead.
MIN_COMPUTE_CAPABILITY = (8, 0)
_capabilities: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int] | None:
    """``device``'s compute capability, asked once per device (ops consult it on every call: a tensor's device
    has its index, found in the cache at once); None where torch has no CUDA device (fake CUDA tensors being
    traced: the kernels are what traces)."""
    if device.index in _capabilities:
        return _capabilities[device.index]
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _capabilities:
        major, minor = torch.cuda.get_device_capability(index)
        _capabilities[index] = (major, minor)
    return _capabilities[index]


def device_reason(device: torch.device) -> str | None:
    """Why no Triton kernel runs on ``device`` (None: they can)."""
    if _triton.triton is None:
        return f"Triton is unavailable ({_triton.IMPORT_ERROR})"
    if device.type == "cuda":
        capability = _capability(device)
        if capability is not None and capability < MIN_COMPUTE_CAPABILITY:
            need = "%d.%d" % MIN_COMPUTE_CAPABILITY
            return (f"compute capability {capability[0]}.{capability[1]}: the kernels need {need} or newer, below "
                    "which Triton builds their dots without tensor cores")
        return None
    if device.type == "cpu" and _triton.interpreting():
        return None
    return f"tensors on {device.type} (the kernels run on CUDA, or on CPU under TRITON_INTERPRET=1)"


def kernel_reasons(op: str, x: torch.Tensor, reasons: list[str]) -> list[str]:
    """All reasons ``op``'s Triton kernel will not run on ``x`` (empty: it will)."""
    where = device_reason(x.device)
    if where is None and x.device.type == "cpu" and _tracing(x):
        where = "traced on the CPU (Triton's interpreter runs kernels eagerly only)"
    return ([where] if where else []) + list(reasons)


def _tracing(x: torch.Tensor) -> bool:
    """Inside torch.compile / torch.export, or on fake tensors."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(x)


def _use_kernel(op: str, x: torch.Tensor, reasons: list[str]) -> bool:
    why = kernel_reasons(op, x, reasons)
    if not why:
        return True
    if x.device.type == "cuda":
        for reason in why:
            if (op, reason) not in _warned:
                _warned.add((op, reason))
                log.warning("stunet.kernels: %s runs its reference math on CUDA: %s", op, reason)
    return False


def _triton_op(name: str):
    """``torch.library.triton_op(name)``. At registration torch looks for the Triton kernels the op launches and,
    without Triton installed, logs "Triton not available" for each op in every process that loads the ops: that
    absence is ``stunet env``'s to tell (the ops run their reference math), so the search logs only errors then."""
    def register(fn):
        with loggers_quiet(logging.ERROR, *(["torch._library.triton"] if _triton.triton is None else [])):
            return triton_op(name, mutates_args=())(fn)
    return register


# -- temporal attention -------------------------------------------------------------------------------------
@_triton_op("stunet::temporal_attention")
def temporal_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    if _use_kernel("temporal_attention", qkv, _ta.unsupported(qkv, heads, bias)):
        return _ta.temporal_attention(qkv, heads, bias, scale)
    return _ta.temporal_attention_ref(qkv, heads, bias, scale)


@temporal_attention.register_fake
def _(qkv, heads, bias=None, scale=None):
    B, T, S, C3 = qkv.shape
    return qkv.new_empty(B, T, S, C3 // 3)


# -- video group norm -------------------------------------------------------------------------------------------
@_triton_op("stunet::group_norm")
def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               scope: str, silu: bool, input_bias: torch.Tensor | None = None) -> torch.Tensor:
    if _use_kernel("group_norm", x, _gn.unsupported(x, num_groups)):
        return _gn.group_norm(x, num_groups, weight, bias, eps, scope, silu, input_bias)
    return _gn.group_norm_ref(x, num_groups, weight, bias, eps, scope, silu, input_bias)


@group_norm.register_fake
def _(x, num_groups, weight, bias, eps, scope, silu, input_bias=None):
    return torch.empty_like(x)  # x's strides, as both implementations return
