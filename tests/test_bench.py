"""The benchmark scripts run end to end (on the CPU, at smoke size) and write their JSON and markdown."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import current_umask, left_in_temp

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_script(name: str, monkeypatch):
    """bench/<name>.py as a module, loaded from its file: a module name such as ``kernels`` can be taken already
    (transformers probes for a ``kernels`` package, which finds the repository's kernels/ folder when the
    repository root is on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their harness
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["runtime.py", "kernels.py", "step.py", "pipeline.py", "distributed.py", "peers.py"])
def test_bench_script_smoke_run(script, tmp_path):
    name = script.removesuffix(".py")
    if script == "peers.py":
        pytest.importorskip("diffusers", reason="bench/peers.py times diffusers' own U-Nets")
    # Whole-model scripts use the kernels' reference paths on the CPU (the interpreter would take minutes);
    # kernels.py runs the kernels interpreted when the suite does.
    whole_model = ("step.py", "pipeline.py", "distributed.py", "peers.py")
    temp = tmp_path / "temp"  # the script's temporary folder: it leaves nothing there
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), **({"TRITON_INTERPRET": "0"} if script in whole_model else {})}
    extra = {"pipeline.py": [], "distributed.py": [], "step.py": ["--iters", "2", "--max-batch", "1"],
             "peers.py": ["--iters", "2"]}.get(
        script, ["--iters", "2"])
    run = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--quick", *extra,
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    impls = {r["impl"] for r in doc["rows"]}
    assert doc["stock"] in impls and len(impls) >= 2, "every benchmark measures the stock alternative beside ours"
    assert all(r["ms"] > 0 for r in doc["rows"]), [r["extra"].get("error") for r in doc["rows"] if r["ms"] <= 0]
    assert all(r["pct_roofline"] > 0 for r in doc["rows"] if r["bytes"]), "memory-bound rows show % of roofline"
    assert doc["command"].startswith(f"python bench/{script}")
    assert left_in_temp(temp) == []
    table = [line for line in (tmp_path / f"{name}.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == len(doc["rows"]) + 1  # header + one line per row


@pytest.mark.slow
def test_step_bench_times_an_aoti_package_beside_the_reference(tiny_aoti_package, tmp_path):
    _, result = tiny_aoti_package
    run = subprocess.run([sys.executable, str(BENCH / "step.py"), "--device", "cpu", "--quick", "--iters", "2",
                          "--backend", "reference", "--backend", "aoti", "--aoti-package", str(result.path),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["reference", "aoti"] and all(r["ms"] > 0 for r in rows)
    assert rows[1]["speedup"] is not None and rows[1]["flops"] == rows[0]["flops"]
    # A package compiled for another model is refused with the reason, before anything is written.
    run = subprocess.run([sys.executable, str(BENCH / "step.py"), "--device", "cpu", "--preset", "small",
                          "--iters", "1", "--backend", "aoti", "--aoti-package", str(result.path),
                          "--out", str(tmp_path / "other")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 2 and "compiled from another architecture" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "other").exists()


def test_step_bench_refuses_bad_aoti_requests(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import step

    (tmp_path / "m.pt2").write_bytes(b"")
    for args, message in (
            (["--backend", "fast", "--aoti-package", tmp_path / "m.pt2"], "pass --backend aoti and one --preset"),
            (["--backend", "aoti", "--preset", "small", "--preset", "edge", "--aoti-package", tmp_path / "m.pt2"],
             "one --preset"),
            (["--backend", "aoti", "--preset", "small", "--aoti-package", tmp_path / "none.pt2"], "no file"),
            (["--backend", "onnx"], "invalid choice: 'onnx'")):
        with pytest.raises(SystemExit) as exit_:
            step.main(["--device", "cpu", *map(str, args), "--out", str(tmp_path)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, message
    assert not (tmp_path / "step.json").exists()


def test_a_step_out_of_memory_is_a_failed_row_and_the_rows_after_it_run(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from harness import finish, markdown, timed_step

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    device = torch.device("cpu")
    rows = [timed_step("step (CFG)", "s", "reference", out_of_memory, device, 2, 1e9),
            timed_step("step (CFG)", "s", "fast", lambda: None, device, 2, 1e9)]
    assert rows[0].ms == 0 and rows[0].extra == {"error": "out of memory (CUDA out of memory. Tried to allocate "
                                                          "9.00 GiB)"}
    assert rows[1].ms > 0
    finish(rows, 1.0, 1.0, stock="reference")
    table = markdown(rows, {"device": "cpu", "copy_gbps": 1.0, "gemm_dtype": "float32", "gemm_tflops": 1.0,
                            "gemm_n": 256, "peak_gbps": 0.0, "torch": torch.__version__})
    assert "| step (CFG) | s | reference | out of memory (CUDA out of memory." in table


def test_a_smoke_run_never_lands_in_a_devices_results(tmp_path, monkeypatch):
    """Without --out, a --quick run writes under results/quick/<device> (ignored by git), a full run under
    results/<device>; each file says which it was."""
    monkeypatch.syspath_prepend(str(BENCH))
    import harness

    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    doc = {"device": "NVIDIA H200 (sm_90)", "command": "python bench/x.py"}
    assert harness.write_results("x", doc, "|", None, quick=True) == tmp_path / "results" / "quick" / "nvidia-h200"
    assert harness.write_results("x", doc, "|", None) == tmp_path / "results" / "nvidia-h200"
    assert json.loads((tmp_path / "results" / "quick" / "nvidia-h200" / "x.json").read_text())["quick"] is True
    assert json.loads((tmp_path / "results" / "nvidia-h200" / "x.json").read_text())["quick"] is False
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/results/quick/cpu/step.json"],
                             cwd=BENCH.parent, capture_output=True)
    if ignored.returncode != 128:  # 128: not a git checkout (an installed copy of the tests)
        assert ignored.returncode == 0, "bench/results/quick/ must be ignored by git"


def test_every_result_records_the_roofline_it_measured(tmp_path):
    """The % of roofline divides by a copy and a matmul measured in the same run, and the file says so."""
    doc = json.loads(_run_script("runtime.py", tmp_path, "--iters", "1").read_text())
    assert doc["copy_gbps"] > 0 and doc["gemm_tflops"] > 0 and doc["gemm_n"] == 256
    assert doc["roofline_gbps"] == doc["copy_gbps"] and doc["roofline_tflops"] == doc["gemm_tflops"]
    for r in doc["rows"]:
        ideal_ms = max(r["bytes"] / doc["copy_gbps"] / 1e6, r["flops"] / doc["gemm_tflops"] / 1e9)
        assert r["pct_roofline"] == pytest.approx(100 * ideal_ms / r["ms"], rel=1e-9)
    header = (tmp_path / "runtime.md").read_text().splitlines()[2]
    assert "roofline measured in this run" in header and "FP32 matmul" in header
    assert {(tmp_path / f).stat().st_mode & 0o777 for f in ("runtime.json", "runtime.md")} == {0o666 & ~current_umask()}


def test_fidelity_bench_compares_every_backend_with_the_fp32_reference(tmp_path):
    doc = json.loads(_run_script("fidelity.py", tmp_path, "--backend", "fast", "--backend", "aoti").read_text())
    rows = {r["impl"]: r for r in doc["rows"]}
    assert list(rows) == ["reference fp16", "fast", "aoti"] and doc["stock"] == "reference fp16"
    assert rows["reference fp16"]["dtype"] == "float16" and rows["reference fp16"]["error_vs_fp16_reference"] == 1
    # fast keeps FP32 on the CPU (the kernels' reference math in the same module tree), and so does the package
    # built there: rounding only.
    for name in ("fast", "aoti"):
        assert rows[name]["dtype"] == "float32" and rows[name]["rel_l2_max"] < 1e-5, rows[name]
        assert rows[name]["psnr_db"] > rows["reference fp16"]["psnr_db"] > 30
    assert 1e-5 < rows["reference fp16"]["rel_l2_max"] < 1e-2
    assert set(rows["fast"]["rel_l2"]) == {"999", "500", "20"}
    table = [line for line in (tmp_path / "fidelity.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 1


def test_profile_bench_splits_a_step_into_classes_of_work(tmp_path, monkeypatch):
    doc = json.loads(_run_script("profile_step.py", tmp_path, "--iters", "1", "--top", "5").read_text())
    assert doc["backend"] == "fast" and doc["preset"] == "tiny" and doc["step_ms"] > 0
    shares = {name: c["share"] for name, c in doc["classes"].items()}
    assert sum(shares.values()) == pytest.approx(1.0)
    # the step's own work lands in its classes (how large each share is depends on the machine's load: no timing
    # assertion here)
    assert all(shares[name] > 0 for name in ("GEMM/conv", "attention", "norms")), shares
    assert all(doc["top"][i]["ms"] >= doc["top"][i + 1]["ms"] for i in range(len(doc["top"]) - 1))
    table = (tmp_path / "profile_step.md").read_text()
    assert table.count("| `") == 5 and "GEMM/conv" in table
    monkeypatch.syspath_prepend(str(BENCH))
    from profile_step import classify

    assert classify("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64") == "GEMM/conv"
    assert classify("void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false>") == "copies/permutes"
    assert classify("_temporal_attn_fwd_kernel") == "attention"
    assert classify("_gn_apply_kernel") == "norms"
    assert classify("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>") == "elementwise"
    assert classify("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>") == "copies/permutes"
    assert classify("aten::upsample_nearest2d") == "other"


def _run_script(script: str, out: Path, *args: str) -> Path:
    """Runs bench/<script> at smoke size on the CPU (the model scripts on the kernels' reference math) and
    returns its JSON's path."""
    run = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--quick", *args,
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    return out / f"{script.removesuffix('.py')}.json"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_baseline_script_parses_and_refuses_a_machine_without_cuda(tmp_path):
    script = BENCH / "baseline.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    run = subprocess.run(["bash", str(script), str(tmp_path / "out"), "60"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stderr, run.stderr
    run = subprocess.run(["bash", str(script), str(tmp_path / "out"), "ten"], capture_output=True, text=True)
    assert run.returncode == 2 and "BUDGET_SECONDS must be a positive whole number" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()
    # Every script and module the baseline runs exists.
    named = set(re.findall(r"python (bench/\w+\.py)", script.read_text()))
    assert named and all((BENCH.parent / m).is_file() for m in named), named
    # (pip aside: setuptools hooks a lookup of pip, and warns)
    modules = set(re.findall(r"python -m ([\w.]+)", script.read_text())) - {"pip"}
    assert "stunet.cli" in modules and all(importlib.util.find_spec(m) for m in modules), modules


def test_fidelity_bench_refuses_bad_requests_before_building_a_model(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import fidelity

    for args, message in ((["--frames", "7"], "frames in multiples of 4"), (["--size", "62"], "sizes in multiples"),
                          (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
                          (["--preset", "lumiere-ssr"], "not a pixel base model")):
        with pytest.raises(SystemExit) as exit_:
            fidelity.main(["--device", "cpu", *args, "--out", str(tmp_path)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, message
    assert not list(tmp_path.iterdir())


SCRIPTS = ("kernels", "step", "pipeline", "runtime", "fidelity", "peers", "profile_step", "distributed")
TIMED = ("kernels", "step", "runtime", "peers", "profile_step")  # the scripts with --iters
BAD_VALUES = {  # a script's own options, each with a value it must refuse as it parses its arguments
    "step": [("--preset", "huge"), ("--max-batch", "0"), ("--compile-mode", "fastest")],
    "pipeline": [("--backend", "tensorrt"), ("--steps", "0"), ("--ssr-steps", "-1"), ("--ssr-batch", "x")],
    "fidelity": [("--preset", "huge"), ("--frames", "0"), ("--size", "-8"), ("--compile-mode", "fastest")],
    "peers": [("--backend", "aoti"), ("--compile-mode", "fastest")],
    "profile_step": [("--preset", "huge"), ("--top", "0"), ("--compile-mode", "fastest")],
    "distributed": [("--nproc", "0"), ("--steps", "0"), ("--ssr-batch", "0")],
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_script_refuses_bad_values_as_it_parses_them(name, tmp_path, capsys, monkeypatch):
    """A bad value exits with status 2 naming its argument, before any model, kernel or result file (a count of
    0 iterations was a statistics error after the warm-up; an unknown preset or compile mode was skipped by
    --quick or failed deep in a build)."""
    script = bench_script(name, monkeypatch)
    (tmp_path / "a_file").write_text("")
    shared = [("--device", "tpu"), *([("--device", "cuda")] if not torch.cuda.is_available() else []),
              ("--out", str(tmp_path / "a_file")), ("--out", str(tmp_path / "a_file" / "results")),
              *([("--iters", "0"), ("--iters", "two")] if name in TIMED else [])]
    for option, value in [*shared, *BAD_VALUES.get(name, [])]:
        with pytest.raises(SystemExit) as exit_:
            script.main(["--quick", "--out", str(tmp_path), option, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument {option}: " in err and value in err, (option, value, err)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]
