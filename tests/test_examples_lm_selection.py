"""Smoke runs of ``examples/tiny_lm.py`` and ``examples/selection_timing.py`` in their reduced (``--quick``) modes.

The runs this session selects run one after the other in one child process (``tests/script_runner.py``: one
start-up and one import of torch, Lightning and W&B), each as ``__main__`` in its own folder (its working directory
and ``--out``), with every W&B folder pointed into that folder so that nothing lands in the repository or the
user's home; each test then checks its own run.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest

from tests.script_runner import launch, read_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# test -> (script, arguments before --out)
RUNS = {
    "test_tiny_lm_quick_with_offline_wandb": ("tiny_lm.py", ["--quick", "--no-progress-bar"]),
    "test_tiny_lm_quick_mean_of_sequence_means_csv": (
        "tiny_lm.py", ["--quick", "--logger", "csv", "--loss-weighting", "sequences", "--no-progress-bar"]),
    "test_selection_timing_quick_with_dvemb_summary": ("selection_timing.py", ["--quick", "--dvemb"]),
}


def example_run(name: str, folder: Path) -> dict:
    """The runner's spec of test ``name``'s example run in ``folder`` (cwd; ``--out`` is ``folder / "run"``)."""
    script, args = RUNS[name]
    env = {"WANDB_SILENT": "true", "WANDB_MODE": "offline", "MPLBACKEND": "Agg"}
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        (folder / variable.lower()).mkdir(parents=True, exist_ok=True)
        env[variable] = str(folder / variable.lower())
    return {"name": name, "script": str(EXAMPLES / script), "args": [*args, "--out", str(folder / "run")],
            "cwd": str(folder), "env": env}


@pytest.fixture(scope="module")
def example_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the examples of the selected tests in one child process.

    Returns:
        ``(folder of the runs' output files and of each run's folder <test name>/, the runner's own stderr)``.
    """
    selected = {item.name for item in request.session.items if item.module is request.module}
    out = tmp_path_factory.mktemp("examples")
    runs = [example_run(name, out / name) for name in RUNS if name in selected]
    return out, launch(runs, out, timeout=180 * max(1, len(runs)))


def run_example(name: str, example_runs: tuple[Path, str]) -> tuple[str, Path]:
    """Test ``name``'s run: its stdout (fail with the tail of its output if it failed) and its ``--out``."""
    out, runner_stderr = example_runs
    return read_run(out, name, runner_stderr), out / name / "run"


@pytest.mark.slow
def test_tiny_lm_quick_with_offline_wandb(example_runs: tuple[Path, str]) -> None:
    printed, out = run_example("test_tiny_lm_quick_with_offline_wandb", example_runs)
    report = out / "dve" / "report"
    for line in ("W&B run (offline):", f"Report folder: {report}", "Stage summary", "Phases (step):"):
        assert line in printed, printed
    assert re.search(r"Top-\d helpful training sequences:", printed) and re.search(r"Top-\d harmful training "
                                                                                 r"sequences:", printed), printed
    assert (report / "summary.json").is_file() and (report / "curve.png").is_file()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_steps"] == 12 and summary["n_samples"] == 96
    assert all(r["score"] > 0 for r in summary["top_k"]["helpful"]) and summary["top_k"]["helpful"]
    assert all(r["score"] < 0 for r in summary["top_k"]["harmful"]) and summary["top_k"]["harmful"]
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
def test_tiny_lm_quick_mean_of_sequence_means_csv(example_runs: tuple[Path, str]) -> None:
    printed, out = run_example("test_tiny_lm_quick_mean_of_sequence_means_csv", example_runs)
    for line in ("CSVLogger logs:", "Stage summary", "Top-5 helpful training sequences:"):
        assert line in printed, printed
    manifest = json.loads((out / "dve" / "manifest.json").read_text())
    assert manifest["settings"]["loss_reduction"] == "mean"
    assert (out / "dve" / "report" / "summary.json").is_file()


@pytest.mark.slow
def test_selection_timing_quick_with_dvemb_summary(example_runs: tuple[Path, str]) -> None:
    printed, out = run_example("test_selection_timing_quick_with_dvemb_summary", example_runs)
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
