"""Triton, when importable. Kernel files take ``jit``, ``tl`` and ``triton`` from here so that their reference
math (the CPU path and the oracle) imports on machines without Triton; ``stunet.kernels.ops`` then reports
why the kernels are unavailable instead of failing at import."""
from __future__ import annotations

import os

# The kernels are written and checked with floating-point contraction (FMA) on, Triton's default up to 3.9;
# 3.9 warns that its default turns off in 3.10. Pinned here unless the environment chooses: the same code and
# numerics on every Triton, and no warning at the first compile.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    import triton
    import triton.language as tl
    IMPORT_ERROR: str | None = None
except ImportError as exc:
    triton = tl = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def jit(fn):
    """``triton.jit`` when Triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if triton is not None else fn


def launch(kernel):
    """``kernel`` ready for ``[grid](...)``: wrapped with ``torch.library.wrap_triton``, so that inside a
    ``torch.library.triton_op`` torch.compile and AOTInductor see the launch (and compile the kernel into their
    output); eagerly it launches the kernel as it is. An interpreted kernel launches as it is: nothing traces one
    (the ops take their reference math under tracing on the CPU), and torch before 2.13 refuses to wrap it."""
    if interpreting():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
