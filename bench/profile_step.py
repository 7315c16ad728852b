"""Where one denoising step's time goes: torch.profiler over a CFG step (model batch 2 + fused sampler step).

    python bench/profile_step.py                                  # fast, lumiere-base 80x128x128
    python bench/profile_step.py --preset edge --backend compile
    python bench/profile_step.py --device cpu --quick

Reports the top ops by device time (on a GPU the CUDA kernels, each timed by CUPTI; on the CPU the ops' own
time, children excluded) over ``--iters`` profiled steps after a warm-up step, and the share of the step in
each class of work, read from the kernel or op name: GEMM/conv, attention, norms, elementwise,
copies/permutes, other. The fast backend is profiled without CUDA graphs, so every kernel is seen by name (a
graph replays the same kernels with fewer launch gaps; ``bench/step.py`` times it). "device busy" is the summed
kernel time over the wall time of the steps: the rest is launch gaps and host work.
"""
from __future__ import annotations

import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import DeviceType, ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command, compile_mode_option, device_info, parser, preset_name, write_results  # noqa: E402
from step import cfg_step, geometry  # noqa: E402

from stunet import STUNet, STUNetConfig, arguments  # noqa: E402
from stunet.backends import make_backend  # noqa: E402

# First match wins: attention before GEMM (flash kernels are GEMMs too), copies before elementwise (a copy is an
# elementwise kernel in PyTorch's naming), norms before everything (the Triton GroupNorm kernels are "_gn_*").
CLASSES = (
    ("norms", r"norm|_gn_"),
    ("attention", r"attn|attention|fmha|flash|softmax|sdpa"),
    ("copies/permutes", r"copy|\bcat\b|catarray|permute|transpose|contiguous|clone|nchwtonhwc|nhwctonchw|"
                        r"memcpy|memset|\bpad\b|constant_pad|index|gather|scatter|unfold|repeat|expand"),
    ("GEMM/conv", r"gemm|conv|cutlass|xmma|wgmma|cudnn|cublas|\bmm\b|aten::mm|addmm|bmm|matmul|linear|sm\d\d_"),
    ("elementwise", r"elementwise|vectorized|triton_poi|add|mul|sub|div|silu|gelu|sigmoid|exp|pow|where|fill|"
                    r"neg|rsqrt|sqrt|clamp|cast"),
)
CLASS_NAMES = [name for name, _ in CLASSES] + ["other"]


def classify(name: str) -> str:
    """The class of work of a kernel or op name (``CLASSES``; "other" when none matches)."""
    low = name.lower()
    return next((cls for cls, pattern in CLASSES if re.search(pattern, low)), "other")


def device_times(prof, device: torch.device) -> dict[str, tuple[float, int]]:
    """Microseconds and calls per kernel name (CUDA), or per op name by self time (CPU)."""
    times: dict[str, list] = defaultdict(lambda: [0.0, 0])
    if device.type == "cuda":
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                times[e.name][0] += e.time_range.elapsed_us()  # the kernel's own duration (CUPTI)
                times[e.name][1] += 1
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep"):
                times[e.key] = [e.self_cpu_time_total, e.count]
    return {k: (v[0], v[1]) for k, v in times.items()}


def profile_step(preset: str, backend: str, device, dtype, iters: int, quick: bool, compile_mode: str) -> dict:
    cfg = STUNetConfig.from_preset(preset)
    T, H, W = (8, 16, 16) if quick else geometry(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = STUNet(cfg).to(dtype).eval()
    options = {"graphs": False} if backend == "fast" and device.type == "cuda" else {}
    if backend == "compile":
        options["mode"] = compile_mode
    executor = make_backend(model, backend, **options)
    step = cfg_step(model, executor, device, dtype, T, H, W)
    step()  # compile, autotune, first-call allocations: outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    per_op = device_times(prof, device)
    busy = sum(us for us, _ in per_op.values())
    top = sorted(per_op.items(), key=lambda kv: -kv[1][0])
    shares = dict.fromkeys(CLASS_NAMES, 0.0)
    for name, (us, _) in per_op.items():
        shares[classify(name)] += us
    return {
        "preset": preset, "backend": backend, "shape": f"2x{cfg.in_channels}x{T}x{H}x{W}", "iters": iters,
        "tflop_per_step": model.flops(2, T, H, W, 77) / 1e12, "step_ms": wall_us / iters / 1e3,
        "busy_ms": busy / iters / 1e3, "timer": "CUDA kernel time" if device.type == "cuda" else "CPU self time",
        "classes": {k: {"ms": v / iters / 1e3, "share": v / busy if busy else 0.0} for k, v in shares.items()},
        "top": [{"name": name, "class": classify(name), "ms": us / iters / 1e3, "calls": calls // iters,
                 "share": us / busy if busy else 0.0} for name, (us, calls) in top],
    }


def markdown(result: dict, info: dict, top_n: int) -> str:
    lines = [f"Device: {info['device']}; torch {info['torch']}. One CFG step of {result['preset']} "
             f"({result['shape']}, {result['tflop_per_step']:.3g} TFLOP) on the {result['backend']} backend: "
             f"{result['step_ms']:.3f} ms wall per step, {result['busy_ms']:.3f} ms of {result['timer']} "
             f"(device busy {100 * result['busy_ms'] / result['step_ms']:.0f}%).",
             "", "| class | ms per step | share |", "|---|---:|---:|"]
    for name, c in sorted(result["classes"].items(), key=lambda kv: -kv[1]["ms"]):
        lines.append(f"| {name} | {c['ms']:.3f} | {100 * c['share']:.1f}% |")
    lines += ["", f"Top {top_n} by time:", "", "| # | op / kernel | class | calls per step | ms per step | share |",
              "|---:|---|---|---:|---:|---:|"]
    for i, op in enumerate(result["top"][:top_n], 1):
        name = op["name"].replace("|", "\\|")
        name = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| {i} | `{name}` | {op['class']} | {op['calls']} | {op['ms']:.3f} | {100 * op['share']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = parser("profile_step", __doc__, iters=3)
    p.add_argument("--preset", type=preset_name, default="lumiere-base",
                   help="small, lumiere-base, lumiere-ssr, edge (default lumiere-base; tiny with --quick)")
    p.add_argument("--backend", default="fast", choices=["reference", "compile", "fast"])
    p.add_argument("--top", type=arguments.positive, default=25, help="ops in the table (default 25; the JSON holds "
                                                                      "all)")
    compile_mode_option(p, "max-autotune", "for the compile backend")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    preset = "tiny" if args.quick else args.preset
    result = profile_step(preset, args.backend, device, dtype, args.iters, args.quick, args.compile_mode)
    info = device_info(device)
    table = markdown(result, info, args.top)
    print(table)
    doc = {"bench": "profile_step", "command": command("profile_step", argv), **info, **result}
    write_results("profile_step", doc, table, args.out, args.quick)
    return doc


if __name__ == "__main__":
    main()
