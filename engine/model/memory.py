"""The peak activation memory of one forward, simulated on the ``meta`` device.

The model is built and run on meta tensors (shapes, dtypes and strides, no data and no compute: lumiere-base
in about a second) under a dispatch mode that counts the bytes of every storage the forward allocates while
any tensor still refers to it, as a caching allocator's "allocated bytes" counter does, and keeps the
maximum. Scaled-dot-product attention runs as the fused kernel it is on a GPU (flash, memory-efficient or
cuDNN: its output alone), not as the math path torch takes on meta tensors, which holds the L x L scores.
Both are modes of the calling thread: a model running in another thread meanwhile is untouched.

Left out, so a GPU's ``torch.cuda.max_memory_allocated`` adds them: the weights and the inputs (not
activations), the caching allocator's rounding, and library workspaces (cuBLAS, cuDNN). The simulation is exact
for what the forward itself holds: the skips kept for the decoder, each block's working set, and the policy's
choices (the reference's fp32 normalisation and attention, the kernels' fused outputs, the channels-last
trunk's copies).

When memory does run out, ``advice_on_out_of_memory`` gives the error the place it happened and the ways to need
less (the pipeline's stages and the export routes use it).
"""
from __future__ import annotations

import contextlib
import re
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..config import STUNetConfig
from .policy import REFERENCE, ExecutionPolicy
from .unet import STUNet
from .validate import check_forward_inputs


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that ops allocate inside the mode, from an op's return until the last
    tensor on the storage is released; ``peak`` is the largest count seen. Storages of tensors made before the
    mode (weights, inputs) are not counted, nor their views."""

    def __init__(self, external: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self._external = {t.untyped_storage()._cdata for t in external}
        self._storages: dict[int, list[int]] = {}  # storage -> [bytes, tensors on it that are alive]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._hold(t)
        self.peak = max(self.peak, self.live)
        return out

    def _hold(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._external:
            return
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [storage.nbytes(), 0]
            self.live += entry[0]
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= self._storages.pop(key)[0]


class FusedAttention(TorchFunctionMode):
    """Runs ``F.scaled_dot_product_attention`` as the fused GPU kernel it is (flash, memory-efficient or cuDNN):
    its output is all it allocates. A function mode, like a dispatch mode, acts on its own thread only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            return q.new_empty(*q.shape[:-1], v.shape[-1])
        return func(*args, **kwargs)


def forward_peak_bytes(config: STUNetConfig, *, batch: int, frames: int, height: int, width: int,
                       text_len: int = 77, dtype: torch.dtype = torch.float16,
                       policy: ExecutionPolicy = REFERENCE) -> int:
    """Peak bytes of activations one inference forward of a ``config`` model holds at once: ``batch`` clips of
    ``frames`` x ``height`` x ``width`` with ``text_len`` tokens, weights and activations in ``dtype``, run
    with ``policy`` (``REFERENCE``, or ``FAST``: the fast backend's kernels and channels-last trunk)."""
    model, args = meta_forward(config, batch=batch, frames=frames, height=height, width=width,
                               text_len=text_len, dtype=dtype)
    with torch.no_grad(), FusedAttention(), LiveBytes([*model.parameters(), *model.buffers(),
                                                        *(a for a in args if a is not None)]) as live:
        model.forward_checked(*args, policy)
    return live.peak


def meta_forward(config: STUNetConfig, *, batch: int, frames: int, height: int, width: int, text_len: int = 77,
                 dtype: torch.dtype = torch.float16) -> tuple[STUNet, tuple]:
    """A ``config`` model on the meta device in ``dtype`` and the checked inputs ``forward_checked`` takes
    (x, timesteps, text, no mask, the noise level of an SSR model)."""
    with torch.device("meta"):
        model = STUNet(config).to(dtype).eval()
        x = torch.empty(batch, config.in_channels, frames, height, width, dtype=dtype)
        text = torch.empty(batch, text_len, config.text_dim, dtype=dtype)
        level = torch.zeros(batch) if config.noise_aug else None
        return model, check_forward_inputs(model, x, torch.zeros(batch), text, None, level, False)


CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"
"""What PyTorch's CPU allocator says, in a plain RuntimeError, when the system refuses an allocation."""


@contextlib.contextmanager
def advice_on_out_of_memory(where: str, ways: list[str]):
    """Adds to a ``torch.OutOfMemoryError`` raised inside where it happened and the ways to need less memory; the
    error keeps its type, so callers that catch it still do. The CPU allocator's refusal becomes the same error
    (a RuntimeError still)."""
    advice = f"stunet: out of memory in {where}; to need less: {'; or '.join(ways)}"
    try:
        yield
    except torch.OutOfMemoryError as e:
        e.args = (f"{e.args[0]}\n{advice}" if e.args else advice, *e.args[1:])
        raise
    except RuntimeError as e:
        if CPU_OUT_OF_MEMORY not in str(e):
            raise
        size = re.search(r"allocate (\d+) bytes", str(e))
        what = f"the CPU could not allocate {int(size[1]) / 2 ** 30:.3g} GiB" if size else str(e)
        raise torch.OutOfMemoryError(f"{what}\n{advice}") from e
