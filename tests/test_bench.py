"""The benchmark scripts run end to end (on the CPU, at smoke size) and write their JSON and markdown."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["runtime.py", "kernels.py"])
def test_bench_script_smoke_run(script, tmp_path):
    name = script.removesuffix(".py")
    run = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--quick", "--iters", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    impls = {r["impl"] for r in doc["rows"]}
    assert "stunet" in impls and len(impls) >= 2, "every benchmark measures the stock alternative beside stunet"
    assert all(r["ms"] > 0 and r["pct_roofline"] > 0 for r in doc["rows"])
    assert doc["command"].startswith(f"python bench/{script}")
    assert (tmp_path / f"{name}.md").read_text().count("| stunet |") == sum(r["impl"] == "stunet" for r in doc["rows"])
