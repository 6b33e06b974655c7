"""Data value dynamics (paper §4.4): influence of each segment's occurrences on the model at each boundary.

With influence checkpointing the trajectory is cut into segments; the factors ``I - M_seg`` give the influence
of any occurrence on the model at any later segment boundary (:meth:`DataValueEmbeddings.score` with
``boundary=``). Given the reference gradient at each boundary's weights, this module tabulates, for every
boundary ``b`` and every segment ``s <= b``, the summed influence of segment ``s``'s occurrences on the
reference loss at ``b``.
"""

from __future__ import annotations

import torch

from .influence import DataValueEmbeddings

DYNAMICS_COLUMNS = ["boundary", "boundary_step", "segment", "first_step", "last_step", "influence"]


def plan_boundaries(total_steps: float, segments: int) -> list[int]:
    """Steps after which the intermediate boundaries fall, for a run of ``total_steps`` optimizer steps.

    They match :func:`lightning_dve.recursion.segment_bounds` when every planned step is recorded; an
    unknown length (``inf``) plans none.
    """
    from .recursion import segment_bounds

    if segments < 2 or not 0 < total_steps < float("inf"):
        return []
    return [hi - 1 for _, hi in segment_bounds(int(total_steps), segments)[:-1]]


def continue_plan(earlier: list[int], earlier_steps: float, last_step: int, total_steps: float,
                  segments: int, first_step: int = 0) -> list[int]:
    """Boundaries of a resumed fit: the ``earlier`` plan, made for ``earlier_steps`` in all, if the fit has as
    many; else those of it that the steps up to ``last_step`` passed (their references are in the store), then
    the rest planned over the steps after it. A store of no step yet (``last_step < 0``) that starts at step
    ``first_step`` (a fit resumed from a checkpoint without one, or a later fit of the same Trainer) plans over
    the steps from there.

    A fit resumed with more epochs or steps than the first planned for would otherwise move every boundary, and
    the ones it has passed would have no reference.
    """
    if last_step < 0 < first_step:
        return [first_step + step for step in plan_boundaries(total_steps - first_step, segments)]
    if earlier_steps == total_steps:
        return list(earlier)
    kept = [step for step in earlier if step <= last_step]
    if not kept:
        return plan_boundaries(total_steps, segments)
    later = plan_boundaries(total_steps - (last_step + 1), segments - len(kept))
    return kept + [last_step + 1 + step for step in later]


def dynamics_rows(
    embeddings: DataValueEmbeddings, references: dict[int, dict[str, torch.Tensor]]
) -> list[list[float | int]]:
    """Rows of :data:`DYNAMICS_COLUMNS`: summed influence of each segment on the reference loss at each boundary.

    Args:
        embeddings: finished embeddings recorded with ``segments > 1``.
        references: ``{boundary index: {layer: [1, k_l]}}`` mean reference gradients at each boundary's weights.
    """
    segments = embeddings.store.manifest.get("segments", [])
    rows: list[list[float | int]] = []
    for boundary, gradients in sorted(references.items()):
        result = embeddings.score(gradients, per_step=True, boundary=boundary)
        for segment, (first, last) in enumerate(segments[: boundary + 1]):
            inside = (result.steps >= first) & (result.steps <= last)
            rows.append([boundary, segments[boundary][1], segment, first, last,
                         float(result.scores[0, inside].sum())])
    return rows


def boundary_rows(
    embeddings: DataValueEmbeddings, final_reference: dict[str, torch.Tensor]
) -> list[list[float | int]]:
    """Dynamics rows for every boundary with a reference gradient saved during training, the final model last.

    Args:
        final_reference: the reference gradient at the final weights, ``{layer: [1, k_l]}``.
    """
    boundaries = embeddings.segment_boundaries
    if len(boundaries) < 2:
        return []
    saved = embeddings.store.read_references()
    references = {b: saved[step] for b, step in enumerate(boundaries[:-1]) if step in saved}
    references[len(boundaries) - 1] = final_reference
    return dynamics_rows(embeddings, references)
