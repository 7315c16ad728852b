"""The backend interface, the reference backend, and the converted copy a backend runs when it needs one.

A backend is an executor of a STUNet: ``backend(x, timesteps, text, text_mask=None, *, noise_level=None)`` ->
the model's prediction. It never modifies the model it is given: it runs that model with an explicit
:class:`~stunet.model.ExecutionPolicy`, or a converted copy of it (other dtype, layout) that shares storage
with the caller's parameters wherever nothing needs converting. Each backend class declares what it cannot
run (``unsupported``), and :func:`~stunet.backends.make_backend` refuses with every reason at once.

A backend may be shared among threads (a server's workers on one pipeline): it runs their calls one at a time.
Backends keep state across calls (the fast backend's text keys/values and CUDA graphs with their static
buffers, a TensorRT execution context), and two calls interleaved on it would read each other's. A call runs
on the model's device (``on_device``), in the model's own precision whatever autocast the caller has on
(``own_precision``).
"""
from __future__ import annotations

import abc
import contextlib
import copy
import logging
import threading

import torch
from torch import nn

from ..model import REFERENCE, ExecutionPolicy, STUNet

log = logging.getLogger(__name__)


def on_device(device: torch.device):
    """A context making ``device`` the current CUDA device (nothing for other devices): Triton kernels, CUDA
    graph capture and TensorRT run on the current device, which need not be the model's (a pipeline on
    ``cuda:1`` called from a thread whose current device is 0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_AUTOCAST_WARNED: set[str] = set()


def own_precision(device: torch.device):
    """A context turning off an ambient ``torch.autocast`` on ``device``'s type (nothing when none is on). The
    engine computes in its models' own precision, the one each fast path is checked in against the reference
    (convert the model for another: ``model.half()``); an autocast would recast the ops and change every
    output. It is said once per device type."""
    kind = device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return contextlib.nullcontext()
    if kind not in _AUTOCAST_WARNED:
        _AUTOCAST_WARNED.add(kind)
        log.warning("stunet: torch.autocast(%r) is on and does not apply here: the models compute in their own "
                    "dtype (convert a model, e.g. model.half(), for another)", kind)
    return torch.autocast(kind, enabled=False)


@contextlib.contextmanager
def ieee_fp32():
    """FP32 computed in FP32 on CUDA while it is held: PyTorch lets cuDNN's FP32 convolutions use TF32 by
    default, whose 10-bit mantissa is FP16's, which would make an "FP32 reference" on a GPU as coarse as the
    FP16 paths checked against it. For measuring: it sets process-wide flags (restored on exit), so no other
    thread should set them meanwhile."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


class Backend(abc.ABC):
    name = "abstract"

    def __init__(self, model: STUNet):
        if not isinstance(model, STUNet):
            raise TypeError(f"model must be a STUNet, got {type(model).__name__}")
        self.model = model
        """The module this backend executes: the caller's model, or the backend's own converted copy."""
        self.policy: ExecutionPolicy = REFERENCE
        self._lock = threading.RLock()  # one call at a time (re-entrant: a forward may call its own backend)
        self._last_stream = None  # the CUDA stream the last call ran on

    @classmethod
    def unsupported(cls, model: STUNet, **options) -> list[str]:
        """Every reason this backend cannot run ``model`` with ``options`` (empty: it can)."""
        reasons = []
        if model.device.type == "meta":
            reasons.append("the model's weights are on the meta device (load them first: STUNet.from_pretrained)")
        return reasons

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        """The dtype this backend computes in: inputs must have it (the pipeline casts to it)."""
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def describe(self) -> str:
        """One line: what this backend runs, on which device and dtype."""
        return f"{self.name}: {self.model.dtype} on {self.model.device}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.in_channels}-channel STUNet, {self.model.dtype})"

    def __call__(self, x: torch.Tensor, timesteps, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                 *, noise_level=None) -> torch.Tensor:
        """The model's prediction (B, out_channels, T, H, W); calls from several threads run in turn."""
        device = self.device
        with self._lock, on_device(device), own_precision(device):
            self._after_the_last_call(device)
            return self.forward(x, timesteps, text, text_mask, noise_level=noise_level)

    def _after_the_last_call(self, device: torch.device) -> None:
        """On CUDA, in turn on the GPU too: a call on another stream than the last call's (threads with streams
        of their own) waits for the work the last call queued, which used the same buffers (static graph
        inputs, stored text keys/values, a TensorRT context's activations)."""
        if device.type != "cuda":
            return
        stream = torch.cuda.current_stream(device)
        if self._last_stream is not None and self._last_stream != stream:
            stream.wait_stream(self._last_stream)
        self._last_stream = stream

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, timesteps, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                *, noise_level=None) -> torch.Tensor:
        """One call's prediction; the backend's own work, run under its lock by ``__call__``."""


class ReferenceBackend(Backend):
    """Eager PyTorch in the model's dtype: the source of truth."""

    name = "reference"

    def describe(self) -> str:
        return f"reference: eager PyTorch, {self.model.dtype} on {self.model.device}"

    def forward(self, x, timesteps, text, text_mask=None, *, noise_level=None):
        return self.model(x, timesteps, text, text_mask, noise_level=noise_level, policy=self.policy)


def converted_copy(model: STUNet, dtype: torch.dtype, channels_last_weights: bool = False) -> STUNet:
    """A copy of ``model`` whose parameters are in ``dtype`` (4-D conv weights channels-last if asked).

    A parameter that needs no conversion shares its storage with the caller's (a new Parameter object over the
    same memory, so a later ``model.half()`` by the caller does not reach the copy); the others are converted
    copies. The caller's model is not modified in any way.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        layout = torch.channels_last if channels_last_weights and p.dim() == 4 else torch.contiguous_format
        data = p.detach()
        if data.dtype != dtype or not data.is_contiguous(memory_format=layout):
            data = data.to(dtype).contiguous(memory_format=layout)
        memo[id(p)] = nn.Parameter(data, requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.to(dtype) if b.is_floating_point() else b
    return copy.deepcopy(model, memo).eval()
