"""Queries: test gradients through the recorded capture and projection, dot products, top-k (method.md §2).

``TSLOO^{(t)}(z; z_test) ~= grad l(theta_T, z_test)^T e_{t,z}``: after training, the influence of every
recorded occurrence on a test point is one dot product per layer block with that point's projected gradient at
the final parameters.
"""

from __future__ import annotations

import bisect
import numbers
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from .batch_trees import count_samples
from .batches import IdFn, WeightFn, align_test_rows, modes, muted_logging, reduction_weights, training_loss
from .capture import GradientCapture
from .config import DVEConfig
from .embedding_arrays import EmbeddingArrays
from .errors import ConfigError, StoreError
from .files import read_json
from .influence_replay import LossFn, ReplayQueries
from .projection import LayerProjection
from .loss_checks import check_loss_count, check_reduction, check_uncoupled, losses_of_a_pair
from .query_layers import (backward_to_layers, check_test_gradients, dtype_refusal, recorded_layers, refuse_empty,
                           refuse_uncaptured, require_autograd, uncompiled, warn_if_moved)
from .recursion import layer_groups
from .replay import ReplayCost
from .replay_data import TrainingData
from .results import EmbeddingMatrix, InfluenceResult, Ranking, dot_layers, stream_columns
from .store import MANIFEST, TrajectoryStore
from .store_checks import open_finished

__all__ = ["DataValueEmbeddings", "InfluenceResult", "LossFn", "Ranking"]

#: Bytes of embeddings a query reads at a time, and of their scores (8 per test point and row): whole steps, more
#: where one step has more. Per-sample totals are summed chunk by chunk, never held per occurrence.
CHUNK_BYTES = 64 * 2**20


class DataValueEmbeddings(ReplayQueries):
    """The embeddings of a finished recording, with the projection needed to score test points against them.

    Create with :meth:`load` (any process) or from ``DataValueEmbedding.embeddings`` after ``fit``. The queries
    that replay training (``exact_influence``, ``replay_embeddings``) are :class:`ReplayQueries`'.
    """

    def __init__(self, store: TrajectoryStore, loss_weights: WeightFn | None = None,
                 sample_ids: str | IdFn | None = None) -> None:
        self.store = store
        self.config = DVEConfig.from_dict(store.manifest["settings"])
        self.loss_weights = loss_weights
        self._factors = store.read_segments()
        self._run_id = store.manifest.get("run_id")  # the recording the cached factors belong to
        self.training_data: TrainingData | None = None  # set by the callback after fit, for exact_influence
        self.sample_ids = sample_ids  # given to load (the callback's is in training_data)
        self.replay_cost: ReplayCost | None = None  # cost of the last exact_influence
        self.projections = {
            entry["name"]: LayerProjection.from_dict(entry["name"], entry["projection"])
            for entry in store.manifest["layers"]
        }

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        loss_weights: WeightFn | None = None,
        settings: DVEConfig | None = None,
        sample_ids: str | IdFn | None = None,
    ) -> DataValueEmbeddings:
        """Open the embeddings in ``path`` (a ``save_dir``), checking that every file is present.

        Args:
            path: the callback's ``save_dir``.
            loss_weights: the ``loss_reduction`` callable used in training, if it was one.
            settings: if given, refuse a store written with other settings.
            sample_ids: how the batches give their ids, as given to the callback: needed where it was a callable
                (not saved) and ``training_step`` sorts or filters its batch (:meth:`test_ids`).

        Raises:
            StoreError: if the store is incomplete, corrupt, or written with other settings or projection.
        """
        return cls(open_finished(path, settings), loss_weights, sample_ids)

    @property
    def steps(self) -> list[int]:
        """Recorded optimizer steps."""
        return self.store.steps

    @property
    def epochs(self) -> list[int]:
        """Training epoch of each recorded step."""
        return self.store.epochs

    @property
    def learning_rates(self) -> torch.Tensor:
        """The param-group learning rate of each tracked layer at each recorded step, ``[T, L]`` (layer order of the
        manifest; 0 where a step did not reach the layer)."""
        return self.store.applied_learning_rates

    def is_current(self) -> bool:
        """Whether the store still holds the recording this handle was opened on (one manifest read)."""
        try:
            return read_json(self.store.root / MANIFEST).get("run_id") == self._run_id
        except (OSError, StoreError):
            return False

    def _check_current(self) -> None:
        """Refuse a query when the store was recorded again since this handle was opened (one manifest read).

        Raises:
            StoreError: if the manifest's ``run_id`` is no longer the one this handle (and its cached segment
                factors) belongs to, or the manifest is gone.
        """
        replaced = self._replaced()
        if replaced is not None:
            raise replaced

    def _replaced(self) -> StoreError | None:
        """The error of :meth:`_check_current`, or ``None`` while the store holds this handle's recording."""
        path = self.store.root / MANIFEST
        again = f"DataValueEmbeddings.load({str(self.store.root)!r}) again to query the recording there now"
        if not path.is_file():
            return StoreError(f"the store at {self.store.root} has no {MANIFEST} any more (deleted or being "
                              f"recorded again) since this handle was opened; {again}.")
        run_id = read_json(path).get("run_id")
        if run_id != self._run_id:
            return StoreError(f"the store at {self.store.root} was recorded again since this handle was opened (run "
                              f"{self._run_id}, now {run_id}): its files belong to another run than this handle's "
                              f"cached factors; {again}.")
        return None

    def _embedding_arrays(self) -> EmbeddingArrays:
        """Every layer's embeddings, memory-mapped (a query holds the files it opened to its end).

        Raises:
            StoreError: if they cannot be opened; if the store was recorded again since :meth:`_check_current`
                (an overwriting fit cleared it meanwhile), that error, with the failed open as its cause.
        """
        try:
            return self.store.embedding_arrays(self.store.layer_names)
        except StoreError as err:
            replaced = self._replaced()
            if replaced is None:
                raise
            raise replaced from err

    def _test_loss(
        self, module: nn.Module, batch: Any, loss_fn: LossFn | None, capture: GradientCapture
    ) -> tuple[torch.Tensor, Callable[[int], torch.Tensor], Any]:
        """Return the scalar loss to backpropagate, ``batch_size -> w [B]`` of its per-sample terms, and the batch
        as ``training_step`` left it (``None`` with ``loss_fn``), with the capture begun for its forward (after
        ``loss_fn``'s pair, which it must not see)."""
        if loss_fn is not None:
            pair = losses_of_a_pair(loss_fn, module, batch)  # before the capture, which must not see its forward
            capture.begin(keep_outputs=True)
            losses = loss_fn(module, batch)
            refuse_uncaptured(capture)
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                raise ConfigError(f"loss_fn must return per-sample losses as a 1-D Tensor[B]; got "
                                  f"{getattr(losses, 'shape', type(losses))}.")
            check_uncoupled(pair, losses)
            return losses.sum(), partial(check_loss_count, losses), None
        if not callable(getattr(module, "training_step", None)):
            raise ConfigError(f"{type(module).__name__} has no training_step; pass loss_fn(module, batch) -> "
                              "Tensor[B] of per-sample test losses.")
        reduction = self.config.loss_reduction
        count_samples(batch)  # a batch of no samples to tell apart (an iterator of batches): refused before the step
        capture.begin(keep_outputs=True)
        with muted_logging(module):
            loss, used = training_loss(module, batch)
        refuse_uncaptured(capture)
        if loss is None:
            raise ConfigError("training_step did not return a scalar loss on the test batch; pass loss_fn(module, "
                              "batch) -> Tensor[B] to the query, or make training_step return the loss on such "
                              "batches (the train-end report takes its reference loss from training_step and has no "
                              "loss_fn).")
        return loss, lambda n: reduction_weights(reduction, used, n, self.loss_weights), used

    def test_gradients(self, module: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
        """Projected per-sample gradients of the test losses at ``module``'s weights, ``{layer: [n, k_l]}``.

        ``batch`` (as the DataLoader yields it) goes through ``module``'s transfer hooks to its device first
        (``batches.on_module_device``); gradients come back on the CPU. ``module`` runs in eval mode with gradients
        on (frozen tracked layers made trainable for the query); its modes, parameters, ``requires_grad`` flags and
        ``.grad`` are left as they were.

        Args:
            module: the trained module (or one with the same tracked layers).
            batch: a test batch in the training batch format.
            loss_fn: ``(module, batch) -> Tensor[n]`` per-sample test losses, each of its own sample alone;
                default: ``training_step`` with logging muted, split with the recorded loss reduction.

        Raises:
            LayerMismatchError: if ``module`` does not hold the recorded layers.
            LossReductionError: if ``training_step``'s loss is not the recorded reduction of per-sample losses.
            ConfigError: under ``torch.inference_mode()``, if the test loss does not depend on the tracked layers,
                ``loss_fn`` does not return one loss per sample or couples them, or ``training_step`` is random.
        """
        require_autograd()
        refuse_empty(batch)
        module = uncompiled(module)
        batch = self.on_device(module, batch, warn=loss_fn is None)
        with recorded_layers(module, self.store.manifest["layers"], self.projections) as tracked:
            capture = GradientCapture(tracked)
            capture.attach()
            try:
                with modes(module, None):  # eval mode, gradients on
                    try:
                        loss, weights_for, used = self._test_loss(module, batch, loss_fn, capture)
                    except RuntimeError as err:
                        refusal = dtype_refusal(err, module, batch)
                        if refusal is None:
                            raise
                        raise refusal from err
                    backward_to_layers(loss, capture, module)
                    size = capture.batch_size()
                    rows = capture.finish(weights_for(size))
                    if loss_fn is None:  # its own forwards and backwards, which the finished capture does not see
                        check_reduction(module, batch, self.config.loss_reduction, self.loss_weights,
                                        list(capture.weights().values()), self.test_ids(), size)
            finally:
                capture.detach()
        return rows if used is None else align_test_rows(rows, batch, used, self.test_ids())

    def test_ids(self) -> str | IdFn | None:
        """How to read a test batch's ids (to match rows that ``training_step`` sorts or filters): the callback's
        ``sample_ids`` after ``fit``, else the one given to :meth:`load`, else the key the store recorded."""
        data = self.training_data
        if data is not None and data.sample_ids is not None:
            return data.sample_ids
        return self.sample_ids if self.sample_ids is not None else self.store.manifest.get("sample_ids")

    def influence(
        self, module: nn.Module, batch: Any, loss_fn: LossFn | None = None, per_step: bool = False
    ) -> InfluenceResult:
        """Scores of every recorded occurrence (or sample) on each test point of ``batch``.

        Args:
            module, batch, loss_fn: as :meth:`test_gradients`.
            per_step: one column per (step, sample) occurrence instead of per-sample totals.

        Raises:
            StoreError: if the store was recorded again since this handle was opened, or a file is damaged.
            LayerMismatchError, LossReductionError, ConfigError: as :meth:`test_gradients`.
        """
        self._check_current()
        grads = self.test_gradients(module, batch, loss_fn)  # another model's layers: refused, not warned about
        warn_if_moved(uncompiled(module), self.store.manifest)
        return self._score(grads, per_step, None)

    @property
    def segment_boundaries(self) -> list[int]:
        """Last optimizer step of each influence-checkpointing segment (one entry when ``segments=1``).

        Boundary ``b`` is the model right after step ``segment_boundaries[b]``, i.e. at
        ``global_step == segment_boundaries[b] + 1`` (a ``ModelCheckpoint(every_n_train_steps=...)`` there).
        """
        return [last for _, last in self.store.manifest.get("segments", [])]

    def score(
        self, test_gradients: dict[str, torch.Tensor], *, per_step: bool = False, boundary: int | None = None
    ) -> InfluenceResult:
        """Scores of every recorded occurrence (or sample) against given projected test gradients.

        ``scores[i, (t, z)] = sum_l <g_test_i^l, e_{t,z}^l>`` (method.md §2). Use it with the mean gradient of a
        reference set (one row) to get a per-step influence curve at one dot product per occurrence. With
        segments, the stored embeddings are segment-local and the test gradient is carried back through the
        later segments' factors instead: ``g^T (I - M_{K-1}) ... (I - M_{s+1}) e_loc`` (method.md §3).

        Args:
            test_gradients: ``{layer: [n, k_l]}`` as returned by :meth:`test_gradients` (any row count), taken at
                the final weights, or at the weights of ``boundary``; detached (the scores are not differentiable:
                an autograd graph would keep every streamed chunk of embeddings).
            per_step: one column per occurrence instead of per-sample totals.
            boundary: score the influence on the model at that segment boundary (data value dynamics): only
                occurrences up to it count; an index into :attr:`segment_boundaries`. ``None`` means the final
                model.

        Raises:
            ConfigError: if ``test_gradients`` has other shapes, or ``boundary`` is not a segment boundary.
            StoreError: if the store was recorded again since this handle was opened, or a file is damaged.
        """
        self._check_boundary(boundary)
        self._check_current()
        return self._score(test_gradients, per_step, boundary)

    def _check_boundary(self, boundary: int | None) -> None:
        """Refuse a ``boundary`` that is not an index into :attr:`segment_boundaries` (``None`` passes).

        Raises:
            ConfigError: listing the valid boundaries.
        """
        count = len(self.segment_boundaries)
        if boundary is not None and (isinstance(boundary, bool) or not isinstance(boundary, numbers.Integral)
                                     or not 0 <= boundary < count):
            raise ConfigError(f"boundary {boundary!r} is out of range: this store has {count} segment boundaries "
                              f"(after steps {self.segment_boundaries}), so boundary must be one of "
                              f"{list(range(count))} or None for the final model. Record with more `segments=` for "
                              "more boundaries.")

    def _score(self, test_gradients: Any, per_step: bool, boundary: int | None) -> InfluenceResult:
        """:meth:`score` once ``boundary`` and the store are checked: the embeddings stream in chunks of at most
        :data:`CHUNK_BYTES` (whole steps), each scored against its segment's carried test gradient."""
        widths = {name: self.projections[name].dim for name in self.store.layer_names}
        carried = self._carry_back(check_test_gradients(test_gradients, widths), boundary)
        arrays = self._embedding_arrays()
        n_test = next(iter(carried[-1].values())).shape[0]
        max_rows = max(1, CHUNK_BYTES // max(1, arrays.row_bytes, 8 * n_test))
        ranges = [(segment, a, b) for segment, lo, hi in self._segment_ranges() if segment < len(carried)
                  for a, b in arrays.chunks(lo, hi, max_rows)]

        def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            for segment, a, b in ranges:
                chunk_ids, embeddings = arrays.rows(a, b)
                scores = dot_layers(carried[segment], embeddings)
                del embeddings  # before the next chunk is read: one chunk in memory at a time
                yield chunk_ids, arrays.row_steps(a, b), scores

        all_ids = arrays.sample_ids(0, ranges[-1][2] if ranges else 0)  # segments run from the first step on
        return stream_columns(chunks(), all_ids, n_test, per_step)

    def embedding_matrix(self) -> EmbeddingMatrix:
        """Every occurrence's embedding of the final model, in memory: ``N x sum_l k_l`` numbers, where queries
        stream them. With segments, a segment's stored embeddings are carried to the final model through the later
        segments' factors, ``e = (I - M_{K-1}) ... (I - M_{s+1}) e_loc`` (method.md §3).

        Raises:
            StoreError: if the store was recorded again since this handle was opened, or a file is damaged.
        """
        self._check_current()
        arrays = self._embedding_arrays()
        ids, steps, rows = [], [], []
        for segment, lo, hi in self._segment_ranges():
            chunk_ids, embeddings = arrays.rows(lo, hi)
            for factors in self._factors[segment + 1:]:
                embeddings = self._apply_factors(embeddings, factors, transpose=True)
            ids.append(chunk_ids)
            steps.append(arrays.row_steps(lo, hi))
            rows.append(embeddings)
        return EmbeddingMatrix(torch.cat(ids), torch.cat(steps),
                               {name: torch.cat([part[name] for part in rows]) for name in self.store.layer_names})

    def influence_at(
        self, boundary: int, module: nn.Module, batch: Any, loss_fn: LossFn | None = None, per_step: bool = False
    ) -> InfluenceResult:
        """Data value dynamics: influence of the occurrences up to segment ``boundary`` on the model there.

        Args:
            boundary: index into :attr:`segment_boundaries`.
            module: the model with the weights it had at that boundary (e.g. loaded from a checkpoint; other
                weights are warned about where the store kept that boundary's).
            batch, loss_fn, per_step: as in :meth:`influence`.

        Raises:
            ConfigError: if ``boundary`` is not a segment boundary (and as :meth:`influence`).
            StoreError: as :meth:`influence`.
        """
        self._check_boundary(boundary)
        self._check_current()
        grads = self.test_gradients(module, batch, loss_fn)
        warn_if_moved(uncompiled(module), self.store.manifest, boundary)
        return self._score(grads, per_step, boundary)

    def _segment_ranges(self) -> Iterator[tuple[int, int, int]]:
        """``(segment index, lo, hi)``: each segment's recorded steps are those with index in ``[lo, hi)``."""
        lasts = self.segment_boundaries or [max(self.steps, default=-1)]
        lo = 0
        for segment, last in enumerate(lasts):
            hi = bisect.bisect_right(self.steps, last, lo=lo)
            yield segment, lo, hi
            lo = hi

    def _carry_back(self, test: dict[str, torch.Tensor], boundary: int | None) -> list[dict[str, torch.Tensor]]:
        """Test gradients carried back to each segment up to ``boundary``: ``t_b = g``, ``t_s = t_{s+1} F_{s+1}``."""
        last = len(self._factors) - 1 if boundary is None else boundary
        carried = [test]
        for segment in range(last, 0, -1):
            carried.insert(0, self._apply_factors(carried[0], self._factors[segment]))
        return carried

    def _apply_factors(
        self, test: dict[str, torch.Tensor], factors: dict[str, torch.Tensor], transpose: bool = False
    ) -> dict[str, torch.Tensor]:
        """Row vectors times each group's factor: ``g^T (I - M)`` per group (``transpose``: ``e^T (I - M)^T``, the
        column vectors ``(I - M) e``)."""
        out = {}
        for group in layer_groups(self.store.layer_names, self.config.layout):
            factor = factors[group[0]].T if transpose else factors[group[0]]
            dtype = torch.promote_types(factor.dtype, test[group[0]].dtype)  # every segment's scores alike
            rows = torch.cat([test[name].to(dtype) for name in group], dim=1) @ factor.to(dtype)
            out.update(zip(group, rows.split([test[name].shape[1] for name in group], dim=1)))
        return out

