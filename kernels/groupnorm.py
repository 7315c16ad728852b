"""Video GroupNorm with a fused input bias and SiLU; per-frame or per-clip statistics.

Layout: a logical (B, C, T, H, W) video with any strides whose (H, W) merge into one pixel axis: contiguous
NCDHW, channels-last-3d (B, T, H, W, C physical), or the trunk's folded (B*T, C, H, W) seen as a video.
``scope="frame"`` normalises each (clip, frame, group) over (C/G, H, W); ``scope="clip"`` each (clip, group)
over (C/G, T, H, W). The output has x's shape and memory format:

    x' = x + input_bias[b, c];  y = (x' - mean(x')) * rstd(x') * weight[c] + bias[c];  y = silu(y)

``input_bias`` is the ResBlock's timestep embedding, added before its second norm: fusing it saves the
materialised ``h + emb`` (a read and a write of the video) per ResBlock.

Why a kernel: native GroupNorm runs one program per (batch, group), which on a video leaves most of the GPU
idle and reads 131k-element groups serially. Here the reduction is split across many programs:
  1. ``_gn_partial_kernel``: each of SPLIT programs per statistics group reduces a slice of its rows to
     (count, mean, M2) in fp32 (a tile's M2 around its own mean, Chan's combination across tiles: no
     catastrophic cancellation from sum-of-squares); for channels-last tensors ``_gn_partial_rows_kernel``
     reduces whole contiguous pixel rows into all G groups of a frame at once;
  2. ``_gn_finalize_kernel`` combines the SPLIT partials into mean and rstd;
  3. ``_gn_apply_kernel`` normalises [pixels x channels] tiles in x's own layout.
Bytes: x is read twice (statistics, then apply) and y written once: 3 passes of the video for the 2 an ideal
single-pass kernel would need, unless L2 still holds x for the second read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import jit, launch, tl, triton


@jit
def _chan_combine(count, mean, m2, n, part_mean, part_m2):
    """Merges a part's (n, mean, M2) into running statistics (Chan et al. 1979); parts with n = 0 change
    nothing. Works elementwise, so on one group or on a vector of groups."""
    total = count + n
    safe = tl.where(total > 0, total, 1.0)
    delta = part_mean - mean
    mean = tl.where(n > 0, mean + delta * (n / safe), mean)
    m2 = tl.where(n > 0, m2 + part_m2 + delta * delta * (count * n / safe), m2)
    return total, mean, m2


@jit
def _gn_partial_kernel(
    x, ibias, part, T, P, C, G, CG, rows_per_group, rows_per_split,
    s_b, s_c, s_t, s_p,
    CLIP_SCOPE: tl.constexpr, HAS_IBIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    sg = tl.program_id(0)  # statistics group: (b, t, g) for frame scope, (b, g) for clip scope
    split = tl.program_id(1)
    g = sg % G
    if CLIP_SCOPE:
        b = sg // G
        t0 = 0
    else:
        bt = sg // G
        b = bt // T
        t0 = bt % T
    cols = tl.arange(0, BLOCK_CG)
    c = g * CG + cols
    col_ok = cols < CG
    base = x + b.to(tl.int64) * s_b + t0.to(tl.int64) * s_t
    if HAS_IBIAS:
        ib = tl.load(ibias + b * C + c, mask=col_ok, other=0.0).to(tl.float32)
    count = tl.zeros([1], tl.float32)
    mean = tl.zeros([1], tl.float32)
    m2 = tl.zeros([1], tl.float32)
    r_start = split * rows_per_split
    for r0 in range(r_start, r_start + rows_per_split, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)  # row = (frame within the group, pixel)
        row_ok = (r < rows_per_group) & (r < r_start + rows_per_split)
        t = r // P
        p = r % P
        off = t.to(tl.int64) * s_t + p.to(tl.int64) * s_p
        ok = row_ok[:, None] & col_ok[None, :]
        v = tl.load(base + off[:, None] + (c.to(tl.int64) * s_c)[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_IBIAS:
            v = tl.where(ok, v + ib[None, :], 0.0)
        n = tl.sum(tl.sum(ok.to(tl.float32), 1), 0)
        tile_mean = tl.sum(tl.sum(v, 1), 0) / tl.where(n > 0, n, 1.0)
        dev = tl.where(ok, v - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(dev * dev, 1), 0)
        count, mean, m2 = _chan_combine(count, mean, m2, n, tile_mean, tile_m2)
    out = part + (sg * tl.num_programs(1) + split) * 3
    idx = tl.arange(0, 1)
    tl.store(out + idx, count)
    tl.store(out + 1 + idx, mean)
    tl.store(out + 2 + idx, m2)


@jit
def _gn_partial_rows_kernel(
    x, ibias, part, T, P, C, G, CG: tl.constexpr, rows_per_group, rows_per_split,
    s_b, s_c, s_t, s_p,
    CLIP_SCOPE: tl.constexpr, HAS_IBIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    """Channels-last partial statistics: a program reduces whole pixel rows (all C channels, contiguous) into
    every group's (count, mean, M2) at once, where the per-group kernel would read C/G-channel slivers of each
    row (16 bytes of a 512-byte row at C = 256, G = 32). The group width CG is a compile-time constant: with it
    the compiler sees each group's channels as one aligned run and loads them as vectors (with CG a runtime
    value, 8 channels of fp16 were 8 separate 2-byte loads)."""
    sf = tl.program_id(0)  # the frame (frame scope) or clip (clip scope) whose G groups this program reduces
    split = tl.program_id(1)
    if CLIP_SCOPE:
        b = sf
        t0 = 0
    else:
        b = sf // T
        t0 = sf % T
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_CG)
    c = g[:, None] * CG + j[None, :]
    c_ok = (g[:, None] < G) & (j[None, :] < CG)
    base = x + b.to(tl.int64) * s_b + t0.to(tl.int64) * s_t
    if HAS_IBIAS:
        ib = tl.load(ibias + b * C + c, mask=c_ok, other=0.0).to(tl.float32)
    count = tl.zeros([BLOCK_G], tl.float32)
    mean = tl.zeros([BLOCK_G], tl.float32)
    m2 = tl.zeros([BLOCK_G], tl.float32)
    r_start = split * rows_per_split
    for r0 in range(r_start, r_start + rows_per_split, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_ok = (r < rows_per_group) & (r < r_start + rows_per_split)
        off = (r // P).to(tl.int64) * s_t + (r % P).to(tl.int64) * s_p
        ok = row_ok[:, None, None] & c_ok[None, :, :]
        v = tl.load(base + off[:, None, None] + (c.to(tl.int64) * s_c)[None, :, :], mask=ok,
                    other=0.0).to(tl.float32)
        if HAS_IBIAS:
            v = tl.where(ok, v + ib[None, :, :], 0.0)
        n = tl.sum(tl.sum(ok.to(tl.float32), 2), 0)
        tile_mean = tl.sum(tl.sum(v, 2), 0) / tl.where(n > 0, n, 1.0)
        dev = tl.where(ok, v - tile_mean[None, :, None], 0.0)
        tile_m2 = tl.sum(tl.sum(dev * dev, 2), 0)
        count, mean, m2 = _chan_combine(count, mean, m2, n, tile_mean, tile_m2)
    out = part + ((sf * G + g) * tl.num_programs(1) + split) * 3
    g_ok = g < G
    tl.store(out, count, mask=g_ok)
    tl.store(out + 1, mean, mask=g_ok)
    tl.store(out + 2, m2, mask=g_ok)


@jit
def _gn_finalize_kernel(part, stats, num_groups, splits, eps, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """Combines BLOCK_S partials at a time in closed form (their total count, the count-weighted mean, and
    M2 = sum of the parts' M2 + n * (part mean - chunk mean)^2: Chan's combination of k parts, a sum of
    non-negative terms), then merges the chunk into the running statistics."""
    gs = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = gs < num_groups
    count = tl.zeros([BLOCK_G], tl.float32)
    mean = tl.zeros([BLOCK_G], tl.float32)
    m2 = tl.zeros([BLOCK_G], tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = g_ok[:, None] & (s < splits)[None, :]
        ptr = part + (gs[:, None] * splits + s[None, :]) * 3
        n = tl.load(ptr, mask=ok, other=0.0)  # masked parts count 0 and add nothing below
        mu = tl.load(ptr + 1, mask=ok, other=0.0)
        q = tl.load(ptr + 2, mask=ok, other=0.0)
        chunk_n = tl.sum(n, 1)
        chunk_mean = tl.sum(n * mu, 1) / tl.where(chunk_n > 0, chunk_n, 1.0)
        dev = mu - chunk_mean[:, None]
        chunk_m2 = tl.sum(q + n * dev * dev, 1)
        count, mean, m2 = _chan_combine(count, mean, m2, chunk_n, chunk_mean, chunk_m2)
    var = m2 / tl.where(count > 0, count, 1.0)
    tl.store(stats + gs * 2, mean, mask=g_ok)
    tl.store(stats + gs * 2 + 1, 1.0 / tl.sqrt(var + eps), mask=g_ok)


@jit
def _gn_apply_kernel(
    x, y, weight, bias, ibias, stats,
    T, P, C, G, CG,
    s_b, s_c, s_t, s_p, y_b, y_c, y_t, y_p,
    CLIP_SCOPE: tl.constexpr, SILU: tl.constexpr, HAS_IBIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pixel_blocks = tl.cdiv(P, BLOCK_P)
    bt = tl.program_id(0) // pixel_blocks  # (frame, pixel block) on the grid's x axis, which takes 2^31 - 1
    b = bt // T
    t = bt % T
    p = (tl.program_id(0) % pixel_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ok = p_ok[:, None] & c_ok[None, :]
    if CLIP_SCOPE:
        sg = b * G + c // CG
    else:
        sg = bt * G + c // CG
    mean = tl.load(stats + sg * 2, mask=c_ok, other=0.0)
    rstd = tl.load(stats + sg * 2 + 1, mask=c_ok, other=0.0)
    w = tl.load(weight + c, mask=c_ok, other=0.0).to(tl.float32)
    bb = tl.load(bias + c, mask=c_ok, other=0.0).to(tl.float32)
    a = rstd * w  # (x - mean) first: x * a - mean * a would cancel badly when rstd is large
    off = b.to(tl.int64) * s_b + t.to(tl.int64) * s_t + p.to(tl.int64)[:, None] * s_p + (c.to(tl.int64) * s_c)[None, :]
    v = tl.load(x + off, mask=ok, other=0.0).to(tl.float32)
    if HAS_IBIAS:
        v += tl.load(ibias + b * C + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    out = (v - mean[None, :]) * a[None, :] + bb[None, :]
    if SILU:
        out = out * tl.sigmoid(out)
    y_off = (b.to(tl.int64) * y_b + t.to(tl.int64) * y_t + p.to(tl.int64)[:, None] * y_p
             + (c.to(tl.int64) * y_c)[None, :])
    tl.store(y + y_off, out.to(y.dtype.element_ty), mask=ok)


def same_layout(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y`` with ``like``'s strides (a copy only when they differ): outputs keep the caller's memory layout,
    so a folded trunk's video view comes back as a view of the same folding."""
    if y.stride() == like.stride():
        return y
    return torch.empty_like(like, dtype=y.dtype).copy_(y)


def group_norm_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                   scope: str = "frame", silu: bool = False, input_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's semantics in fp32 on a (B, C, T, H, W) video (any strides): ``x + input_bias`` ((B, C), optional),
    GroupNorm over (C/G, H, W) per frame or (C/G, T, H, W) per clip, affine, optional SiLU; one rounding to x's
    dtype at the end. The result has x's strides. This is also the reference model's GroupNorm."""
    B, C, T, H, W = x.shape
    v = x.float()
    if input_bias is not None:
        v = v + input_bias.float()[:, :, None, None, None]
    G = num_groups
    # The groups with the pixels left unflattened, contiguous, reduced over their trailing axes: (B, T, G, C/G, H, W)
    # per frame (a view of the folded trunk), (B, G, C/G, T, H, W) per clip (a copy; a contiguous reduction is
    # summed pairwise, ten times more accurately than a strided one at 2^17 elements). Unflattened, the indexing
    # stays affine in every axis; a compiler flattening C/G * H * W with dynamic H and W meets nested modular
    # indexing (minutes per norm).
    if scope == "frame":
        grouped, dims = v.transpose(1, 2).contiguous().unflatten(2, (G, C // G)), (3, 4, 5)
    else:
        grouped, dims = v.contiguous().unflatten(1, (G, C // G)), (2, 3, 4, 5)
    count = math.prod(grouped.shape[dims[0]:])  # the trailing axes (no generator: torch.compile traces this)
    # Two passes (mean, then the centred sum of squares): exact for constant groups, and on the CPU three times
    # faster than var_mean's Welford loop.
    y = grouped - grouped.mean(dim=dims, keepdim=True)
    var = torch.linalg.vector_norm(y, dim=dims, keepdim=True).square().div(count)
    # In place on the video-sized temporaries, except where autograd needs them (training): same values.
    inplace = not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))
    mul, add = (torch.Tensor.mul_, torch.Tensor.add_) if inplace else (torch.mul, torch.add)
    y = mul(y, torch.rsqrt(var + eps))
    y = y.flatten(2, 3).transpose(1, 2) if scope == "frame" else y.flatten(1, 2)  # (B, C, T, H, W)
    y = add(mul(y, weight.float()[:, None, None, None]), bias.float()[:, None, None, None])
    if silu:
        y = F.silu(y, inplace=inplace)
    return same_layout(y.to(x.dtype), x)


def _video_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(b, c, t, pixel) strides of a (B, C, T, H, W) tensor whose H and W merge (stride_h == W * stride_w)."""
    sb, sc, st, sh, sw = t.stride()
    assert t.shape[3] == 1 or t.shape[4] == 1 or sh == t.shape[4] * sw, "H and W must merge"
    return sb, sc, st, (sw if t.shape[4] > 1 else sh)


def unsupported(x: torch.Tensor, num_groups: int) -> list[str]:
    """Why the kernel cannot take these inputs (empty: it can)."""
    reasons = []
    if x.dim() != 5:
        reasons.append(f"x must be (B, C, T, H, W), got {x.dim()}-D")
        return reasons
    sb, sc, st, sh, sw = x.stride()
    if x.shape[3] > 1 and x.shape[4] > 1 and sh != x.shape[4] * sw:
        reasons.append("x's H and W strides do not merge into one pixel axis")
    if x.dtype not in (torch.float16, torch.float32, torch.bfloat16):
        reasons.append(f"dtype {x.dtype}")
    return reasons


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               scope: str = "frame", silu: bool = False, input_bias: torch.Tensor | None = None,
               num_programs: int | None = None) -> torch.Tensor:
    """Launches the three kernels on a (B, C, T, H, W) video; the output has x's strides. ``num_programs``:
    target for the statistics grid (default 4 per SM on a GPU)."""
    B, C, T, H, W = x.shape
    P, G = H * W, num_groups
    CG = C // G
    frames = 1 if scope == "frame" else T
    n_groups = B * G * (T if scope == "frame" else 1)
    rows = frames * P
    block_cg = triton.next_power_of_2(CG)
    rows_kernel = x.stride(1) == 1 and C > 1  # channels-last: reduce whole rows, all groups per program
    tile_cols = triton.next_power_of_2(G) * block_cg if rows_kernel else block_cg
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // tile_cols))
    if num_programs is None:
        num_programs = 4 * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8)
    stat_programs = n_groups // G if rows_kernel else n_groups  # programs per split
    splits = max(1, min(triton.cdiv(rows, block_r), triton.cdiv(num_programs, stat_programs), 1024))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    splits = triton.cdiv(rows, rows_per_split)
    part = torch.empty(n_groups * splits * 3, dtype=torch.float32, device=x.device)
    stats = torch.empty(n_groups * 2, dtype=torch.float32, device=x.device)
    sx = _video_strides(x)
    has_ibias = input_bias is not None
    ibias = input_bias.contiguous() if has_ibias else weight  # a placeholder pointer when absent
    if rows_kernel:
        launch(_gn_partial_rows_kernel)[(stat_programs, splits)](
            x, ibias, part, T, P, C, G, CG, rows, rows_per_split, *sx, CLIP_SCOPE=scope == "clip",
            HAS_IBIAS=has_ibias, BLOCK_R=block_r, BLOCK_G=triton.next_power_of_2(G), BLOCK_CG=block_cg)
    else:
        launch(_gn_partial_kernel)[(n_groups, splits)](x, ibias, part, T, P, C, G, CG, rows, rows_per_split, *sx,
                                              CLIP_SCOPE=scope == "clip", HAS_IBIAS=has_ibias, BLOCK_R=block_r,
                                              BLOCK_CG=block_cg)
    block_g = 64
    launch(_gn_finalize_kernel)[(triton.cdiv(n_groups, block_g),)](part, stats, n_groups, splits, eps, BLOCK_G=block_g,
                                                           BLOCK_S=min(16, triton.next_power_of_2(splits)))
    y = torch.empty_like(x)  # x's strides (x is dense: the op checked that H and W merge)
    block_c = min(64, triton.next_power_of_2(C))
    block_p = max(1, min(triton.next_power_of_2(P), 4096 // block_c))
    grid = (B * T * triton.cdiv(P, block_p), triton.cdiv(C, block_c))
    launch(_gn_apply_kernel)[grid](x, y, weight, bias, ibias, stats, T, P, C, G, CG, *sx, *_video_strides(y),
                           CLIP_SCOPE=scope == "clip", SILU=silu, HAS_IBIAS=has_ibias, BLOCK_P=block_p,
                           BLOCK_C=block_c)
    return y
