"""Shared fixtures. The default suite runs on CPU; tests marked ``gpu`` are skipped unless CUDA is available.

CUDA is queried lazily (at collection of a gpu-marked test), never at import.
"""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. Set before stunet (and so
# its kernel modules) is imported: triton.jit reads it at decoration time. An explicit TRITON_INTERPRET wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import stunet  # noqa: E402
from stunet.distributed import local_cores  # noqa: E402


# Under `pytest -n N` (pytest-xdist), the N workers share the cores instead of each taking all of them; the
# processes a test starts (the CLI, torchrun ranks) inherit the worker's share. An explicit OMP_NUM_THREADS wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, local_cores() // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto`: one worker per core, at most four (a worker can hold several GB: the lumiere-base test,
    an ONNX export)."""
    return min(local_cores(), 4)


def pytest_sessionstart(session):
    """On CI (CI=true), the C++ runtime and Triton must be there: their tests would otherwise skip, and a
    broken build would pass unnoticed. Locally they skip with the reason."""
    if os.environ.get("CI", "").strip().lower() not in ("1", "true", "yes"):
        return
    from stunet.kernels import _triton
    from stunet.sampling import runtime

    missing = []
    if not runtime.available():
        missing.append(f"the C++ runtime stunet._C: {runtime.status()}")
    if _triton.triton is None:
        missing.append(f"Triton: {_triton.IMPORT_ERROR} (pip install -e '.[test]')")
    if missing:
        pytest.exit("CI=true, but the suite cannot test " + "; ".join(missing), returncode=3)


def pytest_report_header(config):
    """A line in the header when Triton's interpreter cannot run a loop over a runtime bound here, which every
    interpreted kernel test then fails on (Triton 3.6's interpreter with numpy 2.4 or newer)."""
    problem = _interpreter_problem()
    return [f"WARNING: {problem}"] if problem else []


def _interpreter_problem() -> str | None:
    from stunet.kernels import _triton

    if _triton.triton is None or not _triton.interpreting():
        return None
    import numpy

    tl = _triton.tl

    @_triton.jit
    def probe(out, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for _ in range(0, n, BLOCK):
            acc += 1.0
        tl.store(out + tl.arange(0, BLOCK), acc)

    out = torch.zeros(4)
    try:
        probe[(1,)](out, 8, BLOCK=4)
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return (f"Triton {_triton.triton.__version__}'s interpreter fails here with numpy {numpy.__version__} "
                f"({type(e).__name__}: {str(e)[:120]}): the interpreted kernel tests will fail; install "
                "numpy<2.4 or a newer Triton")
    if out.tolist() != [2.0] * 4:
        return f"Triton {_triton.triton.__version__}'s interpreter computes a loop wrongly here ({out.tolist()})"
    return None


def pytest_configure(config):
    """`--dist loadfile` hands out whole files in the suite's order (below), not pytest-xdist's default of the
    files with the most tests first."""
    if getattr(config.option, "dist", "no") in ("loadfile", "loadscope"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    # Under `pytest -n`, the files that hold a long test (marked slow) run first: a worker that starts one last
    # would end the run alone. One process keeps the order of the command line (bench/baseline.sh's GPU run).
    if getattr(config.option, "dist", "no") != "no":
        slow_files = {item.path for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.path not in slow_files)
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


@pytest.fixture(scope="session")
def tiny_aoti_package(tmp_path_factory):
    """``utils.tiny_model()`` compiled by AOTInductor for the CPU at bench/step.py's smoke geometry (static:
    batch 2, 8 frames of 16x16, 77 tokens): (model, ExportResult). Built once, in about a minute."""
    from utils import tiny_model

    from stunet.export import export_aoti

    model = tiny_model()
    path = tmp_path_factory.mktemp("aoti") / "tiny.pt2"
    # The package's host wrapper at -O0 (a minute less of g++) and scalar C++ kernels (less code generation).
    result = export_aoti(model, path, batch=2, frames=8, height=16, width=16, text_len=77, dynamic=False,
                         inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0", "cpp.simdlen": 0})
    return model, result
