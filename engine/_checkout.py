"""The top-level name ``kernels`` keeps meaning the installed package of that name when stunet runs from its
source checkout.

In an editable install the checkout's ``kernels/`` folder is ``stunet.kernels`` (setup.py's package_dir), and
``bench/kernels.py`` is a benchmark script. When a checkout folder is on sys.path (``python -m stunet`` or
``python -m pytest`` started in the checkout, a script under bench/), a plain ``import kernels`` finds one of
them instead of Hugging Face's ``kernels`` package, which transformers imports (and then fails inside
transformers: ``cannot import name 'CUDAProperties' from 'kernels'``). :func:`keep_top_level_kernels` puts a
finder before the path search that looks the top-level name up in the other sys.path entries only.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

NAME = "kernels"


def _inside(entry: str, root: Path) -> bool:
    try:
        folder = Path(entry or os.getcwd()).resolve()  # '' is the current folder
    except OSError:  # a current folder that was removed: the path search skips it too
        return False
    return folder == root or root in folder.parents


class InstalledKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level ``kernels`` in the sys.path entries outside ``root`` (None when there is none, and the
    path search goes on as usual)."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME or path is not None:
            return None
        entries = [entry for entry in sys.path if isinstance(entry, str) and not _inside(entry, self.root)]
        return importlib.machinery.PathFinder.find_spec(fullname, entries, target)


def keep_top_level_kernels() -> InstalledKernelsFinder | None:
    """Installs the finder (once) when the top-level ``kernels`` would come from the folder that holds
    ``stunet.kernels``, i.e. from this checkout; returns it, or None where nothing is shadowed (a regular
    install, or no checkout folder on sys.path)."""
    if any(isinstance(finder, InstalledKernelsFinder) for finder in sys.meta_path):
        return None
    ours = importlib.util.find_spec(f"stunet.{NAME}")
    top = importlib.machinery.PathFinder.find_spec(NAME)
    if ours is None or ours.origin is None or top is None or top.origin is None:
        return None
    root = Path(ours.origin).resolve().parent.parent
    if root not in Path(top.origin).resolve().parents:
        return None
    finder = InstalledKernelsFinder(root)
    sys.meta_path.insert(0, finder)
    return finder
