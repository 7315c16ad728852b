"""Argument types for command lines, the ``stunet`` CLI's and the benchmark scripts': each parses one value and
raises ``argparse.ArgumentTypeError`` on a bad one, which argparse reports naming the argument (exit status 2)."""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from .io import folder_problem


def positive(text: str) -> int:
    """An integer >= 1 (sizes, counts, steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def seed(text: str) -> int:
    """A noise seed: an integer in [0, 2**63), what a torch.Generator takes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {value}")
    return value


def number(lo: float, hi: float | None = None, lo_open: bool = False):
    """A finite float in [lo, hi] ((lo, hi] with ``lo_open``; no upper bound when ``hi`` is None)."""
    rule = (f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None
            else (f"> {lo:g}" if lo_open else f">= {lo:g}"))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {rule}, got {text!r}") from None
        if not math.isfinite(value) or (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be a finite number {rule}, got {text!r}")
        return value

    return parse


def device(text: str) -> str:
    """A device name: 'cpu', 'cuda' or 'cuda:N' (whether this machine has it is checked where it is used)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    return text


def folder(text: str) -> Path:
    """A folder to write into: one that exists, or one that can be made (no file in the way)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a folder path, got {text!r}")
    if problem := folder_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return Path(text)
