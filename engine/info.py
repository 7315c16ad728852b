"""Static analysis of a configuration: parameters, analytic FLOPs, activation memory, per-level geometry.

Everything is computed on the ``meta`` device, so ``lumiere-base`` (1.5 B parameters) is analysed in about a
second without allocating its weights: the activation memory is a forward simulated there
(``stunet.model.memory``) for the reference and for the fast backend's policy.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .config import STUNetConfig, check_size, check_volume, is_choice, shown
from .model import FAST, REFERENCE, STUNet, forward_peak_bytes

BYTES_PER_ELEMENT = {"fp16": 2, "bf16": 2, "fp32": 4}
POLICIES = {"reference": REFERENCE, "fast": FAST}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    config: STUNetConfig
    batch: int
    frames: int
    height: int
    width: int
    text_len: int
    dtype: str
    parameters: int
    temporal_parameters: int
    flops: int
    activation_bytes: dict[str, int]
    """Peak activation bytes of one forward, per execution (``POLICIES``): simulated, weights excluded."""
    levels: list[dict]
    pixel_scale: int = 1
    """Pixels per position along H and W (a latent model's VAE factor): ``height`` and ``width`` are positions."""

    @property
    def weight_bytes(self) -> int:
        return self.parameters * BYTES_PER_ELEMENT[self.dtype]

    def to_dict(self) -> dict:
        return {
            "name": self.name, "batch": self.batch, "frames": self.frames, "height": self.height,
            "width": self.width, "text_len": self.text_len, "dtype": self.dtype, "parameters": self.parameters,
            "temporal_parameters": self.temporal_parameters, "flops": self.flops,
            "activation_bytes": self.activation_bytes, "weight_bytes": self.weight_bytes, "levels": self.levels,
            "pixel_scale": self.pixel_scale, "config": self.config.to_dict(),
        }

    def format(self) -> str:
        c = self.config
        spatial = self.parameters - self.temporal_parameters
        lines = [
            f"{self.name}: in_channels {c.in_channels} -> out_channels {c.out_channels}, "
            f"prediction {c.prediction}, schedule {c.schedule}, text_dim {c.text_dim}",
            f"widths        {c.model_channels} x {c.channel_mult} = {c.level_channels}, "
            f"{c.num_res_blocks} ResBlocks per encoder level",
            f"parameters    {self.parameters / 1e6:,.1f} M  (spatial {spatial / 1e6:,.1f} M, temporal "
            f"{self.temporal_parameters / 1e6:,.1f} M); {self.dtype} weights {self.weight_bytes / 1e9:.2f} GB",
            f"input         batch {self.batch} x {self.frames} frames x {self.height} x {self.width}"
            + (f" latents ({self.height * self.pixel_scale} x {self.width * self.pixel_scale} pixels)"
               if self.pixel_scale > 1 else "") + f", {self.text_len} text tokens",
            f"FLOPs/forward {self.flops / 1e12:,.2f} TFLOP (analytic; x2 with classifier-free guidance)",
            "activations   " + ", ".join(f"{n / 1e9:.2f} GB {name}" for name, n in self.activation_bytes.items())
            + f" in {self.dtype}: the peak of one forward, simulated",
            "              (the weights, the allocator's slack and library workspaces come on top on a GPU)",
            "",
            "level      T      H      W      C  spatial attn  temporal",
        ]
        for lv in self.levels:
            lines.append(f"{lv['level']:>5} {lv['T']:>6} {lv['H']:>6} {lv['W']:>6} {lv['C']:>6}  "
                         f"{'yes' if lv['spatial_attention'] else 'no':>12}  {lv['temporal']}")
        return "\n".join(lines)


def analyse(config: STUNetConfig, name: str = "custom", *, batch: int = 1, frames: int | None = None,
            height: int | None = None, width: int | None = None, text_len: int = 77,
            dtype: str = "fp16", pixel_scale: int = 1) -> ModelInfo:
    """``config``'s parameters, FLOPs, simulated activation peak and per-level geometry for one forward of
    ``batch`` x ``frames`` x ``height`` x ``width`` positions; ``pixel_scale`` (pixels per position of a latent
    model) only labels the sizes."""
    if not is_choice(dtype, BYTES_PER_ELEMENT):
        raise ValueError(f"dtype must be one of {sorted(BYTES_PER_ELEMENT)}, got {shown(dtype)}")
    frames = config.call_frames if frames is None else frames
    height = config.sample_size if height is None else height
    width = config.sample_size if width is None else width
    config.check_frames(frames)
    check_size("height", height, config.spatial_divisor)
    check_size("width", width, config.spatial_divisor)
    check_size("batch", batch, 1)
    check_size("text_len", text_len, 1)
    check_volume(batch=batch, frames=frames, height=height, width=width, channels=config.model_channels)
    check_volume(batch=batch, text_len=text_len, text_dim=config.text_dim)
    with torch.device("meta"):
        model = STUNet(config)
    params = sum(p.numel() for p in model.parameters())
    temporal_keys = model.temporal_keys()
    temporal = sum(p.numel() for k, p in model.named_parameters() if k in temporal_keys)

    kinds: dict[int, Counter] = {}
    shapes = config.level_shapes(frames, height, width)
    by_hw = {(t, h): i for i, (t, h, _, _) in enumerate(shapes)}
    for row in model.trace(batch, frames, height, width):
        level = by_hw.get((row.in_shape[1], row.in_shape[2]))
        if level is not None:
            kinds.setdefault(level, Counter())[type(row.block).__name__] += 1
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    activations = {name: forward_peak_bytes(config, batch=batch, frames=frames, height=height, width=width,
                                            text_len=text_len, dtype=torch_dtype, policy=policy)
                   for name, policy in POLICIES.items()}
    levels = []
    last = config.num_levels - 1
    labels = {"ConvInflationBlock": "conv-inflation blocks", "TemporalConvStack": "temporal conv stacks",
              "TemporalAttentionBlock": "temporal-attention blocks", "TemporalTransformer": "temporal transformers"}
    for i, (t, h, w, c) in enumerate(shapes):
        counts = kinds.get(i, Counter())
        temporal_desc = ", ".join(f"{counts[k]} {label}" for k, label in labels.items() if counts[k]) or "none"
        if i < last:
            temporal_desc += ", T/2 below" if config.temporal_downsample[i] else ", T kept below"
        levels.append({"level": i, "T": t, "H": h, "W": w, "C": c,
                       "spatial_attention": i in config.attention_levels or i == last, "temporal": temporal_desc})
    return ModelInfo(name, config, batch, frames, height, width, text_len, dtype, params, temporal,
                     model.flops(batch, frames, height, width, text_len),
                     activations, levels, pixel_scale)
