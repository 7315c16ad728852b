"""Triton kernels against the stock PyTorch a user would write, at the presets' shapes and the measured ones.

    python bench/kernels.py                     # CUDA; --no-compile skips the torch.compile rows (slow to build)
    python bench/kernels.py --device cpu --quick

Rows (fp16 on CUDA, fp32 on CPU; bytes are what an ideal kernel moves once; the stock rows are "torch eager"):
- temporal attention: qkv (B, T, S, 3C) -> (B, T, S, C); stock = view/permute to (B*S, heads, T, D) copies, the
  SDPA backend torch picks, permute back; the same with each SDPA backend forced ("torch SDPA (flash)", ...),
  every one that runs the shape (one that cannot is named on stderr). Bytes 4 * B*T*S*C * 2; FLOPs
  4 * B*S*heads*T^2*D. T sweeps 5 (lumiere-base's coarsest level) to 128.
- group norm + SiLU on (B, C, T, H, W) videos, per-frame and per-clip statistics, NCDHW and channels-last;
  stock = fold the frames into the batch (a copy for NCDHW; per clip: the 5-D tensor as it is), F.group_norm,
  F.silu, unfold; also that function under torch.compile. Bytes: read x + write y. The ResBlock's form adds
  the (B, C) timestep embedding first (stock: a materialised ``x + emb``; stunet: fused into the norm).
- TemporalUp (duplication + depth-3 temporal conv): folded polyphase form vs duplicate-then-conv3d; FLOPs
  counted as the stock form's.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, command, parser, report, timeit  # noqa: E402

from stunet import STUNetConfig, kernels  # noqa: E402


def attention_shapes(quick: bool):
    """(label, B, T, S, C, heads)."""
    if quick:
        return [("quick", 1, 16, 64, 64, 2), ("quick T=5", 2, 5, 16, 64, 1)]
    base, edge = STUNetConfig.from_preset("lumiere-base"), STUNetConfig.from_preset("edge")
    rows = [("issue: B2 C512 T16 32x32", 2, 16, 1024, 512, 8), ("design: 16384 seq x T16 h8 d64", 1, 16, 16384, 512, 8)]
    rows += [(f"sweep T={T}", 1, T, 4096, 512, 8) for T in (5, 8, 16, 32, 64, 80, 128)]
    for name, cfg in (("lumiere-base mid", base), ("edge mid", edge)):
        T, H, W, C = cfg.level_shapes(cfg.sample_frames, cfg.sample_size, cfg.sample_size)[-1]
        rows.append((f"{name} (CFG batch 2)", 2, T, H * W, C, cfg.temporal_attn_heads))
    rows.append(("131072 sequences (beyond flash's 65535)", 2, 16, 65536, 256, 4))
    return rows


def video_shapes(quick: bool):
    """(label, (B, C, T, H, W)) at every level of lumiere-base, CFG batch 2."""
    if quick:
        return [("quick", (2, 32, 4, 16, 16))]
    cfg = STUNetConfig.from_preset("lumiere-base")
    return [(f"lumiere-base L{i}", (2, C, T, H, W))
            for i, (T, H, W, C) in enumerate(cfg.level_shapes(cfg.sample_frames, cfg.sample_size, cfg.sample_size))]


def sdpa_stock(qkv: torch.Tensor, heads: int, backend: SDPBackend | None = None) -> torch.Tensor:
    """Permute to SDPA's (batch, heads, T, D), attend (with ``backend`` forced, if given), permute back."""
    B, T, S, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.view(B, T, S, 3, heads, C // heads).permute(3, 0, 2, 4, 1, 5).reshape(3, B * S, heads, T, -1)
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        o = F.scaled_dot_product_attention(q, k, v)
    return o.view(B, S, heads, T, -1).permute(0, 3, 1, 2, 4).reshape(B, T, S, C)


SDPA_BACKENDS = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "flash": SDPBackend.FLASH_ATTENTION, "cuDNN": SDPBackend.CUDNN_ATTENTION}


def gn_silu_stock(x: torch.Tensor, groups: int, w: torch.Tensor, b: torch.Tensor, scope: str = "frame",
                  emb: torch.Tensor | None = None) -> torch.Tensor:
    B, C, T, H, W = x.shape
    if emb is not None:
        x = x + emb[:, :, None, None, None]
    if scope == "clip":
        return F.silu(F.group_norm(x, groups, w, b))
    folded = x.transpose(1, 2).reshape(B * T, C, H, W)  # free for channels-last, a copy for NCDHW
    y = F.silu(F.group_norm(folded, groups, w, b))
    return y.view(B, T, C, H, W).transpose(1, 2)


def attention_rows(device, quick, iters, dtype):
    rows = []
    for label, B, T, S, C, heads in attention_shapes(quick):
        qkv = torch.randn(B, T, S, 3 * C, device=device, dtype=dtype)
        nbytes = 4 * B * T * S * C * qkv.element_size()
        flops = 4 * B * S * heads * T * T * (C // heads)
        shape = f"{label}: B{B} T{T} S{S} C{C} h{heads}"
        rows.append(Row("temporal attention", shape, "torch eager", timeit(lambda: sdpa_stock(qkv, heads), device,
                                                                         iters=iters), nbytes, flops))
        for name, backend in SDPA_BACKENDS.items():
            try:
                with warnings.catch_warnings():  # a backend that cannot run warns its reasons, then raises
                    warnings.simplefilter("ignore")
                    ms = timeit(lambda: sdpa_stock(qkv, heads, backend), device, iters=iters)
            except RuntimeError as e:  # this backend does not take this shape, dtype or device
                print(f"torch SDPA ({name}) cannot run {shape}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                continue
            rows.append(Row("temporal attention", shape, f"torch SDPA ({name})", ms, nbytes, flops))
        rows.append(Row("temporal attention", shape, "stunet", timeit(lambda: kernels.temporal_attention(qkv, heads),
                                                                     device, iters=iters), nbytes, flops))
        qkv = None  # this shape's memory goes before the next one's is allocated
    return rows


def video_rows(device, quick, iters, compile_stock, dtype):
    rows = []
    for label, shape in video_shapes(quick):
        B, C, T, H, W = shape
        for layout in ("ncdhw", "channels-last"):
            x = torch.randn(shape, device=device, dtype=dtype)
            if layout == "channels-last":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            w, b = torch.randn(C, device=device, dtype=dtype), torch.randn(C, device=device, dtype=dtype)
            emb = torch.randn(B, C, device=device, dtype=dtype)
            name = f"{label} {'x'.join(map(str, shape))} {layout}"
            nbytes = 2 * x.numel() * x.element_size()
            compiled = torch.compile(gn_silu_stock, dynamic=False) if compile_stock else None
            for scope, bias_in in (("frame", None), ("clip", None), ("frame", emb)):
                bench = f"group norm + silu, per {scope}" + (" + emb (ResBlock)" if bias_in is not None else "")
                rows.append(Row(bench, name, "torch eager",
                                timeit(lambda: gn_silu_stock(x, 32, w, b, scope, bias_in), device, iters=iters),
                                nbytes))
                if compiled is not None:
                    rows.append(Row(bench, name, "torch.compile",
                                    timeit(lambda: compiled(x, 32, w, b, scope, bias_in), device, iters=iters),
                                    nbytes))
                rows.append(Row(bench, name, "stunet",
                                timeit(lambda: kernels.group_norm(x, 32, w, b, scope=scope, silu=True,
                                                                  input_bias=bias_in), device, iters=iters), nbytes))
            if T * H * W * C <= 20 * 32 * 32 * 768 or quick:  # the deeper levels; the top ones only add memory
                wt = torch.randn(C, C, 3, device=device, dtype=dtype) * 0.02
                bt = torch.zeros(C, device=device, dtype=dtype)
                flops = 2 * B * 2 * T * H * W * C * C * 3
                rows.append(Row("TemporalUp (dup + conv k=3)", name, "torch eager",
                                timeit(lambda: kernels.temporal_up_conv_ref(x, wt, bt), device, iters=iters),
                                3 * x.numel() * x.element_size(), flops))
                rows.append(Row("TemporalUp (dup + conv k=3)", name, "stunet",
                                timeit(lambda: kernels.temporal_up_conv(x, wt, bt), device, iters=iters),
                                3 * x.numel() * x.element_size(), flops))
            x = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> dict:
    p = parser("kernels", __doc__)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and kernels.available():
        p.error(f"the Triton kernels cannot run: {kernels.available()}")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = attention_rows(device, args.quick, args.iters, dtype)
    rows += video_rows(device, args.quick, args.iters, not args.no_compile and device.type == "cuda", dtype)
    return report("kernels", rows, device, stock="torch eager", command=command("kernels", argv),
                  quick=args.quick, out_dir=args.out)


if __name__ == "__main__":
    main()
