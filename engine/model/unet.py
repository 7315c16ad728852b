"""The reference STUNet: a per-frame text-to-image U-Net inflated with temporal modules.

This eager PyTorch module is the source of truth every other backend is checked against. Structure (levels
numbered from 0 at full resolution; see ``STUNetConfig``):

- encoder stage 0: conv_in [+ a temporal transformer (``temporal_in_heads``)]; then for each level
  ``num_res_blocks`` stages of ResBlock [+ SpatialAttention], each spatial block followed by its temporal
  module; between levels a stage Downsample [+ TemporalDown]. The skip is saved after every stage, so the
  skip of a downsample stage is saved after TemporalDown.
- mid: ``config.mid_modules`` in order (Lumiere's: ResBlock, SpatialAttention, ``temporal_attn_depth``
  temporal attentions, ResBlock).
- decoder: per level ``num_res_blocks + 1`` stages, each consuming one skip (channel concat) through a
  ResBlock [+ SpatialAttention] with their temporal modules; then Upsample [+ TemporalUp].
- out: GN, SiLU, conv3x3.

The temporal module after each ResBlock and each SpatialAttention of a level is the config's
(``res_slots`` / ``attn_slots``: a temporal conv, a temporal attention, or none), in the config's forms
(``temporal_conv``: ConvInflationBlock or TemporalConvStack; ``temporal_attn``: TemporalAttentionBlock or
TemporalTransformer). Lumiere's layout, the default: a ConvInflationBlock at every level but the coarsest;
when temporal attention is enabled (``temporal_attn_depth > 0``), the coarsest level has no temporal convs:
its temporal modelling is the temporal-attention stack of the mid block. With ``temporal_attn_depth == 0``
(SSR: "temporal convs only") the coarsest level and the mid block get ConvInflationBlocks too. The layouts
of ModelScope (a TemporalConvStack after each ResBlock, a TemporalTransformer after each attention and after
conv_in) and AnimateDiff (a TemporalTransformer after each level's last spatial block) are configs too:
``stunet.convert`` builds them from diffusers models.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..config import STUNetConfig
from .layers import (Block, Cond, ConvIn, Downsample, OutHead, ResBlock, Shape, SpatialAttention, Upsample,
                     linear_flops, timestep_embedding, to_clips)
from .policy import REFERENCE, ExecutionPolicy
from .temporal import (ConvInflationBlock, TemporalAttentionBlock, TemporalConvStack, TemporalDown, TemporalModule,
                       TemporalTransformer, TemporalUp)

Stage = nn.ModuleList


@dataclass(frozen=True)
class TraceRow:
    block: Block
    in_shape: Shape  # (B, T, H, W)
    in_channels: int
    out_shape: Shape
    out_channels: int
    is_skip: bool  # its output is saved for the decoder

    @property
    def in_elements(self) -> int:
        return math.prod(self.in_shape) * self.in_channels

    @property
    def out_elements(self) -> int:
        return math.prod(self.out_shape) * self.out_channels


def _embedder(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


def pooled_text(text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of the (B, L, D) text tokens over the mask (all tokens without one; zeros where a row has none)."""
    if mask is None:
        return text.mean(dim=1)
    m = mask.to(text.dtype)[:, :, None]
    return (text * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


class STUNet(nn.Module):
    """Space-Time U-Net. ``model(x, timesteps, text_embeds, text_mask=None) -> (B, out_channels, T, H, W)``."""

    def __init__(self, config: STUNetConfig):
        super().__init__()
        if not isinstance(config, STUNetConfig):
            raise TypeError(f"STUNet(config): config must be a STUNetConfig, got {type(config).__name__}; "
                            "use STUNetConfig.from_preset(name)")
        self.config = cfg = config
        groups, scope, E = cfg.num_groups, cfg.norm_scope, cfg.time_embed_dim
        last = cfg.num_levels - 1

        self.time_embed = _embedder(cfg.model_channels, E)
        self.noise_aug_embed = _embedder(cfg.model_channels, E) if cfg.noise_aug else None
        self.text_pool = nn.Linear(cfg.text_dim, E) if cfg.text_pool else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, E, groups, scope, cfg.norm_eps)

        def attn(ch: int) -> SpatialAttention:
            return SpatialAttention(ch, cfg.spatial_heads(ch), cfg.text_dim, groups, scope, ff=cfg.feed_forward,
                                    eps=cfg.attention_norm_eps)

        def temporal(kind: str, ch: int) -> list[Block]:
            if kind == "conv":
                if cfg.temporal_conv == "stack":
                    return [TemporalConvStack(ch, groups)]
                return [ConvInflationBlock(ch, groups, scope)]
            if kind == "attn":
                heads = cfg.temporal_heads(ch)
                if cfg.temporal_attn == "transformer":
                    return [TemporalTransformer(ch, heads, ch // heads, groups, pos_embed=cfg.temporal_pos_embed,
                                                ff=cfg.feed_forward, mlp_ratio=cfg.temporal_mlp_ratio,
                                                eps=cfg.attention_norm_eps)]
                return [TemporalAttentionBlock(ch, heads, cfg.temporal_pos_embed, cfg.temporal_mlp_ratio,
                                               cfg.feed_forward)]
            return []

        def spatial_stage(level: int, cin: int, cout: int) -> list[Block]:
            blocks: list[Block] = [res(cin, cout), *temporal(cfg.res_slots[level], cout)]
            if level in cfg.attention_levels:
                blocks += [attn(cout), *temporal(cfg.attn_slots[level], cout)]
            return blocks

        ch = cfg.model_channels
        first: list[Block] = [ConvIn(cfg.in_channels, ch)]
        if cfg.temporal_in_heads:
            first.append(TemporalTransformer(ch, cfg.temporal_in_heads, cfg.temporal_attn_head_dim, groups,
                                             pos_embed=cfg.temporal_pos_embed, ff=cfg.feed_forward,
                                             mlp_ratio=cfg.temporal_mlp_ratio, eps=cfg.attention_norm_eps))
        self.encoder = nn.ModuleList([Stage(first)])
        skip_channels = [ch]
        for level, width in enumerate(cfg.level_channels):
            for _ in range(cfg.num_res_blocks):
                self.encoder.append(Stage(spatial_stage(level, ch, width)))
                ch = width
                skip_channels.append(ch)
            if level < last:
                down: list[Block] = [Downsample(ch)]
                if cfg.temporal_downsample[level]:
                    down.append(TemporalDown(ch))
                self.encoder.append(Stage(down))
                skip_channels.append(ch)

        # The mid block's temporal modules are built before its spatial ones (then placed in config order): the
        # order parameters are created in fixes what a seed initialises, and seeded models keep their weights.
        kinds = {"temporal_conv": "conv", "temporal_attn": "attn"}
        built = {i: temporal(kinds[kind], ch) for i, kind in enumerate(cfg.mid_modules) if kind in kinds}
        built.update({i: [res(ch, ch)] if kind == "res" else [attn(ch)]
                      for i, kind in enumerate(cfg.mid_modules) if kind not in kinds})
        self.mid = Stage([block for i in range(len(cfg.mid_modules)) for block in built[i]])

        self.decoder = nn.ModuleList()
        for level in reversed(range(cfg.num_levels)):
            width = cfg.level_channels[level]
            for i in range(cfg.num_res_blocks + 1):
                blocks = spatial_stage(level, ch + skip_channels.pop(), width)
                ch = width
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(Upsample(ch))
                    if cfg.temporal_downsample[level - 1]:
                        blocks.append(TemporalUp(ch))
                self.decoder.append(Stage(blocks))
        assert not skip_channels, "every skip is consumed exactly once"
        self.out = OutHead(ch, cfg.out_channels, groups, scope, cfg.norm_eps)

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def temporal_modules(self) -> Iterator[tuple[str, TemporalModule]]:
        for name, module in self.named_modules():
            if isinstance(module, TemporalModule):
                yield name, module

    def temporal_keys(self) -> set[str]:
        """State-dict keys of the temporal modules (added by inflation, not pretrained)."""
        return {f"{name}.{key}" for name, module in self.temporal_modules() for key in module.state_dict()}

    def is_temporal_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to a temporal module (one lookup: prefer ``temporal_keys()`` in loops)."""
        return key in self.temporal_keys()

    # -- forward ---------------------------------------------------------------------------------------------
    @staticmethod
    def _run(stage: Stage, inputs: list[torch.Tensor], cond: Cond) -> torch.Tensor:
        """The stage on ``inputs`` (a decoder stage's: the level below's output and the skip, concatenated), which
        it empties: once its first block is done, no frame holds the stage's input."""
        h = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        inputs.clear()
        for block in stage:
            if cond.policy.temporal or not isinstance(block, TemporalModule):
                h = block(h, cond)
        return h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float | int, text_embeds: torch.Tensor,
                text_mask: torch.Tensor | None = None, *, noise_level: torch.Tensor | float | None = None,
                policy: ExecutionPolicy = REFERENCE, check_finite: bool | None = None) -> torch.Tensor:
        """Predict v or eps (``config.prediction``) for a noisy video.

        Args:
            x: (B, C, T, H, W) with C = ``config.in_channels``; T a multiple of ``config.frame_divisor``
                (any T when ``policy.temporal`` is False), H and W multiples of ``config.spatial_divisor``.
            timesteps: (B,) or a scalar in [0, num_train_timesteps]; shared by every frame of a clip.
            text_embeds: (B, L, text_dim) text-encoder tokens; shared by every frame of a clip.
            text_mask: optional (B, L) bool (or 0/1) mask, True for tokens to attend to.
            noise_level: SSR only, (B,) or scalar noise-augmentation timestep of the low-res input (default 0).
            policy: how to execute (:class:`ExecutionPolicy`); the default is the reference.
            check_finite: also reject NaN/inf in ``x`` and ``text_embeds`` (costs a device sync); default from
                the environment variable ``STUNET_CHECK_FINITE=1``.
        Returns:
            (B, out_channels, T, H, W) in the model's dtype.
        """
        from .validate import check_forward_inputs

        if not isinstance(policy, ExecutionPolicy):
            raise TypeError(f"policy must be an ExecutionPolicy, got {type(policy).__name__}")
        if check_finite is None:
            check_finite = os.environ.get("STUNET_CHECK_FINITE", "0") == "1"
        x, t, text_embeds, text_mask, noise_level = check_forward_inputs(
            self, x, timesteps, text_embeds, text_mask, noise_level, check_finite, temporal=policy.temporal)
        return self.forward_checked(x, t, text_embeds, text_mask, noise_level, policy)

    def _embed_timestep(self, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return timestep_embedding(t, cfg.model_channels, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift)

    def forward_checked(self, x: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor,
                        text_mask: torch.Tensor | None, noise_level: torch.Tensor | None,
                        policy: ExecutionPolicy = REFERENCE) -> torch.Tensor:
        """``forward`` on inputs ``check_forward_inputs`` already accepted: t (and noise_level) (B,) tensors on
        x's device, mask bool or None. No host synchronisation, so CUDA graphs can capture it."""
        B, C, T, H, W = x.shape
        cfg = self.config

        emb = self.time_embed(self._embed_timestep(t).to(x.dtype))
        if self.noise_aug_embed is not None:
            emb = emb + self.noise_aug_embed(self._embed_timestep(noise_level).to(x.dtype))
        if self.text_pool is not None:
            emb = emb + self.text_pool(pooled_text(text_embeds, text_mask))
        cond = Cond(batch=B, emb=emb, text=text_embeds, text_mask=text_mask, policy=policy)

        # video -> folded (B*T, C, H, W) in the policy's memory format: one copy
        h = torch.empty(B * T, C, H, W, dtype=x.dtype, device=x.device, memory_format=policy.memory_format)
        to_clips(h, B).copy_(x)
        skips = []
        for stage in self.encoder:
            h = self._run(stage, [h], cond)
            skips.append(h)
        h = self._run(self.mid, [h], cond)
        for stage in self.decoder:
            inputs = [h, skips.pop()]
            del h  # the stage's inputs are now held by the list alone, which the stage empties
            h = self._run(stage, inputs, cond)
        h = self.out(h, cond)
        return h.view(B, T, cfg.out_channels, H, W).transpose(1, 2).contiguous()

    # -- analysis --------------------------------------------------------------------------------------------
    def trace(self, batch: int, frames: int, height: int, width: int, *, temporal: bool = True) -> list[TraceRow]:
        """Every block in execution order with its input and output geometry (skips and concats included);
        ``temporal=False`` traces the per-frame U-Net (the policy's ``temporal``)."""
        rows: list[TraceRow] = []
        skips: list[tuple[Shape, int]] = []

        def run(stage: Stage, shape: Shape, ch: int, skip: bool = False) -> tuple[Shape, int]:
            active = [b for b in stage if temporal or not isinstance(b, TemporalModule)]
            for i, block in enumerate(active):
                out_shape, out_ch = block.out_shape(shape), block.out_channels(ch)
                rows.append(TraceRow(block, shape, ch, out_shape, out_ch, skip and i == len(active) - 1))
                shape, ch = out_shape, out_ch
            return shape, ch

        shape, ch = (batch, frames, height, width), self.config.in_channels
        for stage in self.encoder:
            shape, ch = run(stage, shape, ch, skip=True)
            skips.append((shape, ch))
        shape, ch = run(self.mid, shape, ch)
        for stage in self.decoder:
            skip_shape, skip_ch = skips.pop()
            assert skip_shape == shape, f"skip {skip_shape} does not match {shape}"
            shape, ch = run(stage, shape, ch + skip_ch)
        run(Stage([self.out]), shape, ch)
        return rows

    def flops(self, batch: int, frames: int, height: int, width: int, text_len: int = 77) -> int:
        """Analytic FLOPs (2 x multiply-adds of convs, linears and attention matmuls) of one forward."""
        total = sum(linear_flops(m, batch) for m in self.time_embed if isinstance(m, nn.Linear))
        if self.noise_aug_embed is not None:
            total += sum(linear_flops(m, batch) for m in self.noise_aug_embed if isinstance(m, nn.Linear))
        return total + sum(r.block.flops(r.in_shape, text_len) for r in self.trace(batch, frames, height, width))

    # -- weights -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created if missing), atomically."""
        from .weights import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "STUNet":
        """Load a model saved by :meth:`save_pretrained`; strict about keys and shapes."""
        from .weights import from_pretrained

        return from_pretrained(cls, directory, device=device, dtype=dtype)

