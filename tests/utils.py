"""Test helpers: seeded inputs, randomised temporal weights, and comparisons that explain their failures."""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

import stunet


def make_inputs(config: stunet.STUNetConfig, batch: int = 2, frames: int | None = None, size: int | None = None,
                text_len: int = 5, dtype=torch.float32, device="cpu", seed: int = 0):
    """(x, timesteps, text_embeds) for ``config``, drawn on a CPU generator (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    frames = frames or config.sample_frames
    size = size or config.sample_size
    x = torch.randn(batch, config.in_channels, frames, size, size, generator=g)
    t = torch.randint(0, config.num_train_timesteps, (batch,), generator=g)
    text = torch.randn(batch, text_len, config.text_dim, generator=g)
    return x.to(device, dtype), t.to(device), text.to(device, dtype)


def randomize_temporal(model: stunet.STUNet, seed: int = 1, scale: float = 0.05) -> stunet.STUNet:
    """Give every temporal module non-trivial weights (a fresh network is the identity in time)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.temporal_modules():
            for p in module.parameters(recurse=True):
                p.add_(scale * torch.randn(p.shape, generator=g).to(p))
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = "") -> None:
    """allclose with a report of the worst element and the fraction of elements out of tolerance."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        i = int((err - bound).flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        raise AssertionError(
            f"{what}: {bad.float().mean().item():.4%} of elements exceed atol={atol} rtol={rtol}; worst at "
            f"{idx}: got {a[idx].item():.6g}, expected {e[idx].item():.6g} (|err| {err[idx].item():.3g}); "
            f"max |err| {err.max().item():.3g}")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


needs_av = pytest.mark.skipif(not _importable("av"), reason="decoding mp4 needs PyAV")
needs_pil = pytest.mark.skipif(not _importable("PIL.Image"), reason="images need Pillow")


def read_mp4(path):
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def save_png(array, path):
    from PIL import Image

    Image.fromarray(array).save(path)


def current_umask() -> int:
    """The process umask (reading it means setting it: restored at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def tiny_model(**overrides) -> stunet.STUNet:
    """The ``tiny`` preset (with ``overrides``) with seeded weights and clearly non-identity temporal modules."""
    torch.manual_seed(0)
    return randomize_temporal(stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", **overrides)), scale=0.2).eval()


@contextlib.contextmanager
def recorded_launches(module, name: str = ""):
    """``module.launch`` (used as ``launch(kernel)[grid](*args, **kwargs)``) replaced by a recorder: within the
    block each launch appends ``(name, kernel, grid, args, kwargs)`` to the yielded list instead of running, so
    the launchers' own tiles, grids and arguments can be checked on meta tensors of any size."""
    launches = []

    class Recorder:
        def __call__(self, kernel):
            self.kernel = kernel
            return self

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((name, self.kernel, tuple(grid), args, kwargs))

    with mock.patch.object(module, "launch", Recorder()):
        yield launches


def left_in_temp(temp) -> list[str]:
    """What a run given ``temp`` as its TMPDIR left there, torch's compile cache (torchinductor_USER) aside."""
    return sorted(p.name for p in Path(temp).iterdir() if not p.name.startswith("torchinductor_"))
