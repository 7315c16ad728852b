"""Fidelity of each backend against the FP32 reference, on the same weights and inputs.

    python bench/fidelity.py                                      # small, 16x64x64: reference FP16, compile, fast
    python bench/fidelity.py --backend fast --backend aoti        # an AOTInductor package built for the run
    python bench/fidelity.py --preset lumiere-base --frames 80 --size 128 --steps 8
    python bench/fidelity.py --device cpu --quick

Per step: one CFG forward (model batch 2, 77 text tokens) at timesteps 999, 500 and 20, and the relative L2
error of its prediction against the FP32 reference's (``|y - y32| / |y32|``; the worst of the three). Per video:
a generation of ``--steps`` DDIM steps with guidance 7.5 from the same seed and text, and the PSNR (dB) of its
frames against the FP32 reference's frames. The stock row is the reference in FP16 ("reference fp16", eager):
the error a user gets from ``model.half()`` alone, which every backend is held to (the GPU tests: per step at
most twice its error plus 1e-3, PSNR within 3 dB of it or at least 40 dB). Weights are random, with the
temporal modules perturbed (a fresh inflation is the identity in time) so that every block contributes. The FP32
reference is computed in IEEE FP32 (``ieee_fp32``: cuDNN's FP32 convolutions default to TF32 on a GPU).
On the CPU the low-precision rows run in FP16 too, where the backend allows (fast and the aoti package keep FP32
there). The aoti row's package is compiled for the run's geometry (static: batch 2, the frames and size, 77
tokens) from the same weights, as ``bench/step.py`` builds its own.
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command, compile_mode_option, device_info, parser, preset_name, write_results  # noqa: E402
from step import build_package  # noqa: E402

from stunet import Pipeline, STUNet, STUNetConfig, arguments  # noqa: E402
from stunet.backends import converted_copy, make_backend  # noqa: E402
from stunet.backends.base import ieee_fp32  # noqa: E402

TIMESTEPS = (999, 500, 20)


def random_model(preset: str, device) -> STUNet:
    """FP32 weights, seeded, with the temporal modules perturbed (as the test suite's models are): a freshly
    built model's temporal modules are the identity, which would hide their error."""
    torch.manual_seed(0)
    model = STUNet(STUNetConfig.from_preset(preset)).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, module in model.temporal_modules():
            for p in module.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.to(device)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def executors(model32: STUNet, backends: list[str], compile_mode: str, folder: str, frames: int,
              size: int) -> dict:
    """row -> (the model a backend is built on, its name, its options): the stock row and compile on an FP16
    copy, fast on the FP32 model (it converts on CUDA, as a user's call would), aoti on a package of the FP16
    copy built here for this geometry (of the FP32 model on the CPU, whose FP16 inductor code is not the
    product)."""
    copy16 = converted_copy(model32, torch.float16)
    rows = {"reference fp16": (copy16, "reference", {})}
    if "compile" in backends:
        rows["compile"] = (copy16, "compile", {"mode": compile_mode})
    if "fast" in backends:
        rows["fast"] = (model32, "fast", {})
    if "aoti" in backends:
        model = copy16 if model32.device.type == "cuda" else model32
        package, _ = build_package(model, folder, frames, size, size, compile_mode)
        rows["aoti"] = (model, "aoti", {"package": package})
    return rows


def measure(preset: str, backends: list[str], device, frames: int, size: int, steps: int, compile_mode: str) -> list:
    model32 = random_model(preset, device)
    cfg = model32.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, frames, size, size, generator=gen).to(device)
    text = torch.randn(2, 77, cfg.text_dim, generator=gen).to(device)
    video_kw = dict(prompt_embeds=text[:1], num_frames=frames, height=size, width=size, num_inference_steps=steps,
                    guidance_scale=7.5, seed=0)
    with torch.no_grad(), ieee_fp32():  # not cuDNN's default TF32 convolutions
        want = {t: model32(x, torch.full((2,), t, device=device), text) for t in TIMESTEPS}
        frames32 = Pipeline(model32, None, progress=False)(**video_kw).frames
    rows = []
    with tempfile.TemporaryDirectory(prefix="stunet-fidelity-") as folder:  # an aoti package lives here
        for label, (model, backend, options) in executors(model32, backends, compile_mode, folder, frames,
                                                          size).items():
            rows.append(measure_row(label, model, backend, options, x, text, want, video_kw, frames32))
    stock = rows[0]
    for r in rows:
        r["error_vs_fp16_reference"] = r["rel_l2_max"] / stock["rel_l2_max"] if stock["rel_l2_max"] else None
    return rows


def measure_row(label: str, model: STUNet, backend: str, options: dict, x, text, want: dict, video_kw: dict,
                frames32: np.ndarray) -> dict:
    """One backend's per-step errors (against ``want``, the FP32 predictions per timestep) and video PSNR."""
    executor = make_backend(model, backend, **options)
    dtype = executor.dtype
    errors = {}
    with torch.no_grad():
        for t, y32 in want.items():
            y = executor(x.to(dtype), torch.full((2,), t, device=x.device), text.to(dtype), None)
            errors[t] = rel_l2(y, y32)
    del executor
    out = Pipeline(model, None, backend=backend, backend_options=options or None, progress=False)(**video_kw)
    return {"impl": label, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
            "rel_l2": {str(t): e for t, e in errors.items()}, "rel_l2_max": max(errors.values()),
            "psnr_db": psnr(out.frames, frames32)}


def markdown(rows: list[dict], info: dict, label: str) -> str:
    lines = [f"Device: {info['device']}; torch {info['torch']}. {label}; against the FP32 reference on the same "
             "weights and inputs.", "",
             "| backend | dtype | rel. L2 per step, max | t=999 | t=500 | t=20 | x reference fp16 | video PSNR (dB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['error_vs_fp16_reference']:.3g}x" if r["error_vs_fp16_reference"] is not None else ""
        per_t = " | ".join(f"{r['rel_l2'][str(t)]:.2e}" for t in TIMESTEPS)
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['rel_l2_max']:.2e} | {per_t} | {ratio} | "
                     f"{r['psnr_db']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = parser("fidelity", __doc__, iters=None)
    p.add_argument("--preset", type=preset_name, default="small",
                   help="a base preset (default small; tiny with --quick)")
    p.add_argument("--backend", action="append", choices=["compile", "fast", "aoti"],
                   help="repeatable; default compile and fast (fast on the CPU); aoti builds a package for the "
                        "geometry first; the FP16 reference row always runs")
    p.add_argument("--frames", type=arguments.positive, default=16)
    p.add_argument("--size", type=arguments.positive, default=64)
    p.add_argument("--steps", type=arguments.positive, default=8, help="DDIM steps of the video (default 8)")
    compile_mode_option(p, "default", "of the compile row (fidelity does not need autotuning)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    preset = "tiny" if args.quick else args.preset
    frames, size, steps = (8, 16, 2) if args.quick else (args.frames, args.size, args.steps)
    cfg = STUNetConfig.from_preset(preset)
    if cfg.is_ssr or cfg.in_channels != 3:
        p.error(f"argument --preset: {preset!r} is not a pixel base model (in_channels=3); use small, edge or "
                "lumiere-base")
    if frames % cfg.frame_divisor or size % cfg.spatial_divisor:
        p.error(f"arguments --frames/--size: {preset} takes frames in multiples of {cfg.frame_divisor} and sizes "
                f"in multiples of {cfg.spatial_divisor}, got {frames} and {size}")
    backends = args.backend or (["compile", "fast"] if device.type == "cuda" else ["fast"])
    label = f"{preset}, 2x{cfg.in_channels}x{frames}x{size}x{size}, video of {steps} steps"
    try:
        rows = measure(preset, backends, device, frames, size, steps, args.compile_mode)
    except ValueError as e:  # what the model or a backend refuses beyond the checks above
        p.error(str(e))
    info = device_info(device)
    table = markdown(rows, info, label)
    print(table)
    doc = {"bench": "fidelity", "command": command("fidelity", argv), "stock": "reference fp16", **info,
           "workload": label, "rows": rows}
    write_results("fidelity", doc, table, args.out, args.quick)
    return doc


if __name__ == "__main__":
    main()
