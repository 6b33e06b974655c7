"""Query results: scores of training occurrences on test points, per-sample totals and top-k rankings."""

from __future__ import annotations

import dataclasses
import operator
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import ConfigError


def _is_index(value: object) -> bool:
    """Whether ``value`` is an integer (an ``int``, a numpy integer or a 0-d integer tensor)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Ranking:
    """Occurrences or samples ranked by one score each.

    Attributes:
        sample_ids: ``[k]`` dataset indices.
        steps: ``[k]`` optimizer steps (``-1`` for all-occurrence totals).
        scores: ``[k]`` influence scores (test-loss change when removed; positive = helpful).
    """

    sample_ids: torch.Tensor
    steps: torch.Tensor
    scores: torch.Tensor


@dataclasses.dataclass(frozen=True)
class EmbeddingMatrix:
    """Every recorded occurrence's embedding of the final model, in memory.

    Attributes:
        sample_ids: ``[N]`` dataset index of each row.
        steps: ``[N]`` optimizer step of each row.
        embeddings: ``{layer: [N, k_l]}``; projected test gradients ``g`` score ``sum_l g_l @ embeddings[l].T``,
            the columns of ``DataValueEmbeddings.score(g, per_step=True)``.
    """

    sample_ids: torch.Tensor
    steps: torch.Tensor
    embeddings: dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class InfluenceResult:
    """Influence of training occurrences (or samples) on test points.

    Attributes:
        sample_ids: ``[m]`` dataset index of each column.
        steps: ``[m]`` optimizer step of each column (counted from 0), or ``-1`` for per-sample totals.
        scores: ``[n_test, m]``; ``scores[i, j]`` estimates ``l(theta'_T, test_i) - l(theta_T, test_i)`` when
            column ``j`` is removed from training (method.md §1). Positive means the sample helped.
    """

    sample_ids: torch.Tensor
    steps: torch.Tensor
    scores: torch.Tensor

    def top_k(self, k: int = 10, test_index: int | None = None) -> tuple[Ranking, Ranking]:
        """The ``k`` most helpful and the ``k`` most harmful columns.

        Helpful columns have a positive score, harmful ones a negative score (a column that helped is not listed as
        harmful because others helped more, as in the report's top-k tables). Columns whose score is NaN (for the
        mean: NaN for any test point) are in neither. Either ranking may hold fewer than ``k`` columns.

        Args:
            k: how many of each (``>= 0``; fewer when there are fewer columns of that sign).
            test_index: rank by that test point's row (an int, ``-n_test <= test_index < n_test``); ``None`` ranks
                by the mean over test points.

        Returns:
            ``(helpful, harmful)``: highest positive scores first, then lowest negative scores first; tied scores in
            column order (by sample id, or by step and sample id).

        Raises:
            ConfigError: if ``k`` is negative or ``test_index`` is not a row of :attr:`scores`.
        """
        if isinstance(k, bool) or not _is_index(k) or operator.index(k) < 0:
            raise ConfigError(f"top_k(k={k!r}): k must be an int >= 0 (how many columns to rank each way).")
        row = self.scores.mean(dim=0) if test_index is None else self.scores[self._row_index(test_index)]
        valid = (~row.isnan()).nonzero().squeeze(1)  # [m'] columns with a score

        def pick(sign: int) -> Ranking:
            signed = valid[row[valid] * sign > 0]
            columns = signed[first_k(row[signed], min(operator.index(k), signed.numel()), sign > 0)]
            return Ranking(self.sample_ids[columns], self.steps[columns], row[columns])

        return pick(1), pick(-1)

    def _row_index(self, test_index: object) -> int:
        """``test_index`` as a row of :attr:`scores`.

        Raises:
            ConfigError: if it is not an int, or out of range.
        """
        rows = self.scores.shape[0]
        if isinstance(test_index, bool) or not _is_index(test_index) or (
                isinstance(test_index, torch.Tensor) and (test_index.dim() > 0 or test_index.dtype == torch.bool)):
            raise ConfigError(f"top_k(test_index={test_index!r}): test_index must be an int (a row of scores) or "
                              "None for the mean over the test points.")
        if not -rows <= operator.index(test_index) < rows:
            raise ConfigError(f"top_k(test_index={test_index!r}) is out of range: the result has {rows} test "
                              f"point(s), so test_index must be in [{-rows}, {rows - 1}], or None for their mean.")
        return operator.index(test_index)


def first_k(values: torch.Tensor, k: int, highest: bool) -> torch.Tensor:
    """Positions of the ``k`` highest (or lowest) ``values``, ties in position order: ``topk`` for the ``k``-th
    value, then a stable sort of the values at least as far out (a full sort of 10^7 columns took 9 times as long)."""
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    kth = torch.topk(values, k, largest=highest).values[-1]
    candidates = (values >= kth if highest else values <= kth).nonzero().squeeze(1)
    return candidates[torch.sort(values[candidates], descending=highest, stable=True).indices[:k]]


def check_per_step(per_step: object) -> None:
    """Refuse a ``per_step`` that is not a bool (a truthy string such as ``"no"`` would select per-step columns)."""
    if not isinstance(per_step, bool):
        raise ConfigError(f"per_step must be a bool (True: one column per occurrence, False: per-sample totals); got "
                          f"{per_step!r}.")


def stream_columns(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], all_ids: torch.Tensor, n_test: int,
    per_step: bool,
) -> InfluenceResult:
    """Per-occurrence columns, or (``per_step=False``) per-sample totals ordered by sample id, from column chunks,
    holding only the result: the totals ``sum_t scores[:, (t, z)]`` are summed chunk by chunk into ``[n_test, N]``,
    never through the ``[n_test, m]`` occurrence matrix (``m`` grows with the steps).

    Args:
        chunks: ``(sample_ids [c], steps [c], scores [n_test, c])`` of consecutive columns.
        all_ids: ``[m]`` sample id of every column the chunks hold (the totals' columns are its unique values).
        n_test: rows of the result (its scores are ``[n_test, 0]`` float32 when there is no chunk).
        per_step: keep one column per occurrence.
    """
    check_per_step(per_step)
    result = _per_step_columns(chunks, all_ids, n_test) if per_step else _sample_totals(chunks, all_ids, n_test)
    return _warn_non_finite_columns(result)


def _warn_non_finite_columns(result: InfluenceResult) -> InfluenceResult:
    """``result``, after a warning naming columns whose scores are not finite for test points whose other scores
    are (a non-finite test gradient spoils its whole row instead: :func:`warn_non_finite_rows`): their embeddings,
    or the segment factors chained to them, overflowed."""
    finite = torch.isfinite(result.scores)
    bad = (~finite[finite.any(dim=1)]).any(dim=0).cpu()
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        warnings.warn(f"{int(bad.sum())} of {bad.numel()} score columns are not finite (first: sample "
                      f"{int(result.sample_ids[first])}, step {int(result.steps[first])}) for test points whose other "
                      "scores are: the embeddings or the segment factors chained to them overflowed (see the "
                      "train-end warning about expanding steps). top_k leaves them out; exact_influence(...) or "
                      "curvature='none' give finite scores.", UserWarning, stacklevel=outside_level())
    return result


def outside_level() -> int:
    """The ``stacklevel`` of the first caller outside this package, for a warning issued by the function that calls
    this one (the queries reach it through different depths)."""
    package, frame, level = str(Path(__file__).parent), sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _per_step_columns(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], all_ids: torch.Tensor, n_test: int
) -> InfluenceResult:
    """One column per occurrence, each chunk copied into the ``[n_test, m]`` result as it comes (no second copy)."""
    scores, steps, at = None, [], 0
    for _, chunk_steps, chunk in chunks:
        if scores is None:
            scores = chunk.new_empty(n_test, all_ids.numel())
        scores[:, at:at + chunk.shape[1]] = chunk
        at += chunk.shape[1]
        steps.append(chunk_steps)
        del chunk  # before the next chunk is computed
    if scores is None:
        return _empty_result(n_test)
    return InfluenceResult(all_ids, torch.cat(steps), scores)


def _sample_totals(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], all_ids: torch.Tensor, n_test: int
) -> InfluenceResult:
    """Per-sample totals ``[n_test, N]`` (ordered by sample id), summed chunk by chunk."""
    unique, totals = torch.unique(all_ids), None
    for chunk_ids, _, scores in chunks:
        if totals is None:
            totals = scores.new_zeros(n_test, unique.numel())
        totals.index_add_(1, torch.searchsorted(unique, chunk_ids), scores)
        del chunk_ids, scores  # before the next chunk is computed
    if totals is None:
        return _empty_result(n_test)
    return InfluenceResult(unique, torch.full_like(unique, -1), totals)


def _empty_result(n_test: int) -> InfluenceResult:
    """A result without columns (nothing recorded: every step skipped)."""
    empty = torch.zeros(0, dtype=torch.int64)
    return InfluenceResult(empty, empty, torch.zeros(n_test, 0))


def dot_layers(test: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_l test_l @ e_l^T``: ``[n, B]`` scores of one step, in the wider of the two dtypes.

    Args:
        test: ``{layer: [n, k_l]}`` test gradients.
        embeddings: ``{layer: [B, k_l]}`` embeddings of one step's occurrences.
    """
    first = next(iter(embeddings))
    dtype = torch.promote_types(embeddings[first].dtype, test[first].dtype)
    return sum(test[name].to(dtype) @ e.to(dtype).T for name, e in embeddings.items())


def warn_non_finite_rows(gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``gradients`` (``{layer: [n, k_l]}``), after a warning naming the test points whose gradient is not finite:
    their scores are NaN, and :meth:`InfluenceResult.top_k` over the test points' mean then ranks no sample."""
    rows = torch.zeros(next(iter(gradients.values())).shape[0], dtype=torch.bool)
    for gradient in gradients.values():
        rows |= ~torch.isfinite(gradient).all(dim=1).cpu()
    if bool(rows.any()):
        warnings.warn(f"test points {rows.nonzero().flatten().tolist()[:10]} have a non-finite test gradient (NaN or "
                      "inf in their inputs or loss): their scores are NaN, and top_k over the mean of the test points "
                      "ranks no sample. Drop them, or rank by another test point (top_k(k, test_index=i)).",
                      UserWarning, stacklevel=5)  # the caller of influence() or score()
    return gradients
