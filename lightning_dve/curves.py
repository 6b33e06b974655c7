"""Influence over training time: per-step curves, smoothing, epochs, stages, phases, histogram and top-k.

Pure tensor maths (no Lightning, no plotting). The input is the influence of every recorded occurrence on one
reference query (the mean test-loss gradient of a reference set, method.md §4 "Training dynamics")::

    influence_t        = mean_{z in B_t} <g_ref, e_{t,z}>       # average influence of step t's samples
    influence_per_lr_t = influence_t / lr_t                     # the paper's Fig. 1a quantity

Positive means the step's samples lowered the reference loss (they helped). Every function here takes and
returns CPU tensors; curves are float64.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

import torch

from .config import CurveScale, ReportConfig
from .errors import ConfigError
from .influence import InfluenceResult
from .phases import Phases, detect_phases
from .results import first_k


class Stage(str, enum.Enum):
    """The three parts of training a stage summary splits the recorded steps into."""

    EARLY = "early"
    MIDDLE = "middle"
    LATE = "late"


@dataclasses.dataclass(frozen=True)
class InfluenceCurve:
    """The per-step influence curve of one reference query.

    Attributes:
        steps: ``[T]`` recorded optimizer steps (int64, increasing).
        epochs: ``[T]`` training epoch of each step.
        learning_rates: ``[T]`` learning rate used to normalise each step.
        counts: ``[T]`` occurrences (samples) of each step.
        influence: ``[T]`` mean influence of the step's occurrences.
        influence_per_lr: ``[T]`` ``influence / lr``; NaN where ``lr == 0``.
    """

    steps: torch.Tensor
    epochs: torch.Tensor
    learning_rates: torch.Tensor
    counts: torch.Tensor
    influence: torch.Tensor
    influence_per_lr: torch.Tensor


@dataclasses.dataclass(frozen=True)
class EpochCurve:
    """Per-epoch aggregate of an :class:`InfluenceCurve`.

    Attributes:
        epochs: ``[E]`` epochs in increasing order.
        first_steps: ``[E]`` first recorded step of each epoch.
        last_steps: ``[E]`` last recorded step of each epoch.
        influence: ``[E]`` mean over the epoch's steps of the per-step influence.
        influence_per_lr: ``[E]`` mean over the epoch's steps of the per-step ``influence / lr`` (NaN ignored).
        total: ``[E]`` summed influence of every occurrence of the epoch.
    """

    epochs: torch.Tensor
    first_steps: torch.Tensor
    last_steps: torch.Tensor
    influence: torch.Tensor
    influence_per_lr: torch.Tensor
    total: torch.Tensor


@dataclasses.dataclass(frozen=True)
class StageShare:
    """One stage of a stage summary.

    Attributes:
        stage: which stage.
        first_step: first step of the stage (``None`` if the stage is empty).
        last_step: last step of the stage (``None`` if the stage is empty).
        n_steps: recorded steps in the stage.
        share: ``sum(curve in stage) / sum(curve)`` over the defined (non-NaN) values (NaN if the total is 0,
            ``None`` if the stage has no defined value).
        abs_share: ``sum(|curve| in stage) / sum(|curve|)``, likewise.
        mean: mean of the stage's defined values (``None`` if it has none, e.g. only steps with ``lr == 0``).
    """

    stage: Stage
    first_step: int | None
    last_step: int | None
    n_steps: int
    share: float | None
    abs_share: float | None
    mean: float | None


@dataclasses.dataclass(frozen=True)
class CurveReport:
    """Everything the train-end report shows, computed from one reference query.

    Attributes:
        curve: the per-step curve.
        smoothed: ``[T]`` smoothed ``curve.influence``.
        smoothed_per_lr: ``[T]`` smoothed ``curve.influence_per_lr``.
        epochs: the per-epoch aggregate.
        stages: early, middle and late shares of the ``config.stage_scale`` curve.
        phases: phase boundaries of the smoothed ``config.stage_scale`` curve.
        sample_ids: ``[N]`` every recorded sample.
        totals: ``[N]`` total influence of each sample.
        histogram: ``(counts [bins], edges [bins + 1])`` of ``totals``.
        helpful: the most helpful samples, best first.
        harmful: the most harmful samples, worst first.
        config: the settings used.
    """

    curve: InfluenceCurve
    smoothed: torch.Tensor
    smoothed_per_lr: torch.Tensor
    epochs: EpochCurve
    stages: tuple[StageShare, ...]
    phases: Phases
    sample_ids: torch.Tensor
    totals: torch.Tensor
    histogram: tuple[torch.Tensor, torch.Tensor]
    helpful: list[RankedSample]
    harmful: list[RankedSample]
    config: ReportConfig


@dataclasses.dataclass(frozen=True)
class RankedSample:
    """A training sample ranked by its total influence on the reference query.

    Attributes:
        rank: 1-based rank within its list.
        sample_id: dataset index.
        steps: the recorded steps that used the sample.
        score: total influence over all its occurrences (positive = helpful).
    """

    rank: int
    sample_id: int
    steps: tuple[int, ...]
    score: float


def step_curve(
    result: InfluenceResult, steps: Sequence[int], epochs: Sequence[int], learning_rates: torch.Tensor
) -> InfluenceCurve:
    """Average the per-occurrence scores of each step (and over the result's rows) into a curve.

    Args:
        result: per-occurrence scores ``[n, m]`` (``DataValueEmbeddings.score(..., per_step=True)``); with
            ``n > 1`` rows the rows are averaged, which equals scoring their mean gradient.
        steps: ``[T]`` recorded steps, increasing.
        epochs: ``[T]`` epoch of each recorded step.
        learning_rates: ``[T]`` learning rate of each recorded step.

    Raises:
        ConfigError: if the lengths disagree or the result holds a step that is not in ``steps``.
    """
    step_index = torch.as_tensor(list(steps), dtype=torch.int64)
    lrs = torch.as_tensor(learning_rates, dtype=torch.float64).reshape(-1)
    if not len(epochs) == lrs.numel() == step_index.numel():
        raise ConfigError(f"steps, epochs and learning_rates must have one entry per recorded step; got "
                          f"{step_index.numel()}, {len(epochs)} and {lrs.numel()}. Pass the store's own lists.")
    position = torch.searchsorted(step_index, result.steps)
    clipped = position.clamp(max=max(step_index.numel() - 1, 0))
    if step_index.numel() == 0 or bool((step_index[clipped] != result.steps).any()):
        raise ConfigError("the influence result holds steps that are not recorded steps; score with the same "
                          "store (per_step=True) whose steps are passed here.")
    scores = result.scores.to(torch.float64).mean(dim=0)
    counts = torch.bincount(position, minlength=step_index.numel())
    sums = torch.zeros(step_index.numel(), dtype=torch.float64).index_add_(0, position, scores)
    influence = sums / counts.clamp(min=1)
    influence[counts == 0] = math.nan
    per_lr = torch.where(lrs != 0, influence / lrs, torch.full_like(influence, math.nan))
    return InfluenceCurve(step_index, torch.as_tensor(list(epochs), dtype=torch.int64), lrs, counts, influence,
                          per_lr)


def smoothing_window(n_steps: int, fraction: float) -> int:
    """Odd window length of about ``fraction * n_steps`` steps, at least 1."""
    width = max(1, round(fraction * n_steps))
    return width if width % 2 == 1 else width + 1


def smooth(values: torch.Tensor, window: int) -> torch.Tensor:
    """Centred moving average ``[T] -> [T]`` that ignores NaN and shrinks at the edges.

    ``out_t = mean{values_u : |u - t| <= window // 2, values_u not NaN}`` (NaN if none).
    """
    values = values.to(torch.float64)
    if window <= 1:
        return values.clone()
    valid = ~torch.isnan(values)
    half = window // 2
    padded = torch.cat([torch.zeros(1, dtype=torch.float64), torch.where(valid, values, 0.0).cumsum(0)])
    present = torch.cat([torch.zeros(1, dtype=torch.float64), valid.to(torch.float64).cumsum(0)])
    index = torch.arange(values.numel())
    low, high = (index - half).clamp(min=0), (index + half + 1).clamp(max=values.numel())
    count = present[high] - present[low]
    return torch.where(count > 0, (padded[high] - padded[low]) / count.clamp(min=1), math.nan)


def epoch_curve(curve: InfluenceCurve) -> EpochCurve:
    """Aggregate a per-step curve by epoch (means of the per-step values, sum of occurrence influence).

    One pass over the steps (``O(T)``, not one mask per epoch: many short epochs of a long run stay cheap). NaN
    values are left out of the means and the total; an epoch without a defined value has a NaN mean.
    """
    epochs, inverse = torch.unique(curve.epochs, return_inverse=True)
    steps = curve.steps.to(torch.int64)
    return EpochCurve(
        epochs=epochs,
        first_steps=_group_reduce(steps, inverse, epochs.numel(), "amin"),
        last_steps=_group_reduce(steps, inverse, epochs.numel(), "amax"),
        influence=_group_nanmean(curve.influence, inverse, epochs.numel()),
        influence_per_lr=_group_nanmean(curve.influence_per_lr, inverse, epochs.numel()),
        total=_group_nansum(curve.influence * curve.counts, inverse, epochs.numel()),
    )


def _group_reduce(values: torch.Tensor, groups: torch.Tensor, n: int, reduce: str) -> torch.Tensor:
    """``[n]``: ``reduce`` (``"amin"``, ``"amax"``) of ``values`` within each group (every group is non-empty)."""
    return values.new_zeros(n).scatter_reduce_(0, groups, values, reduce, include_self=False)


def _group_nansum(values: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]``: sum of the non-NaN ``values`` of each group (0 if none), float64."""
    values = values.to(torch.float64)
    return torch.zeros(n, dtype=torch.float64).index_add_(0, groups, torch.nan_to_num(values, nan=0.0, posinf=math.inf,
                                                                                       neginf=-math.inf))


def _group_nanmean(values: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]``: mean of the non-NaN ``values`` of each group (NaN if none), float64."""
    defined = torch.zeros(n, dtype=torch.float64).index_add_(0, groups, (~values.isnan()).to(torch.float64))
    return torch.where(defined > 0, _group_nansum(values, groups, n) / defined.clamp(min=1), math.nan)


def stage_bounds(n_steps: int, early_fraction: float, late_fraction: float) -> tuple[int, int]:
    """Positions ``(a, b)`` splitting ``n_steps`` into early ``[0, a)``, middle ``[a, b)`` and late ``[b, n)``.

    Each non-zero fraction gets at least one step when there are steps to give; early wins ties.
    """
    early = min(n_steps, max(1 if early_fraction > 0 else 0, round(early_fraction * n_steps)))
    late = min(n_steps - early, max(1 if late_fraction > 0 else 0, round(late_fraction * n_steps)))
    return early, n_steps - late


def stage_summary(
    steps: torch.Tensor, values: torch.Tensor, early_fraction: float, late_fraction: float
) -> tuple[StageShare, ...]:
    """Share of the curve's total (and of its total magnitude) in the early, middle and late stages.

    Undefined (NaN) values, e.g. ``influence / lr`` at a step with ``lr == 0``, are left out of every sum and
    mean: ``share = nansum(stage) / nansum(curve)``, ``mean = nanmean(stage)``.

    Args:
        steps: ``[T]`` steps of the curve.
        values: ``[T]`` curve values; NaN entries are undefined.
        early_fraction: share of the steps in the early stage.
        late_fraction: share of the steps in the late stage.
    """
    values = values.to(torch.float64)
    a, b = stage_bounds(values.numel(), early_fraction, late_fraction)
    total, total_abs = values.nansum().item(), values.abs().nansum().item()
    out = []
    for stage, (low, high) in zip(Stage, ((0, a), (a, b), (b, values.numel()))):
        part = values[low:high]
        defined = bool((~torch.isnan(part)).any())
        out.append(StageShare(
            stage=stage,
            first_step=int(steps[low]) if high > low else None,
            last_step=int(steps[high - 1]) if high > low else None,
            n_steps=high - low,
            share=_ratio(part.nansum().item(), total) if defined else None,
            abs_share=_ratio(part.abs().nansum().item(), total_abs) if defined else None,
            mean=part.nanmean().item() if defined else None,
        ))
    return tuple(out)


def _ratio(part: float, total: float) -> float:
    """``part / total``, NaN if ``total`` is 0."""
    return part / total if total != 0 else math.nan


@dataclasses.dataclass(frozen=True, eq=False)
class SampleSteps(Sequence[tuple[int, ...]]):
    """The steps that used each sample, as two tensors; ``self[i]`` is built when asked for (a report shows top-k's).

    Attributes:
        steps: ``[M]`` step of every occurrence, grouped by sample and increasing within each group.
        offsets: ``[N + 1]`` group bounds: sample ``i``'s steps are ``steps[offsets[i]:offsets[i + 1]]``.
    """

    steps: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, index: int) -> tuple[int, ...]:  # type: ignore[override]  # no slices; repeats kept
        position = range(len(self))[index]  # IndexError out of range, negative indices allowed
        low, high = self.offsets[position : position + 2].tolist()
        return tuple(self.steps[low:high].tolist())


def sample_totals(result: InfluenceResult) -> tuple[torch.Tensor, torch.Tensor, SampleSteps]:
    """Total influence of each sample over all its occurrences (rows averaged); no Python object per sample.

    Returns:
        ``(sample_ids [N], totals [N] float64, steps_used)`` with ``steps_used[i]`` the sorted steps that used
        ``sample_ids[i]``.
    """
    scores = result.scores.to(torch.float64).mean(dim=0)
    ids, inverse = torch.unique(result.sample_ids, return_inverse=True)
    totals = torch.zeros(ids.numel(), dtype=torch.float64).index_add_(0, inverse, scores)
    by_step = torch.argsort(result.steps, stable=True)
    order = by_step[torch.argsort(inverse[by_step], stable=True)]  # by sample, then by step
    offsets = torch.zeros(ids.numel() + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(inverse, minlength=ids.numel()), 0, out=offsets[1:])
    return ids, totals, SampleSteps(result.steps[order].to(torch.int64), offsets)


def histogram(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts [bins], edges [bins + 1])`` of the finite values, over their range (a unit range if flat)."""
    finite = values[torch.isfinite(values)].to(torch.float64)
    if finite.numel() == 0:
        return torch.zeros(bins, dtype=torch.int64), torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    low, high = finite.min().item(), finite.max().item()
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(finite, bins=bins, min=low, max=high).to(torch.int64)
    return counts, torch.linspace(low, high, bins + 1, dtype=torch.float64)


def top_k_samples(
    sample_ids: torch.Tensor, totals: torch.Tensor, steps_used: Sequence[tuple[int, ...]], k: int
) -> tuple[list[RankedSample], list[RankedSample]]:
    """The ``k`` most helpful (highest total) and ``k`` most harmful (lowest total) samples, best first: helpful
    ones with a positive total only, harmful ones with a negative total only (fewer than ``k`` where fewer samples
    are: a sample that helped is not listed as harmful because others helped more).

    Ties are broken by the smaller sample id.
    """
    by_id = torch.argsort(sample_ids, stable=True)

    def ranked(sign: int) -> list[RankedSample]:
        signed = by_id[totals[by_id] * sign > 0]
        order = signed[first_k(totals[signed], min(k, signed.numel()), highest=sign > 0)]
        return [RankedSample(rank, int(sample_ids[i]), tuple(steps_used[i]), float(totals[i]))
                for rank, i in enumerate(order.tolist(), start=1)]

    return ranked(1), ranked(-1)


def summarise(
    result: InfluenceResult,
    steps: Sequence[int],
    epochs: Sequence[int],
    learning_rates: torch.Tensor,
    config: ReportConfig,
) -> CurveReport:
    """Compute every curve, summary and ranking of the report from per-occurrence scores.

    Args:
        result: per-occurrence scores against the reference query (``score(..., per_step=True)``).
        steps: ``[T]`` recorded steps.
        epochs: ``[T]`` epoch of each step.
        learning_rates: ``[T]`` learning rate of each step (the curve is divided by it).
        config: report settings.
    """
    curve = step_curve(result, steps, epochs, learning_rates)
    window = smoothing_window(curve.steps.numel(), config.smoothing_fraction)
    smoothed, smoothed_per_lr = smooth(curve.influence, window), smooth(curve.influence_per_lr, window)
    per_lr = config.stage_scale is CurveScale.PER_LR
    chosen, chosen_smoothed = (curve.influence_per_lr, smoothed_per_lr) if per_lr else (curve.influence, smoothed)
    ids, totals, steps_used = sample_totals(result)
    helpful, harmful = top_k_samples(ids, totals, steps_used, config.top_k)
    return CurveReport(
        curve=curve, smoothed=smoothed, smoothed_per_lr=smoothed_per_lr, epochs=epoch_curve(curve),
        stages=stage_summary(curve.steps, chosen, config.early_fraction, config.late_fraction),
        phases=detect_phases(curve.steps, chosen_smoothed.masked_fill(chosen.isnan(), math.nan),  # defined steps only
                             config.phase_threshold, config.min_phase_rise),
        sample_ids=ids, totals=totals, histogram=histogram(totals, config.histogram_bins),
        helpful=helpful, harmful=harmful, config=config,
    )
