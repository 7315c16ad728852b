"""The benchmark scripts run end to end (on the CPU, at smoke size) and write their JSON and markdown."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["runtime.py", "kernels.py", "step.py", "pipeline.py", "distributed.py", "peers.py"])
def test_bench_script_smoke_run(script, tmp_path):
    name = script.removesuffix(".py")
    if script == "peers.py":
        pytest.importorskip("diffusers", reason="bench/peers.py times diffusers' own U-Nets")
    # Whole-model scripts use the kernels' reference paths on the CPU (the interpreter would take minutes);
    # kernels.py runs the kernels interpreted when the suite does.
    whole_model = ("step.py", "pipeline.py", "distributed.py", "peers.py")
    env = {**os.environ, **({"TRITON_INTERPRET": "0"} if script in whole_model else {})}
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
