"""Shared fixtures. The default suite runs on CPU; tests marked ``gpu`` are skipped unless CUDA is available.

CUDA is queried lazily (at collection of a gpu-marked test), never at import.
"""
from __future__ import annotations

import os

import pytest
import torch

import stunet


def pytest_configure(config):
    # Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter (set before any kernel
    # module is imported: triton.jit reads it at decoration time). An explicit TRITON_INTERPRET wins.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on a GPU machine)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def tiny_config() -> stunet.STUNetConfig:
    return stunet.STUNetConfig.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config) -> stunet.STUNet:
    torch.manual_seed(0)
    return stunet.STUNet(tiny_config).eval()
