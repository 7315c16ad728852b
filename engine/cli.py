"""The ``stunet`` command line. Bad arguments exit with status 2 and a message naming the argument."""
from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())
