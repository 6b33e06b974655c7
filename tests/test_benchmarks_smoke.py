"""Every benchmark script with a ``--quick`` mode runs and prints JSON lines (a smoke test: no timing is judged;
the figures come from the full runs, README "Benchmarks").

The selected scripts run one after the other in one child process (``tests/script_runner.py``: start-up and the
torch / Lightning imports once, each script as ``__main__`` with ``--quick`` in its own working directory, with
its own output and status files); each script's run and output is then checked by its own test.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.script_runner import launch, read_run

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# ddp_recursion first: its --quick forks its ranks, best from a process that has not yet run other scripts
QUICK = ["ddp_recursion", "capture_overhead", "recursion_scaling", "fidelity", "flop_floor", "step_breakdown",
         "step_phases", "dattri_compare", "mislabel", "replay_cost", "clip_recursion", "replay_memory",
         "momentum_recursion", "call_probe"]


def available(name: str) -> bool:
    """dattri is a benchmark-only dependency (``pip install dattri==0.3.0``); the other scripts always run."""
    return name != "dattri_compare" or importlib.util.find_spec("dattri") is not None


@pytest.fixture(scope="module")
def quick_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the ``--quick`` mode of every script this session selected, in one child process.

    Returns:
        ``(folder of each script's .stdout / .stderr / .status files, the runner's own stderr)``.
    """
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    out = tmp_path_factory.mktemp("quick")
    runs = [{"name": name, "script": str(BENCHMARKS / f"{name}.py"), "args": ["--quick"], "cwd": str(out / name)}
            for name in QUICK if name in selected and available(name)]
    return out, launch(runs, out, timeout=300 * max(1, len(runs)))


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK)
def test_quick_benchmark_runs_and_prints_json_lines(name: str, quick_runs: tuple[Path, str]) -> None:
    if not available(name):
        pytest.skip("dattri is a benchmark-only dependency: pip install dattri==0.3.0")
    records = [json.loads(line) for line in read_run(quick_runs[0], name, quick_runs[1]).splitlines()
               if line.strip()]
    assert len(records) >= 2 and all("benchmark" in r for r in records)
    if name == "fidelity":  # each estimator either scores or says why not: the replayed embeddings must score
        replayed = [r for r in records if r.get("estimator") == "replayed"]
        assert [isinstance(r["spearman_vs_tsloo"], float) for r in replayed] == [True], replayed
    if name == "ddp_recursion":  # 2 ranks embed as one does; only ranks apart (own disks) send rank 0 embeddings
        [line] = [r for r in records if "ratio_separate_disks" in r]
        assert line["embeddings_match_one_rank"]["max_abs_diff"] == 0.0, line
        received = line["train_end_bytes_rank0"]["received"]["embed"]
        assert received < 200 < line["train_end_bytes_rank0_separate_disks"]["received"]["embed"], line
    if name == "replay_cost":  # exact replay of the fidelity MLP: first-order exact where the response is linear
        [line] = [r for r in records if "spearman_vs_tsloo" in r]
        assert line["spearman_vs_tsloo"] > 0.9 and line["max_rel_diff_train_loss_fn"] < 1e-6, line
    if name == "replay_memory":  # every call measured, and train_loss_fn's scores are training_step's
        calls = [r for r in records if "peak_over_weights" in r]
        assert len(calls) == 4 and all(r["max_rel_diff_vs_training_step"] < 1e-5 for r in calls), calls
    if name == "mislabel":  # three callbacks of one Trainer (GGN among them) each score every training sample
        auroc = {r["method"]: r["auroc"] for r in records if r.get("part") == "detection"}
        assert {"DVEmb default", "DVEmb ggn", "DVEmb none (TracIn)"} <= auroc.keys(), auroc
        assert auroc["DVEmb default"] > auroc["random"] + 0.2, auroc
