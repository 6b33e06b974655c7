"""What the report's loggers and printed summary hold, fast: a synthetic report (no fit) logged to real offline
loggers and read back (TensorBoard event files through ``EventAccumulator``, the CSVLogger's ``metrics.csv``), and
:func:`format_summary` of a real ``summary.json``. The oracles are :mod:`lightning_dve.curves`' own functions on
the hand-made curve, and the curve's known shape."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from lightning_dve import curves
from lightning_dve.config import ReportConfig
from lightning_dve.influence import InfluenceResult
from lightning_dve.reporting import TrainEndReport, format_summary, write_files
from lightning_dve.reporting_reference import Reference
from lightning_dve.samples import SampleView

# A U-shaped mean influence over 60 steps, two occurrences per step: a warm-up falling from 10 to 1 (steps 0..14),
# a basin at 1 (15..39), an ascent to 5 (40..59). Its phases exist at every smoothing width used here.
N_STEPS = 60
SHAPE = torch.cat([torch.linspace(10.0, 1.0, 16, dtype=torch.float64)[:-1], torch.ones(25, dtype=torch.float64),
                   torch.linspace(1.0, 5.0, 20, dtype=torch.float64)])
LR = 0.25  # not 1: the per-lr curves are 4 times the raw ones, so no raw curve can stand in for a per-lr one


def synthetic_report(directory: Path, config: ReportConfig | None = None, scale: float = 1.0,
                     samples: dict[int, SampleView] | None = None, spread: float = 0.5) -> TrainEndReport:
    """A report of the U-shaped curve times ``scale``: step ``t``'s two occurrences (samples ``2t`` and
    ``2t + 1``) score ``scale * (SHAPE[t] -/+ spread)``, so their mean is ``scale * SHAPE[t]`` (``spread`` above
    10: every even sample harmed, every odd one helped); learning rate ``LR`` throughout, epochs of 20 steps."""
    steps = torch.arange(N_STEPS).repeat_interleave(2)
    offsets = torch.tensor([-spread, spread], dtype=torch.float64).repeat(N_STEPS)
    scores = (SHAPE.repeat_interleave(2) + offsets)[None]
    result = InfluenceResult(torch.arange(2 * N_STEPS), steps, scale * scores)
    config = config or ReportConfig(top_k=3, histogram_bins=8, smoothing_fraction=0.1)
    summary = curves.summarise(result, list(range(N_STEPS)), [t // 20 for t in range(N_STEPS)],
                               torch.full((N_STEPS,), LR, dtype=torch.float64), config)
    return TrainEndReport(directory / "report", Reference({}, 7, "a test"), "net.0", summary, samples or {}, {})


def expected_curves(config: ReportConfig) -> dict[str, torch.Tensor]:
    """The per-step curves the loggers must hold, computed here from the shape (not from the report)."""
    window = curves.smoothing_window(N_STEPS, config.smoothing_fraction)
    return {"dve/curve/influence": SHAPE, "dve/curve/influence_per_lr": SHAPE / LR,
            "dve/curve/influence_per_lr_smoothed": curves.smooth(SHAPE / LR, window)}


def test_tensorboard_holds_the_smoothed_per_lr_curve_and_the_phase_steps(tmp_path: Path) -> None:
    """Read back from the event files: each per-step curve scalar is the curve its tag names (the smoothed one is
    the smoothed *per-lr* curve, 4 times the smoothed raw curve here), and the phases are logged under
    ``dve/phases/<phase>_step`` at the phase steps :func:`curves.detect_phases` finds on the smoothed per-lr curve
    (the default ``stage_scale``), which ``summary.json`` holds too."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator

    from lightning_dve.reporting_loggers import log_tensorboard

    report = synthetic_report(tmp_path)
    config = report.curves.config
    expected = expected_curves(config)
    assert curves.smoothing_window(N_STEPS, config.smoothing_fraction) > 1  # smoothing changes the curve
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    log_tensorboard(logger, report, {}, step=N_STEPS)
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    for tag, values in expected.items():
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == list(range(N_STEPS)), tag
        torch.testing.assert_close(torch.tensor([e.value for e in logged], dtype=torch.float64), values,
                                   rtol=1e-6, atol=1e-6, msg=tag)
    phases = curves.detect_phases(torch.arange(N_STEPS), expected["dve/curve/influence_per_lr_smoothed"],
                                  config.phase_threshold, config.min_phase_rise)
    assert None not in (phases.warmup_end, phases.basin, phases.ascent_start)
    assert 0 < phases.warmup_end < phases.basin < phases.ascent_start < N_STEPS - 1
    written = json.loads(write_files(report, {})["summary"].read_text())["phases"]
    for name in ("warmup_end", "basin", "ascent_start"):
        logged = events.Scalars(f"dve/phases/{name}_step")
        assert [(e.step, e.value) for e in logged] == [(N_STEPS, getattr(phases, name))], name
        assert written[name] == getattr(phases, name)


def test_tensorboard_top_k_tables_keep_one_row_per_sample_whatever_the_text(tmp_path: Path) -> None:
    """A sample's text of several lines (a ``describe`` text, a text input) ended its markdown row: TensorBoard
    showed each continuation as a row of its own, the text under ``rank`` (an audit). Rendered here by
    TensorBoard's own text plugin: one row per sample, the lines joined by ``⏎``, a ``|`` as ``/``."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.text import text_plugin
    from tensorboard.util import tensor_util

    from lightning_dve.reporting_loggers import log_tensorboard

    texts = {i: SampleView(str(i % 10), f"line one of {i}\nline two | end\r\nthree", None) for i in range(2 * N_STEPS)}
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    log_tensorboard(logger, synthetic_report(tmp_path, samples=texts, spread=12.0), {}, step=N_STEPS)
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    for name in ("helpful", "harmful"):
        proto = events.Tensors(f"dve/top_k/{name}/text_summary")[0].tensor_proto
        html = text_plugin.text_array_to_html(tensor_util.make_ndarray(proto), True)
        assert html.count("<tr>") == 1 + 1 + 3, html  # the plugin's outer table, the header, top_k=3 samples
        assert len(re.findall(r"line one of \d+⏎line two / end⏎three", html)) == 3, html


def test_csv_logger_holds_the_phase_steps_and_the_smoothed_per_lr_curve(tmp_path: Path) -> None:
    """The same through a real CSVLogger's ``metrics.csv``: one row per recorded step with the three curves, and
    one summary row at the trainer's step with the phase steps."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger

    from lightning_dve.reporting_loggers import log_to_loggers

    report = synthetic_report(tmp_path)
    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    log_to_loggers(SimpleNamespace(loggers=[logger], global_step=N_STEPS), report, {})
    with (Path(logger.log_dir) / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    per_step = [r for r in rows if r.get("dve/curve/influence")]
    assert [int(r["step"]) for r in per_step] == list(range(N_STEPS))
    for key, values in expected_curves(report.curves.config).items():
        got = torch.tensor([float(r[key]) for r in per_step], dtype=torch.float64)
        torch.testing.assert_close(got, values, rtol=1e-9, atol=1e-9, msg=key)
    summary = [r for r in rows if r.get("dve/total_influence")]
    assert len(summary) == 1 and int(summary[0]["step"]) == N_STEPS
    names, phases = ("warmup_end", "basin", "ascent_start"), report.curves.phases
    assert [float(summary[0][f"dve/phases/{name}_step"]) for name in names] == [getattr(phases, n) for n in names]


# --- the printed summary ------------------------------------------------------------------------------------


def test_printed_summary_shows_the_values_of_summary_json(tmp_path: Path) -> None:
    """Oracle: the ``summary.json`` the text is printed from. Influence values are small in practice (here about
    1e-6): every printed number keeps 4 significant digits (scientific notation), shares are percentages of the
    total (signed) and of the total magnitude (unsigned), an empty stage (``early_fraction=0``) is left out, the
    stage scale is named, the phases are in order, each top-k list is cut to ``k`` rows under a ``Top-<n>`` header
    of the rows shown, and a sample's description is cut to 60 characters."""
    text_of_best = "a long description " * 6
    config = ReportConfig(top_k=4, histogram_bins=8, smoothing_fraction=0.1, early_fraction=0.0,
                          late_fraction=0.25, stage_scale="raw")
    report = synthetic_report(tmp_path, config, scale=1e-6, samples={1: SampleView("7", text_of_best, None)},
                              spread=12.0)
    summary = json.loads(write_files(report, {})["summary"].read_text())
    assert summary["top_k"]["helpful"][0]["sample_id"] == 1 and len(summary["top_k"]["helpful"]) == 4

    def number(text: str, value: float) -> None:
        assert re.fullmatch(r"[+-]\d\.\d{3}e[+-]\d+", text), text
        assert float(text) == pytest.approx(value, rel=1e-3)

    lines = format_summary(summary, k=2).splitlines()
    head = re.fullmatch(r"Reference: 7 samples from a test; 60 steps, 120 training samples, total influence "
                        r"(\S+)\.", lines[0])
    assert head is not None, lines[0]
    number(head[1], summary["total_influence"])
    assert lines[1].startswith("Stage summary (raw curve;")
    stage_line = re.compile(r"  (\w+) +steps +(\d+)-(\d+) +share +([+-]\d+\.\d)% +\|share\| +(\d+\.\d)% +mean (\S+)")
    stages = [stage_line.fullmatch(line) for line in lines[2:4]]
    assert all(stages), lines[2:4]
    written = [s for s in summary["stages"] if s["n_steps"]]
    assert [s["stage"] for s in summary["stages"] if not s["n_steps"]] == ["early"]
    for match, stage in zip(stages, written):
        assert (match[1], int(match[2]), int(match[3])) == (stage["stage"], stage["first_step"], stage["last_step"])
        assert float(match[4]) == pytest.approx(100 * stage["share"], abs=0.051)
        assert float(match[5]) == pytest.approx(100 * stage["abs_share"], abs=0.051)
        number(match[6], stage["mean"])
    phases = summary["phases"]
    assert lines[4] == (f"Phases (step): warm-up end {phases['warmup_end']}, basin {phases['basin']}, ascent start "
                        f"{phases['ascent_start']}")
    assert phases["warmup_end"] < phases["basin"] < phases["ascent_start"]
    row_line = re.compile(r"  #(\d+) id +(\d+)  score (\S+)  label (\S+)  steps \[(.*)\](?:  '(.*)')?")
    for name, at in (("helpful", 5), ("harmful", 8)):
        assert lines[at] == f"Top-2 {name} training samples:"
        rows = [row_line.fullmatch(line) for line in lines[at + 1 : at + 3]]
        assert all(rows), lines[at + 1 : at + 3]
        for match, row in zip(rows, summary["top_k"][name]):
            assert (int(match[1]), int(match[2]), match[5]) == (row["rank"], row["sample_id"], row["steps"])
            number(match[3], row["score"])
    assert len(lines) == 11
    assert rows_description(lines[6]) == text_of_best[:60]
    more = format_summary(summary, k=6).splitlines()
    assert [line for line in more if line.startswith("Top-")] == ["Top-4 helpful training samples:",
                                                                  "Top-4 harmful training samples:"]
    assert len(more) == 5 + 2 * (1 + 4)


def rows_description(line: str) -> str:
    """The quoted description at the end of a printed top-k row."""
    quoted = re.search(r"  '(.*)'$", line)
    assert quoted is not None, line
    return quoted[1]


def test_binned_curve_rows_average_each_bin_over_its_defined_steps() -> None:
    """7 steps in at most 3 rows: bins of 3, 3 and 1 steps. Each row has its first step and epoch, the mean
    learning rate of its steps (a schedule changes it inside a bin), the summed counts and the mean of the defined
    values: step 3 has learning rate 0, so its influence per lr is undefined and left out of its bin's mean (not
    counted as 0). Oracle: the hand-computed bins of scores ``t + 1`` (one occurrence per step)."""
    from lightning_dve.reporting_loggers import binned_curve_rows, curve_rows

    lrs = torch.tensor([1.0, 0.5, 0.25, 0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    result = InfluenceResult(torch.arange(7), torch.arange(7), torch.arange(1.0, 8.0, dtype=torch.float64)[None])
    report = curves.summarise(result, list(range(7)), [0, 0, 0, 0, 1, 1, 1], lrs,
                              ReportConfig(top_k=1, histogram_bins=2, smoothing_fraction=0.0))
    rows, width = binned_curve_rows(report, 3)
    assert width == 3 and len(rows) == 3
    expected = [[0, 0, 1.75 / 3, 3, 2.0, (1.0 + 4.0 + 12.0) / 3],
                [3, 0, 1.0, 3, 5.0, (5.0 / 1.0 + 6.0 / 2.0) / 2],  # step 3's per-lr value is undefined
                [6, 1, 4.0, 1, 7.0, 7.0 / 4.0]]
    assert [v for row in rows for v in row[:6]] == pytest.approx([v for row in expected for v in row], rel=1e-12)
    assert binned_curve_rows(report, 7) == (curve_rows(report), 1)


def test_the_epoch_figure_ticks_whole_epochs_only(tmp_path: Path) -> None:
    """Three epochs were ticked 0, 0.25, 0.5, ... (an audit): the epoch axis has integer ticks."""
    from lightning_dve import figures

    figure = figures.epoch_figure(synthetic_report(tmp_path).curves)
    figures.render(figure)
    ticks = figure.axes[0].get_xticks()
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
