"""End to end: text embeddings -> base STUNet (CFG) -> SSR on MultiDiffusion windows -> frames, per backend.

    python bench/pipeline.py                                  # lumiere-base + lumiere-ssr, 80 frames
    python bench/pipeline.py --steps 8 --ssr-steps 4 --backend fast --backend reference
    python bench/pipeline.py --device cpu --quick

Seconds per video and per stage (text, base, ssr, decode; each stage ends with a device synchronisation).
Weights are random; the text encoder is replaced by fixed embeddings (its cost is a T5 forward, not ours).
The stock row is the eager FP16 reference backend with the Python sampler ("reference + python").
"""
from __future__ import annotations

import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, command, parser, report  # noqa: E402

from stunet import Pipeline, SSROptions, STUNet, STUNetConfig, arguments  # noqa: E402

TINY_SSR = dict(in_channels=6, noise_aug=True, low_res_size=8, temporal_downsample=(False, False),
                temporal_attn_depth=0, sample_size=16)


def models(quick: bool, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        if quick:
            base = STUNet(STUNetConfig.from_preset("tiny"))
            ssr = STUNet(STUNetConfig.from_preset("tiny", **TINY_SSR))
        else:
            base = STUNet(STUNetConfig.from_preset("lumiere-base"))
            ssr = STUNet(STUNetConfig.from_preset("lumiere-ssr"))
    return base.to(dtype).eval(), ssr.to(dtype).eval()


def run(backend: str, runtime: str, args, device, dtype) -> Row:
    """One row: a whole generation, timed after a one-step warm-up call (unless --no-warmup); on CUDA the peak
    memory of this row alone (the weights included), or a failed row when it runs out of memory."""
    gc.collect()
    if device.type == "cuda":  # the rows before this one, finished or failed, are gone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base, ssr = models(args.quick, device, dtype)
    pipe = Pipeline(base, None, ssr, backend=backend, runtime=runtime, progress=False)
    cfg = base.config
    frames, size = (8, 8) if args.quick else (cfg.sample_frames, cfg.sample_size)
    text = torch.randn(1, 77, cfg.text_dim, device=device, dtype=dtype)
    ssr_options = SSROptions(num_inference_steps=args.ssr_steps, window=4 if args.quick else 16,
                             overlap=1 if args.quick else 2, batch_size=args.ssr_batch)
    kw = dict(prompt_embeds=text, num_frames=frames, height=size, width=size, num_inference_steps=args.steps,
              guidance_scale=7.5, seed=0, ssr=ssr_options)
    cascade = "tiny" if args.quick else "lumiere-base + lumiere-ssr"
    label = f"{cascade} {frames} frames, {args.steps}+{args.ssr_steps} steps"
    impl = f"{backend} + {runtime}"
    try:
        if args.warmup:
            once = dataclasses.replace(ssr_options, num_inference_steps=1)
            pipe(**{**kw, "num_inference_steps": 1, "ssr": once})  # compile / capture once
        t0 = time.perf_counter()
        res = pipe(**kw)
        total = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:
        return Row("video", label, impl, 0.0, extra={"error": f"out of memory ({e})"[:200]})
    extra = {f"{k}_s": v for k, v in res.timings.items()}
    extra["frames"] = list(res.frames.shape)
    if device.type == "cuda":
        extra["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return Row("video", label, impl, total * 1e3, extra=extra)


def main(argv=None) -> dict:
    p = parser("pipeline", __doc__, iters=None)
    p.add_argument("--backend", action="append", choices=["reference", "compile", "fast"],
                   help="repeatable; default reference, fast")
    p.add_argument("--steps", type=arguments.positive, default=32)
    p.add_argument("--ssr-steps", type=arguments.positive, default=32)
    p.add_argument("--ssr-batch", type=arguments.positive, default=1,
                   help="SSR windows per model call (default 1: the CFG pair of one lumiere-ssr window holds 39 GB "
                        "of activations on the fast backend and 86 GB on the reference, as simulated; 6 windows "
                        "cover 80 frames)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first call too")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.ssr_steps = min(args.steps, 2), min(args.ssr_steps, 2)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = [run("reference", "python", args, device, dtype)]
    for backend in args.backend or ["reference", "fast"]:
        rows.append(run(backend, "cpp", args, device, dtype))
    for r in rows:  # per-stage rows, so the table shows where the time goes
        for stage in ("base", "ssr"):
            if f"{stage}_s" in r.extra:
                rows.append(Row(f"stage {stage}", r.shape, r.impl, r.extra[f"{stage}_s"] * 1e3))
    return report("pipeline", rows, device, stock="reference + python", command=command("pipeline", argv),
                  quick=args.quick, out_dir=args.out)


if __name__ == "__main__":
    main()
