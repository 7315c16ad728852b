"""Model weights on disk: ``config.json`` + ``model.safetensors`` (never pickle), strict loading, stylization.

- :func:`save_pretrained` writes both files atomically (a crash mid-write leaves the previous files intact).
- :func:`from_pretrained` refuses anything but an exact match: missing keys, unexpected keys and shape
  mismatches are collected and raised together in one :class:`WeightsError` (counted, and the first 20 of
  each listed); a truncated or corrupt file
  raises a :class:`WeightsError` that names the file.
- :func:`interpolate_spatial` blends the spatial (pretrained) weights towards a style model
  ``W = W_orig + alpha * (W_style - W_orig)``, leaving every temporal module untouched.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from ..config import STUNetConfig, shown
from ..io import atomic_path, make_folder
from .validate import checked_placement

if TYPE_CHECKING:
    from .unet import STUNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "stunet"


class WeightsError(ValueError):
    """Weights that do not fit the model, or a weights file that cannot be read."""


def save_pretrained(model: "STUNet", directory: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    directory = make_folder(directory, "save_pretrained")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    model.config.save(directory / CONFIG_NAME)


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning any read failure into a :class:`WeightsError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {str(path)!r}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise WeightsError(f"cannot read weights file {str(path)!r} ({path.stat().st_size} bytes): it is "
                           f"truncated or not a safetensors file ({e}); re-save or re-download it") from None


LISTED = 20  # keys a WeightsError lists of each kind (a file of another model would list thousands)


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                     what: str = "weights") -> None:
    """Raise one :class:`WeightsError` counting the missing keys, unexpected keys and shape mismatches and listing
    the first ``LISTED`` of each."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
                        for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what} do not match the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {item}" for item in items[:LISTED]]
            if len(items) > LISTED:
                lines.append(f"    ... and {len(items) - LISTED} more")
    raise WeightsError("\n".join(lines))


def from_pretrained(cls: type["STUNet"], directory: str | os.PathLike, *, device=None, dtype=None) -> "STUNet":
    device, dtype = checked_placement(device, dtype)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"from_pretrained: {str(directory)!r} is not a directory holding "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    config = STUNetConfig.load(directory / CONFIG_NAME)
    state = load_state_dict(directory / WEIGHTS_NAME)
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model.state_dict(), state, what=f"weights in {str(directory / WEIGHTS_NAME)!r}")
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def _kind(value) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"of type {type(value).__name__}"


def spatial_keys(model: "STUNet") -> list[str]:
    """State-dict keys of the pretrained per-frame trunk (everything but the temporal modules)."""
    temporal = model.temporal_keys()
    return [k for k in model.state_dict() if k not in temporal]


def interpolate_spatial(orig: "STUNet", style: "STUNet | Mapping[str, torch.Tensor]", alpha: float) -> "STUNet":
    """Stylized generation: a copy of ``orig`` whose spatial weights are ``W_orig + alpha * (W_style - W_orig)``.

    ``style`` is a STUNet of the same architecture or a state dict holding at least the spatial keys (a
    fine-tuned text-to-image U-Net); its temporal weights, if any, are ignored. Lumiere uses alpha in [0.5, 1].
    The temporal modules of the result are ``orig``'s, bit for bit.
    """
    from .unet import STUNet

    if not isinstance(orig, STUNet):
        raise TypeError(f"interpolate_spatial: orig must be a STUNet, got {type(orig).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolate_spatial: alpha must be a number in [0, 1] (Lumiere uses 0.5..1), "
                         f"got {shown(alpha)}")
    if not isinstance(style, (STUNet, Mapping)):
        raise TypeError(f"interpolate_spatial: style must be a STUNet or a state dict, got {type(style).__name__}")
    style_state = style.state_dict() if isinstance(style, STUNet) else dict(style)
    orig_state = orig.state_dict()
    keys = spatial_keys(orig)
    temporal = orig.temporal_keys()
    wrong = sorted(k for k in keys if k in style_state and not (
        isinstance(style_state[k], torch.Tensor) and style_state[k].dtype.is_floating_point))
    if wrong:
        raise TypeError(f"interpolate_spatial: the style weights must be floating-point torch tensors; {wrong[0]} is "
                        f"{_kind(style_state[wrong[0]])}" + (f" ({len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    check_state_dict({k: orig_state[k] for k in keys},
                     {k: v for k, v in style_state.items() if k not in temporal},
                     what="interpolate_spatial: the style weights")
    result = copy.deepcopy(orig)
    with torch.no_grad():
        new_state = result.state_dict()
        for k in keys:
            w = orig_state[k]
            s = style_state[k].to(device=w.device, dtype=torch.float32)
            new_state[k].copy_((w.float() + alpha * (s - w.float())).to(w.dtype))
    return result
