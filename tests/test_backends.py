"""Backends against the reference on the same weights: the fast backend's swap logic, layout and text-K/V
reuse on CPU (kernels in Triton's interpreter), and its fidelity, CUDA graphs and memory on the GPU."""
from __future__ import annotations

import copy
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import torch
from utils import assert_close, make_inputs, randomize_temporal

import stunet
from stunet.backends import BACKENDS, CompileBackend, FastBackend, make_backend
from stunet.backends.base import ieee_fp32
from stunet.kernels import _triton
from stunet.model import TextKVStore
from stunet.pipeline import Pipeline, SSROptions

needs_triton = pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")


def _model(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_temporal(stunet.STUNet(stunet.STUNetConfig.from_preset(preset, **overrides)), scale=0.2).eval()


def _captured(fast: FastBackend) -> int:
    """How many CUDA graphs a fast backend holds (of every call shape and batch slice)."""
    return sum(len(slices) for slices in fast._graphs.values())


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@needs_triton
@pytest.mark.parametrize("scope", ["frame", "clip"])
def test_fast_backend_matches_reference_fp32(scope):
    """fp32 on CPU: the kernels (interpreted) and the channels-last trunk change only rounding."""
    model = _model(norm_scope=scope)
    reference = copy.deepcopy(model)
    x, t, text = make_inputs(model.config, batch=2, frames=8, size=16)
    mask = torch.ones(text.shape[:2], dtype=torch.bool)
    mask[1, 3:] = False
    fast = FastBackend(model)
    got = fast(x, t, text, mask)
    want = reference(x, t, text, mask)
    assert got.shape == want.shape and got.is_contiguous()
    assert_close(got, want, atol=2e-5, rtol=2e-5, what="fast vs reference, fp32")


def _snapshot(model: torch.nn.Module) -> dict:
    """Everything a backend could change on a model: every tensor (values, dtype, strides, identity) and every
    plain attribute of every module."""
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():
        state[name] = (id(t), t.dtype, t.stride(), t.device, t.detach().clone())
    for name, m in model.named_modules():
        state[f"{name}:attrs"] = {k: (v if isinstance(v, (bool, int, float, str, type(None))) else type(v).__name__)
                                  for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")
                                  and not k.endswith("hooks") and "hooks_" not in k}
    return state


def _assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k, b in before.items():
        a = after[k]
        if isinstance(b, tuple):
            assert a[:4] == b[:4] and torch.equal(a[4], b[4]), k
        else:
            assert a == b, k


@pytest.mark.parametrize("name", ["reference", "fast", "compile"])
def test_building_and_calling_a_backend_leaves_the_model_unchanged(name, monkeypatch):
    if name == "fast":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' reference math: this tests ownership
    model = _model()
    before = _snapshot(model)
    options = {"mode": None, "compiler": "eager"} if name == "compile" else {}
    backend = make_backend(model, name, **options)
    x, t, text = make_inputs(model.config, batch=1, frames=8, size=16)
    backend(x, t, text)
    _assert_unchanged(before, _snapshot(model))


def test_two_backends_over_one_model_alternate_with_correct_results(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model()
    reference, fast = make_backend(model, "reference"), make_backend(model, "fast")
    x, t, text = make_inputs(model.config, batch=2, frames=8, size=16)
    want = copy.deepcopy(model)(x, t, text)
    for _ in range(2):
        assert torch.equal(reference(x, t, text), want)
        assert_close(fast(x, t, text), want, atol=2e-5, rtol=2e-5, what="fast between reference calls")


def test_fast_backend_copy_shares_storage_when_nothing_needs_converting():
    model = _model()
    fast = FastBackend(model)
    assert fast.model is not model
    for (name, mine), theirs in zip(fast.model.named_parameters(), model.parameters()):
        assert mine is not theirs and mine.data_ptr() == theirs.data_ptr(), name
    model.half()  # the caller converts its model: the backend's copy keeps its own parameters
    assert fast.model.dtype == torch.float32


def test_backends_refuse_with_every_reason():
    with torch.device("meta"):
        meta = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")).double()
    with pytest.raises(ValueError) as info:
        make_backend(meta, "fast", graphs=True)
    message = str(info.value)
    assert "meta device" in message and "float64" in message and "graphs=True needs" in message
    with pytest.raises(ValueError, match=r"graphs must be True, False or None \(None: on CUDA\), got 'no'"):
        make_backend(_model(), "fast", graphs="no")


def test_fast_backend_on_a_cpu_says_once_what_it_runs(monkeypatch, caplog):
    """Where the kernels cannot run, the first fast backend of the process says why as a warning, the others
    (a cascade makes one per model) at info level; describe() says it for each."""
    import stunet.backends.fast as fast_module

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(fast_module, "_KERNEL_NOTES_SAID", set())  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="stunet.backends.fast"):
        backends = [FastBackend(_model()) for _ in range(3)]
    said = [r.levelno for r in caplog.records if "reference math" in r.getMessage()]
    assert said == [logging.WARNING, logging.INFO, logging.INFO]
    for fast in backends:
        assert "reference math for the kernel ops" in fast.describe() and "tensors on cpu" in fast.describe()


def _projections(backend) -> tuple[list[int], int]:
    """(a list given the batch of every text key/value projection ``backend`` computes from now on, the number of
    projections in one forward)."""
    calls, layers = [], 0
    for name, m in backend.model.named_modules():
        if name.endswith("cross_kv"):
            m.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[0]))
            layers += 1
    return calls, layers


def test_text_keys_and_values_are_computed_once_per_text(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' reference paths: this tests the caching, not kernels
    model = _model()
    reference = copy.deepcopy(model)
    fast = FastBackend(model)
    calls, layers = _projections(fast)
    x, t, text = make_inputs(model.config, batch=1, frames=8, size=16)
    for step in range(3):  # a generation: same text tensor at every step
        fast(x, t - step, text)
    assert len(calls) == layers
    other = torch.randn_like(text)
    got = fast(x, t, other)  # a new text: recomputed once
    assert len(calls) == 2 * layers
    assert_close(got, reference(x, t, other), atol=2e-5, rtol=2e-5, what="after a text change")
    text.mul_(0.5)  # written in place: refreshed into the same buffers
    assert_close(fast(x, t, text), reference(x, t, text), atol=2e-5, rtol=2e-5, what="after an in-place change")
    assert len(calls) == 3 * layers


def test_fast_backend_max_batch_runs_slices_with_the_same_result(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' reference paths: this tests the slicing
    model = _model()
    x, t, text = make_inputs(model.config, batch=3, frames=8, size=16)
    whole = FastBackend(copy.deepcopy(model))(x, t, text)
    sliced = FastBackend(model, max_batch=2)
    calls, layers = _projections(sliced)
    for _ in range(2):
        got = sliced(x, t, text)
        assert_close(got, whole, atol=1e-5, rtol=1e-5, what="max_batch=2 over 3 clips")
    assert sorted(calls) == sorted([2, 1] * layers)  # each slice's text K/V once, reused on the second call
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        FastBackend(model, max_batch=0)


class _Rerun:
    """Stands in for a CUDA graph on the CPU: a replay runs the recorded call again into the same output. As a
    graph replays kernels and no Python, a replay reads the stored text keys/values as they are, refreshing
    none."""

    def __init__(self, run):
        self.run, self.out = run, run()

    def replay(self):
        with mock.patch.object(TextKVStore, "for_text", lambda store, text: store.kv):
            self.out.copy_(self.run())


def _graphed_on_cpu(model, monkeypatch, **options) -> tuple[FastBackend, list[_Rerun]]:
    """A fast backend on the CPU taking the CUDA-graph path, its captures stood in for by reruns; and the list
    of what it records."""
    graphed = FastBackend(model, **options)
    graphed.graphs = True
    recorded = []

    def record(run, device):
        graph = _Rerun(run)
        recorded.append(graph)
        return graph, graph.out

    monkeypatch.setattr(graphed, "_record", record)
    return graphed, recorded


def test_fast_backend_keeps_the_graphs_of_the_last_shapes_used(monkeypatch, caplog):
    """The graph bookkeeping, on the CPU with replays standing in for CUDA graphs (the real capture is
    test_gpu_cuda_graph_replay_equals_eager_fast_and_follows_text_changes): a graph per batch slice and call
    shape, replays equal to the eager backend's calls and following text changes, and at most
    ``max_graph_shapes`` shapes kept, the least recently used dropped first with a warning."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    caplog.set_level(logging.INFO, logger="stunet.backends.fast")
    model = _model()
    eager = FastBackend(copy.deepcopy(model), graphs=False, max_batch=2)
    graphed, recorded = _graphed_on_cpu(model, monkeypatch, max_batch=2, max_graph_shapes=2)
    inputs = {size: make_inputs(model.config, batch=3, frames=8, size=size) for size in (8, 16, 24)}
    for step, size in enumerate([8, 16, 8, 8, 24, 16]):
        x, t, text = inputs[size]
        assert torch.equal(graphed(x, t - step, text), eager(x, t - step, text)), (step, size)
    # 8 and 16 captured (two slices each), 8 replayed, 24 captured dropping 16, then 16 captured again.
    assert len(recorded) == 8
    assert [shape[-1] for shape, *_ in graphed._graphs] == [24, 16]
    assert all(len(slices) == 2 for slices in graphed._graphs.values())
    dropped = [r for r in caplog.records if "dropped the CUDA graphs" in r.getMessage()]
    assert [r.levelno for r in dropped] == [logging.WARNING, logging.INFO]
    x, t, text = inputs[16]
    other = torch.randn_like(text)
    assert torch.equal(graphed(x, t, other), eager(x, t, other))
    assert len(recorded) == 8
    for bad in (0, None, 1.5, True):
        with pytest.raises(ValueError, match="max_graph_shapes must be a positive integer"):
            FastBackend(model, max_graph_shapes=bad)
    for args, error, message in (((None, t, text), TypeError, "x must be a torch.Tensor"),
                                 ((x[0, 0, 0, 0, 0], t, text), ValueError, "x must be 5-D"),
                                 ((x, t, None), TypeError, "text_embeds must be a torch.Tensor")):
        for backend in (graphed, eager):
            with pytest.raises(error, match=message):
                backend(*args)


def test_a_new_text_length_says_once_how_to_keep_one_graph(monkeypatch, caplog):
    """Prompts of another token length are another input shape: the first such capture says so, naming the
    padding that gives every request one shape; other shape changes (the video's size) say nothing of it."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model()
    graphed, recorded = _graphed_on_cpu(model, monkeypatch)
    x, t, text = make_inputs(model.config, batch=2, frames=8, size=16)
    small, _, _ = make_inputs(model.config, batch=2, frames=8, size=8)
    with caplog.at_level(logging.WARNING, logger="stunet.backends.fast"):
        for x_, text_ in ((x, text), (small, text), (x, text[:, :3]), (x, torch.cat([text, text], 1)),
                          (x, text[:, :3])):
            graphed(x_, t, text_)
    told = [r.getMessage() for r in caplog.records if "pad_to_max_length=True" in r.getMessage()]
    assert len(recorded) == 4 and len(told) == 1 and "a text of 3 tokens is a new input shape" in told[0]


def test_a_graphs_text_refresh_cut_short_is_done_again(monkeypatch):
    """Ctrl-C while a graph's text keys/values are being recomputed for a new text: the next call with that text
    recomputes them all, instead of replaying with some layers' keys/values of the old text."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model()
    eager = FastBackend(copy.deepcopy(model), graphs=False)
    graphed, _ = _graphed_on_cpu(model, monkeypatch)
    x, t, text = make_inputs(model.config, batch=2, frames=8, size=16)
    graphed(x, t, text)
    layer = [m for name, m in graphed.model.named_modules() if name.endswith("cross_kv")][-1]

    def interrupted(module, inputs):
        raise KeyboardInterrupt

    hook = layer.register_forward_pre_hook(interrupted)
    other = torch.randn_like(text)
    with pytest.raises(KeyboardInterrupt):
        graphed(x, t, other)
    hook.remove()
    assert torch.equal(graphed(x, t, other), eager(x, t, other))


@pytest.mark.parametrize("name", ["reference", "fast"])
def test_a_pipeline_runs_the_same_under_torch_inference_mode(name, monkeypatch):
    """Serving code often runs under torch.inference_mode, whose tensors count no in-place writes. The same
    pipeline, called in and out of it in turn, makes the same video every time."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model()
    pipe = Pipeline(model, stunet.text.tiny_random_t5(model.config.text_dim), backend=name, progress=False)
    kw = dict(num_frames=8, height=16, width=16, num_inference_steps=2, seed=4)
    want = pipe("a teddy bear surfing", **kw).frames
    for inference in (True, False, True):
        with torch.inference_mode(inference):
            assert np.array_equal(pipe("a teddy bear surfing", **kw).frames, want), inference


def test_fast_backend_follows_an_inference_tensor_written_in_place(monkeypatch):
    """An inference tensor's writes are not counted, so nothing of its text keys/values is kept: each forward
    computes them once per layer, as without a store, and an edit in place is never missed."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model()
    reference, fast = copy.deepcopy(model), FastBackend(model)
    calls, layers = _projections(fast)
    x, t, text = make_inputs(model.config, batch=2, frames=8, size=16)
    with torch.inference_mode():
        text = text.clone()
        assert_close(fast(x, t, text), reference(x, t, text), atol=2e-5, rtol=2e-5, what="an inference text")
        text.mul_(-0.5)
        assert_close(fast(x, t, text), reference(x, t, text), atol=2e-5, rtol=2e-5, what="after an edit")
    assert len(calls) == 2 * layers
    sliced = FastBackend(model, max_batch=1)
    with torch.inference_mode():
        first = sliced(x, t, text)
        text.add_(1.0)
        assert_close(sliced(x, t, text), reference(x, t, text), atol=2e-5, rtol=2e-5, what="sliced, after an edit")
        assert not torch.equal(first, sliced(x, t, text))


@pytest.mark.parametrize("name", ["reference", "fast"])
def test_an_ambient_autocast_does_not_apply_and_says_so_once(name, monkeypatch, caplog):
    """Code carried over from image pipelines often wraps a call in torch.autocast. The engine computes in its
    models' own dtypes, the precision its fast paths are checked in: the pipeline and a backend called alone
    give what they give without the autocast, and one warning says so."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(stunet.backends.base, "_AUTOCAST_WARNED", set())
    model = _model()
    pipe = Pipeline(model, stunet.text.tiny_random_t5(model.config.text_dim), backend=name, progress=False)
    kw = dict(num_frames=8, height=16, width=16, num_inference_steps=2, seed=4)
    want = pipe("a teddy bear surfing", **kw).frames
    x, t, text = make_inputs(model.config, batch=2, frames=8, size=16)
    backend = pipe.base_stage.backend
    want_out = backend(x, t, text)
    want_tokens = pipe.encode_prompt(["a cat"], [""])[0]
    with caplog.at_level(logging.WARNING, logger="stunet.backends.base"), torch.autocast("cpu", torch.bfloat16):
        assert np.array_equal(pipe("a teddy bear surfing", **kw).frames, want)
        assert torch.equal(backend(x, t, text), want_out)
        assert torch.equal(pipe.encode_prompt(["a cat"], [""])[0], want_tokens)
    warnings = [r.getMessage() for r in caplog.records if "autocast" in r.getMessage()]
    assert len(warnings) == 1 and "torch.autocast('cpu') is on and does not apply" in warnings[0]


def test_ieee_fp32_turns_tf32_off_while_held_and_restores_the_flags():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError, match="inside"), ieee_fp32():
            assert not cudnn.allow_tf32 and not matmul.allow_tf32
            assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic) == before[:3]
            raise RuntimeError("inside")
        assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32) == before[:4]
        assert matmul.allow_tf32
    finally:
        matmul.allow_tf32 = before[4]


@pytest.mark.parametrize("name", ["reference", "fast"])
def test_a_backend_shared_among_threads_runs_their_calls_in_turn(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backend = make_backend(_model(), name)
    inside, most = [], []

    def enter(module, args):
        inside.append(1)
        most.append(len(inside))
        time.sleep(0.05)  # lets the other threads in, were nothing to stop them

    def leave(module, args, out):
        inside.pop()

    backend.model.register_forward_pre_hook(enter)
    backend.model.register_forward_hook(leave)
    x, t, text = make_inputs(backend.config, batch=1, frames=8, size=16)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: backend(x, t, text), range(4)))
    assert max(most) == 1 and not inside
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_a_pipeline_shared_among_threads_gives_each_prompt_its_own_video(monkeypatch):
    """Each thread's video is the one a serial call makes: the fast backend keeps each text's keys/values across
    calls, and threads interleaving on it without its lock would read each other's text."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model()
    pipe = Pipeline(model, stunet.text.tiny_random_t5(model.config.text_dim), backend="fast", progress=False)
    prompts = ["a teddy bear surfing", "a red ball", "waves at night", "a cat"]
    kw = dict(num_frames=8, height=16, width=16, num_inference_steps=2, seed=3)
    serial = {p: pipe(p, **kw).frames for p in prompts}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            shared = dict(zip(prompts, pool.map(lambda p: pipe(p, **kw).frames, prompts)))
    finally:
        sys.setswitchinterval(interval)
    for p in prompts:
        assert np.array_equal(shared[p], serial[p]), p


# Ops whose result the host must read (a device synchronisation): inside a CUDA graph capture they fail.
HOST_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::allclose", "aten::nonzero",
              "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"}


@pytest.mark.parametrize("preset, overrides", [("tiny", {}), ("tiny-cond", {"norm_scope": "clip"}),
                                               ("tiny", {"noise_aug": True, "in_channels": 6, "low_res_size": 4})])
def test_the_forward_the_fast_backend_captures_reads_nothing_back(monkeypatch, preset, overrides):
    """The call ``FastBackend`` captures as a CUDA graph (``forward_checked`` with the fast policy, text mask and
    noise level given) dispatches no op that reads a device value on the host, which would fail the capture:
    pinned on the CPU, where a TorchDispatchMode sees every op."""
    import dataclasses

    from torch.utils._python_dispatch import TorchDispatchMode

    from stunet.model import TextKVStore
    from stunet.model.validate import check_forward_inputs

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in HOST_READS:
                self.seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' reference math: the interpreter itself reads values
    model = _model(preset, **overrides)
    fast = FastBackend(model)
    x, t, text = make_inputs(model.config, batch=2)
    mask = torch.arange(text.shape[1]).expand(2, -1) < 5
    level = torch.tensor([10.0, 20.0]) if model.config.noise_aug else None
    args = check_forward_inputs(fast.model, x, t, text, mask, level, False)
    policy = dataclasses.replace(fast.policy, text_kv=TextKVStore())
    with torch.no_grad():
        fast.model.forward_checked(*args, policy)  # the warm-up: fills the text K/V store, as before a capture
        with Reads() as reads:
            fast.model.forward_checked(*args, policy)
    assert reads.seen == []


def test_make_backend_names_and_errors():
    model = _model()
    assert make_backend(model).name == "reference" and set(BACKENDS) == {"reference", "fast", "compile", "aoti",
                                                                                "tensorrt"}
    with pytest.raises(ValueError, match="aoti backend cannot run this model: it needs package=PATH"):
        make_backend(model, "aoti")
    with pytest.raises(ValueError, match="aoti backend cannot run this model: package must be a path, .*got int"):
        make_backend(model, "aoti", package=3)
    with pytest.raises(ValueError, match="tensorrt backend cannot run this model: engine must be a path, .*got bytes"):
        make_backend(model, "tensorrt", engine=b"model.plan")
    with pytest.raises(ValueError, match="backend must be one of"):
        make_backend(model, "tensorrt-ish")
    with pytest.raises(ValueError, match="graphs=True needs the model on a CUDA device"):
        FastBackend(model, graphs=True)
    with pytest.raises(ValueError, match="graphs=True needs the model on a CUDA device"):
        make_backend(model, "fast", graphs=True)
    with pytest.raises(TypeError, match="model must be a STUNet"):
        make_backend(torch.nn.Linear(2, 2))


def _family(name: str) -> stunet.STUNet:
    """A small model of each family the engine runs: its own presets (a pixel base model, an SSR model with noise
    augmentation) and the converted public U-Nets (ModelScope's temporal conv stacks, AnimateDiff's motion
    modules)."""
    if name == "tiny":
        return _model()
    if name == "ssr":
        return _model("tiny", seed=1, in_channels=6, noise_aug=True, low_res_size=8, temporal_downsample=(False, False),
                      temporal_attn_depth=0, sample_size=16)
    pytest.importorskip("diffusers")
    import diffusers
    import diffusers_models as tiny

    from stunet.convert import from_diffusers

    unet = tiny.unet3d() if name == "modelscope" else diffusers.UNetMotionModel.from_unet2d(tiny.unet2d(),
                                                                                             tiny.motion_adapter())
    return from_diffusers(unet.eval()).eval()


@pytest.mark.parametrize("family", ["tiny", "ssr", "modelscope", "animatediff"])
def test_compile_backend_traces_the_whole_forward_once_for_every_timestep(family):
    """One graph per input shape: a graph break would leave the forward's frame to eager (torch.compile skips a
    frame that breaks inside a loop), and the compile row of the benchmarks would time eager PyTorch."""
    model = _family(family)
    x, t, text = make_inputs(model.config, batch=1, frames=8, size=16)
    level = torch.tensor([100.0]) if model.config.noise_aug else None
    graphs = []

    def counting(gm, example_inputs):  # a torch.compile backend that records each graph it is given
        graphs.append(gm)
        return gm.forward

    compiled = CompileBackend(model, mode=None, compiler=counting)
    for step in (t, 999, 500, 3):  # a sampling run: new timesteps must not recompile
        assert_close(compiled(x, step, text, noise_level=level), model(x, step, text, noise_level=level),
                     atol=1e-5, rtol=1e-5, what=f"t={step}")
    assert len(graphs) == 1


def test_compile_backend_refuses_a_mode_torch_compile_does_not_know():
    """Named when the backend is made (torch.compile's own RuntimeError came from inside the constructor)."""
    from stunet.backends import make_backend
    from stunet.backends.compile import compile_modes

    assert {"default", "max-autotune"} <= set(compile_modes())
    with pytest.raises(ValueError, match=r"compile backend cannot run this model: mode must be one of "
                                         r"torch.compile's default, .*\(or None\), got 'fastest'"):
        make_backend(_model(), "compile", mode="fastest")
    assert make_backend(_model(), "compile", mode="default").mode == "default"


def test_pipeline_with_fast_backend_close_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' reference paths (the kernels are tested above)
    base, ssr = _model(), _model("tiny", seed=1, in_channels=6, noise_aug=True, low_res_size=8,
                                 temporal_downsample=(False, False), temporal_attn_depth=0, sample_size=16)
    text = torch.randn(1, 5, base.config.text_dim)
    kw = dict(prompt_embeds=text, num_frames=8, height=8, width=8, num_inference_steps=3, seed=5,
              ssr=SSROptions(window=4, overlap=1, batch_size=2, guidance_scale=2.0))
    ref = Pipeline(copy.deepcopy(base), None, copy.deepcopy(ssr), progress=False)(**kw)
    fast = Pipeline(base, None, ssr, backend="fast", progress=False)(**kw)
    assert fast.frames.shape == ref.frames.shape
    assert np.abs(fast.frames - ref.frames).max() < 1e-4


# -- GPU ----------------------------------------------------------------------------------------------------------
def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.gpu
def test_gpu_fast_step_error_within_twice_fp16_reference_error():
    """Per step (one forward with CFG batch 2) on `small`: rel. L2 error of fast FP16 vs reference FP32 at most
    twice that of the reference in FP16, plus 1e-3."""
    model32 = _model("small").cuda()
    ref16 = copy.deepcopy(model32).half()
    fast = FastBackend(model32)
    x, t, text = make_inputs(model32.config, batch=2, frames=16, size=64)
    x, t, text = x.cuda(), t.cuda(), text.cuda()
    for step_t in (999, 500, 20):
        tt = torch.full_like(t, step_t)
        with ieee_fp32():
            want = model32(x, tt, text)
        err16 = _rel_l2(ref16(x.half(), tt, text.half()).float(), want)
        err_fast = _rel_l2(fast(x.half(), tt, text.half()).float(), want)
        assert err_fast <= 2 * err16 + 1e-3, (step_t, err_fast, err16)


@pytest.mark.gpu
def test_gpu_fast_video_psnr_against_fp32_reference():
    base32 = _model("small").cuda()
    text = torch.randn(1, 7, base32.config.text_dim, device="cuda")
    kw = dict(prompt_embeds=text, num_frames=16, height=64, width=64, num_inference_steps=8, seed=0)
    with ieee_fp32():
        ref32 = Pipeline(copy.deepcopy(base32), None, progress=False)(**kw).frames
    ref16 = Pipeline(copy.deepcopy(base32).half(), None, progress=False)(**kw).frames
    fast = Pipeline(base32, None, backend="fast", progress=False)(**kw).frames
    assert _psnr(fast, ref32) >= min(40.0, _psnr(ref16, ref32) - 3.0)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager_fast_and_follows_text_changes():
    model = _model("small").cuda().half()
    graphed, eager = FastBackend(model), FastBackend(model, graphs=False)
    x, t, text = make_inputs(model.config, batch=2, frames=16, size=64)
    x, t, text = x.cuda().half(), t.cuda(), text.cuda().half()
    for step in range(3):
        assert torch.equal(graphed(x, t - step, text), eager(x, t - step, text))
    other = torch.randn_like(text)
    assert torch.equal(graphed(x, t, other), eager(x, t, other))
    assert _captured(graphed) == 1


@pytest.mark.gpu
def test_gpu_cuda_graphs_of_a_dropped_shape_are_captured_again():
    """max_graph_shapes=1 and two shapes in turn: each call drops the other shape's graph and captures its own
    in the same memory pool, and every replay equals the eager call."""
    model = _model("small").cuda().half()
    graphed, eager = FastBackend(model, max_graph_shapes=1), FastBackend(model, graphs=False)
    for step in range(4):
        x, t, text = make_inputs(model.config, batch=2, frames=16, size=64 if step % 2 else 32)
        x, t, text = x.cuda().half(), t.cuda(), text.cuda().half()
        assert torch.equal(graphed(x, t, text), eager(x, t, text)), step
        assert _captured(graphed) == 1


@pytest.mark.gpu
def test_gpu_cuda_graphs_of_batch_slices_keep_their_own_text_kv():
    """max_batch=1 on a CFG pair: a graph per slice, each computing its text K/V once (one graph shared by the
    halves would refresh its K/V at every call), and the replays equal the eager slices bit for bit."""
    model = _model("small").cuda().half()
    graphed, eager = FastBackend(model, max_batch=1), FastBackend(model, graphs=False, max_batch=1)
    x, t, text = make_inputs(model.config, batch=2, frames=16, size=64)
    x, t, text = x.cuda().half(), t.cuda(), text.cuda().half()
    assert torch.equal(graphed(x, t, text), eager(x, t, text))  # captures both slices' graphs
    refreshes, _ = _projections(graphed)
    for step in range(1, 4):
        assert torch.equal(graphed(x, t - step, text), eager(x, t - step, text))
    assert _captured(graphed) == 2 and refreshes == []


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_gpu_threads_on_streams_of_their_own_share_a_fast_backend(graphs):
    """Four threads, each on its own CUDA stream with its own text, calling one fast backend: every output is
    the one a call alone makes. The calls share the graph's static inputs (or the stored text keys/values), so
    each must wait on the GPU for the last call's work, not only on the host for its turn."""
    model = _model("small").cuda().half()
    fast = FastBackend(model, graphs=graphs)
    x, t, _ = make_inputs(model.config, batch=2, frames=16, size=64)
    x, t = x.cuda().half(), t.cuda()
    texts = [torch.randn(2, 7, model.config.text_dim, device="cuda", dtype=torch.float16) for _ in range(4)]
    alone = [fast(x, t, text) for text in texts]
    torch.cuda.synchronize()

    def work(i: int) -> list[torch.Tensor]:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            outs = [fast(x, t, texts[i]) for _ in range(10)]
        stream.synchronize()
        return outs

    with ThreadPoolExecutor(len(texts)) as pool:
        shared = list(pool.map(work, range(len(texts))))
    for i, outs in enumerate(shared):
        assert all(torch.equal(out, alone[i]) for out in outs), i


@pytest.mark.gpu
def test_gpu_cuda_graphs_in_and_out_of_inference_mode():
    """A graph captured under torch.inference_mode replays outside it and back (its static inputs are ordinary
    tensors, written in place at every call), and follows an inference text edited in place."""
    model = _model("small").cuda().half()
    graphed, eager = FastBackend(model), FastBackend(model, graphs=False)
    x, t, text = make_inputs(model.config, batch=2, frames=16, size=64)
    x, t, text = x.cuda().half(), t.cuda(), text.cuda().half()
    want = eager(x, t, text)
    for inference in (True, False, True):
        with torch.inference_mode(inference):
            assert torch.equal(graphed(x, t, text), want), inference
    with torch.inference_mode():
        edited = text.clone()
        graphed(x, t, edited)
        edited.mul_(-0.5)
        assert torch.equal(graphed(x, t, edited), eager(x, t, edited))
    assert _captured(graphed) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_a_pipeline_on_the_second_device_runs_from_the_first():
    """Triton kernels, CUDA-graph capture and the C++ runtime's CUDA passes launch on the current device: a
    pipeline on cuda:1 called while cuda:0 is current makes the video it makes on cuda:0."""
    model = _model("small")
    kw = dict(prompt_embeds=torch.randn(1, 7, model.config.text_dim), num_frames=16, height=64, width=64,
              num_inference_steps=4, seed=0)
    frames = {}
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        frames[device] = Pipeline(copy.deepcopy(model).to(device), None, backend="fast", progress=False)(**kw).frames
    assert np.array_equal(frames["cuda:0"], frames["cuda:1"])
