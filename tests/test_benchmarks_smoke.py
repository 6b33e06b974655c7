"""Every benchmark script with a ``--quick`` mode runs and prints JSON lines (a smoke test: no timing is judged;
the figures come from the full runs, README "Benchmarks")."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
QUICK = ["capture_overhead", "recursion_scaling", "fidelity", "flop_floor", "ddp_recursion", "step_breakdown",
         "dattri_compare"]


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK)
def test_quick_benchmark_runs_and_prints_json_lines(name: str, tmp_path: Path) -> None:
    if name == "dattri_compare" and importlib.util.find_spec("dattri") is None:
        pytest.skip("dattri is a benchmark-only dependency: pip install dattri==0.3.0")
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)})  # this checkout's package
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(records) >= 2 and all("benchmark" in r for r in records)
