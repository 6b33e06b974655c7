"""Smoke runs of ``examples/tiny_lm.py`` and ``examples/selection_timing.py`` in their reduced (``--quick``) modes.

Each example runs as a subprocess in ``tmp_path`` (its working directory and ``--out``), with every W&B folder
pointed into ``tmp_path`` so that nothing lands in the repository or the user's home.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(script: str, tmp_path: Path, *args: str, timeout: int = 180) -> str:
    """Run ``examples/<script>`` with ``args``; return its stdout (fail with the tail of stderr if it fails)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true", "WANDB_MODE": "offline",
           "MPLBACKEND": "Agg"}
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        folder = tmp_path / name.lower()
        folder.mkdir(exist_ok=True)
        env[name] = str(folder)
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path, env=env)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.slow
def test_tiny_lm_quick_with_offline_wandb(tmp_path):
    out = tmp_path / "run"
    printed = run_example("tiny_lm.py", tmp_path, "--quick", "--out", str(out), "--no-progress-bar")
    report = out / "dve" / "report"
    for line in ("W&B run (offline):", f"Report folder: {report}", "Stage summary", "Phases (step):",
                 "Top-5 helpful training sequences:", "Top-5 harmful training sequences:"):
        assert line in printed, printed
    assert (report / "summary.json").is_file() and (report / "curve.png").is_file()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_steps"] == 12 and summary["n_samples"] == 96
    assert [s["stage"] for s in summary["stages"]] == ["early", "middle", "late"]
    # the describe= text of every top-k sequence reached the summary and the W&B top-k table
    assert all(row["description"] for row in summary["top_k"]["helpful"] + summary["top_k"]["harmful"])
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and glob.glob(str(Path(runs[0]) / "run-*.wandb"))
    tables = glob.glob(str(Path(runs[0]) / "files" / "media" / "table" / "dve" / "top_k" / "helpful_*.table.json"))
    assert tables, "no W&B top-k table"
    table = json.loads(Path(tables[0]).read_text())
    column = table["columns"].index("description")
    assert all(isinstance(row[column], str) and row[column] for row in table["data"])
    assert not (ROOT / "tiny_lm_run").exists() and not (ROOT / "wandb").exists()


@pytest.mark.slow
def test_tiny_lm_quick_mean_of_sequence_means_csv(tmp_path):
    out = tmp_path / "run"
    printed = run_example("tiny_lm.py", tmp_path, "--quick", "--logger", "csv", "--loss-weighting", "sequences",
                          "--out", str(out), "--no-progress-bar")
    for line in ("CSVLogger logs:", "Stage summary", "Top-5 helpful training sequences:"):
        assert line in printed, printed
    manifest = json.loads((out / "dve" / "manifest.json").read_text())
    assert manifest["settings"]["loss_reduction"] == "mean"
    assert (out / "dve" / "report" / "summary.json").is_file()


@pytest.mark.slow
def test_selection_timing_quick_with_dvemb_summary(tmp_path):
    out = tmp_path / "run"
    printed = run_example("selection_timing.py", tmp_path, "--quick", "--dvemb", "--out", str(out))
    assert "held-out loss" in printed and "sel. time (s)" in printed
    for policy in ("never", "always", "early", "late", "early+late", "middle *"):
        assert any(line.startswith(policy + " ") for line in printed.splitlines()), policy
    assert "Verdict: " in printed and "never - always" in printed
    assert "Stage summary" in printed and "DVEmb put" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 6 * 2  # six policies, two seeds
    steps = {r["policy"]: r["selection_steps"] for r in results["runs"]}
    assert steps["never"] == 0 and steps["always"] == 60 and steps["early+late"] == steps["middle"] == 18
    assert steps["early"] == steps["late"] == 9
    assert all(r["selection_seconds"] == 0 for r in results["runs"] if r["policy"] == "never")
