"""``compile``: ``torch.compile`` of the reference forward, the peer a user could build from stock PyTorch."""
from __future__ import annotations

import torch

from ..config import shown
from ..model import STUNet
from ..model.validate import check_forward_inputs
from .base import Backend


def compile_modes() -> list[str]:
    """The modes this torch's ``torch.compile`` knows (``mode=``)."""
    from torch._inductor import list_mode_options

    return list(list_mode_options())


class CompileBackend(Backend):
    """torch.compile of the reference's ``forward_checked`` (once per input shape, ``dynamic=False``); inputs
    are validated eagerly first, and timesteps enter as tensors, so a new timestep never recompiles. The
    caller's model is compiled as it is (its dtype and layout); nothing on it changes."""

    name = "compile"

    def __init__(self, model: STUNet, mode: str | None = "max-autotune", compiler="inductor"):
        super().__init__(model)
        self.mode = mode
        policy, forward = self.policy, model.forward_checked

        def run(x, t, text, mask, noise_level):  # the policy is a constant of the graph, not a guarded input
            return forward(x, t, text, mask, noise_level, policy)

        self._compiled = torch.compile(run, mode=mode, backend=compiler, dynamic=False)

    @classmethod
    def unsupported(cls, model: STUNet, *, mode: str | None = None, **options) -> list[str]:
        reasons = super().unsupported(model, **options)
        modes = compile_modes()
        if mode is not None and mode not in modes:
            reasons.append(f"mode must be one of torch.compile's {', '.join(modes)} (or None), got {shown(mode)}")
        return reasons

    def describe(self) -> str:
        return (f"compile: torch.compile(mode={self.mode!r}) of the reference, {self.model.dtype} on "
                f"{self.model.device}")

    def forward(self, x, timesteps, text, text_mask=None, *, noise_level=None):
        args = check_forward_inputs(self.model, x, timesteps, text, text_mask, noise_level, False)
        return self._compiled(*args)
