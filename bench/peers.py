"""Converted public video U-Nets against diffusers itself: one CFG denoising step (model batch 2 + DDIM step).

    python bench/peers.py                       # ZeroScope (24 x 320 x 576) and AnimateDiff (16 x 512 x 512)
    python bench/peers.py --model zeroscope --compile-mode default
    python bench/peers.py --device cpu --quick

For each model: diffusers' own U-Net (``UNet3DConditionModel`` for ModelScope / ZeroScope; ``UNetMotionModel``
for AnimateDiff = SD 1.5 + a MotionAdapter) in FP16 eager (the stock row) and under torch.compile, and the
same weights converted by ``stunet.convert.from_diffusers`` on each stunet backend (reference eager, compile,
fast). Both sides run the same step: the U-Net on [x; x] with [text; empty text], classifier-free guidance and
a DDIM update (diffusers' ``DDIMScheduler.step``; stunet's fused C++ step). Weights are diffusers' random
initialisation: timing does not depend on them. TFLOP/s and MFU (the roofline column) come from the converted
model's analytic FLOP count (``STUNet.flops``), which counts the same network.
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, command, compile_mode_option, parser, report, timed_step  # noqa: E402

from stunet.backends import make_backend  # noqa: E402
from stunet.convert import from_diffusers  # noqa: E402
from stunet.sampling import runtime  # noqa: E402
from stunet.sampling.samplers import make_sampler  # noqa: E402

# (frames, latent height, latent width, text width): ZeroScope v2 576w at 24 x 320 x 576, AnimateDiff at 16 x 512^2.
MODELS = {"zeroscope": (24, 40, 72, 1024), "animatediff": (16, 64, 64, 768)}
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


def build(name: str, quick: bool):
    """The diffusers U-Net (fp32, CPU, diffusers' initialisation)."""
    import diffusers

    torch.manual_seed(0)
    if name == "zeroscope":
        if quick:
            return diffusers.UNet3DConditionModel(
                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=32, attention_head_dim=8,
                **TINY)
        return diffusers.UNet3DConditionModel(cross_attention_dim=1024, attention_head_dim=64)
    unet = (diffusers.UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, **TINY) if quick
        else diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8))
    adapter = (diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                       motion_num_attention_heads=2, motion_norm_num_groups=8) if quick
               else diffusers.MotionAdapter())
    return diffusers.UNetMotionModel.from_unet2d(unet, adapter)


def rows_for(name: str, device, dtype, backends: list[str], iters: int, compile_mode: str, quick: bool) -> list[Row]:
    import diffusers

    frames, h, w, text_dim = (4, 16, 16, 32) if quick else MODELS[name]
    theirs = build(name, quick).eval()
    ours = from_diffusers(theirs)
    flops = ours.flops(2, frames, h, w, 77)
    theirs = theirs.to(device, dtype)
    ours = ours.to(device, dtype)
    shape = f"{name} 2x4x{frames}x{h}x{w} {str(dtype).removeprefix('torch.')}"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, frames, h, w, generator=g).to(device, dtype)
    text = torch.randn(2, 77, text_dim, generator=g).to(device, dtype)
    per_frame = text.repeat_interleave(frames, 0)  # UNetMotionModel takes the text per frame
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(32)
    t = int(scheduler.timesteps[4])
    rows = []

    def timed(impl: str, step) -> None:
        rows.append(timed_step("step (CFG)", shape, impl, step, device, iters, flops))

    for label, unet in (("diffusers", theirs), ("diffusers compile", None)):
        if unet is None:
            if device.type != "cuda":
                continue
            unet = torch.compile(theirs, mode=compile_mode)
        hidden = per_frame if name == "animatediff" else text

        def diffusers_step(unet=unet, hidden=hidden):
            with torch.no_grad():
                pred = unet(torch.cat([x, x]), t, encoder_hidden_states=hidden).sample
                cond, uncond = pred.chunk(2)
                return scheduler.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample

        timed(label, diffusers_step)

    sampler = runtime.FusedSampler(make_sampler("ddim", schedule="scaled_linear", prediction="eps",
                                                beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                                set_alpha_to_one=False))
    sampler.set_timesteps(32)
    coefs = sampler.step_coefs(t)
    out = torch.empty_like(x)
    for backend in backends:
        kwargs = {"mode": compile_mode} if backend == "compile" else {}
        executor = make_backend(ours, backend, **kwargs)

        def stunet_step(executor=executor):
            pred = executor(torch.cat([x, x]), t, text, None)
            cond, uncond = pred.chunk(2)
            sampler.launch(coefs, cond, uncond, x, out, 7.5)

        timed(f"stunet {backend}", stunet_step)
        del executor
    del theirs, ours
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> dict:
    p = parser("peers", __doc__, iters=10)
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="zeroscope, animatediff (repeatable; "
                                                                           "default both)")
    p.add_argument("--backend", action="append", choices=["reference", "compile", "fast"],
                   help="stunet backends (repeatable; default all on CUDA, reference and fast on a CPU)")
    compile_mode_option(p, "max-autotune", "of the compile rows")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backends = args.backend or (["reference", "compile", "fast"] if device.type == "cuda" else ["reference", "fast"])
    rows = []
    for name in args.model or sorted(MODELS, reverse=True):
        rows += rows_for(name, device, dtype, backends, args.iters, args.compile_mode, args.quick)
    return report("peers", rows, device, stock="diffusers", command=command("peers", argv),
                  quick=args.quick, out_dir=args.out)


if __name__ == "__main__":
    main()
