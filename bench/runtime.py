"""The C++ runtime's fused step and MultiDiffusion blend against the same math as a sequence of torch ops.

    python bench/runtime.py                  # CUDA: base 80x128x128 and a full-resolution SSR video 80x1024x1024
    python bench/runtime.py --device cpu --quick

Bytes per element (fp16 video, fp32 history): a guided DDIM step reads cond, uncond and x and writes x_{t-1}
(8 B); DPM-Solver++(2M) also reads and writes the fp32 x0 history (16 B). The blend reads every window
(N * L / T times the video) and writes the clip once. The torch-op row is the Python reference
(``Sampler.guided_step``: cfg_combine + the sampler's update; ``multidiffusion.blend``), the same math.
Stochastic samplers also draw noise on the CPU (for device-independent seeds); that is a pipeline cost, not
the step's, so DDPM is not timed here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, command, parser, report, timeit  # noqa: E402

from stunet.sampling import runtime  # noqa: E402
from stunet.sampling.multidiffusion import blend, window_plan, window_weights  # noqa: E402
from stunet.sampling.samplers import make_sampler  # noqa: E402

WORKLOADS = {  # name: (B, C, T, H, W), SSR window, overlap
    "base": ((1, 3, 80, 128, 128), 16, 2),
    "ssr": ((1, 3, 80, 1024, 1024), 16, 2),
}
QUICK = {"quick": ((1, 3, 20, 32, 32), 8, 2)}


def step_rows(name: str, shape, device, dtype, iters: int) -> list[Row]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    cond = torch.randn(shape, generator=g, device=device).to(dtype)
    uncond = torch.randn(shape, generator=g, device=device).to(dtype)
    out = torch.empty_like(x)
    numel, elem = x.numel(), x.element_size()
    label = f"{name} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
    for sampler, scale, rescale in (("ddim", 7.5, 0.0), ("dpmpp2m", 7.5, 0.0), ("ddim", 7.5, 0.7)):
        ref = make_sampler(sampler)
        fused = runtime.FusedSampler(make_sampler(sampler))
        ref.set_timesteps(32)
        fused.set_timesteps(32)
        t0, t1 = ref.timesteps[0], ref.timesteps[1]
        ref.guided_step(cond, uncond, t0, x, scale, rescale)  # DPM-Solver++: the timed step is second order
        fused.step_coefs(t0)
        coefs = fused.step_coefs(t1)
        fused.launch(coefs, cond, uncond, x, out, scale, rescale)  # allocates the history
        state = dict(vars(ref))

        def torch_ops():
            vars(ref).update(state)  # the same step every call: restore the multistep history
            return ref.guided_step(cond, uncond, t1, x, scale, rescale)

        history = 8 if coefs.writes_history else 0
        nbytes = numel * (4 * elem + history)
        bench = f"step {sampler} cfg" + (" rescale" if rescale else "")
        extra = {"passes": 2 if rescale else 1}
        rows.append(Row(bench, label, "torch ops", timeit(torch_ops, device, iters=iters), nbytes, extra=extra))
        rows.append(Row(bench, label, "stunet", timeit(
            lambda: fused.launch(coefs, cond, uncond, x, out, scale, rescale), device, iters=iters), nbytes,
            extra=extra))
    return rows


def blend_rows(name: str, shape, window: int, overlap: int, device, dtype, iters: int) -> list[Row]:
    b, c, T, h, w = shape
    starts = window_plan(T, window, overlap)
    length = min(window, T)
    weights = window_weights(T, starts, window, "uniform")
    windows = torch.randn(len(starts), b, c, length, h, w, device=device).to(dtype)
    dims = "x".join(map(str, (len(starts), b, c, length, h, w)))
    label = f"{name} {dims} -> T={T} {str(dtype).replace('torch.', '')}"
    nbytes = windows.numel() * windows.element_size() + b * c * T * h * w * windows.element_size()
    listed = list(windows)
    return [
        Row("blend", label, "torch ops", timeit(lambda: blend(listed, starts, weights, T).to(dtype), device,
                                                iters=iters), nbytes),
        Row("blend", label, "stunet", timeit(lambda: runtime.blend_windows(windows, T, window, overlap,
                                                                           dtype=dtype), device, iters=iters),
            nbytes),
    ]


def main(argv=None) -> dict:
    p = parser("runtime", __doc__)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                   help="base (1x3x80x128x128) and/or ssr (1x3x80x1024x1024); default both")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not runtime.cuda_available():
        p.error(f"the runtime has no CUDA passes: {runtime.status()}")
    dtype = getattr(torch, args.dtype)
    rows: list[Row] = []
    chosen = QUICK if args.quick else {k: v for k, v in WORKLOADS.items() if k in (args.workload or WORKLOADS)}
    for name, (shape, window, overlap) in chosen.items():
        rows += step_rows(name, shape, device, dtype, args.iters)
        rows += blend_rows(name, shape, window, overlap, device, dtype, args.iters)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report("runtime", rows, device, stock="torch ops", command=command("runtime", argv),
                  quick=args.quick, out_dir=args.out)


if __name__ == "__main__":
    main()
