"""The ``stunet`` ONNX nodes as TensorRT ahead-of-time Python plugins (TensorRT 10.9 or newer).

Each node type is registered with ``tensorrt.plugin`` under ``stunet::<node>``: its output description, its
supported types (fp16 and fp32, linear format) and an ``aot_impl`` that returns the Triton kernel of
``stunet.kernels.plugin`` compiled to PTX for the GPU being built for, its launch geometry and its int32
scalars as shape expressions, in the parameter order TensorRT launches with (inputs, scalars, outputs). The
engine embeds the PTX, so running it needs no Python.

The ONNX parser finds a plugin by the node's type, ``plugin_version`` and ``plugin_namespace``; the nodes are
given ``plugin_namespace="stunet"`` just before parsing (the ONNX file itself stays standard).

This module imports ``tensorrt`` (not installable from the package registry). The kernels and their PTX are
tested without it (tests/test_tensorrt.py); registering, building and running the plugins is not verified
on the project's machines.
"""
from __future__ import annotations

from ..kernels.plugin import compile_plugin, group_norm_plugin, temporal_attention_plugin

NAMESPACE = "stunet"
_REGISTERED = False


def route_to_plugins(proto):
    """A copy of ``proto`` whose stunet nodes name the plugin namespace."""
    import onnx

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for node in proto.graph.node:
        if node.domain == NAMESPACE and not any(a.name == "plugin_namespace" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("plugin_namespace", NAMESPACE))
    return proto


def _arch() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def register() -> None:
    """Registers the three plugins with TensorRT (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    def dtype_name(desc) -> str:
        if desc.dtype == trt.float16:
            return "fp16"
        if desc.dtype == trt.float32:
            return "fp32"
        raise ValueError(f"stunet plugins take fp16 or fp32 tensors, got {desc.dtype}")

    def package(kernel, dims):
        compiled = compile_plugin(kernel, _arch())
        launch = trtp.KernelLaunchParams()
        grid_x, grid_y = kernel.grid(dims, trtp.cdiv)
        launch.grid_x, launch.grid_y = grid_x, grid_y
        launch.block_x = compiled.num_warps * 32
        launch.shared_mem = compiled.shared
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(dims[name]) for name in kernel.scalars])
        return compiled.name.encode(), compiled.ptx.encode(), launch, scalars

    def norm(x, num_groups, eps, per_clip, silu, input_bias):
        kernel = group_norm_plugin(dtype_name(x), num_groups=num_groups, eps=eps, per_clip=bool(per_clip),
                                   silu=bool(silu), input_bias=input_bias)
        s = x.shape_expr
        return package(kernel, dict(B=s[0], C=s[1], T=s[2], HW=s[3] * s[4]))

    @trtp.register(f"{NAMESPACE}::GroupNorm")
    def describe_norm(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc, num_groups: int,
                      eps: float, per_clip: int, silu: int) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(f"{NAMESPACE}::GroupNorm")
    def tune_norm(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc, outputs):
        return [trtp.AutoTuneCombination(", ".join(["FP16|FP32"] * 4), "LINEAR")]  # one type for all

    @trtp.aot_impl(f"{NAMESPACE}::GroupNorm")
    def implement_norm(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc, num_groups: int,
                       eps: float, per_clip: int, silu: int, outputs, tactic: int):
        return norm(x, num_groups, eps, per_clip, silu, False)

    @trtp.register(f"{NAMESPACE}::BiasGroupNorm")
    def describe_bias_norm(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                           input_bias: trtp.TensorDesc, num_groups: int, eps: float, per_clip: int,
                           silu: int) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(f"{NAMESPACE}::BiasGroupNorm")
    def tune_bias_norm(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                       input_bias: trtp.TensorDesc, outputs):
        return [trtp.AutoTuneCombination(", ".join(["FP16|FP32"] * 5), "LINEAR")]

    @trtp.aot_impl(f"{NAMESPACE}::BiasGroupNorm")
    def implement_bias_norm(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                            input_bias: trtp.TensorDesc, num_groups: int, eps: float, per_clip: int, silu: int,
                            outputs, tactic: int):
        return norm(x, num_groups, eps, per_clip, silu, True)

    @trtp.register(f"{NAMESPACE}::TemporalAttention")
    def describe_attention(qkv: trtp.TensorDesc, heads: int, scale: float) -> trtp.TensorDesc:
        out = qkv.like()
        out.shape_expr[3] = qkv.shape_expr[3] // 3
        return out

    @trtp.autotune(f"{NAMESPACE}::TemporalAttention")
    def tune_attention(qkv: trtp.TensorDesc, outputs):
        return [trtp.AutoTuneCombination("FP16|FP32, FP16|FP32", "LINEAR")]

    @trtp.aot_impl(f"{NAMESPACE}::TemporalAttention")
    def implement_attention(qkv: trtp.TensorDesc, heads: int, scale: float, outputs, tactic: int):
        s = qkv.shape_expr
        frames = s[1].constant_value() if s[1].is_constant else None
        channels = s[3].constant_value() // 3  # the channel count is static in every export
        kernel = temporal_attention_plugin(dtype_name(qkv), channels=channels, heads=heads, scale=scale,
                                           frames=frames)
        return package(kernel, dict(T=s[1], S=s[2], num_seq=s[0] * s[2], C=s[3] // 3))

    _REGISTERED = True
