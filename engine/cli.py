"""The ``stunet`` command line.

Every argument is checked before any compute; a bad one exits with status 2, the subcommand's usage and a
message naming the argument and the fix. Ctrl-C prints one line and ends the process by SIGINT, as an uncaught
Ctrl-C ends any Python program: a shell shows status 130, and a shell loop that ran the command stops too.
An output file is written atomically, so an interrupted run leaves none behind.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

from . import arguments
from .backends import BACKENDS
from .config import PRESETS
from .io import atomic_path, parent_problem
from .pipeline.latent import folder_scale_factor, vae_folder
from .pipeline.stages import SSROptions
from .pipeline.text import missing_transformers
from .sampling.samplers import SAMPLERS

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CONDITIONAL = ("image-to-video", "inpaint", "cinemagraph")


# -- argument types beyond stunet.arguments' ---------------------------------------------------------------------
def _region(text: str):
    """A mask image path, or a box 'x0,y0,x1,y1' in pixels (the box is the region)."""
    box = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", text)
    if box:
        x0, y0, x1, y1 = map(int, box.groups())
        if x1 <= x0 or y1 <= y0:
            raise argparse.ArgumentTypeError(f"a box x0,y0,x1,y1 needs x1 > x0 and y1 > y0, got {text!r}")
        return (x0, y0, x1, y1)
    if re.fullmatch(r"[\d\s,.+-]*,[\d\s,.+-]*", text) and not os.path.exists(text):  # a box, mistyped
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1: four whole numbers of pixels, got {text!r} (or give "
                                         "a mask image)")
    return text


# -- inputs ----------------------------------------------------------------------------------------------------
def _load_frames(path: str, parser: argparse.ArgumentParser, arg: str):
    """An image (png/jpg) -> (H, W, 3) or a video (mp4/gif/..., or npy frames) -> (F, H, W, 3), floats in
    [0, 1]; or exit 2 naming ``arg``."""
    from .pipeline.video import read_frames

    try:
        return read_frames(path)
    except (FileNotFoundError, ValueError, ImportError) as e:  # a file that cannot be read is a bad argument
        parser.error(f"argument {arg}: {e}")


def _load_image(path: str, parser, arg: str):
    """An image, or the first frame of a video: (H, W, 3)."""
    frames = _load_frames(path, parser, arg)
    return frames[0] if frames.ndim == 4 else frames


def _load_region(region, size: tuple[int, int], parser, arg: str):
    """A (H, W) 0/1 mask from a mask image (white = inside) or a box."""
    import numpy as np

    H, W = size
    if isinstance(region, tuple):
        x0, y0, x1, y1 = region
        if x1 > W or y1 > H:
            parser.error(f"argument {arg}: box {region} reaches outside the {W}x{H} frame")
        mask = np.zeros((H, W), dtype=np.float32)
        mask[y0:y1, x0:x1] = 1
        return mask
    mask = (_load_image(region, parser, arg).mean(axis=-1) > 0.5).astype(np.float32)
    if mask.shape != (H, W):
        parser.error(f"argument {arg}: the mask is {mask.shape[1]}x{mask.shape[0]}, the video {W}x{H}")
    return mask


def _check_output(args, parser, path: str | None = None, arg: str = "-o/--output") -> Path:
    """The video file to write (``path``; default ``args.output``), or exit 2 naming ``arg``."""
    from .pipeline.video import SUFFIXES, missing_writer

    path = args.output if path is None else path
    out = Path(path)
    if not path.strip():
        parser.error(f"argument {arg}: give a file path such as 'out{SUFFIXES[0]}', got {path!r}")
    if out.is_dir():
        parser.error(f"argument {arg}: {path!r} is a directory; give a file path such as "
                     f"{str(out / ('out' + SUFFIXES[0]))!r}")
    if out.suffix.lower() not in SUFFIXES:
        parser.error(f"argument {arg}: must end in {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]}, got {path!r}")
    if problem := missing_writer(out):
        parser.error(f"argument {arg}: {problem}")
    if problem := parent_problem(out):
        parser.error(f"argument {arg}: {problem}")
    if out.exists() and not args.overwrite:
        parser.error(f"argument {arg}: {path!r} exists; pass --overwrite to replace it")
    return out


def _check_model_dir(value: str | None, parser, arg: str) -> None:
    """A model folder: config.json (valid) + model.safetensors, checked before anything loads."""
    from .config import STUNetConfig

    if value is None:
        return
    folder = Path(value)
    if not folder.is_dir():
        parser.error(f"argument {arg}: {value!r} is not a directory (a model folder holds config.json and "
                     "model.safetensors, as STUNet.save_pretrained writes them)")
    try:
        STUNetConfig.load(folder)
    except (FileNotFoundError, ValueError, TypeError) as e:
        parser.error(f"argument {arg}: {e}")


# -- subcommands -----------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from .config import STUNetConfig
    from .info import analyse

    parser, scale = args.parser, 1
    if args.preset in PRESETS:
        config, name = STUNetConfig.from_preset(args.preset), args.preset
    else:

        try:
            config, name = STUNetConfig.load(args.preset), args.preset
            folder = Path(args.preset) if Path(args.preset).is_dir() else Path(args.preset).parent
            scale = folder_scale_factor(folder)  # a converted latent pipeline's sizes are in pixels, as generate's
        except (FileNotFoundError, ValueError, TypeError) as e:
            parser.error(f"argument PRESET: {args.preset!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor a model directory / config.json ({e})")
    sides, step = {"height": args.height, "width": args.width}, scale * config.spatial_divisor
    for side, pixels in sides.items():
        if pixels is not None and scale > 1 and pixels % step:
            parser.error(f"argument --{side}: {side} must be a positive multiple of {step} pixels for this latent "
                         f"model (its VAE's {scale} x the model's {config.spatial_divisor}), got {pixels}")
        sides[side] = pixels if pixels is None else pixels // scale
    try:
        info = analyse(config, name, batch=args.batch, frames=args.frames, text_len=args.text_len, dtype=args.dtype,
                       pixel_scale=scale, **sides)
    except ValueError as e:
        _library_error(parser, e)
    print(json.dumps(info.to_dict(), indent=2) if args.json else info.format())
    return 0


# The Python arguments that the library's errors name, as the command line's flags
_FLAGS = {"num_frames": "--frames", "frames": "--frames", "height": "--height", "width": "--width",
          "num_inference_steps": "--steps", "guidance_scale": "--guidance", "strength": "--strength", "seed": "--seed",
          "negative_prompt": "--negative-prompt", "prompt": "PROMPT", "batch": "--batch", "text_len": "--text-len"}


def _library_error(parser: argparse.ArgumentParser, error: Exception,
                   inputs: dict[str, tuple[str, str]] | None = None):
    """Exits 2 with the library's message, led by the flags of the arguments it names first ("argument --steps:
    ...", "argument --frames/--height/--width: num_frames x height x width = ..."). ``inputs`` maps the arguments
    that an input file sets to its flag and the way to change them (``_input_sizes``)."""
    message = str(error)
    names = re.match(r"\w+(?: x \w+)*", message)
    named = [name for name in (names.group().split(" x ") if names else []) if name in _FLAGS]
    inputs = inputs or {}
    flags = dict.fromkeys(inputs[name][0] if name in inputs else _FLAGS[name] for name in named)
    fixes = dict.fromkeys(inputs[name][1] for name in named if name in inputs)
    if fixes:
        message += f" ({'; '.join(fixes)})"
    parser.error(f"argument {'/'.join(flags)}: {message}" if flags else message)


def _input_sizes(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """The sizes a mode takes from its input file, as {library argument: (the file's flag, how to change it)}: the
    frame count of --video, and the sides of --image or --video where --height/--width do not give them."""
    command = args.command
    if command == "generate":
        return {}
    source = "--image" if command in ("image-to-video", "cinemagraph") else "--video"
    sizes = {"num_frames": ("--video", "the video's frame count: trim the video")} if source == "--video" else {}
    fix = ("the video's size: resize the video" if command == "upscale"  # which keeps its input's size
           else f"the {source[2:]}'s size: --height and --width resize it")
    sizes.update({side: (source, fix) for side in ("height", "width") if getattr(args, side) is None})
    return sizes


def _check_device(device: str, parser: argparse.ArgumentParser) -> None:
    """--device names a device this machine has (its form is checked by ``arguments.device``)."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("argument --device: CUDA is not available on this machine; use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            parser.error(f"argument --device: {device} does not exist ({torch.cuda.device_count()} CUDA device(s))")


def _ranked() -> bool:
    """Whether this process is one rank of several (a torchrun launch, such as `--nproc N`'s)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _note(message: str) -> None:
    """A line on stderr, from one process only when the generation runs on several ranks."""
    if os.environ.get("RANK", "0") == "0":
        print(f"stunet: {message}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import Pipeline
    from .pipeline.video import save_video

    parser, command = args.parser, args.command
    out = _check_output(args, parser)
    _check_model_dir(args.model, parser, "--model")
    _check_model_dir(args.ssr, parser, "--ssr")
    if args.text_encoder is not None and not (Path(args.text_encoder) / "config.json").is_file():
        parser.error(f"argument --text-encoder: {args.text_encoder!r} is not a text-encoder folder (config.json "
                     "and tokenizer files, as transformers' save_pretrained writes them)")
    if args.model is not None and args.preset is not None:
        parser.error("argument --preset: chooses random weights for when --model is not given; drop one of them")
    if args.max_batch and args.backend != "fast":
        parser.error("argument --max-batch: only the fast backend splits batches; add --backend fast")
    for option, backend in (("package", "aoti"), ("engine", "tensorrt")):
        if (getattr(args, option) is not None) != (args.backend == backend):
            parser.error(f"argument --{option}: goes with --backend {backend}, and that backend needs it")
        if getattr(args, option) is not None and args.ssr:
            parser.error(f"argument --{option}: one artifact runs one model; run the SSR stage with another "
                         "backend, or from Python")
    demo = args.model is None and args.preset is None and command not in CONDITIONAL  # the shipped cascade
    latent = args.model is not None and vae_folder(args.model) is not None  # a `stunet convert`ed pipeline
    if latent and args.ssr:
        parser.error(f"argument --ssr: --model {args.model!r} is a latent pipeline (`stunet convert`): its VAE "
                     "decodes the video, and it takes no SSR model")
    if not demo and (problem := missing_transformers()):  # any encoder but the demo's is a transformers model
        if args.text_encoder or args.model:
            parser.error(f"argument {'--text-encoder' if args.text_encoder else '--model'}: {problem}")
        preset = "a preset's" if args.preset else f"without it, {command} runs the 'tiny-cond' preset, whose"
        parser.error(f"argument {'--preset' if args.preset else '--model'}: {preset} random text encoder is a tiny T5 "
                     f"model, and {problem}")
    for flag in ("ssr_steps", "ssr_batch"):
        if getattr(args, flag) and not (args.ssr or demo):
            parser.error(f"argument --{flag.replace('_', '-')}: needs an SSR model (--ssr DIR)")
    if command == "upscale" and not (args.ssr or demo):
        parser.error("argument --ssr: upscale runs an SSR model: give --ssr DIR (and the --model whose videos it "
                     "raises), or neither for the demo cascade")
    low_out = None
    if args.low_res_output is not None:
        if command == "upscale":
            parser.error("argument --low-res-output: upscale's low-resolution video is its --video; drop it")
        if not (args.ssr or demo):
            parser.error("argument --low-res-output: the base video of a cascade; it needs an SSR model "
                         "(--ssr DIR)")
        low_out = _check_output(args, parser, args.low_res_output, "--low-res-output")
        if low_out.resolve() == out.resolve():
            parser.error("argument --low-res-output: the same file as -o/--output; give another path")
    kept = {"inpaint": ("frames",), "upscale": ("frames", "height", "width"),
            "video-to-video": ("frames",)}.get(command, ())
    if fixed := [f"--{k}" for k in kept if getattr(args, k) is not None]:
        what = "size" if command == "upscale" else "frame count"
        parser.error(f"argument {fixed[0]}: {command} keeps the input video's {what}; drop {', '.join(fixed)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device, parser)
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")])
    if args.runtime == "cpp":
        from .sampling import runtime

        if why := runtime.unavailable_on(device):
            parser.error(f"argument --runtime: {why}; or use --runtime python")
    inputs = _mode_inputs(args, parser)
    ranked = _ranked()
    if args.nproc and args.nproc > 1 and not ranked:
        if device.startswith("cuda") and args.nproc > torch.cuda.device_count():
            parser.error(f"argument --nproc: {args.nproc} ranks but {torch.cuda.device_count()} CUDA device(s)")
        from .distributed import ArgumentsRefused, launch

        try:
            return launch(args.nproc, _without_nproc(args.argv))
        except ArgumentsRefused as e:
            parser.error(str(e))
    if ranked:
        from . import distributed

        distributed.init()
        if device.startswith("cuda"):
            device = str(distributed.device())
    if args.backend == "compile":  # else a progress bar stands still at its first step for minutes
        _note("--backend compile: torch.compile (max-autotune) compiles each model at its first step, a minute or "
              "more before that step ends; the steps after it run the compiled code")

    try:
        options = {"max_batch": args.max_batch} if args.max_batch else {}
        options.update({k: getattr(args, k) for k in ("package", "engine") if getattr(args, k) is not None})
        parallel = "auto" if ranked or args.nproc else False
        if latent:
            chosen = {"sampler": args.sampler} if args.sampler else {}
            pipe = Pipeline.from_pretrained(args.model, args.ssr, args.text_encoder, backend=args.backend,
                                            device=device, dtype=dtype, runtime=args.runtime,
                                            backend_options=options, parallel=parallel, **chosen)
        else:
            pipe = _pixel_pipeline(args, demo, device, dtype, options, parallel)
    except torch.OutOfMemoryError as e:
        print(f"stunet: the models do not fit on {device}: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, ImportError) as e:
        _library_error(parser, e)

    call = dict(negative_prompt=args.negative_prompt, num_frames=args.frames, height=args.height, width=args.width,
                num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                progress=not args.quiet)
    ssr = {k: v for k, v in (("num_inference_steps", args.ssr_steps), ("batch_size", args.ssr_batch)) if v}
    if ssr:
        call["ssr"] = SSROptions(**ssr)
    try:
        res = _run_mode(pipe, args, inputs, call)
    except ValueError as e:
        _library_error(parser, e, _input_sizes(args))
    except torch.OutOfMemoryError as e:  # the message ends with where it happened and the ways to need less
        print(f"stunet: {e}", file=sys.stderr)
        return 1
    if res.frames is None:  # another rank writes the video
        return 0
    save_video(res.frames[0], out, fps=args.fps)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in res.timings.items())
    print(f"stunet: wrote {out} ({res.frames.shape[1]} frames, {res.frames.shape[2]}x{res.frames.shape[3]}, "
          f"seed {res.seed}; {stages})", file=sys.stderr)
    if low_out is not None:
        low = res.low_res_frames[0]
        save_video(low, low_out, fps=args.fps)
        again = (f"`stunet upscale --video {low_out} --seed {res.seed}` with the same settings repeats the SSR "
                 "stage" if low_out.suffix.lower() == ".npy" else
                 f"through the {low_out.suffix[1:]} codec: write .npy to raise it again exactly")
        print(f"stunet: wrote {low_out} (the base video, {low.shape[1]}x{low.shape[2]}; {again})", file=sys.stderr)
    return 0


def _pixel_pipeline(args, demo: bool, device: str, dtype, options: dict, parallel):
    """The pipeline of a pixel-space model folder, a preset with random weights, or the shipped demo cascade."""
    import torch

    from .config import STUNetConfig
    from .model import STUNet
    from .pipeline import Pipeline
    from .pipeline.text import load_text_encoder, tiny_random_t5

    demo_ssr = demo_text = None
    if demo:
        from . import demo as shipped

        base, demo_ssr, demo_text = shipped.load(device, dtype)
        _note("no --model given: using the built-in demo cascade (coloured shapes, 16 frames, 16x16 -> 64x64; "
              "prompts such as 'a red circle moving left', 'a white square growing on a striped background')")
    elif args.model is None:
        preset = args.preset or "tiny-cond"
        _note(f"no --model given: running the {preset!r} preset with RANDOM weights and a random tiny text "
              "encoder; the video is noise-like until trained weights are loaded")
        torch.manual_seed(args.seed)
        base = STUNet(STUNetConfig.from_preset(preset)).to(device, dtype)
    else:
        base = STUNet.from_pretrained(args.model, device=device, dtype=dtype)
    ssr = STUNet.from_pretrained(args.ssr, device=device, dtype=dtype) if args.ssr else demo_ssr
    own = Path(args.model) / "text_encoder" if args.model is not None else None
    folder = args.text_encoder or (own if own is not None and own.is_dir() else None)  # as Pipeline.from_pretrained
    if folder is not None:
        encoder = load_text_encoder(folder, device=device, dtype=dtype)
    elif demo_text is not None:
        encoder = demo_text
    else:
        if args.model is not None:
            _note("no --text-encoder given: using a random tiny text encoder")
        encoder = tiny_random_t5(base.config.text_dim, seed=args.seed)
    return Pipeline(base, encoder, ssr, sampler=args.sampler or "ddim", runtime=args.runtime, backend=args.backend,
                    backend_options=options, parallel=parallel)


def _mode_inputs(args, parser) -> dict:
    """The images, videos and regions a mode reads, loaded and checked before any model is built."""
    command = args.command
    if command == "image-to-video":
        return {"image": _load_image(args.image, parser, "--image")}
    if command == "cinemagraph":
        image = _load_image(args.image, parser, "--image")
        return {"image": image, "region": _load_region(args.region, image.shape[:2], parser, "--region")}
    if command in ("inpaint", "video-to-video", "upscale"):
        video = _load_frames(args.video, parser, "--video")
        if video.ndim != 4:
            parser.error(f"argument --video: {args.video!r} is an image; give a video (mp4, gif)")
        inputs = {"video": video}
        if command == "inpaint":
            inputs["region"] = _load_region(args.region, video.shape[1:3], parser, "--region")
        return inputs
    return {}


def _note_upscale_size(ssr, size: tuple[int, int]) -> None:
    """Says so when upscale's video is not the size the SSR model was trained to raise: it raises any size by the
    same factor, so a video already at the model's output size (a cascade's final video, say) comes out larger
    still, at a cost that grows with its area."""
    h, w = size
    if (h, w) != (ssr.low_res_size, ssr.low_res_size):
        n, m = ssr.low_res_size, ssr.sample_size
        _note(f"the video is {w}x{h}; this SSR model raises {n}x{n} videos to {m}x{m}, so it makes "
              f"{w * m // n}x{h * m // n} (a cascade's base video is `stunet generate --low-res-output`)")


def _run_mode(pipe, args, inputs: dict, call: dict):
    """The generation of ``args.command``. An input video fixes the frames; the modes that take an image or a
    video resize it to --height / --width when given (upscale takes it as it is)."""
    command = args.command
    sized = {k: v for k, v in call.items() if k not in ("num_frames", "height", "width")}
    if command == "generate":
        return pipe(args.prompt, **call)
    if command == "image-to-video":
        return pipe.image_to_video(inputs["image"], args.prompt, **call)
    if command == "cinemagraph":
        return pipe.cinemagraph(inputs["image"], inputs["region"], args.prompt, **call)
    if command == "inpaint":
        return pipe.inpaint(inputs["video"], inputs["region"], args.prompt, height=args.height, width=args.width,
                            **sized)
    if command == "upscale":
        _note_upscale_size(pipe.ssr.config, inputs["video"].shape[1:3])
        return pipe.upscale(inputs["video"], args.prompt, **sized)
    return pipe.video_to_video(inputs["video"], args.prompt, strength=args.strength, height=args.height,
                               width=args.width, **sized)


def cmd_export(args: argparse.Namespace) -> int:
    """stunet export onnx|aoti MODEL_DIR -o FILE."""
    import torch

    from . import export
    from .model import STUNet

    parser, suffix = args.parser, {"onnx": ".onnx", "aoti": ".pt2"}[args.route]
    out = Path(args.output)
    if out.is_dir() or out.suffix != suffix:
        parser.error(f"argument -o/--output: must be a file path ending in {suffix}, got {args.output!r}")
    if problem := parent_problem(out):
        parser.error(f"argument -o/--output: {problem}")
    if out.exists() and not args.overwrite:
        parser.error(f"argument -o/--output: {args.output!r} exists; pass --overwrite to replace it")
    _check_device(args.device, parser)
    _check_model_dir(args.model, parser, "MODEL_DIR")
    route = export.export_onnx if args.route == "onnx" else export.export_aoti
    try:
        model = STUNet.from_pretrained(args.model, device=args.device)
        result = route(model, out, batch=args.batch, frames=args.frames, height=args.height, width=args.width,
                       text_len=args.text_len, dynamic=not args.static, dtype=getattr(torch, DTYPES[args.dtype]),
                       check=args.check, progress=not args.quiet)
    except (ImportError, ValueError) as e:
        _library_error(parser, e)
    except torch.OutOfMemoryError as e:  # the message ends with where it happened and the ways to need less
        print(f"stunet: {e}", file=sys.stderr)
        return 1
    except AssertionError as e:  # --check: the artifact was written, and differs from the reference
        print(f"stunet export: error: {e}; {out} was written, but do not deploy it", file=sys.stderr)
        return 1
    spec = result.spec
    note = f"; max |{args.route} - reference| {result.max_abs_error:.2g}" if result.max_abs_error is not None else ""
    if result.external_data is not None:
        note += f"; its weights are in {result.external_data}, which must stay beside it"
    print(f"stunet: wrote {out} (inputs {', '.join(spec.input_names)}; {'dynamic' if spec.dynamic else 'static'} "
          f"batch, frames, height, width, text length{note})", file=sys.stderr)
    return 0


def cmd_export_tensorrt(args: argparse.Namespace) -> int:
    """stunet export tensorrt MODEL.onnx -o MODEL.plan."""
    from .export import build_engine

    parser, out = args.parser, Path(args.output)
    if out.is_dir() or out.suffix not in (".plan", ".engine"):
        parser.error(f"argument -o/--output: must be a file path ending in .plan or .engine, got {args.output!r}")
    if problem := parent_problem(out):
        parser.error(f"argument -o/--output: {problem}")
    if out.exists() and not args.overwrite:
        parser.error(f"argument -o/--output: {args.output!r} exists; pass --overwrite to replace it")
    if Path(args.onnx).is_dir():
        parser.error(f"argument ONNX: {args.onnx!r} is a directory; give the .onnx file (`stunet export onnx` "
                     "makes one)")
    if not Path(args.onnx).is_file():
        parser.error(f"argument ONNX: no file at {args.onnx!r} (make one with `stunet export onnx`)")
    try:
        result = build_engine(args.onnx, out, fp16=not args.fp32, compute_capabilities=args.sm,
                              toolkit_name=args.toolkit, progress=not args.quiet)
    except (ImportError, ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    except RuntimeError as e:
        print(f"stunet: {e}", file=sys.stderr)
        return 1
    targets = f" for sm_{', sm_'.join(map(str, result.compute_capabilities))}" if result.compute_capabilities else ""
    spec = f" and its export spec {out}.json" if result.spec is not None else ""
    print(f"stunet: wrote {out}{spec} ({result.toolkit} {result.version}{targets}, "
          f"{result.bytes / 2 ** 20:.1f} MB, built in {result.seconds:.1f} s)", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """stunet convert SRC_DIR -o DST_DIR."""
    from .convert import ConversionError, convert_folder, overlaps_source

    parser, src, dst = args.parser, Path(args.source), Path(args.output)
    if not src.is_dir():
        parser.error(f"argument SRC_DIR: no folder at {args.source!r} (a diffusers pipeline or unet folder on disk; "
                     "nothing is downloaded)")
    if not (src / "unet" / "config.json").is_file() and not (src / "config.json").is_file():
        parser.error(f"argument SRC_DIR: {args.source!r} holds neither unet/config.json (a pipeline folder) nor "
                     "config.json (a unet folder)")
    if overlaps_source(src, dst):
        parser.error(f"argument -o/--output: {args.output!r} and SRC_DIR {args.source!r} overlap (one holds the "
                     "other): choose an output folder outside the folder being converted")
    if problem := parent_problem(dst, create=True):
        parser.error(f"argument -o/--output: {problem}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        parser.error(f"argument -o/--output: {args.output!r} exists and is not empty; pass --overwrite to replace it")
    if args.motion_adapter is not None and not (Path(args.motion_adapter) / "config.json").is_file():
        parser.error(f"argument --motion-adapter: {args.motion_adapter!r} is not a MotionAdapter folder")
    if args.motion_adapter is not None and overlaps_source(args.motion_adapter, dst):
        parser.error(f"argument -o/--output: {args.output!r} and --motion-adapter {args.motion_adapter!r} overlap "
                     "(one holds the other): choose an output folder outside the folders being converted")
    overrides = {"prediction": args.prediction} if args.prediction else {}
    try:
        model = convert_folder(src, dst, dtype=args.dtype, motion_adapter=args.motion_adapter,
                               overwrite=args.overwrite, progress=not args.quiet, **overrides)
    except (ConversionError, ValueError, ImportError, FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))
    parts = [p.name for p in sorted(dst.iterdir()) if p.is_dir()]
    cfg = model.config
    print(f"stunet: wrote {dst} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{args.dtype}; in_channels {cfg.in_channels}, prediction {cfg.prediction}, schedule {cfg.schedule}"
          f"{'; with ' + ', '.join(parts) if parts else ''})", file=sys.stderr)
    return 0


EXTRAS = {  # what each optional extra of setup.py gives; `stunet env` says which are installed
    "video": ".mp4 and .gif files, image and video inputs",
    "text": "T5 and CLIP text encoders",
    "diffusers": "stunet convert, and the VAEs and CLIP encoders of converted checkpoints",
    "export": "ONNX export and its onnxruntime check",
    "tensorrt-rtx": "TensorRT-RTX engine builds, without a GPU",
}
"""The extras ``stunet env`` reports (``triton`` has its own line, ``test`` is the test suite's)."""


def extras_status() -> dict[str, str]:
    """Each extra of the installed stunet: the versions of what it requires, or what is missing and the command
    that installs it; read from the installed package's metadata (empty where stunet is not installed)."""
    from importlib import metadata

    try:
        requires = metadata.metadata("stunet").get_all("Requires-Dist") or []
    except metadata.PackageNotFoundError:
        return {}
    try:
        from packaging.markers import Marker
        from packaging.requirements import Requirement
    except ImportError:  # without packaging, every requirement of an extra counts on every platform, any version
        Marker = Requirement = None
    needs: dict[str, list] = {}  # extra -> [(name, its version specifier or None)]
    elsewhere: set[str] = set()  # extras with a requirement for other platforms only (tensorrt-rtx off x86-64)
    for line in requires:
        requirement, _, marker = line.partition(";")
        extra = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", marker)
        if extra is None or extra.group(1) not in EXTRAS:
            continue
        if Marker is not None and not Marker(marker).evaluate({"extra": extra.group(1)}):
            elsewhere.add(extra.group(1))
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group()
        wanted = Requirement(requirement).specifier if Requirement is not None else None
        needs.setdefault(extra.group(1), []).append((name, wanted))
    status = {}
    for extra, use in EXTRAS.items():
        found, missing, old = [], [], []
        for name, wanted in needs.get(extra, []):
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                missing.append(name)
                continue
            found.append(f"{name} {version}")
            if wanted and not wanted.contains(version, prereleases=True):
                old.append(f"{name} {version} (needs {wanted})")
        if extra in elsewhere or not needs.get(extra):
            status[extra] = f"not available on this platform ({use})"
        elif missing:
            status[extra] = f"{', '.join(missing)} not installed: pip install 'stunet[{extra}]' for {use}"
        elif old:
            status[extra] = f"{', '.join(old)}: pip install -U 'stunet[{extra}]' for {use}"
        else:
            status[extra] = f"{', '.join(found)}: {use}"
    return status


def cmd_env(args: argparse.Namespace) -> int:
    """What this install can run, and why not where it cannot."""
    import platform

    import torch

    from . import __version__
    from .kernels import _triton, unavailable_on
    from .sampling import runtime

    cuda = torch.cuda.is_available()
    if cuda:
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpus = f" (and {torch.cuda.device_count() - 1} more)" if torch.cuda.device_count() > 1 else ""
        device = (f"{gpu.name}{gpus}: compute capability {gpu.major}.{gpu.minor}, {gpu.total_memory / 2**30:.0f} GiB "
                  f"(CUDA {torch.version.cuda})")
    else:
        device = "no CUDA device visible to torch"
    lines = {"stunet": __version__, "python": platform.python_version(), "torch": torch.__version__, "cuda": device,
             "runtime (stunet._C)": runtime.status()}
    if _triton.triton is None:
        kernels = (f"unavailable ({_triton.IMPORT_ERROR}); the ops run their reference math "
                   "(pip install 'stunet[triton]')")
    elif cuda:
        why = unavailable_on("cuda")
        runs = (f"the ops (and --backend fast) run their reference math on this device: {why}" if why
                else "the kernels run on the CUDA device")
        kernels = f"triton {_triton.triton.__version__}: {runs}"
    else:
        kernels = (f"triton {_triton.triton.__version__} installed, but no CUDA device is visible: the ops (and "
                   "--backend fast) run their reference math here; TRITON_INTERPRET=1 runs the kernels on the "
                   "CPU, slowly, for tests")
    lines["triton kernels"] = kernels
    lines.update({f"[{extra}]": text for extra, text in extras_status().items()})
    width = max(map(len, lines))
    for k, v in lines.items():
        print(f"{k:<{width}}  {v}")
    return 0


# -- the parser ------------------------------------------------------------------------------------------------------
def _add_generation_args(p: argparse.ArgumentParser, edits: str | None = None) -> None:
    """The arguments every generation takes; ``edits``: what a mode's input fixes: "image" (the size, which
    --height / --width resize), "video" (also the frames) or "all" (upscale: the frames and the size)."""
    p.add_argument("prompt", metavar="PROMPT", help="what the video shows (an empty prompt generates unconditionally)")
    p.add_argument("-o", "--output", required=True,
                   help="output video file: .mp4, .gif or .npy (float32 frames in [0, 1], lossless)")
    p.add_argument("--low-res-output", metavar="FILE",
                   help="also write a cascade's base video (before the SSR stage) to FILE (.mp4, .gif or .npy)")
    p.add_argument("--overwrite", action="store_true", help="replace the output files if they exist")
    p.add_argument("--model", metavar="DIR", help="base model folder (config.json + model.safetensors)")
    p.add_argument("--ssr", metavar="DIR", help="SSR model folder; omit to stay at the base resolution")
    p.add_argument("--text-encoder", metavar="DIR",
                   help="T5 / CLIP text encoder folder (transformers format, with its tokenizer; default: "
                        "the --model folder's text_encoder/ when it has one)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="preset for random weights when --model is not given (default: the built-in demo "
                        "cascade, trained; tiny-cond with random weights for the conditional modes)")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT", help="what to steer away from")
    size = {None: "default: the model's sample_size", "all": "not taken: the input video's",
            "image": "default: the image's, over the SSR's scale with --ssr; another resizes it",
            "video": "default: the input video's, over the SSR's scale with --ssr; another resizes its "
                     "frames"}[edits]
    frames = "not taken: the input video's" if edits in ("video", "all") else "default: the model's sample_frames"
    p.add_argument("--frames", type=arguments.positive, help=f"frames ({frames})")
    p.add_argument("--height", type=arguments.positive, help=f"height in pixels ({size})")
    p.add_argument("--width", type=arguments.positive, help=f"width in pixels ({size})")
    p.add_argument("--steps", type=arguments.positive, default=32, help="denoising steps (default 32)")
    p.add_argument("--ssr-steps", type=arguments.positive, help="SSR denoising steps (default: --steps)")
    p.add_argument("--ssr-batch", type=arguments.positive, metavar="N",
                   help=f"SSR windows per model call (default {SSROptions.batch_size}; fewer need less memory)")
    p.add_argument("--guidance", type=arguments.number(0.0), default=7.5,
                   help="classifier-free guidance scale, >= 0 (default 7.5; 1 turns guidance off)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS),
                   help="sampler (default: the model folder's scheduler when it has one, else ddim)")
    p.add_argument("--backend", default="reference", choices=list(BACKENDS),
                   help="model executor: the eager reference (default), fast (Triton kernels, CUDA graphs), "
                        "compile (torch.compile), aoti (--package) or tensorrt (--engine)")
    p.add_argument("--package", metavar="PT2", help="--backend aoti: the model's package (`stunet export aoti`)")
    p.add_argument("--engine", metavar="PLAN", help="--backend tensorrt: the model's engine "
                                                    "(`stunet export tensorrt`)")
    p.add_argument("--nproc", type=arguments.positive, metavar="N",
                   help="share the generation among N local ranks (one per GPU; CPU processes without one), "
                        "launched through torchrun; the video is the same for any N (given the same threads per "
                        "process on a CPU)")
    p.add_argument("--max-batch", type=arguments.positive, metavar="N",
                   help="fast backend: run model batches (the CFG pair, SSR windows) in slices of at most N clips "
                        "to bound activation memory")
    p.add_argument("--runtime", choices=["cpp", "python"],
                   help="sampler step: the C++ runtime (default where it is built for the device) or the Python "
                        "reference")
    p.add_argument("--seed", type=arguments.seed, default=0, help="noise seed, an integer in [0, 2**63) (default 0)")
    p.add_argument("--fps", type=arguments.positive, default=16, help="frames per second of the file (default 16)")
    p.add_argument("--device", type=arguments.device, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="weights and activations of the models, the VAE and a --text-encoder (default fp16 on cuda, "
                        "fp32 on cpu)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse's parser; on a rank of `--nproc N` an argument error goes to the launcher, which prints it once."""

    def error(self, message: str):
        if _ranked():
            from .distributed import REFUSALS

            if os.environ.get(REFUSALS):
                with atomic_path(Path(os.environ[REFUSALS]) / f"rank{os.environ['RANK']}.txt") as tmp:
                    tmp.write_text(message)
                sys.exit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="stunet", description="Space-Time U-Net (STUNet) video diffusion engine.")
    parser.add_argument("--version", action="version", version=f"stunet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    def command(name: str, help: str, description: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description)
        p.set_defaults(func=func, parser=p)
        return p

    info = command("info", "parameters, FLOPs, memory and per-level geometry of a model",
                   "Analyse a preset (or a model directory) without allocating its weights.", cmd_info)
    info.add_argument("preset", metavar="PRESET", help=f"one of {', '.join(PRESETS)}, or a model directory")
    info.add_argument("--frames", type=arguments.positive, help="T (default: the preset's window or clip length)")
    info.add_argument("--height", type=arguments.positive,
                      help="H (default: the preset's sample size; in pixels for a converted latent pipeline)")
    info.add_argument("--width", type=arguments.positive,
                      help="W (default: the preset's sample size; in pixels for a converted latent pipeline)")
    info.add_argument("--batch", type=arguments.positive, default=1,
                      help="clips per forward (default 1; 2 for a CFG step)")
    info.add_argument("--text-len", type=arguments.positive, default=77, help="text tokens (default 77)")
    info.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                      help="element size for the memory figures (default fp16)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")

    convert = command("convert", "a diffusers checkpoint folder -> the engine's folder",
                      "Convert a diffusers folder on disk (a ModelScope / ZeroScope or AnimateDiff pipeline, an "
                      "SD U-Net to inflate, or a lone `unet` folder) into the engine's format: config.json + "
                      "model.safetensors, plus the pipeline's vae, text_encoder, tokenizer and scheduler. Nothing "
                      "is downloaded.", cmd_convert)
    convert.add_argument("source", metavar="SRC_DIR", help="diffusers pipeline folder (with unet/) or unet folder")
    convert.add_argument("-o", "--output", required=True, metavar="DST_DIR", help="the folder to write")
    convert.add_argument("--overwrite", action="store_true", help="replace DST_DIR if it exists and is not empty")
    convert.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="stored weights (default fp16)")
    convert.add_argument("--motion-adapter", metavar="DIR",
                         help="AnimateDiff: a MotionAdapter folder to add to an SD unet (default: SRC_DIR's "
                              "motion_adapter/ when there is one)")
    convert.add_argument("--prediction", choices=["eps", "v"],
                         help="what the U-Net predicts (default: the folder's scheduler's prediction_type, else eps)")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress line")

    command("env", "what this install can run (torch, CUDA, C++ runtime, Triton)",
            "Report the versions, the devices, and what runs where (and why not).", cmd_env)

    export = command("export", "deployment artifacts (ONNX, AOTInductor, TensorRT)",
                     "Export a model for deployment.", None)
    routes = export.add_subparsers(dest="route", required=True, metavar="ROUTE", help="the artifact to make")
    onnx = routes.add_parser("onnx", help="ONNX with the kernel ops as stunet-domain nodes (+ local functions)",
                             description="Export a model folder to ONNX (opset 18): the kernel ops as stunet-domain "
                                         "nodes, each with a local function of standard ops.")
    aoti = routes.add_parser("aoti", help="an AOTInductor package (.pt2) for the model's device",
                             description="Compile a model folder ahead of time with AOTInductor into a .pt2 package "
                                         "(the Triton kernels compile into it on CUDA).")
    for route, p in (("onnx", onnx), ("aoti", aoti)):
        p.set_defaults(func=cmd_export, parser=p)
        p.add_argument("model", metavar="MODEL_DIR", help="model folder (config.json + model.safetensors)")
        p.add_argument("-o", "--output", required=True, help=f"the .{'onnx' if route == 'onnx' else 'pt2'} file")
        p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
        p.add_argument("--batch", type=arguments.positive, default=2, help="example batch (default 2: a CFG pair)")
        p.add_argument("--frames", type=arguments.positive, help="example frames (default: the model's sample_frames)")
        p.add_argument("--height", type=arguments.positive, help="example height (default: the model's sample_size)")
        p.add_argument("--width", type=arguments.positive, help="example width (default: the model's sample_size)")
        p.add_argument("--text-len", type=arguments.positive, default=77, help="example text tokens (default 77)")
        p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and inputs (default fp32)")
        p.add_argument("--device", type=arguments.device, default="cpu",
                       help="where the model is traced (and, for aoti, what the package runs on; default cpu)")
        p.add_argument("--static", action="store_true", help="fix every axis to the example's size")
        p.add_argument("--check", action="store_true",
                       help="run the artifact against the reference (two geometries when dynamic)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    trt = routes.add_parser("tensorrt", help="a TensorRT engine (.plan) from an exported ONNX file",
                            description="Build a TensorRT engine from an ONNX file made by `stunet export onnx`: a "
                                        "strongly typed network, one optimisation profile over the export's "
                                        "dynamic ranges. TensorRT 10.9+ runs the stunet nodes as AOT plugins of "
                                        "the Triton kernels; TensorRT-RTX inlines them and builds without a GPU.")
    trt.set_defaults(func=cmd_export_tensorrt, parser=trt)
    trt.add_argument("onnx", metavar="ONNX", help="the .onnx file (export it with --dtype fp16 for an FP16 engine)")
    trt.add_argument("-o", "--output", required=True, help="the .plan file")
    trt.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    trt.add_argument("--fp32", action="store_true", help="build an fp32 export as it is (default: FP16, which "
                                                         "needs an fp16 export)")
    trt.add_argument("--sm", type=int, nargs="+", metavar="SM",
                     help="TensorRT-RTX: compute capabilities to build for, e.g. 86 89 (default: this GPU)")
    trt.add_argument("--toolkit", choices=["tensorrt", "tensorrt-rtx"],
                     help="which TensorRT builds (default: TensorRT when installed, else TensorRT-RTX)")
    trt.add_argument("-q", "--quiet", action="store_true", help="no progress line")

    _add_generation_args(command("generate", "text to video", "Generate a video from a text prompt.",
                                 cmd_generate))
    i2v = command("image-to-video", "animate an image (7-channel model)",
                  "Generate a video whose first frame is the given image.", cmd_generate)
    _add_generation_args(i2v, edits="image")
    i2v.add_argument("--image", required=True, help="the first frame: an image (png/jpg) or a video's first frame")
    inp = command("inpaint", "regenerate a region of a video (7-channel model)",
                  "Regenerate a region of every frame of a video; the rest is kept.", cmd_generate)
    _add_generation_args(inp, edits="video")
    inp.add_argument("--video", required=True, help="input video (mp4/gif, or npy frames)")
    inp.add_argument("--region", required=True, type=_region,
                     help="what to regenerate: a mask image (white = regenerate) or a box x0,y0,x1,y1 in pixels")
    cin = command("cinemagraph", "animate a region of an image (7-channel model)",
                  "Animate only a region of an image; everything else stays still.", cmd_generate)
    _add_generation_args(cin, edits="image")
    cin.add_argument("--image", required=True, help="the still image (png/jpg) or a video's first frame")
    cin.add_argument("--region", required=True, type=_region,
                     help="what to animate: a mask image (white = animate) or a box x0,y0,x1,y1 in pixels")
    v2v = command("video-to-video", "SDEdit a video towards a prompt",
                  "Noise a video to a strength and denoise it towards the prompt (SDEdit). The output keeps the "
                  "video's frames and its size, or resizes each frame to --height / --width first (e.g. to upscale "
                  "with a high-resolution model).", cmd_generate)
    _add_generation_args(v2v, edits="video")
    v2v.add_argument("--video", required=True, help="input video (mp4/gif, or npy frames)")
    v2v.add_argument("--strength", type=arguments.number(0.0, 1.0, lo_open=True), default=0.6,
                     help="how far the input is noised, in (0, 1] (default 0.6; 1 ignores the input)")
    up = command("upscale", "raise a video with the SSR model alone",
                 "Raise a video at a base size to the SSR model's resolution on MultiDiffusion windows, guided by "
                 "the prompt, without running the base model (the demo cascade's SSR unless --model and --ssr "
                 "are given). The SSR noise depends on the seed alone: the --low-res-output .npy of a generation, "
                 "raised with its --seed and settings, gives its video.", cmd_generate)
    _add_generation_args(up, edits="all")
    up.add_argument("--video", required=True,
                    help="the low-resolution video (mp4/gif, or npy frames) at a base model size")
    return parser


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line a rank runs: the user's, less --nproc."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out


def _hush_library_progress() -> None:
    """-q: no progress bars from the libraries that load weights either (transformers, diffusers, huggingface_hub):
    said in the variable huggingface_hub reads when it is imported, and to those already imported."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for name, off in (("huggingface_hub.utils", "disable_progress_bars"),
                      ("transformers.utils.logging", "disable_progress_bar"),
                      ("diffusers.utils.logging", "disable_progress_bar")):
        module = sys.modules.get(name)
        if module is not None:
            getattr(module, off)()


INTERRUPTED = 130  # main()'s status for Ctrl-C, the one a shell shows for a process that SIGINT ended


def main(argv: list[str] | None = None) -> int:
    """Runs one command line and returns its exit status; :func:`run` is the ``stunet`` program around it."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # told with the subcommand's usage, which lists what it takes
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv
    # The ranks of one generation make the same calls, so they meet the same warnings: rank 0 says them
    follower = _ranked() and os.environ.get("RANK", "0") != "0"
    logging.basicConfig(format="%(message)s", level=logging.ERROR if follower else logging.WARNING)
    if getattr(args, "quiet", False):
        _hush_library_progress()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if not _ranked():  # a rank's interrupt is told by the process that launched the ranks
            print("stunet: interrupted", file=sys.stderr)
        return INTERRUPTED


def _end_by_sigint() -> NoReturn:
    """Ends this process as SIGINT's default action does, after the exit handlers and a flush of the streams.

    Not ``sys.exit(130)``: an exit status tells a shell that the command handled Ctrl-C itself, so a shell loop goes
    on to its next command. Nor left to CPython, which ends a ``python -m`` run by SIGINT only when an interrupt
    once went through an ``exec`` of a string (dataclasses and torch.fx build code that way), even caught."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(INTERRUPTED)  # reached only where SIGINT is blocked


def run() -> NoReturn:
    """The ``stunet`` program: :func:`main` on the command line, then the end of the process."""
    code = main()
    if _ranked():
        from stunet.distributed import leave

        leave(code)
    if code == INTERRUPTED:
        _end_by_sigint()
    sys.exit(code)


if __name__ == "__main__":
    run()
