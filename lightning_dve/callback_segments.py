"""The segment boundaries of a fit (influence checkpointing, ``segments > 1``): planned at train start, where the
replay checkpoints and the dynamics references need them, cut at train end, and what is said where they fall
short of the segments asked for."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .dynamics import continue_plan
from .recursion import bounds_after, segment_bounds


def plan_at_train_start(trainer: pl.Trainer, earlier: list[int], earlier_steps: float, last_step: int,
                        segments: int) -> list[int]:
    """The boundaries of this fit (:func:`~lightning_dve.dynamics.continue_plan` over the Trainer's estimated
    steps, from its current step), saying where the store starts late or the plan is impossible."""
    boundaries = continue_plan(earlier, earlier_steps, last_step, trainer.estimated_stepping_batches, segments,
                               trainer.global_step)
    if last_step < 0 < trainer.global_step:
        note_late_start(trainer.global_step)
    if segments > 1 and not boundaries:
        warn_unplanned_boundaries(segments)
    return boundaries


def train_end_bounds(steps: list[int], planned: list[int], segments: int) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` index ranges of the train-end recursion's segments: cut after the ``planned`` boundaries
    that were recorded (evenly where none were planned), with a warning where there are fewer than ``segments``."""
    bounds = bounds_after(steps, planned) if planned else segment_bounds(len(steps), segments)
    if len(bounds) < segments:
        warn_fewer_segments(segments, len(bounds), steps, planned)
    return bounds


def warn_fewer_segments(asked: int, used: int, steps: list[int], planned: list[int]) -> None:
    """Say that the run had too few ``steps``, stopped before the segment boundaries ``planned`` at train start, or
    recorded no step at some of them, for the ``segments`` asked for."""
    why = f"the {len(steps)} recorded step(s) make {used} segment(s), each of at least one step"
    recorded = set(steps)
    skipped = [step for step in planned if steps and step < steps[-1] and step not in recorded]
    if skipped:
        why = (f"no step was recorded at the planned boundaries after steps {skipped} (training_step returned None "
               f"there, or the grad scaler skipped the step): {used} segment(s), so the boundary indices of "
               "influence_at() shift from the planned ones (emb.segment_boundaries lists the steps)")
    elif planned and steps and planned[-1] >= steps[-1]:
        why = (f"the boundaries were planned at train start (after steps {planned}, from "
               f"trainer.estimated_stepping_batches), and the run stopped after step {steps[-1]} (EarlyStopping, "
               f"max_time or a stop in a hook, or a GradientAccumulationScheduler, whose larger accumulation later "
               f"that estimate does not count: pass segments=1 with it): {used} segment(s)")
    rank_zero_warn(f"DataValueEmbedding: segments={asked}, but {why}; the dynamics report has {used} boundaries (the "
                   f"store's settings keep segments={asked}).")


def note_late_start(step: int) -> None:
    """Say that a store starts at ``step`` of the Trainer: the steps before it (a checkpoint resumed without this
    callback's state, or an earlier fit of the same Trainer) are not recorded."""
    rank_zero_info(f"DataValueEmbedding: recording starts at step {step} (a checkpoint resumed without this "
                   f"callback's store, or a later fit of the same Trainer): steps 0-{step - 1} are not recorded, so "
                   "the samples they used get no data value from them.")


def warn_unplanned_boundaries(segments: int) -> None:
    """Say that the segment boundaries cannot be planned at train start (a loader of unknown length)."""
    rank_zero_warn(f"DataValueEmbedding: segments={segments}, but trainer.estimated_stepping_batches is unknown (a "
                   "training loader without __len__, such as an IterableDataset's, or no epoch limit: max_epochs=-1 "
                   "with max_time), so the boundaries are placed at train end and no reference is taken at them: "
                   "the dynamics report has the final model only. Set max_steps to plan them at train start.")
