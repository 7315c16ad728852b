"""STUNetConfig: every architectural choice of a Space-Time U-Net, its presets and its JSON form.

A config is a frozen dataclass validated in ``__post_init__``; an invalid field raises ``ValueError`` naming the
field, its value and the rule. ``STUNetConfig.from_preset(name)`` gives the named presets:

- ``tiny``: tests; a forward runs in well under a second on a CPU (8 x 16 x 16).
- ``tiny-cond``: ``tiny`` with 7 input channels, to try the conditional modes (image-to-video, inpainting,
  cinemagraphs) in seconds.
- ``small``: development (16 x 64 x 64).
- ``lumiere-base``: the base model of the cascade: 80 x 128 x 128, widths 256 x (1, 2, 3, 4, 4), 3 ResBlocks
  per encoder level, spatial attention at 32/16/8, text dim 4096 (T5-XXL), 4 temporal-attention blocks in the
  mid block; about 90 TFLOP per forward (``stunet info lumiere-base``).
- ``lumiere-ssr``: spatial super-resolution 128 -> 1024 on windows of 16 frames with 2 frames of overlap;
  temporal convs only (no temporal resampling, no temporal attention).
- ``edge``: fits an 8 GB Jetson-class GPU in FP16 (80 x 128 x 128, widths 96 x (1, 2, 3, 4), text dim 1024).

Levels are numbered from 0 (full resolution) to ``num_levels - 1`` (the coarsest). Between level ``i`` and
``i + 1`` sits one spatial downsample (H, W halve), followed by a TemporalDown (T halves) when
``temporal_downsample[i]`` is true.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

IN_CHANNELS = {
    3: "text-to-video: the noisy video",
    4: "latent text-to-video: the noisy VAE latents",
    6: "SSR: noisy high-res video + bilinearly upsampled low-res video",
    7: "conditional: noisy video + masked conditioning video C + mask M",
}
PREDICTIONS = ("v", "eps")
SCHEDULES = ("cosine", "linear", "scaled_linear")
NORM_SCOPES = ("frame", "clip")
POS_EMBEDS = ("sinusoidal", "none")
FEED_FORWARDS = ("gelu", "geglu")
TEMPORAL_CONVS = ("inflation", "stack")
TEMPORAL_ATTNS = ("block", "transformer")
SLOTS = ("conv", "attn", "none")
MID_MODULES = ("res", "attn", "temporal_conv", "temporal_attn")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 160
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8


def shown(value: Any) -> str:
    """A refused value as an error message shows it: its repr, shortened; a tensor or an array (but a 0-d one, a
    number) by its type, shape and dtype (its repr would be its data, over several lines)."""
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and len(shape) and hasattr(value, "dtype"):
        kind = {"Tensor": "a tensor", "ndarray": "an array"}.get(type(value).__name__, f"a {type(value).__name__}")
        return f"{kind} of shape {tuple(shape)} ({value.dtype})"
    return _REPR.repr(value)


def check_size(name: str, value: Any, divisor: int, whose: str = "this model") -> None:
    """A size along a model's axis (frames, height, width, ...) must be a positive integer multiple of
    ``divisor``; raises naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % divisor:
        rule = f"a positive multiple of {divisor} for {whose}" if divisor > 1 else "a positive integer"
        raise ValueError(f"{name} must be {rule}, got {shown(value)}")


def is_choice(value: Any, choices) -> bool:
    """Whether ``value`` is one of ``choices`` (strings or integers; a dict's keys), compared only as one of their
    type: a list is unhashable and an array compares elementwise, so a plain ``in`` raises on them."""
    kinds = tuple({type(choice) for choice in choices})
    return not isinstance(value, bool) and isinstance(value, kinds) and value in choices


MAX_ELEMENTS = 2 ** 40  # of one tensor: past any device's memory, and near the sizes torch can represent


def check_volume(**sizes: int) -> None:
    """A tensor of ``sizes`` (positive integers, by name: ``num_frames=8, height=64, ...``) must be one a device
    could hold; raises naming them."""
    if math.prod(sizes.values()) >= MAX_ELEMENTS:
        raise ValueError(f"{' x '.join(sizes)} = {' x '.join(map(str, sizes.values()))} is past any device's "
                         f"memory (at most 2**40 elements a tensor)")


def check_flags(optional: bool = False, **flags: Any) -> None:
    """On/off options (``progress=``, ``check=``, ...) must be booleans, or None too with ``optional`` (None:
    the default): a string such as "no" would read as true. Raises naming the first that is not."""
    for name, value in flags.items():
        if not (isinstance(value, bool) or (optional and value is None)):
            raise TypeError(f"{name} must be True or False{' or None' if optional else ''}, got {shown(value)}")


def _fail(name: str, value: Any, rule: str) -> None:
    raise ValueError(f"STUNetConfig.{name} {rule}, got {shown(value)}")


@dataclass(frozen=True)
class STUNetConfig:
    # -- input / output -------------------------------------------------------------------------------------
    in_channels: int = 3
    """3 (text-to-video), 4 (latent text-to-video: VAE latents), 6 (SSR: + upsampled low-res video) or 7
    (conditional: + masked video C + mask M)."""
    out_channels: int = 3
    # -- the spatial (pretrained text-to-image) trunk -------------------------------------------------------
    model_channels: int = 256
    """Width of level 0; level i has ``model_channels * channel_mult[i]`` channels."""
    channel_mult: tuple[int, ...] = (1, 2, 3, 4, 4)
    num_res_blocks: int = 3
    """ResBlocks per encoder level; each decoder level has one more (it also consumes the downsample's skip)."""
    attention_levels: tuple[int, ...] = (2, 3, 4)
    """Levels whose ResBlocks are followed by spatial self- and cross-attention (the mid block always has it)."""
    attention_head_dim: int = 64
    attention_heads: int = 0
    """When > 0, every spatial attention has this many heads, whatever its width (Stable Diffusion 1.x: 8);
    0: ``width // attention_head_dim`` heads."""
    feed_forward: str = "gelu"
    """The MLP of the attention blocks (spatial and temporal): "gelu" (Linear, GELU, Linear) or "geglu"
    (Linear to twice the hidden width, value * GELU(gate), Linear: the Stable Diffusion family's)."""
    num_groups: int = 32
    """GroupNorm groups; every level's width must be divisible by it."""
    norm_scope: str = "frame"
    """GroupNorm statistics per frame ("frame": norms never mix frames) or over the whole clip ("clip")."""
    norm_eps: float = 1e-5
    """Epsilon of the ResBlocks' and the output head's GroupNorms."""
    attention_norm_eps: float = 1e-5
    """Epsilon of the GroupNorm in front of each spatial attention and transformer-form temporal attention
    (1e-6 in the diffusers U-Nets)."""
    flip_sin_to_cos: bool = True
    """Timestep embedding order: cos then sin (True) or sin then cos."""
    freq_shift: int = 0
    """Timestep embedding frequencies ``exp(-log(10000) * i / (half - freq_shift))``."""
    text_dim: int = 4096
    """Width of the text-encoder tokens consumed by cross-attention (4096 for T5-XXL)."""
    text_pool: bool = False
    """Also add the text tokens' mean (over the mask), through a linear layer, to the timestep embedding
    (Imagen's pooled text conditioning): prompt-wide attributes reach every ResBlock."""
    # -- the temporal modules ----------------------------------------------------------------------------------
    temporal_downsample: tuple[bool, ...] = (True, True, True, True)
    """One flag per downsample step (``num_levels - 1``): whether time halves there too."""
    temporal_attn_depth: int = 4
    """Temporal-attention blocks stacked in the mid block. 0: temporal convs only, also at the coarsest level."""
    temporal_attn_heads: int = 16
    temporal_attn_head_dim: int = 0
    """When > 0, each temporal attention has ``width // temporal_attn_head_dim`` heads (and the one after
    conv_in heads of this width); 0: ``temporal_attn_heads`` heads."""
    temporal_pos_embed: str = "sinusoidal"
    """Positional encoding added to the normed input of temporal attention: "sinusoidal" or "none"."""
    temporal_max_frames: int = 0
    """The longest clip the positional encoding was trained for (AnimateDiff: 32); 0: no limit."""
    temporal_mlp_ratio: int = 4
    temporal_conv: str = "inflation"
    """Form of the temporal conv module: "inflation" (Lumiere's residual (2+1)D block: conv3x3, GN, SiLU,
    Conv1d over time, GN, SiLU, zero-init 1x1) or "stack" (ModelScope's: four GN-SiLU-Conv1d-over-time layers,
    the last zero-init, plus the input; its norms see the whole clip)."""
    temporal_attn: str = "block"
    """Form of the temporal attention module: "block" (Lumiere's: pre-norm self-attention over T and an MLP)
    or "transformer" (the diffusers video U-Nets': clip GroupNorm, proj_in, two self-attentions over T, a
    feed-forward, proj_out, plus the input)."""
    temporal_after_res: tuple[str, ...] = ()
    """Per level, the temporal module after each ResBlock: "conv", "attn" or "none". Empty: Lumiere's layout
    ("conv" at every level, "none" at the coarsest when ``temporal_attn_depth > 0``)."""
    temporal_after_attn: tuple[str, ...] = ()
    """Per level, the temporal module after each spatial attention (ignored at levels without one); empty:
    Lumiere's layout, as ``temporal_after_res``."""
    mid_block: tuple[str, ...] = ()
    """The mid block's modules in order, from "res", "attn", "temporal_conv", "temporal_attn". Empty: Lumiere's
    ("res", "attn", ``temporal_attn_depth`` x "temporal_attn" (or one "temporal_conv" when 0), "res")."""
    temporal_in_heads: int = 0
    """When > 0, a transformer-form temporal attention with this many heads of ``temporal_attn_head_dim``
    follows conv_in (ModelScope's ``transformer_in``)."""
    noise_aug: bool = False
    """SSR: embed the noise-augmentation level of the low-res input like a timestep (needs in_channels=6)."""
    # -- diffusion -------------------------------------------------------------------------------------------
    prediction: str = "v"
    schedule: str = "cosine"
    num_train_timesteps: int = 1000
    # -- default sample geometry (what `stunet info` and the pipeline use unless told otherwise) -------------
    sample_frames: int = 80
    sample_size: int = 128
    low_res_size: int = 0
    """SSR: side of the low-res video it upsamples (0 for a base model)."""
    window_frames: int = 0
    """SSR: MultiDiffusion window length in frames (0: the whole clip in one window)."""
    window_overlap: int = 0

    def __post_init__(self) -> None:
        # JSON gives lists; the dataclass is frozen and hashable, so store tuples.
        for name in ("channel_mult", "attention_levels", "temporal_downsample", "temporal_after_res",
                     "temporal_after_attn", "mid_block"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                _fail(name, value, "must be a sequence")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.norm_eps, int) and not isinstance(self.norm_eps, bool):
            object.__setattr__(self, "norm_eps", float(self.norm_eps))
        self._validate()
        self._validate_layout()

    # -- the temporal layout (explicit fields, or Lumiere's when they are empty) -------------------------------
    def _lumiere_slots(self) -> tuple[str, ...]:
        return tuple("none" if level == self.num_levels - 1 and self.temporal_attn_depth else "conv"
                     for level in range(self.num_levels))

    @property
    def res_slots(self) -> tuple[str, ...]:
        """Per level, the temporal module after each ResBlock ("conv", "attn" or "none")."""
        return self.temporal_after_res or self._lumiere_slots()

    @property
    def attn_slots(self) -> tuple[str, ...]:
        """Per level, the temporal module after each spatial attention."""
        return self.temporal_after_attn or self._lumiere_slots()

    @property
    def mid_modules(self) -> tuple[str, ...]:
        """The mid block's modules in order."""
        if self.mid_block:
            return self.mid_block
        return ("res", "attn", *(("temporal_attn",) * self.temporal_attn_depth or ("temporal_conv",)), "res")

    # ------------------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_head_dim",
                     "num_groups", "text_dim", "temporal_attn_heads", "temporal_mlp_ratio",
                     "num_train_timesteps", "sample_frames", "sample_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "must be a positive integer")
        for name in ("temporal_attn_depth", "low_res_size", "window_frames", "window_overlap", "attention_heads",
                     "temporal_attn_head_dim", "temporal_max_frames", "temporal_in_heads", "freq_shift"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "must be a non-negative integer")
        if not is_choice(self.in_channels, IN_CHANNELS):
            _fail("in_channels", self.in_channels,
                  "must be 3 (text-to-video), 4 (latent text-to-video), 6 (SSR) or 7 (conditional: video + masked "
                  "video + mask)")
        if not self.channel_mult or any(not isinstance(m, int) or isinstance(m, bool) or m < 1
                                        for m in self.channel_mult):
            _fail("channel_mult", self.channel_mult, "must be a non-empty sequence of positive integers")
        if len(self.temporal_downsample) != self.num_levels - 1 or any(
                not isinstance(f, bool) for f in self.temporal_downsample):
            _fail("temporal_downsample", self.temporal_downsample,
                  f"must hold one bool per downsample step (len(channel_mult) - 1 = {self.num_levels - 1})")
        for level in self.attention_levels:
            if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < self.num_levels:
                _fail("attention_levels", self.attention_levels,
                      f"must hold level indices in [0, {self.num_levels - 1}]")
        if len(set(self.attention_levels)) != len(self.attention_levels):
            _fail("attention_levels", self.attention_levels, "must not repeat a level")
        for level, ch in enumerate(self.level_channels):
            if ch % self.num_groups:
                _fail("num_groups", self.num_groups,
                      f"must divide every level's width (level {level} has {ch} channels)")
            attends = level in self.attention_levels or level == self.num_levels - 1
            if attends and self.attention_heads and ch % self.attention_heads:
                _fail("attention_heads", self.attention_heads,
                      f"must divide the width of every attention level (level {level} has {ch} channels)")
            if attends and not self.attention_heads and ch % self.attention_head_dim:
                _fail("attention_head_dim", self.attention_head_dim,
                      f"must divide the width of every attention level (level {level} has {ch} channels)")
        for name in ("norm_eps", "attention_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                _fail(name, value, "must be a number in (0, 1)")
        for name, choices in (("feed_forward", FEED_FORWARDS), ("temporal_conv", TEMPORAL_CONVS),
                              ("temporal_attn", TEMPORAL_ATTNS)):
            if getattr(self, name) not in choices:
                _fail(name, getattr(self, name), f"must be one of {choices}")
        if not isinstance(self.flip_sin_to_cos, bool):
            _fail("flip_sin_to_cos", self.flip_sin_to_cos, "must be a bool")
        if self.freq_shift >= self.model_channels // 2:
            _fail("freq_shift", self.freq_shift,
                  f"must be smaller than model_channels // 2 ({self.model_channels // 2})")
        if not is_choice(self.norm_scope, NORM_SCOPES):
            _fail("norm_scope", self.norm_scope, f"must be one of {NORM_SCOPES}")
        if not is_choice(self.temporal_pos_embed, POS_EMBEDS):
            _fail("temporal_pos_embed", self.temporal_pos_embed, f"must be one of {POS_EMBEDS}")
        if not is_choice(self.prediction, PREDICTIONS):
            _fail("prediction", self.prediction, f"must be one of {PREDICTIONS}")
        if not is_choice(self.schedule, SCHEDULES):
            _fail("schedule", self.schedule, f"must be one of {SCHEDULES}")
        if not isinstance(self.text_pool, bool):
            _fail("text_pool", self.text_pool, "must be a bool")
        if not isinstance(self.noise_aug, bool):
            _fail("noise_aug", self.noise_aug, "must be a bool")
        if self.noise_aug and self.in_channels != 6:
            _fail("noise_aug", self.noise_aug, "needs in_channels=6 (an SSR model); set noise_aug=False")
        if self.in_channels == 6 and not self.low_res_size:
            _fail("low_res_size", self.low_res_size, "must be set (> 0) for an SSR model (in_channels=6)")
        if self.low_res_size and self.in_channels != 6:
            _fail("low_res_size", self.low_res_size, "is only meaningful for an SSR model (in_channels=6); use 0")
        if self.sample_frames % self.frame_divisor:
            _fail("sample_frames", self.sample_frames,
                  f"must be divisible by 2**(temporal downsamples) = {self.frame_divisor}")
        if self.sample_size % self.spatial_divisor:
            _fail("sample_size", self.sample_size,
                  f"must be divisible by 2**(num_levels - 1) = {self.spatial_divisor}")
        if self.window_frames:
            if self.window_frames % self.frame_divisor:
                _fail("window_frames", self.window_frames,
                      f"must be divisible by 2**(temporal downsamples) = {self.frame_divisor}")
            if self.window_overlap >= self.window_frames:
                _fail("window_overlap", self.window_overlap,
                      f"must be smaller than window_frames ({self.window_frames})")
        elif self.window_overlap:
            _fail("window_overlap", self.window_overlap, "needs window_frames > 0")

    def _validate_layout(self) -> None:
        for name in ("temporal_after_res", "temporal_after_attn"):
            value = getattr(self, name)
            if value and (len(value) != self.num_levels or any(not is_choice(slot, SLOTS) for slot in value)):
                _fail(name, value, f"must be empty or hold one of {SLOTS} per level ({self.num_levels})")
        mid = self.mid_modules
        if any(not is_choice(m, MID_MODULES) for m in mid) or mid[0] != "res":
            _fail("mid_block", mid, f"must be empty or start with 'res' and hold only {MID_MODULES}")
        if self.mid_block and mid.count("temporal_attn") != self.temporal_attn_depth:
            _fail("temporal_attn_depth", self.temporal_attn_depth,
                  f"must equal the number of 'temporal_attn' in mid_block {mid}")
        if self.temporal_in_heads and (self.temporal_attn != "transformer" or not self.temporal_attn_head_dim):
            _fail("temporal_in_heads", self.temporal_in_heads,
                  "needs temporal_attn='transformer' and temporal_attn_head_dim > 0 (its heads' width)")
        for level, ch in enumerate(self.level_channels):
            slots = [self.res_slots[level]]
            if level in self.attention_levels:
                slots.append(self.attn_slots[level])
            if level == self.num_levels - 1 and "temporal_attn" in mid:
                slots.append("attn")
            if "attn" in slots:
                per_head = self.temporal_attn_head_dim or ch // self.temporal_attn_heads
                if per_head < 1 or ch % per_head or ch % self.temporal_heads(ch):
                    name = "temporal_attn_head_dim" if self.temporal_attn_head_dim else "temporal_attn_heads"
                    _fail(name, getattr(self, name),
                          f"must divide the width {ch} of level {level}, which has temporal attention")

    def spatial_heads(self, width: int) -> int:
        """Heads of a spatial attention of ``width`` channels."""
        return self.attention_heads or width // self.attention_head_dim

    def temporal_heads(self, width: int) -> int:
        """Heads of a temporal attention of ``width`` channels."""
        return width // self.temporal_attn_head_dim if self.temporal_attn_head_dim else self.temporal_attn_heads

    # -- derived geometry ---------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def num_temporal_downsamples(self) -> int:
        return sum(self.temporal_downsample)

    @property
    def frame_divisor(self) -> int:
        """T must be a multiple of this: each TemporalDown halves it."""
        return 2 ** self.num_temporal_downsamples

    @property
    def spatial_divisor(self) -> int:
        """H and W must be multiples of this: each spatial downsample halves them."""
        return 2 ** (self.num_levels - 1)

    @property
    def call_frames(self) -> int:
        """The frames of one model call at the model's own geometry: an SSR model's window, else its clip."""
        return self.window_frames or self.sample_frames

    def check_frames(self, frames: int, name: str = "frames", whose: str = "this model") -> None:
        """``frames`` must be a size this model takes: a multiple of its frame divisor, no longer than the clip its
        temporal positional encoding was trained for."""
        check_size(name, frames, self.frame_divisor, whose)
        if self.temporal_max_frames and frames > self.temporal_max_frames:
            raise ValueError(f"{name} must be at most {self.temporal_max_frames} for {whose} (the clip length its "
                             f"temporal positional encoding was trained for), got {frames}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def is_ssr(self) -> bool:
        return self.in_channels == 6

    def level_shapes(self, frames: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(T, H, W, C) of every level for an input of ``frames x height x width``."""
        shapes, t, h, w = [], frames, height, width
        for level, ch in enumerate(self.level_channels):
            shapes.append((t, h, w, ch))
            if level < self.num_levels - 1:
                h, w = h // 2, w // 2
                t = t // 2 if self.temporal_downsample[level] else t
        return shapes

    # -- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "STUNetConfig":
        if not isinstance(data, dict):
            raise TypeError(f"STUNetConfig.from_dict: data must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"STUNetConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "STUNetConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"STUNetConfig.from_json: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (``path`` is the file, or a directory to hold it), atomically."""
        from .io import atomic_write_text

        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "STUNetConfig":
        """Read ``config.json`` (``path`` is the file or its directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"STUNetConfig.load: no config file at {str(path)!r}")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, TypeError) as e:
            raise type(e)(f"{str(path)!r}: {e}") from None

    def replace(self, **changes: Any) -> "STUNetConfig":
        """A copy with ``changes`` applied (and validated)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"STUNetConfig.replace: unknown field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "STUNetConfig":
        if not is_choice(name, PRESETS):
            raise ValueError(f"unknown preset {shown(name)}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)


_TINY = dict(
    model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1,), attention_head_dim=8,
    num_groups=4, text_dim=24, temporal_downsample=(True, False), temporal_attn_depth=1, temporal_attn_heads=2,
    sample_frames=8, sample_size=16,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "tiny-cond": dict(_TINY, in_channels=7),
    "small": dict(
        model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
        attention_head_dim=32, num_groups=32, text_dim=512, temporal_downsample=(True, True),
        temporal_attn_depth=2, temporal_attn_heads=4, sample_frames=16, sample_size=64,
    ),
    "lumiere-base": dict(),  # the dataclass defaults are the base model
    "lumiere-ssr": dict(
        in_channels=6, noise_aug=True, model_channels=64, channel_mult=(1, 2, 4, 8, 8),
        num_res_blocks=2, attention_levels=(4,), attention_head_dim=64, text_dim=4096,
        temporal_downsample=(False, False, False, False), temporal_attn_depth=0,
        sample_frames=80, sample_size=1024, low_res_size=128, window_frames=16, window_overlap=2,
    ),
    "edge": dict(
        model_channels=96, channel_mult=(1, 2, 3, 4), num_res_blocks=2, attention_levels=(2, 3),
        attention_head_dim=32, text_dim=1024, temporal_downsample=(True, True, True),
        temporal_attn_depth=2, temporal_attn_heads=8, sample_frames=80, sample_size=128,
    ),
}

__all__ = ["STUNetConfig", "PRESETS"]
