"""Public video diffusion U-Nets as STUNets: ``from_diffusers(model) -> STUNet``.

Three diffusers classes map onto a :class:`~stunet.config.STUNetConfig` and its weights, module by module:

- ``UNet3DConditionModel`` (ModelScope T2V, ZeroScope): the per-frame SD trunk with a
  :class:`~stunet.model.temporal.TemporalConvStack` after each ResBlock, a
  :class:`~stunet.model.temporal.TemporalTransformer` after each spatial transformer and one after conv_in.
- ``UNetMotionModel`` (AnimateDiff: an SD 1.5 U-Net + a ``MotionAdapter``): a TemporalTransformer with
  sinusoidal positions after each level's last spatial block (and in the mid block).
- ``UNet2DConditionModel`` (Stable Diffusion's text-to-image U-Net): inflated the Lumiere way, with
  identity-initialised temporal modules (conv inflation blocks, TemporalDown/Up, temporal attention in the mid
  block), so the new STUNet computes exactly what the 2D model computes on every frame of a static video.

The walk is strict: an option, block type or module form that the STUNet cannot express raises a
:class:`ConversionError` naming it, never a silently different network. Nothing is downloaded: the caller
passes a model it built or loaded (``diffusers`` is only needed to load one).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, NoReturn

import torch
from torch import nn

from .config import STUNetConfig, check_flags, is_choice, shown
from .model import STUNet
from .model.layers import ConvIn, Downsample, OutHead, ResBlock, SpatialAttention, Upsample
from .model.temporal import (ConvInflationBlock, TemporalAttentionBlock, TemporalConvStack, TemporalDown,
                             TemporalTransformer, TemporalUp)

log = logging.getLogger(__name__)

SUPPORTED = ("UNet3DConditionModel", "UNetMotionModel", "UNet2DConditionModel")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # of a converted STUNet

# Per class: the down / up block types the walk maps, (cross-attention type, plain type).
_BLOCKS = {
    "UNet3DConditionModel": (("CrossAttnDownBlock3D", "DownBlock3D"), ("CrossAttnUpBlock3D", "UpBlock3D")),
    "UNetMotionModel": (("CrossAttnDownBlockMotion", "DownBlockMotion"),
                        ("CrossAttnUpBlockMotion", "UpBlockMotion")),
    "UNet2DConditionModel": (("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")),
}
_MISSING = object()
# Config options the STUNet does not express, with the value(s) it needs (options a class lacks are skipped).
_REQUIRED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,), "act_fn": ("silu",), "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,), "dual_cross_attention": (False,), "class_embed_type": (None,),
    "num_class_embeds": (None,), "addition_embed_type": (None,), "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,), "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "attention_type": ("default",), "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,), "reverse_temporal_transformer_layers_per_block": (None,),
    "reverse_motion_num_attention_heads": (None,), "transformer_layers_per_mid_block": (None, 1),
    "temporal_transformer_layers_per_mid_block": (None, 1), "mid_block_layers": (1,), "num_attention_heads": (None,),
}
_ALL_ONE = ("transformer_layers_per_block", "temporal_transformer_layers_per_block")


class ConversionError(ValueError):
    """A diffusers model (or one of its options, block types or modules) that the STUNet cannot express."""


def _fail(what: str, fix: str = "") -> NoReturn:
    raise ConversionError(f"from_diffusers: {what} is not supported" + (f"; {fix}" if fix else ""))


def _per_level(value, levels: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            _fail(f"{name}={value!r} (one value per level is needed)")
        return tuple(value)
    return (value,) * levels


def _check_options(kind: str, cfg) -> None:
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    for option, allowed in _REQUIRED.items():
        if kind != "UNet3DConditionModel" and option == "num_attention_heads":
            continue  # the heads of the image U-Nets (mapped below); a UNet3DConditionModel refuses the option
        value = get(option, _MISSING)
        if value is not _MISSING and value not in allowed:
            _fail(f"{kind} option {option}={value!r}", f"this converter needs {option}={allowed[0]!r}")
    for option in _ALL_ONE:
        value = get(option, _MISSING)
        if value is not _MISSING and any(v != 1 for v in (value if isinstance(value, (list, tuple)) else (value,))):
            _fail(f"{kind} option {option}={value!r}", "one transformer block per attention is mapped")
    if not isinstance(get("layers_per_block"), int):
        _fail(f"{kind} option layers_per_block={get('layers_per_block')!r}", "the same count at every level")
    if not isinstance(get("cross_attention_dim"), int):
        _fail(f"{kind} option cross_attention_dim={get('cross_attention_dim')!r}", "one text width")
    if get("norm_num_groups") is None:
        _fail(f"{kind} option norm_num_groups=None")


def _attention_levels(kind: str, cfg) -> tuple[int, ...]:
    (down_cross, down_plain), (up_cross, up_plain) = _BLOCKS[kind]
    levels = []
    for level, block in enumerate(cfg.down_block_types):
        if block not in (down_cross, down_plain):
            _fail(f"{kind} down block type {block!r}", f"use {down_cross!r} or {down_plain!r}")
        if block == down_cross:
            levels.append(level)
    ups = list(cfg.up_block_types)
    if len(ups) != len(cfg.down_block_types):
        _fail(f"{kind} with {len(ups)} up blocks for {len(cfg.down_block_types)} down blocks")
    for i, block in enumerate(ups):
        if block not in (up_cross, up_plain):
            _fail(f"{kind} up block type {block!r}", f"use {up_cross!r} or {up_plain!r}")
        level = len(ups) - 1 - i
        if (block == up_cross) != (level in levels):
            _fail(f"{kind} with cross-attention in its down and up blocks at different levels "
                  f"(down {cfg.down_block_types[level]!r}, up {block!r})", "the U-Net must be symmetric")
    return tuple(levels)


def _heads(widths: tuple[int, ...], heads: tuple[int, ...], name: str) -> dict[str, int]:
    """Per-level head counts -> (fixed heads) or (fixed head width) config fields."""
    if len(set(heads)) == 1:
        return {"heads": heads[0]}
    dims = {w // h for w, h in zip(widths, heads)}
    if len(dims) == 1 and all(w % h == 0 for w, h in zip(widths, heads)):
        return {"head_dim": dims.pop()}
    _fail(f"{name}={heads!r} over widths {widths!r} (neither the head count nor the head width is the same at "
          "every level)")
    raise AssertionError


def config_from_diffusers(model: nn.Module, **overrides: Any) -> STUNetConfig:
    """The :class:`STUNetConfig` of a diffusers U-Net (see :func:`from_diffusers`); ``overrides`` replace fields
    (``prediction``, ``schedule``, ``sample_frames``, or the inflation's ``temporal_downsample``, ...)."""
    kind = type(model).__name__
    if kind not in SUPPORTED:
        _fail(f"model type {kind}", f"pass one of {', '.join(SUPPORTED)}")
    cfg = model.config
    _check_options(kind, cfg)
    widths = tuple(cfg.block_out_channels)
    ch0 = widths[0]
    if any(w % ch0 for w in widths):
        _fail(f"block_out_channels={widths!r} (each must be a multiple of the first)")
    levels = len(widths)
    attention_levels = _attention_levels(kind, cfg)
    attends = [i for i in range(levels) if i in attention_levels or i == levels - 1]
    fields: dict[str, Any] = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=ch0,
        channel_mult=tuple(w // ch0 for w in widths), num_res_blocks=cfg.layers_per_block,
        attention_levels=attention_levels, num_groups=cfg.norm_num_groups, norm_eps=float(cfg.norm_eps),
        attention_norm_eps=1e-6, feed_forward="geglu", text_dim=cfg.cross_attention_dim, prediction="eps",
        schedule="scaled_linear", flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=int(cfg.get("freq_shift", 0)), temporal_mlp_ratio=4,
    )
    sample = cfg.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    divisor = 2 ** (levels - 1)
    fields["sample_size"] = -(-int(sample) // divisor) * divisor

    if kind == "UNet3DConditionModel":
        head_dim = cfg.attention_head_dim
        if not isinstance(head_dim, int):
            _fail(f"UNet3DConditionModel option attention_head_dim={head_dim!r}", "one head width at every level")
        fields.update(
            attention_head_dim=head_dim, temporal_attn_head_dim=head_dim, temporal_in_heads=8,
            temporal_conv="stack", temporal_attn="transformer", temporal_pos_embed="none",
            temporal_after_res=("conv",) * levels, temporal_after_attn=("attn",) * levels,
            mid_block=("res", "temporal_conv", "attn", "temporal_attn", "res", "temporal_conv"),
            temporal_attn_depth=1, temporal_downsample=(False,) * (levels - 1), sample_frames=16)
    else:
        heads = _per_level(cfg.get("num_attention_heads") or cfg.attention_head_dim, levels, "num_attention_heads")
        spatial = _heads(tuple(widths[i] for i in attends), tuple(heads[i] for i in attends), "num_attention_heads")
        fields.update(attention_heads=spatial.get("heads", 0), attention_head_dim=spatial.get("head_dim", 64))
    if kind == "UNetMotionModel":
        motion = _per_level(cfg.motion_num_attention_heads, levels, "motion_num_attention_heads")
        temporal = _heads(widths, motion, "motion_num_attention_heads")
        with_mid = bool(cfg.use_motion_mid_block)
        fields.update(
            temporal_attn_heads=temporal.get("heads", 16), temporal_attn_head_dim=temporal.get("head_dim", 0),
            temporal_attn="transformer", temporal_pos_embed="sinusoidal",
            temporal_max_frames=cfg.motion_max_seq_length,
            temporal_after_res=tuple("none" if i in attention_levels else "attn" for i in range(levels)),
            temporal_after_attn=("attn",) * levels,
            mid_block=("res", "attn", *(("temporal_attn",) if with_mid else ()), "res"),
            temporal_attn_depth=int(with_mid), temporal_downsample=(False,) * (levels - 1), sample_frames=16)
    if kind == "UNet2DConditionModel":
        depth = overrides.get("temporal_attn_depth", 1)
        coarsest = widths[-1]
        fields.update(temporal_attn_depth=depth, temporal_attn_heads=max(1, coarsest // 64),
                      temporal_downsample=(True,) * (levels - 1), sample_frames=max(16, 2 ** (levels - 1)))
    fields.update(overrides)
    try:
        return STUNetConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"from_diffusers: the {kind} maps to an invalid STUNetConfig ({e})") from None


# -- the walk: both networks' modules in execution order ------------------------------------------------------
_KIND = {ConvIn: "conv_in", ResBlock: "res", SpatialAttention: "attn", ConvInflationBlock: "temporal_conv",
         TemporalConvStack: "temporal_conv", TemporalAttentionBlock: "temporal_attn",
         TemporalTransformer: "temporal_attn", Downsample: "down", Upsample: "up", OutHead: "out",
         TemporalDown: "temporal_resample", TemporalUp: "temporal_resample"}


def _ours(model: STUNet, inflate: bool) -> list[tuple[str, nn.Module]]:
    blocks = [b for stage in (*model.encoder, model.mid, *model.decoder) for b in stage] + [model.out]
    seq = [(_KIND[type(b)], b) for b in blocks]
    if inflate:  # the temporal modules an inflation adds keep their identity initialisation
        seq = [(k, b) for k, b in seq if not k.startswith("temporal")]
    return seq


def _theirs(model: nn.Module, kind: str) -> Iterator[tuple[str, nn.Module]]:
    video3d, motion = kind == "UNet3DConditionModel", kind == "UNetMotionModel"

    def layers(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            yield "res", resnet
            if video3d:
                yield "temporal_conv", block.temp_convs[j]
            if attentions is not None:
                yield "attn", attentions[j]
                if video3d:
                    yield "temporal_attn", block.temp_attentions[j]
            if motion:
                yield "temporal_attn", block.motion_modules[j]

    yield "conv_in", model.conv_in
    if video3d:
        yield "temporal_attn", model.transformer_in
    for block in model.down_blocks:
        yield from layers(block)
        if block.downsamplers is not None:
            yield "down", block.downsamplers[0]
    mid = model.mid_block
    yield "res", mid.resnets[0]
    if video3d:
        yield "temporal_conv", mid.temp_convs[0]
    for j, attn in enumerate(mid.attentions):
        yield "attn", attn
        if video3d:
            yield "temporal_attn", mid.temp_attentions[j]
        if motion and getattr(mid, "motion_modules", None) is not None:
            yield "temporal_attn", mid.motion_modules[j]
        yield "res", mid.resnets[j + 1]
        if video3d:
            yield "temporal_conv", mid.temp_convs[j + 1]
    for block in model.up_blocks:
        yield from layers(block)
        if block.upsamplers is not None:
            yield "up", block.upsamplers[0]
    yield "out", model


# -- copying weights, one module kind at a time ---------------------------------------------------------------
def _copy(dst: torch.Tensor, src: torch.Tensor | None, where: str) -> None:
    if src is None:
        _fail(f"{where} without its parameter")
    if src.numel() != dst.numel():
        raise ConversionError(f"from_diffusers: {where} has shape {tuple(src.shape)}, the STUNet's has "
                              f"{tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.detach().reshape(dst.shape))


def _linear(dst: nn.Module, src: nn.Module, where: str) -> None:
    _copy(dst.weight, src.weight, f"{where}.weight")
    if getattr(dst, "bias", None) is not None:
        _copy(dst.bias, src.bias, f"{where}.bias")
    elif getattr(src, "bias", None) is not None:
        _fail(f"{where} with a bias")


def _norm(dst: nn.Module, src: nn.Module, where: str) -> None:
    if not getattr(src, "affine", getattr(src, "elementwise_affine", True)):
        _fail(f"{where} without affine parameters")
    if abs(dst.eps - src.eps) > 1e-12:
        _fail(f"{where} with eps={src.eps:g} (the STUNet's is {dst.eps:g})")
    if isinstance(src, nn.GroupNorm) and src.num_groups != dst.num_groups:
        _fail(f"{where} with {src.num_groups} groups (the STUNet's has {dst.num_groups})")
    _linear(dst, src, where)


def _packed(dst: nn.Linear, parts: list[nn.Module], where: str) -> None:
    if any(p.bias is not None for p in parts):
        _fail(f"{where} with q/k/v biases")
    _copy(dst.weight, torch.cat([p.weight for p in parts], dim=0), f"{where}.to_q|to_k|to_v")


def _attention(attn: nn.Module, heads: int, qkv: nn.Linear, out: nn.Linear, where: str, kv=None) -> None:
    if attn.heads != heads:
        _fail(f"{where} with {attn.heads} heads (the STUNet's config gives {heads})")
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        _fail(f"{where} with a residual connection or output rescaling")
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_cross", None) is not None:
        _fail(f"{where} with query/key or cross normalisation")
    if kv is None:
        _packed(qkv, [attn.to_q, attn.to_k, attn.to_v], where)
    else:
        _packed(qkv, [attn.to_q], where)
        _packed(kv, [attn.to_k, attn.to_v], where)
    _linear(out, attn.to_out[0], f"{where}.to_out.0")


def _feed_forward(ours: nn.Module, ff: nn.Module, where: str) -> None:
    act = ff.net[0]
    if type(act).__name__ != "GEGLU" or ours.ff != "geglu":
        _fail(f"{where} with activation {type(act).__name__}", "GEGLU feed-forwards are mapped")
    _linear(ours.mlp_in, act.proj, f"{where}.net.0.proj")
    _linear(ours.mlp_out, ff.net[2], f"{where}.net.2")


def _one_block(src: nn.Module, where: str) -> nn.Module:
    if len(src.transformer_blocks) != 1:
        _fail(f"{where} with {len(src.transformer_blocks)} transformer blocks", "one block per attention")
    block = src.transformer_blocks[0]
    if block.norm_type != "layer_norm" or getattr(block, "only_cross_attention", False):
        _fail(f"{where} with norm_type={block.norm_type!r} / only_cross_attention")
    return block


def _load_res(ours: ResBlock, src: nn.Module, where: str) -> None:
    if src.time_embedding_norm != "default" or src.output_scale_factor != 1.0 or src.up or src.down:
        _fail(f"{where} ({type(src).__name__} with time_embedding_norm={src.time_embedding_norm!r}, "
              f"output_scale_factor={src.output_scale_factor}, up={src.up}, down={src.down})")
    if src.time_emb_proj is None or getattr(src, "skip_time_act", False):
        _fail(f"{where} without a plain timestep projection")
    _norm(ours.norm1, src.norm1, f"{where}.norm1")
    _linear(ours.conv1, src.conv1, f"{where}.conv1")
    _linear(ours.emb_proj, src.time_emb_proj, f"{where}.time_emb_proj")
    _norm(ours.norm2, src.norm2, f"{where}.norm2")
    _linear(ours.conv2, src.conv2, f"{where}.conv2")
    if isinstance(ours.skip, nn.Conv2d):
        if src.conv_shortcut is None or src.conv_shortcut.kernel_size != (1, 1):
            _fail(f"{where} with a {getattr(src.conv_shortcut, 'kernel_size', None)} shortcut conv")
        _linear(ours.skip, src.conv_shortcut, f"{where}.conv_shortcut")
    elif src.conv_shortcut is not None:
        _fail(f"{where} with a shortcut conv between equal widths")


def _load_attn(ours: SpatialAttention, src: nn.Module, where: str) -> None:
    if not getattr(src, "is_input_continuous", True):
        _fail(f"{where} ({type(src).__name__} on discrete or patched input)")
    block = _one_block(src, where)
    _norm(ours.norm, src.norm, f"{where}.norm")
    _linear(ours.proj_in, src.proj_in, f"{where}.proj_in")
    _norm(ours.norm1, block.norm1, f"{where}.transformer_blocks.0.norm1")
    _attention(block.attn1, ours.heads, ours.qkv, ours.attn_out, f"{where}.transformer_blocks.0.attn1")
    if block.attn2 is None or block.attn2.is_cross_attention is False:
        _fail(f"{where} without cross-attention")
    _norm(ours.norm2, block.norm2, f"{where}.transformer_blocks.0.norm2")
    _attention(block.attn2, ours.heads, ours.cross_q, ours.cross_out, f"{where}.transformer_blocks.0.attn2",
               kv=ours.cross_kv)
    _norm(ours.norm3, block.norm3, f"{where}.transformer_blocks.0.norm3")
    _feed_forward(ours, block.ff, f"{where}.transformer_blocks.0.ff")
    _linear(ours.proj_out, src.proj_out, f"{where}.proj_out")


def _load_temporal_conv(ours: nn.Module, src: nn.Module, where: str) -> None:
    if not isinstance(ours, TemporalConvStack):
        _fail(f"{where} ({type(src).__name__} into {type(ours).__name__})")
    layers = [src.conv1, src.conv2, src.conv3, src.conv4]
    for i, (norm, conv, layer) in enumerate(zip(ours.norms, ours.convs, layers)):
        _norm(norm, layer[0], f"{where}.conv{i + 1}.0")
        src_conv = layer[-1]
        if tuple(src_conv.kernel_size) != (3, 1, 1) or tuple(src_conv.padding) != (1, 0, 0):
            _fail(f"{where}.conv{i + 1} with kernel {src_conv.kernel_size}, padding {src_conv.padding}")
        _linear(conv, src_conv, f"{where}.conv{i + 1}")


def _load_temporal_attn(ours: nn.Module, src: nn.Module, where: str) -> None:
    if not isinstance(ours, TemporalTransformer):
        _fail(f"{where} ({type(src).__name__} into {type(ours).__name__})")
    block = _one_block(src, where)
    has_pos = getattr(block, "pos_embed", None) is not None
    if has_pos != (ours.pos_embed == "sinusoidal"):
        _fail(f"{where} with positional embedding {type(block.pos_embed).__name__ if has_pos else None}")
    if block.attn2 is None or block.attn2.is_cross_attention:
        _fail(f"{where} with cross-attention in a temporal transformer", "both attentions must be self-attention")
    _norm(ours.norm, src.norm, f"{where}.norm")
    _linear(ours.proj_in, src.proj_in, f"{where}.proj_in")
    for i, (norm, attn, qkv, out) in enumerate(((ours.norm1, block.attn1, ours.qkv1, ours.attn_out1),
                                                (ours.norm2, block.attn2, ours.qkv2, ours.attn_out2)), 1):
        _norm(norm, getattr(block, f"norm{i}"), f"{where}.transformer_blocks.0.norm{i}")
        _attention(attn, ours.heads, qkv, out, f"{where}.transformer_blocks.0.attn{i}")
    _norm(ours.norm3, block.norm3, f"{where}.transformer_blocks.0.norm3")
    _feed_forward(ours, block.ff, f"{where}.transformer_blocks.0.ff")
    _linear(ours.proj_out, src.proj_out, f"{where}.proj_out")


def _load_resample(ours: nn.Module, src: nn.Module, where: str) -> None:
    if isinstance(ours, Downsample):
        if not src.use_conv or src.padding != 1 or getattr(src, "norm", None) is not None:
            _fail(f"{where} ({type(src).__name__} without a padded stride-2 conv, or with a norm)")
    elif not src.use_conv or src.use_conv_transpose or not src.interpolate or getattr(src, "norm", None) is not None:
        _fail(f"{where} ({type(src).__name__} other than nearest interpolation + conv)")
    _linear(ours.conv, src.conv, f"{where}.conv")


def _load_out(ours: OutHead, src: nn.Module, where: str) -> None:
    if src.conv_norm_out is None:
        _fail("a model without conv_norm_out")
    _norm(ours.norm, src.conv_norm_out, "conv_norm_out")
    _linear(ours.conv, src.conv_out, "conv_out")


def _load_conv_in(ours: ConvIn, src: nn.Module, where: str) -> None:
    _linear(ours.conv, src, where)


_LOADERS = {"conv_in": _load_conv_in, "res": _load_res, "attn": _load_attn, "temporal_conv": _load_temporal_conv,
            "temporal_attn": _load_temporal_attn, "down": _load_resample, "up": _load_resample, "out": _load_out}


INIT_SEED = 0
"""The seed a converted STUNet is initialised from before the source's weights are copied in: what stays of that
initialisation (the temporal modules an inflation adds) is the same in every conversion."""


@contextlib.contextmanager
def _made_in(dtype: torch.dtype) -> Iterator[None]:
    """Modules built in the block get parameters in ``dtype`` (no float32 copy of a large model beside the source)
    drawn from ``INIT_SEED``; the caller's default dtype and random state are left as they were."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def from_diffusers(model: nn.Module, *, dtype: torch.dtype = torch.float32, **overrides: Any) -> STUNet:
    """A :class:`STUNet` (on the CPU, parameters in ``dtype``) computing what the diffusers U-Net ``model``
    computes: its weights copied, rounded to ``dtype`` as ``.to(dtype)`` rounds them.

    ``model`` is a ``UNet3DConditionModel`` (ModelScope / ZeroScope), a ``UNetMotionModel`` (AnimateDiff) or a
    ``UNet2DConditionModel`` (inflated with identity-initialised temporal modules, with a TemporalDown/Up at
    every level and one temporal-attention block in the mid block, as Lumiere inflates its text-to-image
    model; ``temporal_downsample=(...)`` and ``temporal_attn_depth=`` change that). ``overrides`` replace config
    fields, e.g. ``prediction="v"`` for a v-prediction checkpoint (the U-Net does not record it; its scheduler
    does). Video models return ``stunet(x, t, text)`` equal to ``model(x, t, encoder_hidden_states=text)``
    (``UNetMotionModel`` takes the text per frame: ``text.repeat_interleave(F, 0)``). The STUNet's own
    initialisation, which an inflation's temporal modules keep, is drawn from a fixed seed: the same model from
    every conversion, and the caller's random state untouched.

    Raises :class:`ConversionError` naming the option, block type or module that has no STUNet equivalent.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_diffusers(model): model must be a diffusers U-Net module, got {type(model).__name__}")
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(map(str, _DTYPES.values()))}, got {shown(dtype)}")
    kind = type(model).__name__
    config = config_from_diffusers(model, **overrides)
    with _made_in(dtype):
        ours = STUNet(config).eval()
    inflate = kind == "UNet2DConditionModel"
    time = model.time_embedding
    if getattr(time, "cond_proj", None) is not None or getattr(time, "post_act", None) is not None:
        _fail(f"{kind} time embedding with a condition projection or a post-activation")
    _linear(ours.time_embed[0], time.linear_1, "time_embedding.linear_1")
    _linear(ours.time_embed[2], time.linear_2, "time_embedding.linear_2")
    mine, theirs = _ours(ours, inflate), list(_theirs(model, kind))
    if [k for k, _ in mine] != [k for k, _ in theirs]:
        raise ConversionError(f"from_diffusers: the {kind}'s modules {[k for k, _ in theirs]} do not line up with "
                              f"the STUNet's {[k for k, _ in mine]}")
    names = {module: name for name, module in model.named_modules()}
    for (kind_, dst), (_, src) in zip(mine, theirs):
        _LOADERS[kind_](dst, src, names.get(src, kind_))
    log.info("converted a %s into a STUNet (%.1f M parameters)", kind,
             sum(p.numel() for p in ours.parameters()) / 1e6)
    return ours


# -- folders on disk -------------------------------------------------------------------------------------------
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
"""The parts of a diffusers pipeline folder that ``convert_folder`` copies next to the converted model."""


def _load_unet(src, motion_adapter, dtype: torch.dtype):
    from .io import folder_load_errors, read_json
    from .pipeline.latent import _require_diffusers, diffusers_load_options

    diffusers = _require_diffusers()
    config = src / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(src)!r} has no config.json: give a diffusers `unet` folder or a pipeline "
                                "folder holding one")
    data = read_json(config, "give the folder a diffusers config.json")
    kind = data.get("_class_name") if isinstance(data, dict) else None
    if not isinstance(kind, str) or kind not in SUPPORTED:
        _fail(f"model type {kind!r} (in {str(config)!r})", f"convert one of {', '.join(SUPPORTED)}")
    with folder_load_errors(kind, src):
        model = getattr(diffusers, kind).from_pretrained(src, torch_dtype=dtype, **diffusers_load_options())
    if kind == "UNet2DConditionModel" and motion_adapter is not None:
        with folder_load_errors("MotionAdapter", motion_adapter):
            adapter = diffusers.MotionAdapter.from_pretrained(motion_adapter, torch_dtype=dtype,
                                                              **diffusers_load_options())
        # from_unet2d casts the model it builds with .to(dtype), on which diffusers warns that the modules "that
        # should be kept in float32: []" may be cast inconsistently: a note about an empty list, dropped here
        def note(record: logging.LogRecord) -> bool:
            return "should be kept in float32: []" not in record.getMessage()

        modeling = logging.getLogger("diffusers.models.modeling_utils")
        modeling.addFilter(note)
        try:
            model = diffusers.UNetMotionModel.from_unet2d(model, adapter)
        finally:
            modeling.removeFilter(note)
    return model.eval()


def overlaps_source(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Whether the output folder ``dst`` and the folder being converted, ``src``, overlap: the same folder, or
    one inside the other. Writing ``dst`` replaces it whole, which would delete a source inside it, and a
    ``dst`` inside the source would be copied into itself with the pipeline's parts."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    return dst == src or dst in src.parents or src in dst.parents


def convert_folder(src, dst, *, dtype: str = "fp16", motion_adapter=None, overwrite: bool = False,
                   progress: bool = False, **overrides: Any) -> STUNet:
    """``stunet convert``: a diffusers folder on disk -> the engine's own folder.

    ``src`` is a diffusers ``unet`` folder, or a pipeline folder (``model_index.json``, ``unet``, and for the
    pipeline ``text_encoder``, ``tokenizer``, ``vae``, ``scheduler``; for AnimateDiff a ``motion_adapter``
    folder next to an SD ``unet``, or ``motion_adapter=`` elsewhere). ``dst`` gets ``config.json`` +
    ``model.safetensors`` (weights in ``dtype``) and copies of the pipeline parts, which
    :meth:`stunet.Pipeline.from_pretrained` reads. The scheduler's prediction type and beta schedule go into
    the model's config. The diffusers U-Net is loaded in ``dtype`` and converted into it, so a conversion holds
    two copies of the weights in that dtype at its peak. The folder is built aside and moved into place
    (``io.atomic_dir``), so a failure leaves nothing behind; an existing non-empty ``dst`` is refused unless
    ``overwrite``, and a ``dst`` that is ``src``, holds it or lies inside it always, as one overlapping
    ``motion_adapter`` (``overlaps_source``).
    ``progress`` shows a line naming the stage that runs (loading a large checkpoint takes a while). Returns
    the converted model, as written (its parameters in ``dtype``).
    """
    import shutil

    from .io import atomic_dir, read_json
    from .progress import Stages
    from .sampling.samplers import scheduler_options

    check_flags(overwrite=overwrite, progress=progress)
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"no diffusers folder at {str(src)!r}; convert a folder you have on disk (nothing "
                                "is downloaded)")
    if not is_choice(dtype, _DTYPES):
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {shown(dtype)}")
    if overlaps_source(src, dst):
        raise ValueError(f"dst {str(dst)!r} and the folder being converted, {str(src)!r}, overlap (one holds the "
                         "other): choose an output folder outside the source")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{str(dst)!r} exists and is not empty; choose another output folder or overwrite")
    pipeline = (src / "unet").is_dir()
    unet_dir = src / "unet" if pipeline else src
    if motion_adapter is None and pipeline and (src / "motion_adapter").is_dir():
        motion_adapter = src / "motion_adapter"
    if motion_adapter is not None and not Path(motion_adapter).is_dir():
        raise FileNotFoundError(f"no motion adapter folder at {str(motion_adapter)!r}")
    if motion_adapter is not None and overlaps_source(motion_adapter, dst):
        raise ValueError(f"dst {str(dst)!r} and the motion adapter being converted, {str(motion_adapter)!r}, "
                         "overlap (one holds the other): choose an output folder outside it")
    scheduler = src / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        _, options = scheduler_options(read_json(scheduler, "fix or remove the scheduler folder"))
        for key in ("prediction", "schedule", "num_train_timesteps"):
            overrides.setdefault(key, options[key])
    parts = [part for part in PIPELINE_PARTS if pipeline and (src / part).is_dir()]
    names = ["load the diffusers U-Net", "convert", "write", *(["copy " + ", ".join(parts)] if parts else [])]
    with Stages(f"convert {src.name}", names, progress) as stages:
        with stages.stage(names[0]):
            unet = _load_unet(unet_dir, motion_adapter, _DTYPES[dtype])
        with stages.stage(names[1]):
            model = from_diffusers(unet, dtype=_DTYPES[dtype], **overrides)
            del unet
        with atomic_dir(dst) as staging:
            with stages.stage(names[2]):
                model.save_pretrained(staging)
            if parts:
                with stages.stage(names[3]):
                    for part in parts:  # fresh files (the umask's mode), not the source's permission bits
                        shutil.copytree(src / part, staging / part, copy_function=shutil.copyfile)
    log.info("wrote %s (%s weights%s)", dst, dtype,
             ", with " + ", ".join(p for p in PIPELINE_PARTS if (dst / p).is_dir()) if pipeline else "")
    return model


__all__ = ["from_diffusers", "config_from_diffusers", "convert_folder", "overlaps_source", "ConversionError",
           "SUPPORTED", "PIPELINE_PARTS"]
