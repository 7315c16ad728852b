"""One denoising step with classifier-free guidance (model batch 2 + the fused sampler step), per backend.

    python bench/step.py --preset lumiere-base           # reference FP16 eager, torch.compile, fast
    python bench/step.py --preset small --preset lumiere-ssr --compile-mode default
    python bench/step.py --preset small --backend reference --backend fast --backend aoti
    python bench/step.py --device cpu --quick

Reports ms per step, TFLOP/s from the model's analytic FLOP count (``STUNet.flops``: convs, linears, attention
matmuls), MFU against the FP16 matmul throughput measured in the same run (the roofline column; its inverse is
how far the step is from its FLOP lower bound), and the step's memory: on a GPU the measured peak, beside the
weights and the activations the forward holds at its peak as simulated on meta tensors
(``stunet.model.forward_peak_bytes`` for the reference's and the fast backend's policies), so each run shows how
far the simulation is from the allocator's count. The stock row is the eager
reference in FP16 ("reference"); "compile" is torch.compile of the same module; "aoti" is the model compiled
ahead of time into an AOTInductor package (``stunet.export.export_aoti``, static at the timed geometry, with
max-autotune on CUDA when ``--compile-mode`` asks for it), whose build seconds are recorded beside its row;
``--aoti-package`` times a package built beforehand instead. Weights are random (timing does not depend on them).
"""
from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, command, compile_mode_option, parser, preset_name, report, timed_step  # noqa: E402

from stunet import STUNet, STUNetConfig, arguments  # noqa: E402
from stunet.model import FAST, REFERENCE, forward_peak_bytes  # noqa: E402
from stunet.sampling import runtime  # noqa: E402
from stunet.backends import make_backend  # noqa: E402
from stunet.sampling.samplers import make_sampler  # noqa: E402


def geometry(cfg: STUNetConfig) -> tuple[int, int, int]:
    """(T, H, W) of one forward: the clip for a base model, one window for an SSR model."""
    return (cfg.window_frames if cfg.is_ssr else cfg.sample_frames), cfg.sample_size, cfg.sample_size


def build_package(model: STUNet, folder: str, T: int, H: int, W: int, compile_mode: str | None) -> tuple[Path, float]:
    """The model compiled by AOTInductor for the timed call (batch 2, T x H x W, 77 tokens, static), and the
    seconds the build took."""
    from stunet.export import export_aoti

    configs = {"max_autotune": True} if model.device.type == "cuda" and compile_mode == "max-autotune" else {}
    start = time.perf_counter()
    result = export_aoti(model, Path(folder) / "model.pt2", batch=2, frames=T, height=H, width=W, text_len=77,
                         dynamic=False, dtype=model.dtype, inductor_configs=configs)
    return result.path, time.perf_counter() - start


def step_row(preset: str, backend: str, device, dtype, iters: int, compile_mode: str | None, quick: bool,
             max_batch: int | None = None, package: Path | None = None) -> Row:
    cfg = STUNetConfig.from_preset(preset)
    T, H, W = (8, 16, 16) if quick else geometry(cfg)
    shape = f"{preset} 2x{cfg.in_channels}x{T}x{H}x{W}"
    impl = f"{backend} (max_batch={max_batch})" if max_batch else backend
    torch.manual_seed(0)
    with torch.device(device):
        model = STUNet(cfg).to(dtype).eval()
    kwargs = {"mode": compile_mode} if backend == "compile" else {}
    if max_batch:
        kwargs["max_batch"] = max_batch
    build = {}
    with tempfile.TemporaryDirectory(prefix="stunet-bench-") as folder:
        if backend == "aoti" and package is None:
            package, build["build_s"] = build_package(model, folder, T, H, W, compile_mode)
        if backend == "aoti":
            kwargs["package"] = package
        executor = make_backend(model, backend, **kwargs)
        row = time_step(model, executor, shape, impl, device, dtype, iters, T, H, W)
    row.extra.update(build)
    row.extra.update(memory(model, backend, max_batch or 2, T, H, W, row.extra.get("peak_memory_gb")))
    del executor, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def memory(model: STUNet, backend: str, batch: int, T: int, H: int, W: int, peak_gb: float | None) -> dict:
    """The weights' and the simulated activations' GB of a forward (batch: the clips one model call holds,
    ``max_batch`` when the pair runs in slices), and a note beside the measured peak. The compile and aoti rows
    take the reference's figure (inductor's fusion and buffer reuse usually lower it)."""
    policy = FAST if backend == "fast" else REFERENCE
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    simulated = forward_peak_bytes(model.config, batch=batch, frames=T, height=H, width=W, text_len=77,
                                   dtype=model.dtype, policy=policy) / 1e9
    out = {"weights_gb": weights, "simulated_activation_gb": simulated}
    if peak_gb is not None:
        out["note"] = f"peak {peak_gb:.2f} GB (weights {weights:.2f} + activations {simulated:.2f} simulated)"
    return out


def time_step(model: STUNet, executor, shape: str, impl: str, device, dtype, iters: int, T: int, H: int,
              W: int) -> Row:
    step = cfg_step(model, executor, device, dtype, T, H, W)
    return timed_step("step (CFG)", shape, impl, step, device, iters, model.flops(2, T, H, W, 77))


def cfg_step(model: STUNet, executor, device, dtype, T: int, H: int, W: int):
    """One denoising step with CFG as a closure: ``executor`` on the pair [x; x] with 77 text tokens each, then
    the fused DDIM update with guidance 7.5 (the C++ runtime), on random inputs."""
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, T, H, W, device=device, dtype=dtype)
    text = torch.randn(2, 77, cfg.text_dim, device=device, dtype=dtype)
    sampler = runtime.FusedSampler(make_sampler("ddim", schedule=cfg.schedule, prediction=cfg.prediction))
    sampler.set_timesteps(32)
    t = int(sampler.timesteps[4])
    coefs = sampler.step_coefs(t)
    latent = x[:, :3].contiguous()
    out = torch.empty_like(latent)
    level = {"noise_level": 0} if cfg.noise_aug else {}

    def step():
        pred = executor(torch.cat([x, x]), t, text, None, **level)
        cond, uncond = pred.chunk(2)
        sampler.launch(coefs, cond, uncond, latent, out, 7.5)

    return step


def main(argv=None) -> dict:
    p = parser("step", __doc__, iters=10)
    p.add_argument("--preset", action="append", type=preset_name,
                   help="small, lumiere-base, lumiere-ssr, edge (repeatable; default: small, lumiere-base, "
                        "lumiere-ssr)")
    p.add_argument("--backend", action="append", choices=["reference", "compile", "fast", "aoti"],
                   help="repeatable; default reference, compile and fast (reference and fast on the CPU); aoti "
                        "builds a package per preset first")
    p.add_argument("--aoti-package", type=Path, metavar="PT2",
                   help="--backend aoti times this package (`stunet export aoti` of the one --preset, --static at "
                        "the timed geometry: --batch 2, the preset's frames and size, --text-len 77) instead of "
                        "building one")
    p.add_argument("--max-batch", type=arguments.positive,
                   help="also time the fast backend running the CFG pair in slices of this many clips (lower peak "
                        "memory)")
    compile_mode_option(p, "max-autotune", "for the compile backend")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    presets = ["tiny"] if args.quick else (args.preset or ["small", "lumiere-base", "lumiere-ssr"])
    backends = args.backend or (["reference", "compile", "fast"] if device.type == "cuda" else ["reference", "fast"])
    if args.aoti_package is not None:
        if "aoti" not in backends or len(presets) != 1:
            p.error("argument --aoti-package: times one preset's package; pass --backend aoti and one --preset")
        if not args.aoti_package.is_file():
            p.error(f"argument --aoti-package: no file {str(args.aoti_package)!r} (make one with "
                    "`stunet export aoti MODEL_DIR -o model.pt2 --static ...`)")
    rows = []
    try:
        for preset in presets:
            rows += [step_row(preset, b, device, dtype, args.iters, args.compile_mode, args.quick,
                              package=args.aoti_package) for b in backends]
            if args.max_batch:
                rows.append(step_row(preset, "fast", device, dtype, args.iters, args.compile_mode, args.quick,
                                     args.max_batch))
    except ValueError as e:  # a backend that cannot run this request (a package of another geometry, ...)
        p.error(str(e))
    return report("step", rows, device, stock="reference", command=command("step", argv),
                  quick=args.quick, out_dir=args.out)


if __name__ == "__main__":
    main()
