"""The TensorRT route, as far as a machine without a GPU can check it.

- The plugin kernels (``stunet.kernels.plugin``) run in Triton's interpreter, launched in TensorRT's AOT
  parameter order (inputs, int32 scalars, outputs) over the plugin's own grid, and match the ops' references.
- They compile to PTX for sm_86, sm_90, sm_100 and sm_120 whose entry has exactly that parameter list (no
  scratch pointers) and whose shared memory fits every targeted GPU, and the PTX assembles with ptxas.
- With TensorRT-RTX installed, an engine of the tiny model builds from its exported ONNX without a GPU, with
  the export spec beside it that the tensorrt backend checks a model against.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import tiny_model

import stunet
from stunet.cli import main
from stunet.kernels import _triton, group_norm_ref, temporal_attention_ref
from stunet.kernels.temporal_attn import SHARED_MEMORY_PER_BLOCK

needs_triton = pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")


def _gn_dims(x):
    B, C, T, H, W = x.shape
    return dict(B=B, C=C, T=T, HW=H * W)


@needs_triton
@pytest.mark.parametrize("B,C,G,T,H,W", [(1, 8, 2, 1, 3, 5), (2, 12, 3, 5, 4, 4), (1, 16, 4, 3, 33, 33)])
@pytest.mark.parametrize("per_clip", [False, True])
@pytest.mark.parametrize("input_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_group_norm_plugin_kernel_matches_reference(B, C, G, T, H, W, per_clip, input_bias, dtype):
    from stunet.kernels.plugin import group_norm_plugin

    g = torch.Generator().manual_seed(B * C + T)
    x = (torch.randn(B, C, T, H, W, generator=g) * 3 + 1).to(dtype)
    weight, bias = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
    ibias = torch.randn(B, C, generator=g).to(dtype) if input_bias else None
    silu = per_clip != input_bias
    kernel = group_norm_plugin("fp16" if dtype == torch.float16 else "fp32", num_groups=G, eps=1e-5,
                               per_clip=per_clip, silu=silu, input_bias=input_bias)
    y = torch.full_like(x, float("nan"))
    tensors = dict(x=x, weight=weight, bias=bias, y=y, **({"ibias": ibias} if input_bias else {}))
    kernel.launch(tensors, _gn_dims(x))
    want = group_norm_ref(x, G, weight, bias, 1e-5, "clip" if per_clip else "frame", silu, ibias)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.float(), want.float(), atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("B,T,S,heads,D", [(1, 1, 3, 1, 8), (2, 5, 7, 2, 16), (1, 17, 4, 3, 24), (1, 70, 2, 1, 32)])
@pytest.mark.parametrize("static_frames", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_temporal_attention_plugin_kernel_matches_reference(B, T, S, heads, D, static_frames, dtype):
    from stunet.kernels.plugin import temporal_attention_plugin

    C = heads * D
    qkv = torch.randn(B, T, S, 3 * C, generator=torch.Generator().manual_seed(T)).to(dtype)
    scale = 0.7 / D ** 0.5
    kernel = temporal_attention_plugin("fp16" if dtype == torch.float16 else "fp32", channels=C, heads=heads,
                                       scale=scale, frames=T if static_frames else None)
    out = torch.full((B, T, S, C), float("nan"), dtype=dtype)
    kernel.launch(dict(qkv=qkv, out=out), dict(T=T, S=S, num_seq=B * S, C=C))
    want = temporal_attention_ref(qkv, heads, scale=scale)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


def _plugin_variants():
    from stunet.kernels.plugin import group_norm_plugin, temporal_attention_plugin

    for dtype in ("fp16", "fp32"):
        for per_clip, silu, ibias in ((False, True, False), (True, False, False), (False, True, True)):
            yield (f"gn-{dtype}-clip{int(per_clip)}-ibias{int(ibias)}",
                   group_norm_plugin(dtype, num_groups=32, eps=1e-6, per_clip=per_clip, silu=silu, input_bias=ibias))
        for frames in (16, 80, None):
            yield (f"attn-{dtype}-T{frames}",
                   temporal_attention_plugin(dtype, channels=512, heads=8, scale=0.125, frames=frames))


def compile_all(arch: int) -> list[dict]:
    """Each plugin kernel compiled for sm_<arch>: its entry's parameter kinds, the plugin's order, and whether
    ptxas assembles the (rewritten) PTX. Run without TRITON_INTERPRET."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    from stunet.kernels.plugin import compile_plugin

    ptxas = get_ptxas(arch).path
    rows = []
    for name, kernel in _plugin_variants():
        compiled = compile_plugin(kernel, arch)
        target = re.search(r"\.target\s+(sm_\w+)", compiled.ptx).group(1)  # sm_90a: Hopper's full PTX
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(compiled.ptx)
            run = subprocess.run([ptxas, f"-arch={target}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True)
        wanted = ["ptr"] * len(kernel.inputs) + ["u32"] * len(kernel.scalars) + ["ptr"] * len(kernel.outputs)
        rows.append(dict(name=name, entry=compiled.name, params=list(compiled.params), wanted=wanted,
                         ptxas=run.returncode, stderr=run.stderr[-500:], target=target.rstrip("a") == f"sm_{arch}",
                         shared=compiled.shared))
    return rows


@needs_triton
@pytest.mark.parametrize("arch", [86, 90, 100, 120])
def test_plugin_kernels_compile_to_ptx_in_the_plugin_parameter_order(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_tensorrt import compile_all; print(json.dumps(compile_all({arch})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 12
    for row in rows:
        assert row["params"] == row["wanted"], row["name"]
        assert row["target"] and row["ptxas"] == 0, (row["name"], row["stderr"])
        assert row["shared"] <= SHARED_MEMORY_PER_BLOCK[arch], (row["name"], row["shared"])


# -- engines ------------------------------------------------------------------------------------------------------
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    from stunet.export import export_onnx

    model = tiny_model()
    path = tmp_path_factory.mktemp("trt") / "tiny16.onnx"
    return model, export_onnx(model, path, batch=2, frames=8, height=16, width=16, text_len=5, dtype=torch.float16)


def test_the_onnx_file_carries_its_spec_and_the_profile_spans_its_ranges(fp16_export):
    from stunet.export import ExportSpec, profile_shapes, read_spec

    model, result = fp16_export
    spec = read_spec(result.path)
    assert spec == result.spec and ExportSpec.from_json(spec.to_json()) == spec
    shapes = profile_shapes(spec)
    assert shapes["x"] == ((1, 3, 2, 4, 4), (2, 3, 8, 16, 16), (4, 3, 32, 64, 64))  # min, export geometry, max
    assert shapes["text_embeds"] == ((1, 1, 24), (2, 5, 24), (4, 20, 24))
    assert set(shapes) == set(spec.input_names)
    static = profile_shapes(ExportSpec.for_model(model.config, frames=8, height=16, width=16, dynamic=False))
    assert all(lo == opt == hi for lo, opt, hi in static.values())
    ssr = ExportSpec.for_model(stunet.STUNetConfig.from_preset("tiny", noise_aug=True, low_res_size=8,
                                                               in_channels=6), dynamic=False)
    assert "noise_level" in profile_shapes(ssr)


def test_inlined_network_is_what_the_reference_computes(fp16_export):
    """TensorRT-RTX parses the file with its stunet nodes inlined: that network, run by onnxruntime, matches
    the fp32 reference within fp16 error."""
    ort = pytest.importorskip("onnxruntime")
    from stunet.export.spec import compare
    from stunet.export.tensorrt import _inline_stunet_functions

    model, result = fp16_export
    proto = _inline_stunet_functions(onnx.load(str(result.path)))
    assert not any(n.domain == "stunet" for n in proto.graph.node) and not proto.functions
    # Basic graph optimisations only: the extended ones fuse the two forms differently on some onnxruntime
    # releases (1.23: 2e-3 apart in fp16), which would hide whether inlining computes exactly the same.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    inlined = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with_functions = ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])

    def runner(session):
        def run(*inputs):
            feeds = {name: t.numpy() for name, t in zip(result.spec.input_names, inputs)}
            return torch.from_numpy(session.run(None, feeds)[0])
        return run

    inputs = result.spec.sample_inputs(seed=3)
    args = [inputs[name] for name in result.spec.input_names]
    assert torch.equal(runner(inlined)(*args), runner(with_functions)(*args))
    assert compare(runner(inlined), model, result.spec, "inlined") < 1e-2  # fp16 rounding (5e-3 measured)


def test_plugin_route_names_the_namespace(fp16_export):
    from stunet.export.tensorrt_plugins import route_to_plugins

    _, result = fp16_export
    proto = route_to_plugins(onnx.load(str(result.path)))
    nodes = [n for n in proto.graph.node if n.domain == "stunet"]
    assert nodes and all(onnx.helper.get_node_attr_value(n, "plugin_namespace") == b"stunet" for n in nodes)
    assert route_to_plugins(proto).SerializeToString() == proto.SerializeToString()  # idempotent


def test_tiny_engine_builds_without_a_gpu(fp16_export, tmp_path):
    """TensorRT-RTX's ahead-of-time build on a machine with no GPU: a strongly typed FP16 engine of the
    exported tiny model for two compute capabilities, with the spec's profile."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from stunet.export import build_engine, plan_spec_path, profile_shapes, read_plan_spec

    _, result = fp16_export
    plan = tmp_path / "tiny.plan"
    built = build_engine(result.path, plan, compute_capabilities=[86, 89], toolkit_name="tensorrt-rtx")
    assert plan.is_file() and plan.stat().st_size == built.bytes > 1_000_000
    assert built.toolkit == "tensorrt-rtx" and built.compute_capabilities == [86, 89]
    assert built.profiles == [profile_shapes(result.spec)]
    assert not list(tmp_path.glob("*.onnx")) and not list(result.path.parent.glob("tmp*"))  # no leftovers
    assert built.spec == result.spec == read_plan_spec(plan) and plan_spec_path(plan).name == "tiny.plan.json"


def test_a_plan_records_its_spec_and_the_backend_refuses_another_architecture(fp16_export, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    from stunet.backends import TensorRTBackend, make_backend
    from stunet.export import build_engine, plan_spec_path, profile_shapes, read_plan_spec

    model, result = fp16_export
    plan = build_engine(result.path, tmp_path / "tiny.plan", compute_capabilities=[86],
                        toolkit_name="tensorrt-rtx").path
    other = tiny_model(temporal_attn_depth=2)
    with pytest.raises(ValueError, match=r"was built from another architecture \(the config in tiny.plan.json"):
        make_backend(other, "tensorrt", engine=plan)
    reasons = " ".join(TensorRTBackend.unsupported(model, engine=plan))
    assert "another architecture" not in reasons
    # A plan rebuilt at the same path from a file without a spec (explicit profiles) leaves no stale spec behind.
    # That file keeps its weights beside it, as a model past 2 GB does: the build finds them there.
    proto = onnx.load(str(result.path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare), save_as_external_data=True, location="bare.onnx.data")
    built = build_engine(bare, plan, profiles=[profile_shapes(result.spec)], compute_capabilities=[86],
                         toolkit_name="tensorrt-rtx")
    assert built.bytes > 1_000_000 and sorted(p.name for p in tmp_path.iterdir()) == [
        "bare.onnx", "bare.onnx.data", "tiny.plan"]
    (tmp_path / "bare.onnx.data").rename(tmp_path / "elsewhere.data")  # the .onnx copied without its weights
    with pytest.raises(FileNotFoundError, match=r"keeps its weights in bare.onnx.data, which is not beside it"):
        build_engine(bare, tmp_path / "other.plan", profiles=[profile_shapes(result.spec)], compute_capabilities=[86],
                     toolkit_name="tensorrt-rtx")
    assert built.spec is None and read_plan_spec(plan) is None and not plan_spec_path(plan).exists()
    assert "another architecture" not in " ".join(TensorRTBackend.unsupported(other, engine=plan))


def test_an_unreadable_export_spec_is_named(tmp_path):
    from stunet.export import ExportSpec, read_plan_spec

    for text in ("{not json", "[]", '{"config": {}}'):
        with pytest.raises(ValueError, match=r"ExportSpec.from_json: not an export spec \(\w+: .*\); export the model"):
            ExportSpec.from_json(text)
    (tmp_path / "m.plan").write_bytes(b"plan")
    (tmp_path / "m.plan.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"engine: the export spec beside it, '.*m.plan.json', is unreadable"):
        read_plan_spec(tmp_path / "m.plan")


def test_build_engine_refuses_bad_requests(fp16_export, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    from stunet.export import build_engine, export_onnx

    model, result = fp16_export
    with pytest.raises(FileNotFoundError, match="onnx_path: no ONNX file"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "a.plan")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="onnx_path: .*junk.onnx' is not an ONNX model"):
        build_engine(tmp_path / "junk.onnx", tmp_path / "a.plan")
    with pytest.raises(ValueError, match="must end in .plan or .engine"):
        build_engine(result.path, tmp_path / "a.bin")
    with pytest.raises(TypeError, match="fp16 must be True or False, got 'no'"):
        build_engine(result.path, tmp_path / "a.plan", fp16="no")
    with pytest.raises(ValueError, match="builds for .*got \\[90\\]"):
        build_engine(result.path, tmp_path / "a.plan", compute_capabilities=[90], toolkit_name="tensorrt-rtx")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU here to build for; name the targets"):
            build_engine(result.path, tmp_path / "a.plan", toolkit_name="tensorrt-rtx")
    with pytest.raises(ValueError, match="profiles\\[0\\] must give every input"):
        build_engine(result.path, tmp_path / "a.plan", profiles=[{"x": ((1,), (1,), (1,))}], compute_capabilities=[86],
                     toolkit_name="tensorrt-rtx")
    x = ((1, 3, 8, 16, 16), (1, 3, 8, 16, 16), (1, 3, 4, 16, 16))
    bad = {"x": x, "timesteps": ((1,),) * 3, "text_embeds": ((1, 5, 24),) * 3, "text_mask": ((1, 5),) * 3}
    with pytest.raises(ValueError, match="min <= opt <= max"):
        build_engine(result.path, tmp_path / "a.plan", profiles=[bad], compute_capabilities=[86],
                     toolkit_name="tensorrt-rtx")
    for shapes, message in [(x[:2], "got"), ((x[0][:4],) * 3, "of 5 positive integers each"),
                            (((1, 3, 0, 16, 16),) * 3, "positive integers"), ((*x[:2], (1, 3, 8.0, 16, 16)), "got")]:
        with pytest.raises(ValueError, match=r"profiles\[0\]\['x'\] must be \(min, opt, max\) shapes.*" + message):
            build_engine(result.path, tmp_path / "a.plan", profiles=[{**bad, "x": shapes}], compute_capabilities=[86],
                         toolkit_name="tensorrt-rtx")
    with pytest.raises(ValueError, match="profiles must be a non-empty list of"):
        build_engine(result.path, tmp_path / "a.plan", profiles=[list(bad.items())], compute_capabilities=[86],
                     toolkit_name="tensorrt-rtx")
    for workspace in (0, -1, "4", float("nan")):
        with pytest.raises(ValueError, match="workspace_gb must be a positive number of GiB"):
            build_engine(result.path, tmp_path / "a.plan", workspace_gb=workspace)
    with pytest.raises(ValueError, match="toolkit must be one of"):
        build_engine(result.path, tmp_path / "a.plan", toolkit_name="trt")
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", frames=8, height=16, width=16, text_len=5, dynamic=False)
    with pytest.raises(ValueError, match="is float32: export it with dtype=torch.float16"):
        build_engine(fp32.path, tmp_path / "a.plan", compute_capabilities=[86], toolkit_name="tensorrt-rtx")
    assert not list(tmp_path.glob("*.plan"))


def test_tensorrt_backend_says_what_it_needs():
    from stunet.backends import make_backend

    with pytest.raises(ValueError, match="needs engine=PATH") as err:
        make_backend(tiny_model(), "tensorrt")
    if not torch.cuda.is_available():
        assert "TensorRT engines run on CUDA; the model is on cpu" in str(err.value)


def test_cli_builds_an_engine(fp16_export, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx_bindings")
    _, result = fp16_export
    plan = tmp_path / "tiny.plan"
    assert main(["export", "tensorrt", str(result.path), "-o", str(plan), "--sm", "86"]) == 0
    err = capsys.readouterr().err
    assert plan.is_file() and "tensorrt-rtx" in err and f"its export spec {plan}.json" in err
    assert f"build {plan.name}: parse (1/2)" in err and f"build {plan.name}: tensorrt-rtx build (2/2)" in err
    for argv, message in (([str(result.path), "-o", str(plan), "--sm", "86"], "exists; pass --overwrite"),
                          ([str(tmp_path / "no.onnx"), "-o", str(tmp_path / "b.plan")], "argument ONNX: no file"),
                          ([str(result.path), "-o", str(tmp_path / "b.txt")], "ending in .plan or .engine"),
                          ([str(result.path), "-o", str(tmp_path / "b.plan"), "--sm", "90"], "got \\[90\\]")):
        with pytest.raises(SystemExit) as exit_:
            main(["export", "tensorrt", *argv])
        assert exit_.value.code == 2
        assert re.search(message, capsys.readouterr().err), message


@pytest.mark.gpu
def test_gpu_engine_matches_the_reference(fp16_export, tmp_path):
    """On a GPU with a toolkit that runs there (TensorRT 10.9+ anywhere; TensorRT-RTX not on SM 9.0)."""
    from stunet.backends import make_backend
    from stunet.export import build_engine
    from stunet.export.spec import compare

    try:
        from stunet.export.tensorrt import toolkit

        name, _ = toolkit()
    except ImportError as e:
        pytest.skip(str(e))
    if name == "tensorrt-rtx" and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("TensorRT-RTX has no SM 9.0 target")
    model, result = fp16_export
    plan = build_engine(result.path, tmp_path / "tiny.plan").path
    backend = make_backend(model.to("cuda"), "tensorrt", engine=plan)
    assert compare(backend, model, result.spec, "engine", device=torch.device("cuda")) < 5e-3
    axes = result.spec.axes()
    inputs = result.spec.sample_inputs(frames=axes["frames"].max + axes["frames"].divisor)
    with pytest.raises(ValueError, match=r"x: shape .* is outside the engine's profile"):
        backend(inputs["x"].cuda(), inputs["timesteps"].cuda(), inputs["text_embeds"].cuda())
