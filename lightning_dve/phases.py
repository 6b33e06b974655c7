"""Phases of an influence curve (paper Fig. 1a): the end of the early warm-up, the basin, the late ascent."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Phases:
    """Phase boundaries of a curve (steps), ``None`` where the phase is not present.

    Attributes:
        warmup_end: first step after the early peak where the curve has fallen to the threshold level.
        basin: step of the curve's minimum.
        ascent_start: last step at or after the basin still at or below the threshold level before the
            late rise.
    """

    warmup_end: int | None
    basin: int | None
    ascent_start: int | None


def _drop_index(values: torch.Tensor, threshold: float, min_rise: float, scale: float) -> int | None:
    """First index after the peak of ``values`` where it falls to ``bottom + threshold * (peak - bottom)``.

    ``values`` ends at its minimum (``bottom = values[-1]``). Returns ``None`` if the peak is less than
    ``min_rise * scale`` above the bottom.
    """
    bottom = values[-1].item()
    peak_index = int(torch.argmax(values))
    rise = values[peak_index].item() - bottom
    if rise <= 0 or rise < min_rise * scale:
        return None
    level = bottom + threshold * rise
    below = torch.nonzero(values[peak_index:] <= level).flatten()
    return peak_index + int(below[0])


def detect_phases(steps: torch.Tensor, smoothed: torch.Tensor, threshold: float = 0.2,
                  min_rise: float = 0.1) -> Phases:
    """Warm-up end, basin and ascent start of a (smoothed) curve.

    With ``m`` the curve's minimum (the basin) and ``p`` the peak on one side of it, the boundary on that
    side is where the curve crosses ``m + threshold * (p - m)``: the first such step after the early peak
    (warm-up end), and the last such step before the late rise (ascent start). A side has no phase (``None``)
    if its peak is less than ``min_rise * (max - min)`` above the basin, or if the crossing is the basin itself
    (the curve never settles before, or after, its minimum). NaN entries are ignored.

    Args:
        steps: ``[T]`` steps.
        smoothed: ``[T]`` curve values (smooth first: noise creates spurious crossings).
        threshold: level of the crossing, as a share of the rise from the basin to the side's peak.
        min_rise: minimum rise, as a share of the curve's range, for a phase to exist.
    """
    valid = ~torch.isnan(smoothed)
    values, at = smoothed[valid].to(torch.float64), steps[valid]
    if values.numel() < 3:
        return Phases(None, None, None)
    scale = (values.max() - values.min()).item()
    basin = int(torch.argmin(values))
    warmup = _drop_index(values[: basin + 1], threshold, min_rise, scale) if basin > 0 else None
    late = values[basin:].flip(0)
    ascent = _drop_index(late, threshold, min_rise, scale) if basin < values.numel() - 1 else None
    ascent = None if ascent is None else values.numel() - 1 - ascent
    return Phases(
        warmup_end=None if warmup is None or warmup == basin else int(at[warmup]),
        basin=int(at[basin]),
        ascent_start=None if ascent is None or ascent == basin else int(at[ascent]),
    )
