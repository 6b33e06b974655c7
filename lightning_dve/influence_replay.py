"""Queries that replay training: exact first-order scores, and embeddings with every update's true curvature.

The methods of :class:`~lightning_dve.DataValueEmbeddings` built on :mod:`lightning_dve.replay`: one test target
carried back through the replayed run (:meth:`ReplayQueries.exact_influence`), or every projection row
(:meth:`ReplayQueries.replay_embeddings`, :mod:`lightning_dve.replay_embeddings`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .batch_trees import count_samples, split_batch
from .batches import WeightFn, on_module_device
from .config import DVEConfig
from .device_memory import available_bytes
from .errors import DVEError
from .projection import LayerProjection
from .query_layers import eager, refuse_empty, require_autograd, uncompiled
from .replay import ReplayCost, Replayer, TrainLossFn, replay_scores, samples_per_chunk
from .replay_data import TrainingData, step_loss_terms
from .replay_embeddings import replay_embeddings
from .replay_optim import OptimizerKind
from .replay_setup import make_replayer
from .results import InfluenceResult, check_per_step, outside_level, stream_columns
from .store import TrajectoryStore

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class ReplayQueries:
    """Replay queries of :class:`~lightning_dve.DataValueEmbeddings` (a mixin over its store and settings)."""

    store: TrajectoryStore
    config: DVEConfig
    loss_weights: WeightFn | None
    projections: dict[str, LayerProjection]
    training_data: TrainingData | None  # set by the callback after fit
    sample_ids: str | Callable[[Any], Any] | None  # the callback's, or given to load
    replay_cost: ReplayCost | None  # cost of the last replay
    _check_current: Callable[[], None]
    _hooks_warned = False  # whether a query after load warned of the fit's DataModule hooks (:meth:`on_device`)

    def exact_influence(
        self, module: nn.Module, batch: Any, loss_fn: LossFn | None = None, per_step: bool = False,
        dataset: Any = None, *, collate_fn: Callable[[list[Any]], Any] | None = None,
        train_loss_fn: TrainLossFn | None = None, sample_ids: str | Callable[[Any], Any] | None = None,
    ) -> InfluenceResult:
        """Exact first-order scores by replaying training (same result type and meaning as :meth:`influence`).

        ``scores[i, (t, z)] = -w_{t,z} dl(theta_T, test_i)/dw_{t,z}``: the derivative of the final test loss in
        the weight of occurrence ``(t, z)``, by reverse-mode differentiation through every later recorded step of
        the actual optimizer (SGD with momentum, Nesterov, weight decay; Adam, AdamW), learning rates and
        clipping (:mod:`lightning_dve.replay`). It is the first-order limit of TSLOO, not TSLOO itself. The cost
        relative to training is in :attr:`replay_cost` afterwards. It warns first where its expected memory passes
        what the module's device has available (:func:`warn_if_short_of_memory`).

        Args:
            module, batch, loss_fn, per_step: as in :meth:`influence` (without ``loss_fn``, each test sample's
                loss is ``training_step`` on a one-sample batch divided by its recorded reduction weight); each of
                ``loss_fn``'s losses is differentiated by itself, so it may return any number of targets, not one
                per test sample (e.g. the batch's mean loss as one target: one row of scores).
            dataset: the training dataset (map-style); default the one seen in ``fit``, required after
                :meth:`load`. Batches are rebuilt as ``collate_fn([dataset[i] for i in ids])``.
            collate_fn: default the training dataloader's (after :meth:`load`: ``default_collate``).
            train_loss_fn: ``(module, batch) -> Tensor[B]`` per-sample training losses (one forward per step);
                default ``training_step`` on one-sample batches (logging muted), one forward per sample.
            sample_ids: how dataset items map to the recorded ids, as given to the callback (a dict key, or
                ``batch -> LongTensor[B]``); default the callback's after ``fit``, after :meth:`load` the recorded
                key, or, for a callable (not saved), ids are taken as dataset positions.

        Raises:
            ConfigError: checkpoints were off, no dataset, recorded ids outside it with no ``sample_ids`` to map
                them, ``module`` is not the final trained module, or called under ``torch.inference_mode()``.
            UnsupportedError: the run cannot be replayed exactly (optimizer, dropout, non-indexable dataset,
                random transforms, or the replay does not reproduce the checkpoints).
            StoreError: if the store was recorded again since this handle was opened, or a file is damaged.
        """
        check_per_step(per_step)  # before the replay, not after it
        refuse_empty(batch)
        self._check_current()
        replayer = self._replayer(module, dataset, collate_fn, train_loss_fn, sample_ids)
        warn_if_short_of_memory(module, max(self.store.manifest.get("rows", ()), default=1), _targets(batch),
                                train_loss_fn is None, optimizer_moments(replayer))
        target = self._replay_target(self.on_device(module, batch, warn=loss_fn is None), loss_fn)
        with eager():  # compiled submodules too: the replay differentiates their backward
            ids, steps, scores, self.replay_cost = replay_scores(replayer, target)
        return stream_columns([(ids, steps, scores)], ids, scores.shape[0], per_step)

    def replay_embeddings(
        self, module: nn.Module, dataset: Any = None, *, collate_fn: Callable[[list[Any]], Any] | None = None,
        train_loss_fn: TrainLossFn | None = None, sample_ids: str | Callable[[Any], Any] | None = None,
    ) -> ReplayCost:
        """Replace the embeddings by test-agnostic ones with the true curvature of every recorded update.

        ``e_{t,z} = P Delta theta_T(t, z)``: each projection row carried back through the replayed run as
        :meth:`exact_influence` carries a test gradient (:mod:`lightning_dve.replay_embeddings`). Afterwards
        :meth:`influence`, :meth:`score` and :meth:`load` use them; without projection (``projection_dim=None``)
        :meth:`influence` then equals :meth:`exact_influence`. Costs ``sum_l k_l`` vector-Jacobian products per
        step: for small models (refused above ~1 GiB of carried rows).

        Args:
            module, dataset, collate_fn, train_loss_fn, sample_ids: as in :meth:`exact_influence`.

        Returns:
            the replay's cost against training (also in :attr:`replay_cost`).

        Raises:
            ConfigError, UnsupportedError, StoreError: as :meth:`exact_influence`; ``ConfigError`` also for a run
                recorded with ``segments > 1`` or too large (the embeddings on disk are kept).
        """
        self._check_current()
        replayer = self._replayer(module, dataset, collate_fn, train_loss_fn, sample_ids)
        with eager():  # as in exact_influence
            self.replay_cost = replay_embeddings(self.store, replayer, self.projections)
        return self.replay_cost

    def _replayer(self, module: nn.Module, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None,
                  train_loss_fn: TrainLossFn | None, sample_ids: str | Callable[[Any], Any] | None) -> Replayer:
        """The recorded run's :class:`~lightning_dve.replay.Replayer`, with the defaults of :meth:`exact_influence`
        (refused under ``torch.inference_mode()``, before any replay: it differentiates through training)."""
        require_autograd()
        base = self.training_data or TrainingData(None, sample_ids=self.sample_ids)  # (combined loaders: none)
        data = dataclasses.replace(base, dataset=base.dataset if dataset is None else dataset,
                                   collate_fn=collate_fn or base.collate_fn,
                                   sample_ids=base.sample_ids if sample_ids is None else sample_ids)
        return make_replayer(self.store, self.config.checkpoint_interval, uncompiled(module), data, train_loss_fn,
                             self.config.loss_reduction, self.loss_weights)

    def test_losses(self, module: nn.Module, batch: Any) -> torch.Tensor:
        """Per-sample test losses ``[n]`` as the queries define them (``training_step`` split by the reduction)."""
        return self._replay_target(self.on_device(module, batch), None)(module)

    def on_device(self, module: nn.Module, batch: Any, warn: bool = True) -> Any:
        """``batch`` as the training loop hands one to ``training_step`` (``batches.on_module_device``), through the
        fit's batch transfer hooks (``TrainingData.hooks``) after ``fit``; after :meth:`load` (or a fit whose loader
        held no dataset of samples), through the module's own, with a warning (once) where the fit's DataModule had
        such hooks, which the handle cannot run and Lightning's dispatch for ``module`` does not reach; not where
        the caller's ``loss_fn`` takes the batch (``warn=False``), as the warning advises."""
        hooks = self.store.manifest.get("datamodule_hooks")
        if (warn and hooks and self.training_data is None and not self._hooks_warned
                and not _dispatched_to_datamodule(module, hooks)):
            self._hooks_warned = True
            warnings.warn(f"the recorded fit ran its LightningDataModule's {hooks} on every training batch, which "
                          "this handle (from DataValueEmbeddings.load(), or of a fit whose loader held no dataset of "
                          "samples) cannot run, and the module's Trainer does not hand them to that DataModule (the "
                          "module is attached to none, or a later trainer.test, validate or predict call left it "
                          "out): test batches reach training_step through the LightningModule's transfer hooks only "
                          "(a KeyError, or inputs the DataModule would have changed, scored as they are). Apply "
                          "those hooks to the batch before the query (batch = "
                          "datamodule.on_after_batch_transfer(batch, 0)) or pass loss_fn=; exact_influence and "
                          "replay_embeddings take a collate_fn= that applies them to the training batches. This "
                          "warning is given once per handle.", UserWarning,
                          stacklevel=outside_level())
        with (self.training_data.hooks if self.training_data is not None else contextlib.nullcontext)(
                uncompiled(module)):
            return on_module_device(module, batch, self.store.manifest.get("precision"))

    def _replay_target(self, batch: Any, loss_fn: LossFn | None) -> Callable[[nn.Module], torch.Tensor]:
        """``module -> Tensor[n]`` per-sample test losses for :meth:`exact_influence`."""
        if loss_fn is not None:
            return lambda module: loss_fn(module, batch)
        singles, reduction = split_batch(batch), self.config.loss_reduction
        return lambda module: step_loss_terms(module, singles, reduction, self.loss_weights, test=True)


def _dispatched_to_datamodule(module: nn.Module, hooks: list[str]) -> bool:
    """Whether Lightning runs a DataModule's ``hooks`` for ``module`` (``batches.on_module_device`` goes through the
    Trainer's dispatch): as ``LightningModule._call_batch_hook`` decides, by the Trainer's hook selector of its latest
    ``fit``, ``validate``, ``test`` or ``predict`` call, not by ``trainer.datamodule``, which a later call without a
    DataModule leaves in place."""
    trainer = getattr(module, "_trainer", None)
    selector = getattr(getattr(trainer, "_data_connector", None), "_datahook_selector", None)
    if getattr(selector, "datamodule", None) is None:
        return False
    return not any(isinstance(selector.get_instance(hook), type(module)) for hook in hooks)


def _targets(batch: Any) -> int:
    """Test points of ``batch``; 1 where it does not split into samples (a ``loss_fn`` that reads no batch, as the
    report's exact-replay curve, ``batch=None``)."""
    try:
        return count_samples(batch)
    except DVEError:
        return 1


#: Multiples ``(base, per target)`` of the trainable weights' bytes that exact replay holds with a batched
#: ``train_loss_fn``, by the optimizer state's tensors per parameter (0: SGD, 1: with momentum, 2: Adam's moments),
#: as ``benchmarks/replay_memory.py`` measured them on stacks of linear layers.
REPLAY_MEMORY = {0: (16, 5), 1: (28, 6), 2: (61, 9)}


def optimizer_moments(replayer: Replayer) -> int:
    """Tensors per parameter in the replayed optimizer's state: 2 for Adam, 1 for SGD with momentum, else 0."""
    if replayer.kind is not OptimizerKind.SGD:
        return 2
    steps = replayer.store.steps
    return int(bool(steps) and any(h["momentum"] for h in replayer.checkpoints.read_hyper(steps[0])["groups"]))


def warn_if_short_of_memory(module: nn.Module, batch_size: int, targets: int, per_sample: bool, moments: int
                            ) -> None:
    """Warn before an :meth:`~ReplayQueries.exact_influence` whose expected peak memory passes what the module's
    device has available. The estimate is the scaling ``benchmarks/replay_memory.py`` measured on stacks of linear
    layers: the trainable weights' bytes times :data:`REPLAY_MEMORY` of the optimizer's ``moments`` (``16 + 5 n``
    for SGD) through a batched ``train_loss_fn``, and through ``training_step`` on one-sample batches ``1.5 + 1.5 n``
    more per sample of a chunk (the gradient graphs held for the double backward,
    :func:`~lightning_dve.replay.samples_per_chunk` of the largest recorded step's ``B``; ``n``: targets)."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    base, per_target = REPLAY_MEMORY[moments]
    lighter = weights * (base + per_target * targets)
    graphs = samples_per_chunk(weights, batch_size) * weights * (3 + 3 * targets) // 2 if per_sample else 0
    need = lighter + graphs
    device = next(module.parameters(), torch.empty(0)).device
    have = available_bytes(device)
    if have is None or need <= have:
        return
    gib = 2**30
    advice = ("pass train_loss_fn=(module, batch) -> Tensor[B] per-sample losses (one batched forward per step: "
              f"about {lighter / gib:.1f} GiB), " if per_sample else "")
    warnings.warn(f"exact_influence is expected to need about {need / gib:.1f} GiB of {device.type} memory for "
                  f"{targets} test point(s), recorded batches of up to {batch_size} samples and {weights / gib:.2f} "
                  f"GiB of trainable weights, and {have / gib:.1f} GiB are available: {advice}query fewer test points "
                  "per call, or use influence() (README, exact replay: memory).", stacklevel=3)
