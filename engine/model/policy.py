"""How one forward executes: an explicit, immutable policy passed with the call, never stored on modules.

    out = model(x, t, text)                                                # the reference: REFERENCE
    out = model(x, t, text, policy=ExecutionPolicy(kernels=True, channels_last=True))
    out = model(x, t, text, policy=PER_FRAME)                              # the text-to-image U-Net per frame

A model is only its weights; backends choose how to run it by the policy they pass, so two backends (or two
threads) over one model never see each other's modes. The policy rides on :class:`~stunet.model.layers.Cond`
down to the blocks; each op reads it at the one place where its kernel and its reference math differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def tensor_version(t: torch.Tensor) -> int | None:
    """How many in-place writes ``t`` has had, or None for an inference tensor (made under
    ``torch.inference_mode``), which counts none: its values can never be known unchanged."""
    return None if t.is_inference() else t._version


class TextKVStore:
    """Cross-attention keys and values of one text tensor, kept across calls (a generation's steps).

    Valid while the caller passes the *same* tensor object; it holds a reference, so the address cannot be
    reused by another tensor. When that tensor was written in place (its version changed), the values are
    recomputed into the existing buffers, so CUDA graphs that read them stay valid. Nothing is kept of an
    inference tensor, whose writes are not counted: its keys and values are computed in every forward, as
    without a store. It serves one forward at a time: two forwards with different texts interleaved on one
    store would read each other's keys and values (the backends that keep stores run their calls in turn).
    """

    def __init__(self):
        self.text: torch.Tensor | None = None
        self.version = -1
        self.kv: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}

    def for_text(self, text: torch.Tensor) -> dict:
        """The per-layer (k, v) dict for ``text`` (empty on a new text; refreshed in place after an edit; a
        new empty one at every call for an inference tensor)."""
        version = tensor_version(text)
        if version is None:
            self.clear()
            return {}
        if text is not self.text:
            self.text, self.version, self.kv = text, version, {}
        elif version != self.version:
            for layer, (k, v) in self.kv.items():
                new_k, new_v = layer(text).chunk(2, dim=-1)
                k.copy_(new_k)
                v.copy_(new_v)
            self.version = version
        return self.kv

    def clear(self) -> None:
        self.text, self.version, self.kv = None, -1, {}


@dataclass(frozen=True)
class ExecutionPolicy:
    """What a forward computes with; every field's default is the reference."""

    kernels: bool = False
    """Run the ops of ``stunet.kernels`` (GroupNorm+SiLU, temporal attention, TemporalUp's folded conv): their
    Triton kernels where those can run, their ``*_ref`` math otherwise (the op logs why on a GPU)."""
    channels_last: bool = False
    """Fold frames into a channels-last trunk: (B*T, C, H, W) tensors with (B*T, H, W, C) memory, the layout the
    temporal-attention kernel and cuDNN's fp16 convolutions read without permutes."""
    temporal: bool = True
    """Run the temporal modules. False runs the per-frame text-to-image U-Net (T is never resampled, so any
    frame count is accepted)."""
    text_kv: TextKVStore | None = field(default=None, compare=False)
    """Where cross-attention keys/values of the text are kept across calls; None computes them every call."""

    def __post_init__(self):
        for name in ("kernels", "channels_last", "temporal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ExecutionPolicy.{name} must be a bool, got {getattr(self, name)!r}")
        if self.text_kv is not None and not isinstance(self.text_kv, TextKVStore):
            raise TypeError(f"ExecutionPolicy.text_kv must be a TextKVStore or None, got "
                            f"{type(self.text_kv).__name__}")

    @property
    def memory_format(self) -> torch.memory_format:
        """The folded trunk's memory format."""
        return torch.channels_last if self.channels_last else torch.contiguous_format


REFERENCE = ExecutionPolicy()
"""Eager PyTorch reference math in the model's dtype, NCHW trunk: the source of truth."""
FAST = ExecutionPolicy(kernels=True, channels_last=True)
"""The fast backend's: the kernel ops on a channels-last trunk (the backend adds its text K/V store)."""
PER_FRAME = ExecutionPolicy(temporal=False)
"""The reference without its temporal modules: the inflated text-to-image U-Net on every frame."""

__all__ = ["ExecutionPolicy", "TextKVStore", "tensor_version", "REFERENCE", "FAST", "PER_FRAME"]
