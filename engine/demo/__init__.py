"""The demo cascade shipped inside the package: a small text-to-video STUNet, its SSR model and a word-level text
encoder, trained by ``tools/train_demo.py`` on synthetic clips of coloured shapes.

    stunet generate "a red circle moving left" -o out.mp4      # no --model: this cascade
    pipe = stunet.demo.pipeline()                               # the same from Python
    frames = pipe("a yellow triangle growing", seed=0).frames[0]

The language: ``a COLOUR SHAPE MOTION [on a BACKGROUND background]`` with COLOUR in :data:`COLORS`, SHAPE in
:data:`SHAPES`, MOTION one of "moving left/right/up/down", "growing", "shrinking", and BACKGROUND "plain" or
"striped" (unnamed: either). The base model makes 16 frames of 16 x 16 pixels (two temporal downsamplings, temporal
attention in the middle), the SSR model raises them to 64 x 64 on MultiDiffusion windows of 8 frames.

:func:`render` draws the training clips; :func:`follows` measures whether frames show what a caption says
(the named colour dominates the object pixels, its centroid moves the named way or its area grows/shrinks), the
check the tests and the training script apply to generated videos.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import resources

import torch

from ..config import STUNetConfig

COLORS = {
    "red": (0.90, 0.15, 0.10),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
MOVES = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SIZES = ("growing", "shrinking")
BACKGROUNDS = {"plain": 0.20, "striped": 0.20}  # mean grey level
VOCAB = ["a", "on", "moving", "background", *COLORS, *SHAPES, *MOVES, *SIZES, *BACKGROUNDS]
TEXT_DIM = 64
FRAMES, LOW_RES, HIGH_RES = 16, 16, 64
_GREYS = (0.12, 0.20, 0.28)  # what background pixels look like, for :func:`follows`


def base_config() -> STUNetConfig:
    return STUNetConfig(model_channels=16, channel_mult=(1, 4, 4), num_res_blocks=1, attention_levels=(1, 2),
                        attention_head_dim=32, num_groups=8, text_dim=TEXT_DIM, text_pool=True,
                        temporal_downsample=(True, True),
                        temporal_attn_depth=1, temporal_attn_heads=4, sample_frames=FRAMES, sample_size=LOW_RES)


def ssr_config() -> STUNetConfig:
    return STUNetConfig(in_channels=6, noise_aug=True, low_res_size=LOW_RES, model_channels=16, channel_mult=(1, 2, 2),
                        num_res_blocks=1, attention_levels=(), attention_head_dim=32, num_groups=8, text_dim=TEXT_DIM,
                        temporal_downsample=(False, False), temporal_attn_depth=0, sample_frames=FRAMES,
                        sample_size=HIGH_RES, window_frames=8, window_overlap=2)


@dataclass(frozen=True)
class Scene:
    """One clip of the demo's world: what a caption names."""

    color: str
    shape: str
    motion: str  # a key of MOVES or one of SIZES
    background: str | None = None  # None: not named (either)

    @property
    def caption(self) -> str:
        what = f"moving {self.motion}" if self.motion in MOVES else self.motion
        where = f" on a {self.background} background" if self.background else ""
        return f"a {self.color} {self.shape} {what}{where}"


def parse(prompt: str) -> Scene:
    """The scene a caption names; ``ValueError`` when the prompt is not one of the demo's captions."""
    words = re.findall(r"[a-z]+", prompt.lower())
    pick = lambda options: [w for w in words if w in options]  # noqa: E731
    color, shape, motion = pick(COLORS), pick(SHAPES), pick((*MOVES, *SIZES))
    background = pick(BACKGROUNDS)
    if len(color) != 1 or len(shape) != 1 or len(motion) != 1 or len(background) > 1:
        raise ValueError(f"prompt {prompt!r} is not a demo caption: 'a COLOUR SHAPE MOTION [on a BACKGROUND "
                         f"background]' with COLOUR in {list(COLORS)}, SHAPE in {list(SHAPES)}, MOTION 'moving "
                         f"{'/'.join(MOVES)}' or {' / '.join(SIZES)}, BACKGROUND {' / '.join(BACKGROUNDS)}")
    return Scene(color[0], shape[0], motion[0], background[0] if background else None)


def random_scenes(n: int, generator: torch.Generator, name_background: float = 0.5) -> list[Scene]:
    """``n`` scenes drawn uniformly; the background is named in a caption with probability ``name_background``."""
    def choice(options) -> str:
        options = list(options)
        return options[int(torch.randint(len(options), (), generator=generator))]

    scenes = []
    for _ in range(n):
        named = float(torch.rand((), generator=generator)) < name_background
        scenes.append(Scene(choice(COLORS), choice(SHAPES), choice((*MOVES, *SIZES)),
                            choice(BACKGROUNDS) if named else None))
    return scenes


def render(scenes: list[Scene], frames: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Clips of ``scenes`` as (B, 3, frames, size, size) RGB in [0, 1], anti-aliased, with the position, size,
    travel and (unnamed) background of each drawn from ``generator``; and each clip's caption."""
    B = len(scenes)
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    py, px = u[:, None], u[None, :]  # (S, 1), (1, S): image coordinates, y down
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    clips, captions = torch.empty(B, 3, frames, size, size), []
    s = torch.linspace(0, 1, frames)[:, None, None]  # (T, 1, 1): progress through the clip
    for b, scene in enumerate(scenes):
        background = scene.background or ("plain", "striped")[int(rand(()) < 0.5)]
        level = BACKGROUNDS[background]
        if background == "striped":
            phase = float(rand(())) * 2 * math.pi
            stripes = (torch.sin(2 * math.pi * 3 * (px + py) + phase) * 3).clamp(-1, 1)
            bg = level + 0.08 * stripes
        else:
            bg = torch.full((size, size), level)
        if scene.motion in MOVES:
            r = 0.15 + 0.05 * float(rand(()))
            travel = 0.35 + 0.15 * float(rand(()))
            lo, hi = r + 0.03, 1 - r - 0.03
            dx, dy = MOVES[scene.motion]
            start = lo + (hi - lo - travel) * float(rand(()))
            across = lo + (hi - lo) * float(rand(()))
            along = start + travel * s if dx + dy > 0 else hi - (start - lo) - travel * s
            cx, cy = (along, torch.full_like(s, across)) if dx else (torch.full_like(s, across), along)
            radius = torch.full_like(s, r)
        else:
            small, big = 0.06 + 0.03 * float(rand(())), 0.22 + 0.05 * float(rand(()))
            lo, hi = big + 0.02, 1 - big - 0.02
            cx = torch.full_like(s, lo + (hi - lo) * float(rand(())))
            cy = torch.full_like(s, lo + (hi - lo) * float(rand(())))
            radius = small + (big - small) * (s if scene.motion == "growing" else 1 - s)
        qx, qy = torch.broadcast_tensors(px - cx, py - cy)  # (T, S, S)
        if scene.shape == "circle":
            sdf = torch.sqrt(qx ** 2 + qy ** 2) - radius
        elif scene.shape == "square":
            sdf = torch.maximum(qx.abs(), qy.abs()) - 0.85 * radius
        else:  # equilateral, pointing up, circumradius 1.5 r centred in its height: the largest of its three
            R = 1.5 * radius  # edges' signed distances
            c, h, qy = math.cos(math.pi / 6), 0.5, qy + R / 4
            sdf = torch.stack([qy, c * qx - h * qy, -c * qx - h * qy]).amax(0) - R / 2
        cover = (0.5 - sdf * size).clamp(0, 1)  # the pixel's area inside the shape, to first order
        color = torch.tensor(COLORS[scene.color])[:, None, None, None]
        clips[b] = color * cover + bg * (1 - cover)
        captions.append(scene.caption)
    return clips, captions


def batch(n: int, generator: torch.Generator, frames: int = FRAMES, size: int = HIGH_RES,
          drop_caption: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """``n`` random training clips in model space [-1, 1] and their captions (each replaced by "" with
    probability ``drop_caption``: the unconditional branch classifier-free guidance needs)."""
    clips, captions = render(random_scenes(n, generator), frames, size, generator)
    keep = torch.rand(n, generator=generator) >= drop_caption
    return clips * 2 - 1, [c if k else "" for c, k in zip(captions, keep.tolist())]


def follows(frames, prompt: str) -> dict:
    """Whether frames (T, H, W, 3) in [0, 1] (or uint8) show what ``prompt`` says, measured: each pixel takes the
    nearest of the palette's colours and the background greys; ``share`` is the named colour's part of the
    object (non-grey) pixels; ``along`` / ``across`` the move of its centroid from the first to the last quarter
    of the clip, in frame widths, along and across the named direction; ``growth`` the ratio of its area in the
    last and the first quarter. ``ok`` when share >= 0.5 and the motion shows (along >= 0.1 and |across| <
    along; growth >= 1.5 or <= 1 / 1.5)."""
    scene = parse(prompt)
    v = torch.as_tensor(frames)
    v = v.float() / 255 if v.dtype == torch.uint8 else v.float()
    if v.dim() != 4 or v.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {tuple(v.shape)}")
    T, H, W, _ = v.shape
    names = [*COLORS, *(f"grey{i}" for i in range(len(_GREYS)))]
    palette = torch.tensor([*COLORS.values(), *((g, g, g) for g in _GREYS)])
    nearest = torch.cdist(v.reshape(-1, 3), palette).argmin(-1).reshape(T, H, W)
    named = nearest == names.index(scene.color)
    objects = nearest < len(COLORS)
    share = float(named.sum() / objects.sum().clamp(min=1))
    q = max(1, T // 4)
    area = named.flatten(1).sum(-1).float()
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    cx = (named * xs).flatten(1).sum(-1) / area.clamp(min=1) / W
    cy = (named * ys).flatten(1).sum(-1) / area.clamp(min=1) / H
    seen = area > 0
    first, last = seen[:q], seen[-q:]
    result = {"prompt": prompt, "share": share, "along": 0.0, "across": 0.0,
              "growth": float(area[-q:].mean() / area[:q].mean().clamp(min=1))}
    if first.any() and last.any():
        move = torch.stack([cx[-q:][last].mean() - cx[:q][first].mean(), cy[-q:][last].mean() - cy[:q][first].mean()])
        if scene.motion in MOVES:
            d = torch.tensor(MOVES[scene.motion])
            result["along"] = float(move @ d)
            result["across"] = float(move @ torch.stack([d[1], -d[0]]))
    if scene.motion in MOVES:
        moved = result["along"] >= 0.1 and abs(result["across"]) < result["along"]
    else:
        moved = result["growth"] >= 1.5 if scene.motion == "growing" else result["growth"] <= 1 / 1.5
    result["ok"] = share >= 0.5 and moved
    return result


def _weights(name: str):
    return resources.files(__name__) / "weights" / name


def load(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(base, ssr, text_encoder): the shipped weights, strictly loaded."""
    from ..model import STUNet
    from ..pipeline.text import WordEncoder

    parts = {}
    for name in ("base", "ssr", "text"):
        with resources.as_file(_weights(name)) as path:
            if not path.is_dir():
                raise FileNotFoundError(f"the demo weights are missing from this installation ({path}); "
                                        "tools/train_demo.py --out engine/demo/weights trains them")
            parts[name] = (WordEncoder.load(path, device) if name == "text"
                           else STUNet.from_pretrained(path, device=device, dtype=dtype))
    return parts["base"], parts["ssr"], parts["text"]


def pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs):
    """A :class:`~stunet.Pipeline` over the demo cascade (``kwargs`` go to ``Pipeline``)."""
    from ..pipeline import Pipeline

    base, ssr, encoder = load(device, dtype)
    return Pipeline(base, encoder, ssr, **kwargs)


__all__ = ["COLORS", "SHAPES", "MOVES", "SIZES", "BACKGROUNDS", "VOCAB", "Scene", "parse", "random_scenes", "render",
           "batch", "follows", "base_config", "ssr_config", "load", "pipeline"]
