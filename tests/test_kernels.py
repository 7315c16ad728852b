"""Triton kernels against their reference math (``*_ref``, fp32), over hypothesis-generated shapes.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set by conftest);
with one, on CUDA. Tolerances: fp32 1e-5 (attention: 2e-5, its exp2 softmax); fp16 outputs one fp16 rounding of
the fp32 result plus what the kernel's own fp16 steps add (attention casts the softmax weights to fp16 for the
PV product, as flash attention does): atol 2e-3 + rtol 4e-3 for attention, 1e-3 + 1e-3 elsewhere.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from utils import assert_close, recorded_launches

from stunet import kernels
from stunet.kernels import _triton

pytestmark = pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3)}


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every dimension longer than one (a size-1 dimension's stride means nothing)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _check(got, want, dtype, what, tol=None):
    atol, rtol = tol or TOL[dtype]
    assert got.dtype == want.dtype == dtype and got.shape == want.shape, (got.shape, want.shape, what)
    assert_close(got, want, atol=atol, rtol=rtol, what=what)


# -- temporal attention ------------------------------------------------------------------------------------------
def _qkv(B, T, S, C, dtype, layout, g):
    """Packed projection output as (B, T, S, 3C): token-major (channels-last trunk) or a view of a folded
    NCHW (B*T, 3C, S) tensor (unit pixel stride)."""
    x = torch.randn(B * T, 3 * C, S, generator=g) if layout == "nchw" else torch.randn(B, T, S, 3 * C, generator=g)
    x = x.to(DEVICE, dtype)
    return x.view(B, T, 3 * C, S).transpose(2, 3) if layout == "nchw" else x


ATTN_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 4e-3)}


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.sampled_from([1, 2, 3, 5, 8, 16, 17, 31, 64, 65, 80, 128, 130]),
       S=st.integers(1, 9), heads=st.integers(1, 3), D=st.sampled_from([8, 16, 24, 32, 48, 64]),
       dtype=st.sampled_from(list(DTYPES)), layout=st.sampled_from(["tokens", "nchw"]), with_bias=st.booleans())
def test_temporal_attention_matches_reference(B, T, S, heads, D, dtype, layout, with_bias):
    dtype = DTYPES[dtype]
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + S)
    qkv = _qkv(B, T, S, heads * D, dtype, layout, g)
    bias = torch.randn(heads, T, T, generator=g).to(DEVICE) if with_bias else None
    got = kernels.temporal_attention(qkv, heads, bias)
    assert got.is_contiguous()
    _check(got, kernels.temporal_attention_ref(qkv, heads, bias), dtype, f"T={T} D={D} {layout}", ATTN_TOL[dtype])


@pytest.mark.parametrize("D", [32, 64, 128])
def test_temporal_attention_head_dims_and_many_sequences(D):
    g = torch.Generator().manual_seed(D)
    qkv = _qkv(1, 16, 300, 2 * D, torch.float16, "tokens", g)  # 300 sequences: many programs
    _check(kernels.temporal_attention(qkv, 2), kernels.temporal_attention_ref(qkv, 2), torch.float16, f"D={D}",
           ATTN_TOL[torch.float16])


# (fp32, T) -> (packed, sequences per tile, block_m, block_n, stages) of temporal_attn.tiles at head dim 64
LAUNCH_CONFIGURATIONS = {(False, 17): (True, 3, 64, 64, 3), (False, 80): (True, 1, 128, 64, 2),
                         (False, 130): (False, 1, 64, 64, 3), (True, 17): (True, 1, 32, 32, 2),
                         (True, 80): (False, 1, 32, 32, 2), (True, 130): (False, 1, 32, 32, 2)}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("T", [17, 80, 130])
def test_temporal_attention_every_launch_configuration(T, dtype):
    """Each branch of the launcher's tile choice (``temporal_attn.tiles``) against the reference, with a bias:
    fp16 packs three 17-frame sequences per 64-row tile, fills a 128-row tile with 80 frames (two 64-key blocks)
    and streams 130; fp32 packs one 17-frame sequence per 32 x 32 tile and streams the longer ones."""
    from stunet.kernels.temporal_attn import tiles

    dtype = DTYPES[dtype]
    t = tiles(T, 64, dtype)
    assert (t.packed, t.seq_per_block, t.block_m, t.block_n, t.num_stages) == \
        LAUNCH_CONFIGURATIONS[(dtype == torch.float32, T)]
    g = torch.Generator().manual_seed(T)
    qkv = _qkv(1, T, 3, 2 * 64, dtype, "tokens", g)
    bias = torch.randn(2, T, T, generator=g).to(DEVICE)
    _check(kernels.temporal_attention(qkv, 2, bias), kernels.temporal_attention_ref(qkv, 2, bias), dtype,
           f"T={T} {t}", ATTN_TOL[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("T", [17, 130])
def test_temporal_attention_wide_heads(T, dtype):
    """Head dims 129 to 256 (AnimateDiff: 1280 channels in 8 heads of 160) pad to 256: packed 64-row tiles up to
    64 frames in fp16, else 32-key blocks in two stages (fp32: 32 x 32 tiles in one stage, packed up to 32
    frames)."""
    from stunet.kernels.temporal_attn import tiles

    dtype = DTYPES[dtype]
    exact = dtype == torch.float32
    t = tiles(T, 160, dtype)
    assert t.block_d == 256 and t.packed == (T <= (32 if exact else 64))
    assert (t.block_m, t.block_n, t.num_stages) == ((32, 32, 1) if exact else (64, 64, 3) if t.packed else (64, 32, 2))
    g = torch.Generator().manual_seed(T)
    qkv = _qkv(1, T, 2, 2 * 160, dtype, "nchw", g)
    bias = torch.randn(2, T, T, generator=g).to(DEVICE)
    _check(kernels.temporal_attention(qkv, 2, bias), kernels.temporal_attention_ref(qkv, 2, bias), dtype,
           f"T={T} D=160", ATTN_TOL[dtype])


def test_temporal_attention_bad_inputs():
    q = torch.zeros(1, 4, 5, 96)
    with pytest.raises(ValueError, match="4-D"):
        kernels.temporal_attention(q[0], 1)
    with pytest.raises(ValueError, match="divisible by 3 \\* heads"):
        kernels.temporal_attention(q, 5)
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        kernels.temporal_attention(q, 0)
    with pytest.raises(ValueError, match="bias must be a \\(heads, T, T\\)"):
        kernels.temporal_attention(q, 1, torch.zeros(1, 4, 5))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        kernels.temporal_attention(q.double(), 1)
    with pytest.raises(TypeError, match="bias must be a floating-point tensor, got torch.int64"):
        kernels.temporal_attention(q, 1, torch.zeros(1, 4, 4, dtype=torch.long))
    for scale in ("0.1", float("nan"), torch.tensor(0.1), True):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            kernels.temporal_attention(q, 1, scale=scale)
    with pytest.raises(ValueError, match="head_dim >= 1, got 0"):
        kernels.temporal_attention(q[..., :0], 1)


@pytest.mark.parametrize("shape", [(0, 4, 5, 24), (1, 0, 5, 24), (2, 3, 0, 24)], ids=["B=0", "T=0", "S=0"])
def test_the_kernels_take_empty_videos(shape):
    """An empty axis gives an empty result of the op's shape (an empty grid was a ZeroDivisionError)."""
    qkv = torch.zeros(shape, device=DEVICE)
    assert kernels.temporal_attention(qkv, 2).shape == (*shape[:3], 8)
    B, T, S = shape[:3]
    x = torch.zeros(B, 8, T, S, 3, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    assert kernels.group_norm(x, 4, w, w, silu=True).shape == x.shape
    assert kernels.temporal_up_conv(x, torch.ones(5, 8, 3, device=DEVICE)).shape == (B, 5, 2 * T, S, 3)


def test_temporal_attention_unsupported_head_dim_falls_back_to_reference():
    q = torch.randn(1, 4, 3, 3 * 320)  # head dim 320: beyond the kernel's 256
    from stunet.kernels import temporal_attn

    assert temporal_attn.unsupported(q, 1, None) == ["head dim 320 (1 to 256 only)"]
    assert torch.equal(kernels.temporal_attention(q, 1), kernels.temporal_attention_ref(q, 1))


# -- group norm -------------------------------------------------------------------------------------------------------
def _video_of_folded(B, C, T, H, W, dtype, channels_last, g):
    """The model's case: a folded (B*T, C, H, W) trunk tensor seen as a (B, C, T, H, W) video (a transposed view)."""
    folded = torch.randn(B * T, C, H, W, generator=g).to(DEVICE, dtype)
    if channels_last:
        folded = folded.contiguous(memory_format=torch.channels_last)
    return folded.view(B, T, C, H, W).transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), groups=st.sampled_from([1, 2, 3, 4]), cg=st.sampled_from([1, 2, 3, 8]),
       T=st.integers(1, 5), H=st.integers(1, 9), W=st.integers(1, 9), scope=st.sampled_from(["frame", "clip"]),
       silu=st.booleans(), input_bias=st.booleans(), dtype=st.sampled_from(list(DTYPES)),
       layout=st.sampled_from(["ncdhw", "channels_last_3d", "folded", "folded_channels_last"]),
       programs=st.sampled_from([1, 7, 64]))
def test_group_norm_matches_reference(B, groups, cg, T, H, W, scope, silu, input_bias, dtype, layout, programs):
    dtype = DTYPES[dtype]
    C = groups * cg
    g = torch.Generator().manual_seed(B + 10 * C + 100 * T + 1000 * H + 10000 * W)
    if layout.startswith("folded"):
        x = _video_of_folded(B, C, T, H, W, dtype, layout.endswith("channels_last"), g) * 3 + 2
    else:
        x = (torch.randn(B, C, T, H, W, generator=g) * 3 + 2).to(DEVICE, dtype)  # offset mean: tests the variance
        if layout == "channels_last_3d":
            x = x.contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(C, generator=g).to(DEVICE), torch.randn(C, generator=g).to(DEVICE)
    kw = dict(eps=1e-5, scope=scope, silu=silu)
    if input_bias:
        kw["input_bias"] = torch.randn(B, C, generator=g).to(DEVICE, dtype)
    from stunet.kernels import groupnorm

    got = groupnorm.group_norm(x, groups, w, b, num_programs=programs, **kw)  # the launcher: split count varies
    want = kernels.group_norm_ref(x, groups, w, b, **kw)
    assert _same_layout(got, x) and _same_layout(want, x)
    _check(got, want, dtype, f"{scope} C={C} G={groups} T={T} {H}x{W} {layout}")
    _check(kernels.group_norm(x, groups, w, b, **kw), want, dtype, "through the op")


@pytest.mark.parametrize("scope", ["frame", "clip"])
def test_group_norm_ref_is_torch_group_norm(scope):
    """The reference is stock GroupNorm (per frame: frames folded into the batch) of x + input_bias, then SiLU."""
    g = torch.Generator().manual_seed(3)
    x, bias_in = torch.randn(2, 8, 3, 5, 4, generator=g), torch.randn(2, 8, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    v = x + bias_in[:, :, None, None, None]
    if scope == "frame":
        want = F.group_norm(v.transpose(1, 2).reshape(6, 8, 5, 4), 4, w, b).view(2, 3, 8, 5, 4).transpose(1, 2)
    else:
        want = F.group_norm(v, 4, w, b)
    got = kernels.group_norm_ref(x, 4, w, b, scope=scope, silu=True, input_bias=bias_in)
    assert_close(got, F.silu(want), atol=1e-6, rtol=1e-6, what=scope)


def test_group_norm_large_mean_is_stable():
    """Statistics by Chan's parallel combination: a mean of 1000 over unit noise loses nothing in fp32."""
    x = (torch.randn(1, 4, 2, 16, 16) + 1000.0).to(DEVICE)
    w, b = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    got = kernels.group_norm(x, 2, w, b, scope="clip")
    ref = torch.nn.functional.group_norm(x.double(), 2, w.double(), b.double()).float()
    assert_close(got, ref, atol=2e-3, rtol=2e-3, what="mean 1000")


@pytest.mark.parametrize("scope, T, side", [("clip", 4, 24), ("frame", 2, 40)])
def test_group_norm_combines_many_splits(scope, T, side):
    """More partial statistics per group than the finalize kernel combines at once (and not a multiple of
    that), around a mean of 1000 with a ramp over the rows, so that the splits' means differ: the chunks'
    closed-form combination and their running merge lose nothing."""
    from stunet.kernels import groupnorm

    g = torch.Generator().manual_seed(5)
    ramp = torch.linspace(-4, 4, T * side * side).view(T, side, side)
    x = (torch.randn(1, 128, T, side, side, generator=g) + 1000.0 + ramp).to(DEVICE)
    w, b = torch.randn(128, generator=g).to(DEVICE), torch.randn(128, generator=g).to(DEVICE)
    with recorded_launches(groupnorm) as launches:  # the same launch plan, on meta tensors
        groupnorm.group_norm(x.to("meta"), 2, w.to("meta"), b.to("meta"), scope=scope, num_programs=400)
    [(splits, chunk)] = [(args[3], kwargs["BLOCK_S"]) for _, kernel, _, args, kwargs in launches
                         if kernel.fn.__name__ == "_gn_finalize_kernel"]  # (splits, partials combined at once)
    assert splits > chunk and splits % chunk, (splits, chunk)
    got = groupnorm.group_norm(x, 2, w, b, scope=scope, num_programs=400)
    want = kernels.group_norm_ref(x.double(), 2, w.double(), b.double(), scope=scope).float()
    assert_close(got, want, atol=2e-3, rtol=2e-3, what=f"{scope}: {splits} splits, mean 1000")


def test_group_norm_bad_inputs():
    x = torch.zeros(1, 8, 2, 4, 4)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="num_groups must be a positive divisor"):
        kernels.group_norm(x, 3, w, b)
    with pytest.raises(ValueError, match="scope must be one of"):
        kernels.group_norm(x, 2, w, b, scope="video")
    with pytest.raises(ValueError, match=r"weight must be a \(8,\)"):
        kernels.group_norm(x, 2, torch.ones(4), b)
    with pytest.raises(ValueError, match=r"input_bias must be a \(B, C\) = \(1, 8\) tensor"):
        kernels.group_norm(x, 2, w, b, input_bias=torch.zeros(8))
    with pytest.raises(ValueError, match="5-D"):
        kernels.group_norm(x[0], 2, w, b)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        kernels.group_norm(x, 2, w.long(), b)
    for eps in (0, -1e-5, "1e-5", float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite positive number"):
            kernels.group_norm(x, 2, w, b, eps)
    with pytest.raises(TypeError, match="silu must be True or False, got 'no'"):
        kernels.group_norm(x, 2, w, b, silu="no")


# -- TemporalUp --------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(B=st.sampled_from([1, 2, 5]), C=st.integers(1, 12), C_out=st.integers(1, 9), T=st.sampled_from([1, 2, 3, 7, 16]),
       H=st.integers(1, 6), W=st.integers(1, 6), with_bias=st.booleans(), channels_last=st.booleans())
def test_temporal_up_conv_matches_reference(B, C, C_out, T, H, W, with_bias, channels_last):
    """The folded convolutions compute the duplicated video's convolution (fp32: the same sums, rounded
    differently), in x's memory format, over odd shapes: one frame, one pixel, one channel."""
    g = torch.Generator().manual_seed(B * 1000 + C * 100 + T * 10 + H)
    x = torch.randn(B, C, T, H, W, generator=g).to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(C_out, C, 3, generator=g).to(DEVICE)
    b = torch.randn(C_out, generator=g).to(DEVICE) if with_bias else None
    got, want = kernels.temporal_up_conv(x, w, b), kernels.temporal_up_conv_ref(x, w, b)
    _check(got, want, torch.float32, f"B={B} C={C}->{C_out} T={T} {H}x{W}")
    assert _same_layout(got, want)


def test_temporal_up_conv_fp16_is_as_close_to_fp32_as_the_reference():
    """In fp16 the folded taps (w1 + w2, w0 + w1) round once more; both paths stay within fp16's accumulated
    rounding of the fp32 result (2e-3 of the output's scale)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 64, 9, 5, 7, generator=g), torch.randn(32, 64, 3, generator=g) / 8
    b = torch.randn(32, generator=g)
    exact = kernels.temporal_up_conv_ref(x.half().float(), w.half().float(), b.half().float())
    x, w, b = (t.to(DEVICE, torch.float16) for t in (x, w, b))
    scale = float(exact.abs().max())
    for path in (kernels.temporal_up_conv, kernels.temporal_up_conv_ref):
        assert_close(path(x, w, b).float().cpu(), exact, atol=2e-3 * scale, rtol=0, what=path.__name__)


def test_temporal_up_conv_identity_init_is_frame_duplication():
    w = torch.zeros(3, 3, 3)
    w[:, :, 1] = torch.eye(3)
    x = torch.randn(1, 3, 4, 2, 2)
    assert torch.equal(kernels.temporal_up_conv(x, w, None), x.repeat_interleave(2, dim=2))


def test_temporal_up_conv_bad_inputs():
    x, w = torch.zeros(1, 6, 2, 3, 3), torch.zeros(4, 6, 3)
    for args, error, message in [
        (("x", w), TypeError, "x must be a torch.Tensor"),
        ((x[0], w), ValueError, "x must be 5-D"),
        ((x, torch.zeros(4, 6, 2)), ValueError, r"weight must be a \(C_out, C, 3\) = \(C_out, 6, 3\) tensor, got"),
        ((x, torch.zeros(4, 5, 3)), ValueError, r"weight must be a \(C_out, C, 3\)"),
        ((x, w.long()), TypeError, "weight must be a floating-point tensor"),
        ((x, w, torch.zeros(3)), ValueError, r"bias must be a \(C_out,\) = \(4,\) tensor, got \(3,\)"),
        ((x, w.half()), TypeError, "weight and bias must have x's dtype torch.float32"),
    ]:
        with pytest.raises(error, match=message):
            kernels.temporal_up_conv(*args)


# -- the ops: schema, fakes, compile, fallbacks ------------------------------------------------------------------------
def _op_samples():
    x = torch.randn(1, 8, 3, 4, 4)
    w, b = torch.randn(8), torch.randn(8)
    return [
        (torch.ops.stunet.temporal_attention.default, (torch.randn(1, 4, 5, 96), 2, None, None)),
        (torch.ops.stunet.group_norm.default, (x, 2, w, b, 1e-5, "frame", True, None)),
        (torch.ops.stunet.group_norm.default, (x, 4, w, b, 1e-5, "clip", False, torch.randn(1, 8))),
        (torch.ops.stunet.group_norm.default, (x.contiguous(memory_format=torch.channels_last_3d), 2, w, b, 1e-5,
                                                "frame", True, torch.randn(1, 8))),
        (torch.ops.stunet.group_norm.default, (torch.randn(3, 8, 4, 4).view(1, 3, 8, 4, 4).transpose(1, 2), 2, w,
                                                b, 1e-5, "frame", False, None)),
    ]


def test_ops_pass_opcheck():
    from stunet.kernels import ops  # noqa: F401  (registers the ops)

    for op, args in _op_samples():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_trace_under_torch_compile():
    x = torch.randn(1, 8, 4, 4, 4)
    w, b = torch.randn(8), torch.randn(8)

    def f(x):
        h = kernels.group_norm(x, 2, w, b, silu=True)
        qkv = h.permute(0, 2, 3, 4, 1).reshape(1, 4, 16, 8).repeat(1, 1, 1, 3)
        return kernels.temporal_attention(qkv, 2)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # one graph: the ops trace
    # Traced on the CPU the ops take their reference math (the interpreter runs kernels eagerly only).
    assert_close(compiled(x), f(x), atol=2e-5, rtol=2e-5, what="compiled vs eager")


def test_kernel_reasons_name_every_obstacle(monkeypatch, caplog):
    from stunet.kernels import ops

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = ops.kernel_reasons("group_norm", torch.zeros(1), ["dtype torch.float64"])
    assert any("tensors on cpu" in r for r in reasons) and "dtype torch.float64" in reasons
    with caplog.at_level(logging.WARNING, logger="stunet.kernels"):
        x, w = torch.randn(1, 4, 2, 3, 3), torch.randn(4)
        assert torch.equal(kernels.group_norm(x, 2, w, w), kernels.group_norm_ref(x, 2, w, w))
    assert kernels.unavailable_on("cpu") == reasons[0]
    assert not caplog.records  # CPU tensors outside the interpreter: the reference path is the CPU path, no warning


def test_gpus_older_than_ampere_run_the_reference_math(monkeypatch):
    """Below compute capability 8.0 Triton compiles the attention dots without tensor cores (and the wide-head
    tiles overflow Turing's 64 KB of shared memory per block), so the ops name the capability and run their
    reference math; each device's capability is asked once."""
    from stunet.kernels import ops

    capabilities = {0: (7, 5), 1: (8, 6), 2: (12, 0), 3: (7, 0)}
    asked = []

    def capability(index):
        asked.append(index)
        return capabilities[index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(ops, "_capabilities", {})
    assert "compute capability 7.5: the kernels need 8.0 or newer" in kernels.unavailable_on("cuda:0")
    assert "compute capability 7.0" in kernels.unavailable_on("cuda:3")
    assert kernels.unavailable_on("cuda") is None  # the current device, an sm_86
    assert kernels.unavailable_on("cuda:2") is None  # Blackwell consumer cards
    assert kernels.unavailable_on("cuda:0") and asked == [0, 3, 1, 2]


# -- offsets past 2^31 elements ----------------------------------------------------------------------------------------
def _far_apart(shape, strides, tmp_path, device):
    """An fp16 view whose element offsets pass 2^31 while every stride fits in int32: what a video of more
    than 2^31 elements per clip gives a kernel (Triton passes such strides as int32; an offset formed in int32
    wraps). On the CPU its storage is a sparse file mapped into memory (only the pages the view touches
    exist); on CUDA a real allocation of several GB."""
    numel = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    assert numel > 2**31 and max(strides) < 2**31
    if device == "cuda":
        flat = torch.zeros(numel, dtype=torch.float16, device="cuda")
    else:
        path = tmp_path / "storage.bin"
        with open(path, "wb") as f:
            f.truncate(numel * 2)
        flat = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float16)
        path.unlink()  # the mapping stays
    view = flat.as_strided(shape, strides)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    view.copy_(values.to(device))
    return view, values


# Where the kernels run: CUDA (a gpu test, with a real allocation), else the CPU in Triton's interpreter.
_DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if DEVICE == "cuda" else ["cpu"]


@pytest.mark.parametrize("device", _DEVICES)
def test_group_norm_offsets_past_two_to_the_31(device, tmp_path):
    """128 channels 2^25 elements apart (a clip of 2^32 elements): channel offsets are formed in int64."""
    x, values = _far_apart((1, 128, 2, 2, 2), (1, 2**25, 4, 2, 1), tmp_path, device)
    w = torch.randn(128, generator=torch.Generator().manual_seed(1)).to(device, torch.float16)
    for scope in ("frame", "clip"):
        got = kernels.group_norm(x, 32, w, w, scope=scope, silu=True)
        want = kernels.group_norm_ref(values, 32, w.cpu(), w.cpu(), scope=scope, silu=True)
        _check(got.cpu(), want, torch.float16, f"scope={scope}")


@pytest.mark.parametrize("device", _DEVICES)
def test_temporal_attention_offsets_past_two_to_the_31(device, tmp_path):
    """q|k|v channels 2^25 elements apart (3C = 96: offsets up to 3.2e9): formed in int64."""
    qkv, values = _far_apart((1, 3, 2, 96), (1, 4, 2, 2**25), tmp_path, device)
    _check(kernels.temporal_attention(qkv, 2).cpu(), kernels.temporal_attention_ref(values, 2), torch.float16,
           "far-apart channels", ATTN_TOL[torch.float16])


# CUDA's grid: up to 2^31 - 1 programs along x, 65,535 along y and z. Shapes are drawn up to what fits in 128 GiB
# of fp16 (2^36 elements), on meta tensors: the launchers' grids are recorded, nothing runs.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
MAX_ELEMENTS = 2**36


def _assert_grids_fit(launches, what):
    assert launches, what
    for _, kernel, grid, _, _ in launches:
        assert 1 <= len(grid) <= 3 and all(1 <= int(n) <= limit for n, limit in zip(grid, GRID_LIMITS)), \
            f"{kernel.fn.__name__} launched over grid {grid} (CUDA allows {GRID_LIMITS}) for {what}"


@settings(max_examples=60, deadline=None)
@given(B=st.sampled_from([1, 2, 7, 64]), C=st.sampled_from([32, 64, 320, 1280]), T=st.sampled_from([1, 5, 80, 2048]),
       H=st.sampled_from([1, 3, 128, 1024, 4096, 8192]), W=st.sampled_from([1, 5, 128, 1024, 4096, 8192]),
       scope=st.sampled_from(["frame", "clip"]), layout=st.sampled_from(["contiguous", "channels-last"]))
def test_group_norm_grids_fit_cuda_limits(B, C, T, H, W, scope, layout):
    from stunet.kernels import groupnorm

    assume(B * C * T * H * W <= MAX_ELEMENTS)
    trunk = torch.empty(B * T, C, H, W, dtype=torch.float16, device="meta")
    if layout == "channels-last":
        trunk = trunk.contiguous(memory_format=torch.channels_last)
    x = trunk.unflatten(0, (B, T)).transpose(1, 2)  # (B, C, T, H, W)
    w = torch.empty(C, dtype=torch.float16, device="meta")
    with recorded_launches(groupnorm) as launches:
        groupnorm.group_norm(x, 32, w, w, 1e-5, scope, True, num_programs=4 * 132)
    _assert_grids_fit(launches, f"a {layout} (B, C, T, H, W) = {tuple(x.shape)} video, {scope} scope")


@settings(max_examples=60, deadline=None)
@given(B=st.sampled_from([1, 2, 64]), T=st.sampled_from([1, 8, 80, 128, 1024]),
       S=st.sampled_from([1, 256, 128 * 128, 1024 * 1024, 4096 * 4096]), heads=st.sampled_from([1, 8, 16]),
       D=st.sampled_from([32, 64, 128]))
def test_temporal_attention_grids_fit_cuda_limits(B, T, S, heads, D):
    from stunet.kernels import temporal_attn

    assume(B * T * S * 3 * heads * D <= MAX_ELEMENTS)
    qkv = torch.empty(B, T, S, 3 * heads * D, dtype=torch.float16, device="meta")
    with recorded_launches(temporal_attn) as launches:
        temporal_attn.temporal_attention(qkv, heads)
    _assert_grids_fit(launches, f"(B, T, S) = {(B, T, S)}, {heads} heads of {D}")


# -- GPU ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_temporal_attention_beyond_flash_batch_limit():
    """B*H*W = 2 x 256 x 256 = 131,072 sequences (SDPA's flash backend refuses batch >= 65,536)."""
    qkv = torch.randn(2, 16, 256 * 256, 3 * 128, device="cuda", dtype=torch.float16)
    got = kernels.temporal_attention(qkv, 2)
    idx = torch.randint(0, 256 * 256, (512,), device="cuda")
    want = kernels.temporal_attention_ref(qkv[:, :, idx], 2)
    _check(got[:, :, idx], want, torch.float16, "131072 sequences", ATTN_TOL[torch.float16])


@pytest.mark.gpu
def test_gpu_ops_under_compile_and_cuda_graphs():
    x = torch.randn(2, 64, 8, 32, 32, device="cuda", dtype=torch.float16).contiguous(
        memory_format=torch.channels_last_3d)
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    qkv = torch.randn(2, 8, 1024, 3 * 64, device="cuda", dtype=torch.float16)

    bias_in = torch.randn(2, 64, device="cuda", dtype=torch.float16)

    def f(x, qkv):
        return kernels.group_norm(x, 32, w, b, silu=True, input_bias=bias_in), kernels.temporal_attention(qkv, 2)

    eager = f(x, qkv)
    compiled = torch.compile(f, fullgraph=True)(x, qkv)
    for a, e in zip(compiled, eager):
        assert torch.equal(a, e)
    f(x, qkv)  # warm-up: autotuning and allocation outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = f(x, qkv)
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(captured, eager):
        assert torch.equal(a, e)
