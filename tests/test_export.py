"""ONNX export: parity with the reference in onnxruntime (CPU), dynamic axes, the stunet-domain nodes and the
local functions that give them meaning, fp16, and the command line."""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from utils import current_umask, left_in_temp, tiny_model

import stunet
from stunet.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from stunet.backends.base import converted_copy  # noqa: E402
from stunet.export import ExportSpec, check_onnx, export_onnx  # noqa: E402
from stunet.export.spec import compare  # noqa: E402


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    model = tiny_model()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    result = export_onnx(model, path, batch=2, frames=8, height=16, width=16, text_len=5, check=True)
    return model, result


def test_tiny_matches_the_reference_at_several_geometries(tiny_export):
    model, result = tiny_export
    assert result.max_abs_error <= 1e-4
    # One file, two frame counts and two resolutions (non-square), batch 1 and 3.
    geometries = [dict(batch=1, frames=4, height=16, width=16), dict(batch=3, frames=12, height=24, width=32,
                                                                    text_len=9)]
    assert check_onnx(result.path, model, result.spec, geometries) <= 1e-4


def test_a_check_refuses_what_it_cannot_compare(tiny_export, tmp_path):
    """A check against another architecture's model, at a geometry the file does not take, or without the file
    or its spec is refused by name (a parity failure of 2, onnxruntime's Reshape error, its NO_SUCHFILE error)."""
    model, result = tiny_export
    other = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", model_channels=24))
    for args, error, message in [
        ((result.path, other, result.spec), ValueError, "was exported from another architecture than this model's"),
        ((result.path, model, result.spec, [dict(frames=3)]), ValueError,
         r"cannot run at \{'frames': 3\}: frames 3 \(dynamic: \d+\.\.\d+ in steps of 2\)"),
        ((result.path, model, result.spec, [dict(fps=16)]), ValueError, "geometries must be dicts of sizes by"),
        ((result.path, model, result.spec.to_json()), TypeError, "spec must be the artifact's ExportSpec"),
        ((tmp_path / "none.onnx", model, result.spec), FileNotFoundError, "no ONNX file at"),
    ]:
        with pytest.raises(error, match=message):
            check_onnx(*args)


def test_stunet_nodes_carry_local_functions(tiny_export):
    model, result = tiny_export
    proto = onnx.load(str(result.path))
    nodes = Counter(n.op_type for n in proto.graph.node if n.domain == "stunet")
    functions = {(f.domain, f.name) for f in proto.functions}
    assert functions == {("stunet", "GroupNorm"), ("stunet", "BiasGroupNorm"), ("stunet", "TemporalAttention")}
    norms = sum(isinstance(m, stunet.model.VideoGroupNorm) for m in model.modules())
    res_blocks = sum(isinstance(m, stunet.model.ResBlock) for m in model.modules())
    assert nodes["GroupNorm"] + nodes["BiasGroupNorm"] == norms and nodes["BiasGroupNorm"] == res_blocks
    assert nodes["TemporalAttention"] == model.config.temporal_attn_depth
    assert {i.name for i in proto.graph.input} == {"x", "timesteps", "text_embeds", "text_mask"}
    assert [o.name for o in proto.graph.output] == ["sample"]
    assert any(o.domain == "stunet" for o in proto.opset_import)
    assert next(o.version for o in proto.opset_import if o.domain == "") >= 18
    onnx.checker.check_model(proto)


def test_the_functions_alone_compute_the_kernel_ops_semantics(tmp_path):
    """A one-node model per stunet op: onnxruntime runs it through the local function."""
    from onnx import TensorProto, helper

    from stunet import kernels
    from stunet.export.onnx import _functions

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 4, 5, generator=g)
    w, b, bias_in = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(2, 8, generator=g)
    qkv = torch.randn(2, 5, 6, 3 * 16, generator=g)
    cases = [
        ("GroupNorm", [x, w, b], dict(num_groups=4, eps=1e-5, per_clip=0, silu=1),
         kernels.group_norm_ref(x, 4, w, b, silu=True)),
        ("GroupNorm", [x, w, b], dict(num_groups=2, eps=1e-5, per_clip=1, silu=0),
         kernels.group_norm_ref(x, 2, w, b, scope="clip")),
        ("BiasGroupNorm", [x, w, b, bias_in], dict(num_groups=4, eps=1e-5, per_clip=0, silu=1),
         kernels.group_norm_ref(x, 4, w, b, silu=True, input_bias=bias_in)),
        ("TemporalAttention", [qkv], dict(heads=2, scale=0.25), kernels.temporal_attention_ref(qkv, 2, scale=0.25)),
    ]
    for name, inputs, attrs, want in cases:
        names = [f"in{i}" for i in range(len(inputs))]
        node = helper.make_node(name, names, ["out"], domain="stunet", **attrs)
        graph = helper.make_graph([node], name, [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(t.shape))
                                                 for n, t in zip(names, inputs)],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
        # IR 10, as the exporter writes: helper's default is the onnx library's newest, which an older
        # onnxruntime refuses (onnx 1.23 writes IR 14, onnxruntime 1.30 reads up to 13).
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("stunet", 1)],
                                  functions=_functions(), ir_version=10)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
        np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-5, err_msg=f"{name} {attrs}")


def test_odd_frames_non_square_ssr_model_with_noise_level(tmp_path):
    """A model without temporal resampling (any T): 5 frames, 16x24, an SSR model's noise_level input."""
    model = tiny_model(in_channels=6, noise_aug=True, low_res_size=8, temporal_downsample=(False, False),
                   temporal_attn_depth=0)
    result = export_onnx(model, tmp_path / "ssr.onnx", batch=2, frames=5, height=16, width=24, text_len=4,
                         check=True)
    assert result.max_abs_error <= 1e-4
    assert check_onnx(result.path, model, result.spec, [dict(frames=7, height=8, width=32)]) <= 1e-4
    names = [i.name for i in onnx.load(str(result.path)).graph.input]
    assert names == ["x", "timesteps", "text_embeds", "text_mask", "noise_level"]


def test_a_converted_modelscope_unet_exports_with_its_clip_wide_norms(tmp_path):
    """A ZeroScope-shaped model converted from diffusers: ModelScope's temporal conv stacks (GroupNorm over the
    whole clip: per_clip nodes), transformer-form temporal attention (also after conv_in) and GEGLU."""
    pytest.importorskip("diffusers")
    from diffusers_models import unet3d

    from stunet.convert import from_diffusers

    model = from_diffusers(unet3d())
    result = export_onnx(model, tmp_path / "zeroscope.onnx", batch=2, frames=8, height=16, width=16, text_len=5,
                         check=True)
    assert result.max_abs_error <= 1e-4
    norms = Counter(onnx.helper.get_node_attr_value(n, "per_clip") for n in onnx.load(str(result.path)).graph.node
                    if n.domain == "stunet" and n.op_type.endswith("GroupNorm"))
    assert norms[1] and norms[0]  # clip-wide and per-frame statistics both in the file


def test_fp16_export_runs(tmp_path):
    model = tiny_model()
    result = export_onnx(model, tmp_path / "fp16.onnx", batch=1, frames=4, height=16, width=16, text_len=3,
                         dtype=torch.float16, dynamic=False)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    inputs = result.spec.sample_inputs()
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    want = model(inputs["x"].float(), inputs["timesteps"], inputs["text_embeds"].float(), inputs["text_mask"])
    assert got.dtype == np.float16 and got.shape == tuple(want.shape)
    assert np.abs(got.astype(np.float32) - want.detach().numpy()).max() < 2e-2
    for p in model.parameters():
        assert p.dtype == torch.float32  # the caller's model is not converted


def test_a_model_past_protobufs_limit_keeps_its_weights_beside_the_file(tmp_path, monkeypatch, capsys):
    """A model past 2 GB does not fit one protobuf message: its weights go to one external-data file beside the
    .onnx, the pair is written atomically and runs in onnxruntime. The limit is lowered to the tiny model here;
    lumiere-base in fp16 (3.0 GB of weights) exports the same way."""
    import stat

    import stunet.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1)
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    out, data = tmp_path / "out" / "big.onnx", tmp_path / "out" / "big.onnx.data"
    out.parent.mkdir()
    assert main(["export", "onnx", str(tmp_path / "m"), "-o", str(out), "--frames", "4", "--height", "16",
                 "--width", "16", "--text-len", "3", "--batch", "1", "--static", "--check", "-q"]) == 0
    assert f"its weights are in {data}, which must stay beside it" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]  # no leftovers
    proto = onnx.load(str(out), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(dict((e.key, e.value) for e in t.external_data)["location"] == data.name
                            for t in external)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (out, data)} == {0o666 & ~current_umask()}

    # A write that fails leaves the pair as it was, and nothing beside it.
    before = {p: p.read_bytes() for p in (out, data)}
    from onnxscript import ir

    save = ir.save

    def full_disk(model, f, **kwargs):
        save(model, f, **kwargs)
        raise OSError("No space left on device")

    other = tiny_model()  # other weights, so a file written over the old one would differ from it
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    monkeypatch.setattr(ir, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(other, out, batch=1, frames=4, height=16, width=16, text_len=3, dynamic=False)
    assert {p: p.read_bytes() for p in (out, data)} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]

    # A model under the limit written over the pair holds its weights inline, and the stale weights file goes.
    monkeypatch.undo()
    export_onnx(other, out, batch=1, frames=4, height=16, width=16, text_len=3, dynamic=False, check=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx"]


def test_export_arguments_are_checked(tmp_path, monkeypatch, capsys):
    import onnxscript

    model = tiny_model()
    with monkeypatch.context() as patch:  # an onnxscript the exporter of this torch cannot use
        patch.setattr(onnxscript, "__version__", "0.5.7")
        with pytest.raises(ImportError, match=r"onnxscript>=0.6.2, found 0.5.7: pip install -U 'stunet\[export\]'"):
            export_onnx(model, tmp_path / "m.onnx")
        model.save_pretrained(tmp_path / "m")
        with pytest.raises(SystemExit) as info:
            main(["export", "onnx", str(tmp_path / "m"), "-o", str(tmp_path / "m.onnx")])
        assert info.value.code == 2 and "needs onnxscript>=0.6.2" in capsys.readouterr().err
        assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match="path must end in .onnx"):
        export_onnx(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="frames must be a positive multiple of 2"):
        export_onnx(model, tmp_path / "m.onnx", frames=3)
    for axis, divisor in (("frames", 2), ("height", 4), ("width", 4)):  # 0 is a size, not "the default" (None)
        with pytest.raises(ValueError, match=f"{axis} must be a positive multiple of {divisor} for this model, got 0"):
            ExportSpec.for_model(model.config, **{axis: 0})
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        ExportSpec.for_model(model.config, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        ExportSpec.for_model(model.config, batch=0)
    # an array for the dtype was "truth value ... ambiguous"; a batch of 10**30 torch.randn's overflow
    with pytest.raises(ValueError, match=r"dtype must be float32, float16 or bfloat16, got an array of shape \(2,"):
        ExportSpec.for_model(model.config, dtype=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"batch x channels x frames x height x width = 10{30} x 3 x .* is past any "):
        export_onnx(model, tmp_path / "m.onnx", batch=10 ** 30)
    with pytest.raises(ValueError, match=rf"batch x text_len x text_dim = 2 x {2 ** 40} x 24 is past any device"):
        ExportSpec.for_model(model.config, text_len=2 ** 40)
    # an on/off option must be a bool: "no" would read as true
    with pytest.raises(TypeError, match="dynamic must be True or False, got 'no'"):
        export_onnx(model, tmp_path / "m.onnx", dynamic="no")
    for route, path in ((export_onnx, "m.onnx"), (stunet.export.export_aoti, "m.pt2")):
        for flag in ("check", "progress"):
            with pytest.raises(TypeError, match=f"{flag} must be True or False, got 1"):
                route(model, tmp_path / path, **{flag: 1})
    assert not list(tmp_path.glob("m.*"))


def test_an_export_out_of_memory_says_where_and_what_needs_less(tmp_path, monkeypatch, capsys):
    """The CPU allocator's refusal (a plain RuntimeError) while an export builds its example inputs is the
    OutOfMemoryError the pipeline raises, naming the geometry; `stunet export` prints it and exits 1, writing
    nothing."""
    def refused(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 412316860416 bytes. Error code 12 (Cannot allocate memory)")

    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(ExportSpec, "sample_inputs", refused)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        export_onnx(model, tmp_path / "m.onnx", batch=3)
    assert str(raised.value) == (
        "the CPU could not allocate 384 GiB\nstunet: out of memory in the export's copy of the model and its "
        "example inputs (batch 3, 8 frames of 16x16, 77 text tokens); to need less: a smaller example geometry "
        "(batch, frames, height, width, text_len: a dynamic export still runs at other sizes within its ranges)")
    assert main(["export", "onnx", str(tmp_path / "m"), "-o", str(tmp_path / "m.onnx"), "-q"]) == 1
    assert "stunet: out of memory in the export's copy" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_spec_geometry_errors_name_the_axis_and_its_range():
    cfg = stunet.STUNetConfig.from_preset("tiny")  # frames in steps of 2, sides in steps of 4
    static = ExportSpec.for_model(cfg, batch=2, frames=8, height=16, width=16, text_len=77, dynamic=False)
    assert static.geometry_errors(batch=2, frames=8, height=16, width=16, text_len=77) == []
    assert static.geometry_errors(batch=1, frames=16, text_len=77) == ["batch 1 (static: 2)", "frames 16 (static: 8)"]
    dynamic = ExportSpec.for_model(cfg, batch=2, frames=8, height=16, width=16, text_len=5)
    assert dynamic.geometry_errors(batch=1, frames=32, height=4, width=64, text_len=20) == []
    assert dynamic.geometry_errors(batch=5, frames=6, height=68, width=18, text_len=21) == [
        "batch 5 (dynamic: 1..4)", "height 68 (dynamic: 4..64 in steps of 4)",
        "width 18 (dynamic: 4..64 in steps of 4)", "text_len 21 (dynamic: 1..20)"]


def test_a_dynamic_export_traces_every_axis_at_two_steps_or_more(tmp_path, monkeypatch, capsys):
    """torch.export turns a size of 1 into a constant: an export asked for at one step of an axis (batch 1, one
    frame step, one token) traces at two, and its ranges still start at one step. A dynamic AOTInductor package
    cannot run one step of frames, sides or text, so it refuses such a geometry before any work; batch 1 it runs
    as a pair."""
    import stunet.export.aoti as aoti

    model = tiny_model()  # frames in steps of 2, sides in steps of 4
    one_step = dict(batch=1, frames=2, height=4, width=4, text_len=1)
    spec = ExportSpec.for_model(model.config, **one_step)
    assert spec.trace_geometry() == dict(batch=2, frames=4, height=8, width=8, text_len=2)
    assert ExportSpec.for_model(model.config, dynamic=False, **one_step).trace_geometry() == one_step
    assert ExportSpec.for_model(model.config, batch=3, frames=6).trace_geometry()["batch"] == 3

    compiled = []  # the compile is not under test: torch.export of the batch-1 spec is

    def compile_stub(program, package_path, inductor_configs):
        compiled.append(program)
        Path(package_path).write_bytes(b"")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_stub)
    aoti.export_aoti(model, tmp_path / "b1.pt2", batch=1, frames=4, height=8, width=8, text_len=3)
    program = compiled[0]
    x = next(n for n in program.graph.nodes if n.name == program.graph_signature.user_inputs[0]).meta["val"]
    assert not all(isinstance(n, int) for n in x.shape[:1] + x.shape[2:]), x.shape  # batch, frames, sides dynamic
    for flag, size, least in (("frames", 2, 4), ("height", 4, 8), ("text_len", 1, 2)):
        with pytest.raises(ValueError, match=f"{flag} must be at least {least} for a dynamic AOTInductor package"):
            aoti.export_aoti(model, tmp_path / "short.pt2", **{**dict(frames=4, height=8, width=8, text_len=3),
                                                               flag: size})
    assert not (tmp_path / "short.pt2").exists() and len(compiled) == 1
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit) as info:
        main(["export", "aoti", str(tmp_path / "m"), "-o", str(tmp_path / "short.pt2"), "--frames", "2"])
    assert info.value.code == 2 and "argument --frames: frames must be at least 4 for a dynamic AOTInductor " \
        "package, got 2" in capsys.readouterr().err and len(compiled) == 1


def test_the_frame_range_stops_at_the_clip_length_the_model_was_trained_for():
    """AnimateDiff's motion modules know clips of up to 32 frames: a dynamic artifact of its 16-frame sample
    takes 2..32 frames (not 4x the sample), and its parity check runs within that range."""
    model = tiny_model(temporal_max_frames=12)
    spec = ExportSpec.for_model(model.config, batch=2, frames=8, height=16, width=16, text_len=5)
    assert (spec.axes()["frames"].min, spec.axes()["frames"].max) == (2, 12)
    assert spec.second_geometry() == dict(batch=1, frames=12, height=20, text_len=8)
    assert spec.geometry_errors(frames=14) == ["frames 14 (dynamic: 2..12 in steps of 2)"]
    at_the_limit = ExportSpec.for_model(model.config, frames=12, height=16, width=16, text_len=5)
    assert at_the_limit.second_geometry()["frames"] == 10
    with pytest.raises(ValueError, match="frames must be at most 12 for this model"):
        ExportSpec.for_model(model.config, frames=14)
    reference = converted_copy(model, torch.float32)
    assert compare(lambda *inputs: reference(*inputs), model, spec, "the reference itself") == 0


def test_cli_export_onnx(tmp_path, capsys, recwarn):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "m.onnx"
    exporter_log = []  # what torch.onnx.export logs about itself (torchvision's ops missing) stays out of the way
    handler = logging.Handler(logging.WARNING)
    handler.emit = exporter_log.append
    logging.getLogger("torch.onnx._internal.exporter._registration").addHandler(handler)
    try:
        # one step of every axis: traced at two steps (torch.export would fix sizes of 1), checked at this one
        assert main(["export", "onnx", str(tmp_path / "m"), "-o", str(out), "--frames", "2", "--height", "4",
                     "--width", "4", "--text-len", "1", "--batch", "1", "--check"]) == 0
    finally:
        logging.getLogger("torch.onnx._internal.exporter._registration").removeHandler(handler)
    assert not exporter_log, [r.getMessage() for r in exporter_log]
    chatter = [str(w.message) for w in recwarn if "axis name" in str(w.message) or "LeafSpec" in str(w.message)]
    assert not chatter, chatter
    err = capsys.readouterr().err
    assert out.is_file() and "max |onnx - reference|" in err
    at = [err.find(f"export m.onnx: {stage}") for stage in  # the progress line, stage by stage
          ("torch.onnx.export (1/3)", "optimise and save (2/3)", "check (3/3)", "done")]
    assert -1 not in at and at == sorted(at), err
    with pytest.raises(SystemExit) as info:
        main(["export", "onnx", str(tmp_path / "m"), "-o", str(out)])
    assert info.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["export", "onnx", str(tmp_path / "m"), "-o", str(tmp_path / "odd.onnx"), "--frames", "3"])
    assert info.value.code == 2 and "error: argument --frames: frames must be a positive multiple of 2" in \
        capsys.readouterr().err and not (tmp_path / "odd.onnx").exists()


def test_cli_export_says_when_the_artifact_fails_its_check(tmp_path, capsys, monkeypatch):
    import stunet.export

    progress = []

    def failing(model, path, **kwargs):
        progress.append(kwargs["progress"])
        path.write_bytes(b"")
        raise AssertionError("AOTInductor package 'm.pt2' differs from the reference by 1.4 (tolerance 0.0001)")

    tiny_model().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(stunet.export, "export_aoti", failing)
    assert main(["export", "aoti", str(tmp_path / "m"), "-o", str(tmp_path / "m.pt2"), "--check"]) == 1
    err = capsys.readouterr().err
    assert "stunet export: error: AOTInductor package 'm.pt2' differs from the reference by 1.4" in err
    assert "was written, but do not deploy it" in err and "Traceback" not in err
    assert main(["export", "aoti", str(tmp_path / "m"), "-o", str(tmp_path / "q.pt2"), "--check", "-q"]) == 1
    assert progress == [True, False]  # -q: no progress line


# -- AOTInductor ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_aoti_package_matches_the_reference_and_runs_as_a_backend(tiny_aoti_package):
    """The tiny model compiled ahead of time for the CPU (the ops' reference math compiled as C++)."""
    import zipfile

    from stunet.backends import make_backend
    from stunet.export import check_aoti

    model, result = tiny_aoti_package
    assert check_aoti(result.path, model, result.spec) <= 1e-4
    backend = make_backend(model, "aoti", package=result.path)
    inputs = result.spec.sample_inputs(seed=5)
    got = backend(inputs["x"], inputs["timesteps"], inputs["text_embeds"])  # no mask: every token attends
    want = model(inputs["x"], inputs["timesteps"], inputs["text_embeds"])
    assert (got - want).abs().max() <= 1e-4
    # The archive is rooted at the package's own name (not at the temporary file it was built as), and only the
    # package is left in its folder.
    assert {name.split("/")[0] for name in zipfile.ZipFile(result.path).namelist()} == {"tiny"}
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["tiny.pt2"]
    assert backend.spec == result.spec  # recorded in the package
    # A CFG pair made by expanding one latent (stride 0 over the batch) is read as the values it holds.
    pair = inputs["x"][:1].expand(2, *inputs["x"].shape[1:])
    got = backend(pair, inputs["timesteps"], inputs["text_embeds"])
    assert (got - model(pair.contiguous(), inputs["timesteps"], inputs["text_embeds"])).abs().max() <= 1e-4


class _StubRunner:
    """Stands in for a loaded package: records what it is called with, returns the sample's shape."""

    def __init__(self, spec):
        self.spec, self.calls = spec, []

    def get_metadata(self):
        from stunet.export import SPEC_KEY

        return {SPEC_KEY: self.spec.to_json(), "AOTI_DEVICE_KEY": "cpu"}

    def __call__(self, *inputs):
        self.calls.append(inputs)
        x = inputs[0]
        return torch.arange(x.shape[0], dtype=x.dtype)[:, None, None, None, None].expand(
            x.shape[0], self.spec.config.out_channels, *x.shape[2:]).clone()


def test_package_runs_only_where_it_was_compiled_to_be_right(tmp_path, monkeypatch, caplog):
    """A dynamic package is compiled for two steps of every axis up (torch.export specialises sizes 0 and 1):
    batch 1 runs as a pair (logged once), one step of another axis is refused; inputs reach it contiguous."""
    import stunet.export.aoti as aoti

    spec = ExportSpec.for_model(stunet.STUNetConfig.from_preset("tiny"), batch=2, frames=8, height=16, width=16,
                                text_len=5)
    stub = _StubRunner(spec)
    monkeypatch.setattr(aoti, "load_aoti", lambda path: stub)
    package = aoti.Package(tmp_path / "m.pt2")
    assert package.spec == spec and package.device == "cpu"

    inputs = spec.sample_inputs(batch=1)
    with caplog.at_level("WARNING", logger="stunet.export"):
        out = package(*(inputs[n] for n in spec.input_names))
        package(*(inputs[n] for n in spec.input_names))
    assert out.shape == (1, 3, 8, 16, 16) and [c[0].shape[0] for c in stub.calls] == [2, 2]
    assert all(torch.equal(c[0][0], c[0][1]) for c in stub.calls)  # the sample twice
    assert caplog.text.count("runs batch 1 as a pair") == 1

    x = spec.sample_inputs(batch=3)["x"].transpose(3, 4).contiguous().transpose(3, 4)  # same values, other strides
    rest = spec.sample_inputs(batch=3)
    package(x, *(rest[n] for n in spec.input_names[1:]))
    assert stub.calls[-1][0].is_contiguous() and torch.equal(stub.calls[-1][0], x)

    for geometry, named in (({"frames": 2}, "frames 2 (dynamic: 4..32 in steps of 2)"),
                            ({"height": 4}, "height 4 (dynamic: 8..64 in steps of 4)"),
                            ({"text_len": 1}, "text_len 1 (dynamic: 2..20)"),
                            ({"batch": 5}, "batch 5 (dynamic: 2..4)")):
        inputs = spec.sample_inputs(**geometry)
        with pytest.raises(ValueError, match=re.escape(named)):
            package(*(inputs[n] for n in spec.input_names))
    assert len(stub.calls) == 3  # nothing refused reached the package


@pytest.mark.slow
def test_aoti_backend_refuses_calls_and_models_the_package_was_not_compiled_for(tiny_aoti_package, monkeypatch):
    """A static package runs at its export's shapes only: anything else is an error naming the axis, never a
    silent run of the compiled shapes (which would read past the inputs' buffers)."""
    import stunet.export.aoti as aoti
    from stunet.backends import make_backend

    model, result = tiny_aoti_package
    backend = make_backend(model, "aoti", package=result.path)
    for geometry, named in (({"frames": 16}, "frames 16 (static: 8)"), ({"batch": 1}, "batch 1 (static: 2)"),
                            ({"height": 32}, "height 32 (static: 16)"), ({"text_len": 7}, "text_len 7 (static: 77)")):
        inputs = result.spec.sample_inputs(**geometry)
        with pytest.raises(ValueError, match=rf"was not compiled for {re.escape(named)}; export it at this geometry"):
            backend(inputs["x"], inputs["timesteps"], inputs["text_embeds"])
    with pytest.raises(ValueError, match=r"does not match the model: it computes in torch.float32, the model is "
                                         r"torch.float16"):
        make_backend(tiny_model().half(), "aoti", package=result.path)
    with pytest.raises(ValueError, match="compiled from another architecture"):
        make_backend(tiny_model(text_dim=32), "aoti", package=result.path)
    monkeypatch.setattr(aoti, "package_spec", lambda runner: None)
    with pytest.raises(ValueError, match="carries no stunet export spec"):
        make_backend(model, "aoti", package=result.path)


def test_aoti_export_refuses_a_wrong_path(tmp_path):
    from stunet.export import export_aoti

    model = tiny_model()
    with pytest.raises(ValueError, match="path must end in .pt2"):
        export_aoti(model, tmp_path / "m.onnx")


def test_aoti_backend_refuses_a_file_that_is_not_a_package(tmp_path, monkeypatch):
    """Refused by name before torch's loader sees it (which extracts a package into a temporary folder, and
    leaves that behind when it fails); an archive whose compiled model torch cannot load is torch's reason."""
    import zipfile

    from stunet.backends import make_backend

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with zipfile.ZipFile(tmp_path / "other.pt2", "w") as archive:
        archive.writestr("other/notes.txt", "a zip without a compiled model")
        archive.writestr("other/data/aotinductor/model/", "")  # its folder alone
    with zipfile.ZipFile(tmp_path / "broken.pt2", "w") as archive:
        archive.writestr("broken/data/aotinductor/model/c0.wrapper.so", b"not a shared library")
    with pytest.raises(ValueError, match=r"junk.pt2' is not an AOTInductor package \(a .pt2 is a zip archive\)"):
        make_backend(tiny_model(), "aoti", package=tmp_path / "junk.pt2")
    with pytest.raises(ValueError, match=r"other.pt2' cannot be loaded as an AOTInductor package \(the archive "
                                         r"holds no compiled model, data/aotinductor/model/\*\); rebuild"):
        make_backend(tiny_model(), "aoti", package=tmp_path / "other.pt2")
    assert left_in_temp(temp) == []
    with pytest.raises(ValueError, match=r"broken.pt2' cannot be loaded as an AOTInductor package \(.+\); rebuild"):
        make_backend(tiny_model(), "aoti", package=tmp_path / "broken.pt2")


@pytest.mark.gpu
def test_gpu_aoti_cuda_package_holds_the_kernels_and_matches_the_reference(tmp_path):
    """Built on CUDA, the package holds the Triton kernels (temporal attention, GroupNorm) and runs like the
    reference: fp32 within the spec's tolerance (TF32 off on both sides), fp16 within twice the fp16 reference's
    relative L2 error plus 1e-3 (the fast backend's bound)."""
    import copy
    import zipfile

    from stunet.backends import make_backend
    from stunet.backends.base import ieee_fp32
    from stunet.export import check_aoti, export_aoti

    model = tiny_model().cuda()
    geometry = dict(batch=2, frames=8, height=16, width=16, text_len=7)
    with ieee_fp32():
        result = export_aoti(model, tmp_path / "tiny.pt2", **geometry)  # dynamic: checked at two geometries
        assert check_aoti(result.path, model, result.spec) <= result.spec.tolerance
    archive = zipfile.ZipFile(result.path)
    sources = "".join(archive.read(n).decode(errors="ignore") for n in archive.namelist() if n.endswith(".cpp"))
    for kernel in ("_temporal_attn_fwd_kernel", "_gn_apply_kernel"):
        assert kernel in sources, f"{kernel} is not compiled into the package"

    half = copy.deepcopy(model).half()
    result16 = export_aoti(half, tmp_path / "tiny16.pt2", dtype=torch.float16, **geometry)
    backend = make_backend(half, "aoti", package=result16.path)
    inputs = {k: v.cuda() for k, v in result16.spec.sample_inputs(seed=3).items()}
    args = inputs["x"], inputs["timesteps"], inputs["text_embeds"], inputs["text_mask"]
    with torch.no_grad():
        want = model(args[0].float(), args[1], args[2].float(), args[3])
        err16 = float((half(*args).float() - want).norm() / want.norm())
        err = float((backend(*args).float() - want).norm() / want.norm())
    assert err <= 2 * err16 + 1e-3, (err, err16)
