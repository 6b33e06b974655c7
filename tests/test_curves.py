"""Unit tests of lightning_dve.curves (pure maths) and ReportConfig validation, on hand-made inputs."""

from __future__ import annotations

import math
import tracemalloc

import pytest
import torch

from lightning_dve import curves
from lightning_dve.config import CurveScale, ReportConfig
from lightning_dve.curves import Phases, Stage
from lightning_dve.errors import ConfigError
from lightning_dve.influence import InfluenceResult


def occurrences(rows: list[tuple[int, int, float]]) -> InfluenceResult:
    """``(step, sample_id, score)`` rows as a one-row per-step InfluenceResult."""
    steps, ids, scores = zip(*rows)
    return InfluenceResult(torch.tensor(ids), torch.tensor(steps), torch.tensor([scores], dtype=torch.float64))


# A synthetic curve of 100 steps: a warm-up falling linearly from 10 to 1.45 (steps 0..19), a flat basin at 1
# (steps 20..69) and an ascent rising linearly from 1 to 5 (steps 70..99).
STEPS = torch.arange(100)
WARMUP = torch.linspace(10.0, 1.0, 21, dtype=torch.float64)[:-1]
BASIN = torch.ones(50, dtype=torch.float64)
ASCENT = torch.linspace(1.0, 5.0, 30, dtype=torch.float64)
CURVE = torch.cat([WARMUP, BASIN, ASCENT])


# --- the per-step curve -------------------------------------------------------------------------------------


def test_step_curve_averages_each_steps_occurrences_and_divides_by_lr():
    result = occurrences([(0, 7, 1.0), (0, 8, 3.0), (1, 7, -2.0), (3, 9, 4.0), (3, 7, 0.0), (3, 8, 2.0)])
    curve = curves.step_curve(result, [0, 1, 3], [0, 0, 1], torch.tensor([0.5, 0.25, 2.0]))
    assert curve.steps.tolist() == [0, 1, 3]
    assert curve.epochs.tolist() == [0, 0, 1]
    assert curve.counts.tolist() == [2, 1, 3]
    assert curve.influence.tolist() == [2.0, -2.0, 2.0]
    assert curve.influence_per_lr.tolist() == [4.0, -8.0, 1.0]


def test_step_curve_averages_rows_like_their_mean_query():
    result = InfluenceResult(torch.tensor([1, 2, 1]), torch.tensor([0, 0, 1]),
                             torch.tensor([[1.0, 3.0, 5.0], [3.0, 5.0, -1.0]], dtype=torch.float64))
    curve = curves.step_curve(result, [0, 1], [0, 0], torch.ones(2))
    assert curve.influence.tolist() == [3.0, 2.0]


def test_step_curve_zero_learning_rate_gives_nan_per_lr():
    for influence in (0.0, 3.0, -3.0):  # undefined, not 0 / 0 = NaN only: never an infinity
        curve = curves.step_curve(occurrences([(0, 1, influence), (1, 1, 2.0)]), [0, 1], [0, 0],
                                  torch.tensor([0.0, 1.0]))
        assert math.isnan(curve.influence_per_lr[0]) and curve.influence_per_lr[1] == 2.0


def test_a_recorded_step_without_scored_occurrences_is_undefined_not_zero():
    """Scores of a subset of the occurrences (here none of step 1's): that step's influence is unknown (NaN, left
    out of the epoch mean), not a measured 0."""
    curve = curves.step_curve(occurrences([(0, 1, 2.0), (2, 3, 4.0)]), [0, 1, 2], [0, 0, 0], torch.full((3,), 0.5))
    assert curve.counts.tolist() == [1, 0, 1] and curve.influence[0] == 2.0 and curve.influence[2] == 4.0
    assert math.isnan(curve.influence[1]) and math.isnan(curve.influence_per_lr[1])
    epochs = curves.epoch_curve(curve)
    assert epochs.influence.tolist() == [3.0] and epochs.influence_per_lr.tolist() == [6.0]


def test_step_curve_refuses_a_step_that_was_not_recorded():
    with pytest.raises(ConfigError, match="not recorded steps"):
        curves.step_curve(occurrences([(0, 1, 1.0), (5, 1, 1.0)]), [0, 1], [0, 0], torch.ones(2))


def test_step_curve_refuses_lists_of_other_lengths():
    with pytest.raises(ConfigError, match="one entry per recorded step"):
        curves.step_curve(occurrences([(0, 1, 1.0)]), [0], [0, 0], torch.ones(1))


# --- smoothing and epochs -----------------------------------------------------------------------------------


def test_smoothing_window_is_odd_and_at_least_one():
    assert curves.smoothing_window(100, 0.05) == 5
    assert curves.smoothing_window(100, 0.04) == 5
    assert curves.smoothing_window(100, 0.0) == 1
    assert curves.smoothing_window(3, 0.05) == 1


def test_smooth_is_a_centred_mean_that_skips_nan_and_shrinks_at_edges():
    values = torch.tensor([1.0, math.nan, 3.0, 4.0, 5.0])
    assert curves.smooth(values, 3).tolist() == [1.0, 2.0, 3.5, 4.0, 4.5]
    assert torch.equal(curves.smooth(CURVE, 1), CURVE)


def test_epoch_curve_means_per_epoch_and_sums_occurrences():
    result = occurrences([(0, 1, 1.0), (0, 2, 3.0), (1, 1, 6.0), (2, 2, -1.0)])
    curve = curves.step_curve(result, [0, 1, 2], [0, 0, 1], torch.tensor([1.0, 2.0, 0.5]))
    epochs = curves.epoch_curve(curve)
    assert epochs.epochs.tolist() == [0, 1]
    assert epochs.first_steps.tolist() == [0, 2] and epochs.last_steps.tolist() == [1, 2]
    assert epochs.influence.tolist() == [4.0, -1.0]  # mean of step means 2 and 6
    assert epochs.influence_per_lr.tolist() == [2.5, -2.0]  # mean of 2 and 3
    assert epochs.total.tolist() == [10.0, -1.0]


# --- stages and phases --------------------------------------------------------------------------------------


def test_stage_bounds():
    assert curves.stage_bounds(100, 0.1, 0.2) == (10, 80)
    assert curves.stage_bounds(5, 0.01, 0.01) == (1, 4)  # each non-zero stage gets a step
    assert curves.stage_bounds(1, 0.1, 0.1) == (1, 1)  # early wins, the late stage is empty
    assert curves.stage_bounds(10, 0.0, 0.0) == (0, 10)


def test_stage_summary_on_the_synthetic_curve():
    early, middle, late = curves.stage_summary(STEPS, CURVE, early_fraction=0.2, late_fraction=0.3)
    total = CURVE.sum().item()
    assert [s.stage for s in (early, middle, late)] == [Stage.EARLY, Stage.MIDDLE, Stage.LATE]
    assert (early.first_step, early.last_step, early.n_steps) == (0, 19, 20)
    assert (middle.first_step, middle.last_step, middle.n_steps) == (20, 69, 50)
    assert (late.first_step, late.last_step, late.n_steps) == (70, 99, 30)
    assert early.share == pytest.approx(WARMUP.sum().item() / total)  # 115 / 255
    assert middle.share == pytest.approx(50 / total)
    assert late.share == pytest.approx(90 / total)
    assert early.abs_share == pytest.approx(early.share)
    assert middle.mean == pytest.approx(1.0) and late.mean == pytest.approx(3.0)


def test_stage_summary_abs_share_differs_from_share_with_negative_values():
    values = torch.tensor([4.0, -1.0, -1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    early, middle, late = curves.stage_summary(torch.arange(6), values, 1 / 6, 1 / 6)
    assert early.share == pytest.approx(4 / 6) and early.abs_share == pytest.approx(4 / 10)
    assert middle.share == pytest.approx(0.0) and middle.abs_share == pytest.approx(4 / 10)
    assert late.share == pytest.approx(2 / 6) and late.abs_share == pytest.approx(2 / 10)


def test_stage_summary_of_an_all_zero_curve_has_nan_shares():
    early, _, _ = curves.stage_summary(torch.arange(4), torch.zeros(4), 0.25, 0.25)
    assert math.isnan(early.share) and math.isnan(early.abs_share)


def test_stage_summary_leaves_undefined_values_out():
    """NaN values (influence / lr at a step with lr 0, e.g. a warm-up from 0) are undefined, not 0: the mean is
    the mean of the defined values, the shares are sums of defined values, and a stage with none is ``None``."""
    values = torch.tensor([math.nan, 2.0, math.nan, 4.0, -2.0, 6.0], dtype=torch.float64)
    early, middle, late = curves.stage_summary(torch.arange(6), values, 2 / 6, 2 / 6)
    assert early.mean == pytest.approx(2.0) and middle.mean == pytest.approx(4.0) and late.mean == pytest.approx(2.0)
    assert early.share == pytest.approx(2 / 10) and late.share == pytest.approx(4 / 10)
    assert late.abs_share == pytest.approx(8 / 14)
    undefined, rest, _ = curves.stage_summary(torch.arange(4), torch.tensor([math.nan, 1.0, 3.0, 2.0]), 0.25, 0.25)
    assert (undefined.n_steps, undefined.share, undefined.abs_share, undefined.mean) == (1, None, None, None)
    assert rest.share == pytest.approx(4 / 6) and rest.mean == pytest.approx(2.0)


def test_detect_phases_on_the_synthetic_curve():
    # level on the warm-up side: 1 + 0.2 * (10 - 1) = 2.8, first reached at step 17 (10 - 0.45 t <= 2.8);
    # on the ascent side: 1 + 0.2 * (5 - 1) = 1.8, last step at or below it is 75 (1 + 4 (t - 70) / 29).
    assert curves.detect_phases(STEPS, CURVE, threshold=0.2) == Phases(warmup_end=16, basin=20, ascent_start=75)


def test_detect_phases_survives_noise_after_smoothing():
    noisy = CURVE + 0.3 * torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    phases = curves.detect_phases(STEPS, curves.smooth(noisy, 5), threshold=0.2)
    assert abs(phases.warmup_end - 16) <= 2
    assert 20 <= phases.basin <= 70
    assert abs(phases.ascent_start - 75) <= 3


def test_detect_phases_reports_absent_phases_as_none():
    falling = torch.linspace(5.0, 1.0, 20, dtype=torch.float64)  # level 1.8 first reached at step 16
    assert curves.detect_phases(torch.arange(20), falling) == Phases(16, 19, None)
    rising = falling.flip(0)  # the mirror image: last step at or below 1.8 is 3
    assert curves.detect_phases(torch.arange(20), rising) == Phases(None, 0, 3)
    v_shape = torch.tensor([5.0, 1.0, 5.0], dtype=torch.float64)  # crossings only at the basin itself
    assert curves.detect_phases(torch.arange(3), v_shape) == Phases(None, 1, None)
    flat_then_rise = torch.cat([torch.ones(10), torch.linspace(1.0, 3.0, 10)]).double()
    assert curves.detect_phases(torch.arange(20), flat_then_rise).warmup_end is None
    assert curves.detect_phases(torch.arange(2), torch.ones(2)) == Phases(None, None, None)


def test_detect_phases_does_not_depend_on_the_curves_offset():
    """``min_rise`` is a share of the curve's range (max - min), so shifting the whole curve changes nothing."""
    for offset in (100.0, -100.0):
        assert curves.detect_phases(STEPS, CURVE + offset) == Phases(warmup_end=16, basin=20, ascent_start=75)


def test_detect_phases_ignores_a_rise_below_min_rise():
    small_ascent = torch.cat([WARMUP, BASIN, torch.linspace(1.0, 1.5, 30, dtype=torch.float64)])
    assert curves.detect_phases(STEPS, small_ascent, min_rise=0.1).ascent_start is None
    assert curves.detect_phases(STEPS, small_ascent, min_rise=0.01).ascent_start is not None


# --- samples ------------------------------------------------------------------------------------------------


def test_sample_totals_histogram_and_top_k():
    result = occurrences([(0, 5, 1.0), (0, 6, -2.0), (1, 5, 2.0), (1, 7, 0.5), (2, 6, 1.0), (2, 8, 0.5)])
    ids, totals, steps_used = curves.sample_totals(result)
    assert ids.tolist() == [5, 6, 7, 8]
    assert totals.tolist() == [3.0, -1.0, 0.5, 0.5]
    assert list(steps_used) == [(0, 1), (0, 2), (1,), (2,)]
    counts, edges = curves.histogram(totals, 4)
    assert counts.tolist() == [1, 2, 0, 1] and edges.tolist() == [-1.0, 0.0, 1.0, 2.0, 3.0]
    helpful, harmful = curves.top_k_samples(ids, totals, steps_used, 3)
    assert [(s.rank, s.sample_id, s.score, s.steps) for s in helpful] == [(1, 5, 3.0, (0, 1)), (2, 7, 0.5, (1,)),
                                                                          (3, 8, 0.5, (2,))]
    assert [s.sample_id for s in harmful] == [6]  # 7 and 8 helped (0.5): not harmful, however few harmed
    helpful, harmful = curves.top_k_samples(ids, -totals, steps_used, 3)
    assert [s.sample_id for s in harmful] == [5, 7, 8] and [s.sample_id for s in helpful] == [6]  # ties: smaller id
    assert curves.top_k_samples(ids, torch.zeros(4, dtype=torch.float64), steps_used, 3) == ([], [])


def test_top_k_ties_and_steps_used_do_not_depend_on_the_input_order():
    ids, totals = torch.tensor([9, 3, 5, 4]), torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    helpful, harmful = curves.top_k_samples(ids, totals, [(0,), (1,), (2,), (3,)], 4)
    assert [s.sample_id for s in helpful] == [3, 9] and [s.sample_id for s in harmful] == [4, 5]
    assert [s.steps for s in helpful] == [(1,), (0,)] and [s.steps for s in harmful] == [(3,), (2,)]
    _, _, steps_used = curves.sample_totals(occurrences([(2, 5, 1.0), (0, 6, 1.0), (0, 5, 1.0), (1, 5, 1.0)]))
    assert list(steps_used) == [(0, 1, 2), (0,)]  # sorted, whatever the order of the occurrences


def _sample_totals_oracle(result: InfluenceResult) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, ...]]]:
    """The former ``sample_totals``: one Python tuple of steps per sample."""
    scores = result.scores.to(torch.float64).mean(dim=0)
    ids, inverse = torch.unique(result.sample_ids, return_inverse=True)
    totals = torch.zeros(ids.numel(), dtype=torch.float64).index_add_(0, inverse, scores)
    order = torch.argsort(inverse, stable=True)
    grouped = torch.split(result.steps[order], torch.bincount(inverse, minlength=ids.numel()).tolist())
    return ids, totals, [tuple(sorted(group.tolist())) for group in grouped]


@pytest.mark.parametrize("seed", range(5))
def test_sample_totals_and_top_k_match_one_tuple_per_sample(seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 300, (1,), generator=g))
    ids = torch.randint(0, 40, (m,), generator=g) * 7  # repeated ids, also within one step
    steps = torch.randint(0, 25, (m,), generator=g)  # unordered, repeated steps
    scores = torch.randint(-3, 4, (2, m), generator=g).to(torch.float64)  # integers: many tied totals
    result = InfluenceResult(ids, steps, scores)
    got, want = curves.sample_totals(result), _sample_totals_oracle(result)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert list(got[2]) == want[2] and len(got[2]) == len(want[2])
    assert got[2][-1] == want[2][-1]
    with pytest.raises(IndexError):
        got[2][len(want[2])]
    assert curves.top_k_samples(*got, 6) == curves.top_k_samples(*want, 6)


def test_summarise_builds_no_python_object_per_sample():
    """200k samples, 2 occurrences each: the steps of only the top-k samples become Python tuples.

    tracemalloc counts Python objects, not tensor storage: one tuple (and its ints) per sample would take > 20 MB.
    """
    n, k = 200_000, 5
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randperm(n, generator=g), torch.randperm(n, generator=g)])
    steps = torch.arange(2 * n) // 1000 + 1000  # 400 steps, outside the small-int cache
    result = InfluenceResult(ids, steps, torch.randn(1, 2 * n, generator=g, dtype=torch.float64))
    n_steps = int(steps[-1]) + 1
    config = ReportConfig(top_k=k)
    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        before = tracemalloc.get_traced_memory()[0]
        report = curves.summarise(result, range(n_steps), [0] * n_steps, torch.ones(n_steps), config)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if not already:
            tracemalloc.stop()
    assert len(report.helpful) == k and all(len(s.steps) == 2 for s in report.helpful)
    assert peak < 4 * 2**20, f"summarise allocated {peak / 2**20:.1f} MiB of Python objects"


def test_histogram_of_a_constant_uses_a_unit_range():
    counts, edges = curves.histogram(torch.full((3,), 2.0, dtype=torch.float64), 2)
    assert counts.tolist() == [0, 3] and edges.tolist() == [1.5, 2.0, 2.5]


def test_summarise_uses_the_configured_scale():
    rows = [(t, 100 + t, float(v)) for t, v in enumerate(CURVE.tolist())]
    lrs = torch.full((100,), 0.5, dtype=torch.float64)
    config = ReportConfig(early_fraction=0.2, late_fraction=0.3, smoothing_fraction=0.0, top_k=2)
    report = curves.summarise(occurrences(rows), STEPS.tolist(), [0] * 100, lrs, config)
    assert torch.allclose(report.curve.influence_per_lr, 2 * CURVE)
    assert report.phases == Phases(16, 20, 75)
    assert report.stages[2].mean == pytest.approx(6.0)  # per-lr curve: twice the raw late mean
    raw = curves.summarise(occurrences(rows), STEPS.tolist(), [0] * 100, lrs,
                           ReportConfig(early_fraction=0.2, late_fraction=0.3, stage_scale="raw"))
    assert raw.stages[2].mean == pytest.approx(3.0)
    assert [s.sample_id for s in report.helpful] == [100, 101] and report.harmful == []  # every total is positive


def test_summarise_finds_the_phases_on_the_smoothed_curve():
    """Oracle: :func:`detect_phases` of :func:`smooth` of the per-lr curve. On a noisy curve the phases of the raw
    curve differ (its minimum is a noise spike, its crossings jitter)."""
    noisy = CURVE + 0.3 * torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = [(t, t, float(v)) for t, v in enumerate(noisy.tolist())]
    lrs = torch.full((100,), 0.5, dtype=torch.float64)
    config = ReportConfig(smoothing_fraction=0.05)
    report = curves.summarise(occurrences(rows), STEPS.tolist(), [0] * 100, lrs, config)
    window = curves.smoothing_window(100, 0.05)
    expected = curves.detect_phases(STEPS, curves.smooth(noisy / 0.5, window))
    assert report.phases == expected and expected != curves.detect_phases(STEPS, noisy / 0.5)
    torch.testing.assert_close(report.smoothed_per_lr, curves.smooth(noisy / 0.5, window), rtol=1e-12, atol=0)


def test_phases_are_found_at_steps_where_the_curve_is_defined():
    """The smoothed curve has a value at a step of learning rate 0 (its neighbours' mean), where the per-lr curve
    itself is undefined: the basin was reported there (until session 40), at a step the curve does not show."""
    rows = [(t, t, abs(t - 20.0)) for t in range(100)]  # a V, lowest at step 20
    lrs = torch.full((100,), 0.5, dtype=torch.float64)
    lrs[20] = 0.0
    report = curves.summarise(occurrences(rows), STEPS.tolist(), [0] * 100, lrs, ReportConfig(smoothing_fraction=0.05))
    per_lr = report.curve.influence_per_lr
    assert per_lr[20].isnan() and not report.smoothed_per_lr[20].isnan()
    expected = curves.detect_phases(STEPS, report.smoothed_per_lr.masked_fill(per_lr.isnan(), math.nan))
    assert report.phases == expected and expected.basin != 20 and not per_lr[expected.basin].isnan()


# --- ReportConfig -------------------------------------------------------------------------------------------


def test_report_config_defaults_and_dict():
    config = ReportConfig()
    assert config.stage_scale is CurveScale.PER_LR
    assert config.to_dict()["stage_scale"] == "per_lr"
    assert ReportConfig(stage_scale="raw").stage_scale is CurveScale.RAW
    assert ReportConfig(histogram_bins=512).histogram_bins == 512  # the most W&B holds is allowed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stage_scale": "log"}, "allowed values are 'raw', 'per_lr'"),
        ({"max_reference_samples": 0}, "max_reference_samples must be an int >= 1"),
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"top_k": 2.5}, "top_k must be an int"),
        ({"histogram_bins": 0}, "histogram_bins must be an int >= 1"),
        ({"histogram_bins": 513}, "histogram_bins must be <= 512"),
        ({"early_fraction": 1.0}, r"early_fraction must be a number in \[0.0, 1.0\)"),
        ({"late_fraction": -0.1}, r"late_fraction must be a number in \[0.0, 1.0\)"),
        ({"early_fraction": 0.6, "late_fraction": 0.4}, "early_fraction \\+ late_fraction must be < 1"),
        ({"smoothing_fraction": True}, "smoothing_fraction must be a number"),
        ({"phase_threshold": 1.0}, "phase_threshold must be a number"),
        ({"min_phase_rise": "0.1"}, "min_phase_rise must be a number"),
        ({"figures": 1}, "figures must be a bool"),
    ],
)
def test_report_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReportConfig(**kwargs)
