"""The ``stunet`` command line. Bad arguments exit with status 2 and a message naming the argument."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .backends import BACKENDS
from .config import PRESETS
from .sampling.samplers import SAMPLERS


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def cmd_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import STUNetConfig
    from .info import analyse

    if args.preset in PRESETS:
        config, name = STUNetConfig.from_preset(args.preset), args.preset
    else:
        try:
            config, name = STUNetConfig.load(args.preset), args.preset
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"argument PRESET: {args.preset!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor a model directory / config.json ({e})")
    try:
        info = analyse(config, name, batch=args.batch, frames=args.frames, height=args.height, width=args.width,
                       text_len=args.text_len, dtype=args.dtype)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(info.to_dict(), indent=2) if args.json else info.format())
    return 0


def _load_frames(path: str, parser, arg: str):
    """An image (png/jpg) -> (H, W, 3) or a video (mp4/gif) -> (F, H, W, 3), floats in [0, 1]."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        parser.error(f"argument {arg}: no file at {path!r}")
    try:
        if p.suffix.lower() in (".mp4", ".gif", ".mov", ".webm"):
            import av

            with av.open(str(p)) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            return np.stack(frames).astype(np.float32) / 255.0
        from PIL import Image

        return np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
    except Exception as e:  # a decoder error is a bad argument, not a crash
        parser.error(f"argument {arg}: cannot read {path!r} ({e})")


def _load_region(path: str, parser, arg: str):
    import numpy as np

    return (_load_frames(path, parser, arg).mean(axis=-1) > 0.5).astype(np.float32)


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .config import STUNetConfig
    from .model import STUNet
    from .pipeline import Pipeline
    from .pipeline.text import load_text_encoder, tiny_random_t5
    from .pipeline.video import SUFFIXES, save_video

    out = Path(args.output)
    if out.suffix.lower() not in SUFFIXES:
        parser.error(f"argument -o/--output: must end in {' or '.join(SUFFIXES)}, got {args.output!r}")
    if not out.parent.is_dir():
        parser.error(f"argument -o/--output: directory {str(out.parent)!r} does not exist")
    for arg, value in (("--model", args.model), ("--ssr", args.ssr), ("--text-encoder", args.text_encoder)):
        if value is not None and not Path(value).is_dir():
            parser.error(f"argument {arg}: {value!r} is not a directory")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available on this machine; use --device cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]

    try:
        if args.model is None:
            preset = args.preset or "small"
            print(f"stunet: no --model given: running the {preset!r} preset with RANDOM weights and a random "
                  "tiny text encoder; the video is noise-like until trained weights are loaded", file=sys.stderr)
            torch.manual_seed(args.seed)
            base = STUNet(STUNetConfig.from_preset(preset)).to(device, dtype)
        else:
            base = STUNet.from_pretrained(args.model, device=device, dtype=dtype)
        ssr = STUNet.from_pretrained(args.ssr, device=device, dtype=dtype) if args.ssr else None
        if args.text_encoder:
            encoder = load_text_encoder(args.text_encoder, device=device)
        else:
            if args.model is not None:
                print("stunet: no --text-encoder given: using a random tiny text encoder", file=sys.stderr)
            encoder = tiny_random_t5(base.config.text_dim, seed=args.seed)
        options = {"max_batch": args.max_batch} if args.max_batch else {}
        if options and args.backend != "fast":
            parser.error("argument --max-batch: only the fast backend splits batches; add --backend fast")
        pipe = Pipeline(base, encoder, ssr, sampler=args.sampler, runtime=args.runtime, backend=args.backend,
                        backend_options=options)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        parser.error(str(e))

    call = dict(negative_prompt=args.negative_prompt, num_frames=args.frames, height=args.height, width=args.width,
                num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                progress=not args.quiet)
    if args.ssr_steps:
        from .pipeline import SSROptions

        call["ssr"] = SSROptions(num_inference_steps=args.ssr_steps)
    try:
        if args.command == "generate":
            res = pipe(args.prompt, **call)
        elif args.command == "image-to-video":
            res = pipe.image_to_video(_load_frames(args.image, parser, "--image"), args.prompt, **call)
        elif args.command == "inpaint":
            video = _load_frames(args.video, parser, "--video")
            res = pipe.inpaint(video, _load_region(args.region, parser, "--region"), args.prompt,
                               **{k: v for k, v in call.items() if k not in ("num_frames", "height", "width")})
        elif args.command == "cinemagraph":
            res = pipe.cinemagraph(_load_frames(args.image, parser, "--image"),
                                   _load_region(args.region, parser, "--region"), args.prompt, **call)
        else:  # video-to-video
            video = _load_frames(args.video, parser, "--video")
            res = pipe.video_to_video(video, args.prompt, strength=args.strength,
                                      **{k: v for k, v in call.items() if k not in ("num_frames", "height", "width")})
    except ValueError as e:
        parser.error(str(e))
    save_video(res.frames[0], out, fps=args.fps)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in res.timings.items())
    print(f"stunet: wrote {out} ({res.frames.shape[1]} frames, {res.frames.shape[2]}x{res.frames.shape[3]}, "
          f"seed {res.seed}; {stages})", file=sys.stderr)
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("-o", "--output", required=True, help="output video: .mp4 or .gif")
    p.add_argument("--model", help="base model directory (config.json + model.safetensors)")
    p.add_argument("--ssr", help="SSR model directory; omit for base resolution only")
    p.add_argument("--text-encoder", help="T5 / CLIP text encoder directory (transformers format)")
    p.add_argument("--preset", choices=list(PRESETS), help="preset for random weights when --model is not given")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--frames", type=_positive, help="frames (default: the model's sample_frames)")
    p.add_argument("--height", type=_positive)
    p.add_argument("--width", type=_positive)
    p.add_argument("--steps", type=_positive, default=32, help="denoising steps (default 32)")
    p.add_argument("--ssr-steps", type=_positive, help="SSR denoising steps (default: --steps)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--backend", default="reference", choices=list(BACKENDS),
                   help="model executor: the eager reference (default), fast (Triton kernels, CUDA graphs) or "
                        "torch.compile")
    p.add_argument("--max-batch", type=_positive,
                   help="fast backend: run model batches (the CFG pair, SSR windows) in slices of at most N clips "
                        "to bound activation memory")
    p.add_argument("--runtime", choices=["cpp", "python"],
                   help="sampler step: the C++ runtime (default when built) or the Python reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=_positive, default=16)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)


def cmd_env(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """What this install can run, and why not where it cannot."""
    import platform

    import torch

    from .sampling import runtime

    lines = {"stunet": __import__("stunet").__version__, "python": platform.python_version(),
             "torch": torch.__version__,
             "cuda": (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if torch.cuda.is_available()
                      else "no CUDA device visible to torch"),
             "runtime (stunet._C)": runtime.status()}
    from .kernels import _triton

    lines["triton kernels"] = (f"triton {_triton.triton.__version__}" if _triton.triton is not None else
                               f"unavailable ({_triton.IMPORT_ERROR}); the ops run their reference math "
                               "(`pip install -e .[triton]`)")
    width = max(map(len, lines))
    for k, v in lines.items():
        print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stunet", description="Space-Time U-Net video diffusion engine")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, FLOPs, memory and per-level geometry of a model",
                          description="Analyse a preset (or a model directory) without allocating its weights.")
    info.add_argument("preset", metavar="PRESET", help=f"one of {', '.join(PRESETS)}, or a model directory")
    info.add_argument("--frames", type=_positive, help="T (default: the preset's window or clip length)")
    info.add_argument("--height", type=_positive, help="H (default: the preset's sample size)")
    info.add_argument("--width", type=_positive, help="W (default: the preset's sample size)")
    info.add_argument("--batch", type=_positive, default=1)
    info.add_argument("--text-len", type=_positive, default=77, help="text tokens (default 77)")
    info.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_info)

    env = sub.add_parser("env", help="what this install can run (torch, CUDA, C++ runtime, Triton)")
    env.set_defaults(func=cmd_env)

    _add_generation_args(sub.add_parser("generate", help="text to video",
                                        description="Generate a video from a text prompt."))
    i2v = sub.add_parser("image-to-video", help="animate an image (7-channel model)")
    _add_generation_args(i2v)
    i2v.add_argument("--image", required=True, help="the first frame (png/jpg)")
    inp = sub.add_parser("inpaint", help="regenerate a region of a video (7-channel model)")
    _add_generation_args(inp)
    inp.add_argument("--video", required=True, help="input video (mp4/gif)")
    inp.add_argument("--region", required=True, help="mask image, white = regenerate")
    cin = sub.add_parser("cinemagraph", help="animate a region of an image (7-channel model)")
    _add_generation_args(cin)
    cin.add_argument("--image", required=True)
    cin.add_argument("--region", required=True, help="mask image, white = animate")
    v2v = sub.add_parser("video-to-video", help="SDEdit a video towards a prompt")
    _add_generation_args(v2v)
    v2v.add_argument("--video", required=True)
    v2v.add_argument("--strength", type=float, default=0.6, help="noise strength in (0, 1] (default 0.6)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())
