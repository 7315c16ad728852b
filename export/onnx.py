"""ONNX export: the kernel ops as nodes of the ``stunet`` domain, each with a local function of standard ops.

    stunet.export.export_onnx(model, "model.onnx", batch=2, frames=16, height=64, width=64, text_len=77)

``torch.onnx.export(dynamo=True)`` (opset 18) exports the model with the execution policy
``ExecutionPolicy(kernels=True)``, so the engine's ops reach the exporter as ``torch.ops.stunet.*`` nodes. They
are translated to ``stunet``-domain nodes:

| node | inputs | attributes | semantics (``stunet.kernels``) |
|---|---|---|---|
| ``GroupNorm`` | x (B, C, T, H, W), weight, bias | num_groups, eps, per_clip, silu | ``group_norm_ref`` |
| ``BiasGroupNorm`` | x, weight, bias, input_bias (B, C) | the same | ``group_norm_ref`` with ``input_bias`` |
| ``TemporalAttention`` | qkv (B, T, S, 3C) | heads, scale | ``temporal_attention_ref`` |

and the model carries, for each, an ONNX local function with the same (domain, name) whose body is standard
ops computing that semantics in fp32. A runtime without plugins (onnxruntime) runs the functions; TensorRT
(10.7 and newer) prefers a plugin registered under the node's name over the function.

A model with 1.75 GB of weights or more (protobuf holds at most 2 GB in one file) keeps them in one external-data
file beside the ``.onnx`` file, ``<name>.onnx.data`` (``ExportResult.external_data``; keep the two together).
A smaller model written over such a file holds its weights inline and removes the ``.data`` file of the one it
replaces.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from ..config import check_flags
from ..io import atomic_files, atomic_path
from ..model import STUNet
from ..progress import Stages
from .spec import SPEC_KEY, ExportResult, ExportSpec, compare, exporter_chatter_silenced, prepare, shapes_tuple

log = logging.getLogger(__name__)

DOMAIN = "stunet"
OPSET = 18
EXTERNAL_DATA_BYTES = 2 ** 31 - 2 ** 28
"""Models with this many bytes of weights or more keep them beside the file: protobuf holds at most 2 GB in one
message, and this leaves the graph 256 MB of it."""
ONNXSCRIPT_MIN = "0.6.2"
"""The oldest onnxscript that exports with the torch releases stunet runs on (older ones lack the exporter's API
or fail in the optimizer)."""
_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _require():
    try:
        import onnx
        import onnxscript
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({e}): pip install 'stunet[export]'") from None
    from packaging.version import Version  # an onnxscript dependency

    if Version(onnxscript.__version__) < Version(ONNXSCRIPT_MIN):
        raise ImportError(f"ONNX export needs onnxscript>={ONNXSCRIPT_MIN}, found {onnxscript.__version__}: "
                          "pip install -U 'stunet[export]'")
    return onnx, onnxscript


# -- the stunet domain: schemas (so the exporter can emit the nodes) and local functions (their meaning) ----------
_SCHEMAS_REGISTERED = False


def _register_schemas() -> None:
    """ONNX schemas of the stunet ops, registered once per process (the node builder checks against them)."""
    global _SCHEMAS_REGISTERED
    if _SCHEMAS_REGISTERED:
        return
    onnx, _ = _require()
    S = onnx.defs.OpSchema
    P, A, T = S.FormalParameter, S.Attribute, S.AttrType
    norm_attrs = [A("num_groups", T.INT, "GroupNorm groups"), A("eps", T.FLOAT, "variance epsilon"),
                  A("per_clip", T.INT, "1: statistics over the clip's frames; 0: per frame"),
                  A("silu", T.INT, "1: SiLU after the affine")]
    schemas = [
        S("GroupNorm", DOMAIN, 1, inputs=[P("x", "T"), P("weight", "T"), P("bias", "T")], outputs=[P("y", "T")],
          type_constraints=[("T", _TYPES, "float tensors")], attributes=norm_attrs),
        S("BiasGroupNorm", DOMAIN, 1, inputs=[P("x", "T"), P("weight", "T"), P("bias", "T"), P("input_bias", "T")],
          outputs=[P("y", "T")], type_constraints=[("T", _TYPES, "float tensors")], attributes=norm_attrs),
        S("TemporalAttention", DOMAIN, 1, inputs=[P("qkv", "T")], outputs=[P("out", "T")],
          type_constraints=[("T", _TYPES, "float tensors")],
          attributes=[A("heads", T.INT, "attention heads"), A("scale", T.FLOAT, "score scale")]),
    ]
    for schema in schemas:
        try:
            onnx.defs.get_schema(schema.name, 1, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)
    _SCHEMAS_REGISTERED = True


def _functions() -> list:
    """The FunctionProtos: each op's semantics in standard ONNX ops, computed in fp32 like the ``*_ref``."""
    _, onnxscript = _require()
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    domain = Opset(DOMAIN, 1)

    @onnxscript.script(domain, default_opset=op)
    def GroupNorm(x, weight, bias, num_groups: int, eps: float, per_clip: int, silu: int):
        shape = op.Shape(x)  # (B, C, T, H, W)
        b, c, t = op.Slice(shape, [0], [1], [0]), op.Slice(shape, [1], [2], [0]), op.Slice(shape, [2], [3], [0])
        hw = op.Mul(op.Slice(shape, [3], [4], [0]), op.Slice(shape, [4], [5], [0]))
        g = op.Reshape(op.Constant(value_int=num_groups), [1])
        clip = op.Cast(op.Constant(value_int=per_clip), to=9)
        frames = op.Where(clip, op.Constant(value_ints=[1]), t)  # per clip: one "frame" of T * H * W pixels
        pixels = op.Where(clip, op.Mul(t, hw), hw)
        v = op.Reshape(op.Cast(x, to=1), op.Concat(b, g, op.Div(c, g), frames, pixels, axis=0))
        axes = op.Constant(value_ints=[2, 4])
        d = op.Sub(v, op.ReduceMean(v, axes))
        y = op.Div(d, op.Sqrt(op.Add(op.ReduceMean(op.Mul(d, d), axes), op.Constant(value_float=eps))))
        per_channel = op.Constant(value_ints=[-1, 1, 1, 1])
        y = op.Add(op.Mul(op.Reshape(y, shape), op.Reshape(op.Cast(weight, to=1), per_channel)),
                   op.Reshape(op.Cast(bias, to=1), per_channel))
        y = op.Where(op.Cast(op.Constant(value_int=silu), to=9), op.Mul(y, op.Sigmoid(y)), y)
        return op.CastLike(y, x)

    @onnxscript.script(domain, default_opset=op)
    def BiasGroupNorm(x, weight, bias, input_bias, num_groups: int, eps: float, per_clip: int, silu: int):
        biased = op.Add(op.Cast(x, to=1), op.Unsqueeze(op.Cast(input_bias, to=1), [2, 3, 4]))
        return op.CastLike(GroupNorm(biased, weight, bias, num_groups=num_groups, eps=eps, per_clip=per_clip,
                                     silu=silu), x)

    @onnxscript.script(domain, default_opset=op)
    def TemporalAttention(qkv, heads: int, scale: float):
        shape = op.Shape(qkv)  # (B, T, S, 3C)
        bts = op.Slice(shape, [0], [3], [0])
        h = op.Reshape(op.Constant(value_int=heads), [1])
        split = op.Reshape(op.Cast(qkv, to=1),
                           op.Concat(bts, op.Constant(value_ints=[3]), h, op.Constant(value_ints=[-1]), axis=0))
        parts = op.Transpose(split, perm=[3, 0, 2, 4, 1, 5])  # (3, B, S, heads, T, D)
        q, k, v = op.Gather(parts, 0, axis=0), op.Gather(parts, 1, axis=0), op.Gather(parts, 2, axis=0)
        scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 2, 4, 3])), op.Constant(value_float=scale))
        o = op.Transpose(op.MatMul(op.Softmax(scores, axis=-1), v), perm=[0, 3, 1, 2, 4])  # (B, T, S, heads, D)
        return op.CastLike(op.Reshape(o, op.Concat(bts, op.Constant(value_ints=[-1]), axis=0)), qkv)

    return [f.to_function_proto() for f in (GroupNorm, BiasGroupNorm, TemporalAttention)]


def _translations() -> dict:
    """torch.ops.stunet.* -> stunet-domain nodes, for ``torch.onnx.export(custom_translation_table=...)``."""
    from onnxscript.values import Opset

    _register_schemas()
    from ..kernels import ops  # noqa: F401  (registers torch.ops.stunet.*)

    domain = Opset(DOMAIN, 1)

    def group_norm(x, num_groups: int, weight, bias, eps: float, scope: str, silu: bool, input_bias=None):
        attrs = dict(num_groups=num_groups, eps=eps, per_clip=int(scope == "clip"), silu=int(silu))
        if input_bias is None:
            return domain.GroupNorm(x, weight, bias, **attrs)
        return domain.BiasGroupNorm(x, weight, bias, input_bias, **attrs)

    def temporal_attention(qkv, heads: int, bias=None, scale=None):
        if bias is not None:
            raise NotImplementedError("temporal attention with a bias has no ONNX node yet")
        head_dim = qkv.shape[-1] // 3 // heads  # the channel count is static
        return domain.TemporalAttention(qkv, heads=heads, scale=float(scale or 1.0 / math.sqrt(head_dim)))

    return {torch.ops.stunet.group_norm.default: group_norm,
            torch.ops.stunet.temporal_attention.default: temporal_attention}


def export_onnx(model: STUNet, path: str | os.PathLike, *, batch: int = 2, frames: int | None = None,
                height: int | None = None, width: int | None = None, text_len: int = 77, dynamic: bool = True,
                dtype: torch.dtype = torch.float32, check: bool = False, progress: bool = False) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` (written atomically; the model is not modified).

    ``batch``, ``frames``, ``height``, ``width``, ``text_len`` give the example geometry (defaults: the model's
    sample size, 2 clips, 77 tokens); with ``dynamic`` every one of them is a dynamic axis (frames and sides in
    multiples of the model's divisors). ``check`` runs the file with onnxruntime against the reference at
    two geometries and raises if it differs by more than the spec's tolerance (fp32). ``progress`` shows the
    stage that runs.
    """
    _require()
    from onnxscript import ir, optimizer

    check_flags(check=check, progress=progress)
    path, spec, module, args = prepare(model, path, ".onnx", device=torch.device("cpu"), batch=batch, frames=frames,
                                       height=height, width=width, text_len=text_len, dtype=dtype, dynamic=dynamic)
    result = ExportResult(path, spec)
    names = ["torch.onnx.export", "optimise and save", *(["check"] if check else [])]
    with Stages(f"export {path.name}", names, progress) as stages:
        with stages.stage("torch.onnx.export"), torch.no_grad(), exporter_chatter_silenced():
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes_tuple(spec),
                                        input_names=spec.input_names, output_names=spec.output_names,
                                        custom_translation_table=_translations(), opset_version=OPSET,
                                        optimize=False, verbose=False)
        with stages.stage("optimise and save"):
            onnx_model = program.model  # the exporter's IR: weights still the model's tensors, not copied
            for function in _functions():
                ir_function = ir.serde.deserialize_function(function)
                onnx_model.functions[ir_function.identifier()] = ir_function
            onnx_model.opset_imports.setdefault(DOMAIN, 1)
            # Fold the exporter's shape arithmetic and its SplitToSequence/SequenceAt pairs into plain ops
            # (TensorRT's parser has no sequences); the stunet nodes and their functions stay as they are.
            optimizer.optimize(onnx_model, num_iterations=1, inline=False, onnx_shape_inference=False)
            onnx_model.metadata_props[SPEC_KEY] = spec.to_json()  # build_engine's default profiles
            if _weight_bytes(onnx_model) >= EXTERNAL_DATA_BYTES:
                result.external_data = path.with_name(path.name + ".data")
                with atomic_files(result.external_data, path) as folder:
                    ir.save(onnx_model, folder / path.name, external_data=result.external_data.name)
            else:
                with atomic_path(path) as tmp:
                    ir.save(onnx_model, tmp)
                stale = path.with_name(path.name + ".data")
                if stale.is_file():  # the weights of the file just replaced, which held them outside
                    stale.unlink()
                    log.info("stunet export: removed %s, the external weights of the file %s replaced", stale,
                             path.name)
        if check:
            with stages.stage("check"):
                result.max_abs_error = check_onnx(path, model, spec)
    return result


def _weight_bytes(onnx_model) -> int:
    """The bytes of the model's initializers (what decides whether its file fits one protobuf message)."""
    return sum(v.const_value.nbytes for v in onnx_model.graph.initializers.values() if v.const_value is not None)


def check_onnx(path: str | os.PathLike, model: STUNet, spec: ExportSpec, geometries=None) -> float:
    """Run the ONNX file with onnxruntime (CPU) against the fp32 reference on the same weights at the spec's
    geometry and, for a dynamic export, a second one; the worst |difference|. Raises beyond the tolerance."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX file at {str(path)!r} (make one with stunet.export.export_onnx or "
                                "`stunet export onnx`)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feeds = {name: (t.float() if t.dtype == torch.bfloat16 else t).numpy()
                 for name, t in zip(spec.input_names, inputs)}
        return torch.from_numpy(session.run(None, feeds)[0])

    worst = compare(run, model, spec, f"ONNX file {str(path)!r}", geometries, device=torch.device("cpu"))
    log.info("stunet export: %s matches the reference to %.3g", path, worst)
    return worst
