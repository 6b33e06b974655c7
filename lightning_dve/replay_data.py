"""Replay inputs: the training batches rebuilt from the dataset, per-sample losses, the test loss's gradient, the
modes training ran in.

Only what replay needs to call the user's code exactly as training did: ``collate_fn([dataset[i] for i in ids])``
(refusing datasets that cannot give the same batch twice), ``training_step`` on one-sample batches or a user
``train_loss_fn`` for the per-sample losses, and the module modes of the recorded run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module  # the context manager behind torch.func.functional_call
from torch.utils.data import IterableDataset, default_collate

from .batch_trees import count_samples, same_items, to_device
from .batches import (WeightFn, extract_sample_ids, modes, muted_logging, reduction_weights,
                      training_loss_or_refuse)
from .config import LossReduction
from .errors import ConfigError, SampleIdError, UnsupportedError
from .sample_losses import vmapped_losses

Params = dict[str, torch.Tensor]


@dataclasses.dataclass
class TrainingData:
    """Where replay rebuilds the training batches from.

    Attributes:
        dataset: the training dataset (map-style: ``dataset[i]`` for a sample at position ``i``).
        collate_fn: turns a list of items into a batch; ``None`` means ``torch.utils.data.default_collate``.
        sample_ids: the callback's ``sample_ids`` (key or callable), to map recorded ids to dataset positions;
            ``None`` assumes the id is the position (and refuses ids outside ``range(len(dataset))``).
        prepare: what the training loop did to a collated batch (precision conversion, transfer hooks, device);
            ``None`` (after ``load``) moves it to the module's device and converts it as the recorded precision
            did (``"64-true"``: floating tensors to float64).
        stage: the Trainer's stage as in training, entered around each replayed step (its batches' hooks,
            ``training_step`` and a checkpointed forward may read ``self.trainer.training``); a no-op after
            ``load``.
        hooks: ``module -> context``: the fit's batch transfer hooks in place for a query of ``module`` (a later
            ``trainer.test`` dispatches them to its own DataModule); a no-op after ``load``.
    """

    dataset: Any
    collate_fn: Callable[[list[Any]], Any] | None = None
    sample_ids: str | Callable[[Any], Any] | None = None
    prepare: Callable[[Any], Any] | None = None
    stage: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    hooks: Callable[[Any], contextlib.AbstractContextManager[None]] = contextlib.nullcontext


class BatchSource:
    """Rebuilds recorded batches from the training dataset, refusing one that cannot be replayed exactly."""

    def __init__(self, data: TrainingData, device: torch.device | None = None,
                 float_dtype: torch.dtype | None = None) -> None:
        self.data = data
        self.collate = data.collate_fn or default_collate
        self.device, self.float_dtype = device, float_dtype  # used where ``data.prepare`` is None
        self._position: dict[int, int] | None = None  # None: the ids are positions
        self._checked: set[int] = set()  # ids confirmed to be the positions of their items

    def check(self, ids: torch.Tensor) -> None:
        """Refuse a non-indexable dataset or one whose items change between reads (random transforms).

        Raises:
            UnsupportedError: naming the reason.
        """
        dataset = self.data.dataset
        indexable = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        if isinstance(dataset, IterableDataset) or not indexable:
            raise UnsupportedError(f"the training dataset ({type(dataset).__name__}) is not indexable (map-style "
                                   "with __getitem__ and __len__), so recorded batches cannot be rebuilt. Pass "
                                   "dataset= a map-style dataset with the same samples.")
        for position in self.positions(ids)[:4]:
            if not same_items(dataset[position], dataset[position]):
                raise UnsupportedError(f"dataset[{position}] differs between two reads (a random transform or "
                                       "augmentation): replay cannot rebuild the batches training saw. Pass "
                                       "dataset= the same data without random transforms (only valid if training "
                                       "used none).")

    def positions(self, ids: torch.Tensor) -> list[int]:
        """Dataset positions of recorded sample ids: the ids themselves while the dataset says so (each id checked
        once), else from one scan of the dataset.

        Raises:
            ConfigError: ids the dataset does not hold.
        """
        if self._position is None and not self._ids_are_positions([int(i) for i in ids]):
            self._position = self._scan()
        if self._position is None:
            return [int(i) for i in ids]
        missing = [int(i) for i in ids if int(i) not in self._position]
        if missing:
            raise ConfigError(f"sample ids {missing[:5]} are not in the dataset exact_influence replays from (the "
                              "training dataset seen when fit started, or dataset=): training also used other "
                              "samples, e.g. from dataloaders reloaded per epoch. Pass dataset= a map-style "
                              "dataset holding every sample the run trained on.")
        return [self._position[int(i)] for i in ids]

    def _ids_are_positions(self, ids: list[int]) -> bool:
        """Whether every id is the position of its item. Without ``sample_ids`` that is assumed, and ids outside
        the dataset are refused; with it, the items at ids not seen before are read and their ids compared
        (a run's first batch says nothing about the later ones: a ``ConcatDataset`` with gaps in its ids)."""
        if self.data.sample_ids is None:
            self._in_range(ids)
            return True
        new = sorted(set(ids) - self._checked)
        if not new:
            return True
        if not all(0 <= i < len(self.data.dataset) for i in new):
            return False
        with contextlib.suppress(IndexError, KeyError, ValueError):
            if self._ids_of(new) == new:
                self._checked.update(new)
                return True
        return False

    def _in_range(self, positions: list[int]) -> None:
        """Refuse ids outside ``range(len(dataset))`` when there is no ``sample_ids`` to map them.

        Raises:
            ConfigError: naming the ids (a sample_ids callable is not saved with the store).
        """
        n = len(self.data.dataset)
        outside = [i for i in positions if not 0 <= i < n]
        if outside:
            raise ConfigError(
                f"recorded sample ids {outside[:5]} are not positions in the dataset passed to exact_influence "
                f"({n} items), and there is no sample_ids to map ids to items (a sample_ids callable is not saved "
                "with the store). Pass sample_ids= to exact_influence: the callback's key or callable batch -> ids.")

    def _ids_of(self, positions: Sequence[int]) -> list[int | None]:
        """The ids of the items at ``positions``, each read from a batch of that item alone: a ``collate_fn`` may
        reorder a batch (sort it by length), so a batch's ids need not follow its items' order."""
        return [self._id_of(self.collate([self.data.dataset[p]])) for p in positions]

    def _id_of(self, batch: Any) -> int | None:
        """A one-sample batch's id, read as training read it: from the batch prepared as the training loop did
        (transfer hooks, in the training stage: a hook may renumber the ids or make the batch type ``sample_ids``
        reads) where the replay has that preparation (after ``fit``; ``None`` for an item the hooks drop, which
        training never recorded), else from the collated batch.

        Raises:
            ConfigError: if ``sample_ids`` cannot read the collated batch (after ``load``), naming the fix.
        """
        if self.data.prepare is not None:
            with self.data.stage():
                hooked = self.data.prepare(batch)
            try:
                return int(extract_sample_ids(hooked, self.data.sample_ids, 1)[0])
            except SampleIdError:
                if _rows(hooked) != 1:  # the hooks dropped the item (or added rows): no id of its own
                    return None
                raise  # one sample, but no ids that sample_ids reads (a key it lacks)
        try:
            return int(extract_sample_ids(batch, self.data.sample_ids, 1)[0])
        except (AttributeError, TypeError, KeyError) as err:
            raise ConfigError(f"sample_ids cannot read the batches the replay rebuilds with collate_fn ({err}): "
                              "after load they skip the LightningModule's transfer hooks. Pass a collate_fn= that "
                              "makes the batch training_step saw, or sample_ids= for the collated batch.") from err

    def _scan(self) -> dict[int, int]:
        """``{id: position}`` from one scan of the dataset."""
        positions = range(len(self.data.dataset))
        return {i: p for i, p in zip(self._ids_of(positions), positions) if i is not None}

    def batch(self, ids: torch.Tensor) -> Any:
        """``collate_fn([dataset[i] for i in ids])``, prepared as training prepared it."""
        return self._prepared(self.collate([self.data.dataset[p] for p in self.positions(ids)]))

    def singles(self, ids: torch.Tensor) -> list[Any]:
        """One-sample batches ``collate_fn([dataset[i]])``, prepared as training prepared them."""
        return [self._prepared(self.collate([self.data.dataset[p]])) for p in self.positions(ids)]

    def _prepared(self, batch: Any) -> Any:
        if self.data.prepare is not None:
            return self.data.prepare(batch)
        return to_device(batch, self.device, self.float_dtype)


@contextlib.contextmanager
def parameters_as(module: nn.Module, params: Params) -> Iterator[None]:
    """``module`` with its parameters replaced by ``params`` (the rest unchanged, tied names filled) in the block.

    The forward *and* every ``torch.autograd.grad`` through it must run inside: activation checkpointing
    (``torch.utils.checkpoint``) recomputes the forward during backward, reading the module's parameters then.
    ``F.scaled_dot_product_attention`` runs its math kernel there: the fused kernels have no double backward,
    which the replay takes (the same attention, rounded otherwise). A module held under two names (``self.encoder =
    self.net[0]``) is swapped once per name, so the originals are put back in reverse order: in swap order the last
    swapped-in value would stay (pytorch/pytorch#164759).
    """
    with _reparametrize_module(module, dict(params), tie_weights=True, stack_weights=True), _math_attention():
        yield


def _math_attention() -> contextlib.AbstractContextManager[None]:
    """``sdpa_kernel(SDPBackend.MATH)`` where this torch has it (2.3 on), else nothing."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def target_gradients(module: nn.Module, params: Params, target: Callable[[nn.Module], torch.Tensor]
                     ) -> dict[tuple[str, str], torch.Tensor]:
    """``grad_theta L_i(theta_T)`` for every target row ``i``: ``{(name, "param"): [n, *shape]}`` (eval mode)."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    with modes(module, None), parameters_as(module, leaves):  # grad inside too: checkpointing recomputes there
        losses = target(module)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise ConfigError("the test loss must be per-sample, a 1-D Tensor[n]; got "
                              f"{getattr(losses, 'shape', losses)}.")
        rows = [_gradient(losses[i], list(leaves.values())) for i in range(losses.shape[0])]
    return {(n, "param"): torch.stack([torch.zeros_like(leaves[n]) if r[j] is None else r[j] for r in rows])
            for j, n in enumerate(leaves)}


def _gradient(loss: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """``grad loss`` in ``leaves`` (``None`` where it does not reach one).

    Raises:
        UnsupportedError: if the loss passes through activation checkpointing with ``use_reentrant=True``, which
            ``torch.autograd.grad`` cannot differentiate (nor can the replay's vector-Jacobian products).
    """
    try:
        return torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    except RuntimeError as err:
        if "use_reentrant=True" not in str(err):
            raise
        raise UnsupportedError("exact replay cannot differentiate the test loss through activation checkpointing "
                               "with use_reentrant=True (torch.utils.checkpoint): use use_reentrant=False, which "
                               "it replays exactly.") from err


def checked_losses(losses: Any, n: int, what: str) -> torch.Tensor:
    """``losses`` if it is a ``Tensor[n]``.

    Raises:
        ConfigError: naming ``what`` returned the wrong thing.
    """
    if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
        raise ConfigError(f"{what} must return per-sample losses as a 1-D Tensor[{n}]; got "
                          f"{getattr(losses, 'shape', type(losses))}.")
    return losses


def replayed_loss(module: nn.Module, batch: Any, test: bool = False) -> tuple[torch.Tensor | None, Any]:
    """:func:`~.batches.training_loss` of a batch the replay rebuilt (``test``: a test point of a query), its
    failures named as the replay's.

    Raises:
        ConfigError: where ``training_step`` fails on it, with the ways to give it the batches it expects.
    """
    if test:
        return training_loss_or_refuse(
            module, batch, "one sample of the test batch", "exact_influence takes each test point's loss from "
            "training_step on it alone: make training_step work on a one-sample batch (e.g. .squeeze(-1) instead "
            "of .squeeze()), or pass loss_fn(module, batch) -> Tensor[n] of per-sample test losses. A single "
            "dataset item dataset[i] has no batch dimension: pass default_collate([dataset[i]]).")
    return training_loss_or_refuse(
        module, batch, "a training batch the replay rebuilt", "The replay collates the recorded samples dataset[i] "
        "with the training loader's collate_fn, one loader's batch, where training batches had another form "
        "(several loaders combined, a DataModule's on_after_batch_transfer not run here). Pass collate_fn= that "
        "builds the batch training_step expects, or train_loss_fn(module, batch) -> Tensor[B] of per-sample training "
        "losses.")


def step_loss_terms(
    module: nn.Module, batches: list[Any], reduction: LossReduction, weight_fn: WeightFn | None, test: bool = False
) -> torch.Tensor:
    """Per-sample losses ``l(theta, z)`` ``[B]`` from ``training_step`` on one-sample batches (logging muted):
    each output divided by the one-sample weight of the recorded reduction (1 for a mean or a sum). A sample of
    weight 0 (or ``0 / 0``, e.g. a token mean over no tokens) gets a zero loss: it does not enter the step (as in
    capture, method.md §2). ``test``: the samples are a query's test points (named so where the step fails)."""
    if reduction is LossReduction.WEIGHTS and weight_fn is None:
        raise ConfigError("this store was recorded with per-sample loss weights (a loss_reduction callable), which "
                          "the losses from training_step must be divided by: pass the same callable as "
                          "`loss_weights=` to DataValueEmbeddings.load, or per-sample losses directly, "
                          "`train_loss_fn=` for the replayed training steps and `loss_fn=` for the test losses.")
    losses = []
    with muted_logging(module):  # a mean or a sum weighs a one-sample batch's loss 1: vmapped where it can be
        vmapped = None if reduction is LossReduction.WEIGHTS else vmapped_losses(
            module, batches, lambda single: replayed_loss(module, single, test)[0])
        for single in batches if vmapped is None else []:
            loss, single = replayed_loss(module, single, test)
            if loss is None:
                raise ConfigError("training_step did not return a scalar loss on a one-sample batch; pass "
                                  "train_loss_fn(module, batch) -> Tensor[B] of per-sample training losses.")
            weight = float(reduction_weights(reduction, single, 1, weight_fn)[0])  # 0 / 0 = NaN for no tokens
            if weight != 0 and not math.isnan(weight):
                losses.append(loss / weight)
            else:  # not in the step: zero, tied to the parameters as in training unless its own loss is NaN
                losses.append(loss * 0.0 if bool(torch.isfinite(loss)) else loss.new_zeros((), requires_grad=True))
    return torch.stack(losses) if vmapped is None else vmapped


#: A recorded step's sample ids, weights and micro-batch of each sample (``None`` in stores of earlier versions).
StepSamples = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def step_losses(source: BatchSource, reduction: LossReduction, weight_fn: WeightFn | None,
                train_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None, batched: bool
                ) -> Callable[..., torch.Tensor]:
    """``(module, weights, record) -> sum_z w_z l(theta, z)`` of a recorded step (``record``: its ids, recorded
    weights and micro-batches, ``Replayer.record``): :func:`step_total`, or from ``train_loss_fn``'s per-sample
    losses on the step's batch (one forward)."""
    if train_loss_fn is None:
        return lambda m, weights, record: step_total(m, source, weights, record, reduction, weight_fn, batched)

    def from_loss_fn(m: nn.Module, weights: torch.Tensor, record: StepSamples) -> torch.Tensor:
        per_sample = checked_losses(train_loss_fn(m, source.batch(record[0])), len(record[0]), "train_loss_fn")
        return (weights.to(per_sample.dtype) * per_sample).sum()

    return from_loss_fn


def step_total(module: nn.Module, source: BatchSource, weights: torch.Tensor, record: StepSamples,
               reduction: LossReduction, weight_fn: WeightFn | None, batched: bool) -> torch.Tensor:
    """``sum_z w_z l(theta, z)`` of a recorded step, from ``training_step`` on one-sample batches (method.md §2).

    With ``batched`` (bf16 autocast), its value and ``theta``-gradient come from the step's micro-batches as training
    ran them (:func:`micro_batch_loss`) and only its derivative in the weights from the one-sample losses:
    ``L_rec + sum_z (w_z - w_rec,z) l_z``. A one-sample forward rounds otherwise under autocast, and where a
    coordinate's batch gradient nearly cancels, Adam's normalisation turns that into derivatives thousands of
    times too large.

    Args:
        weights: the step's occurrence weights (the variables of the influence).
        record: the step's sample ids, recorded weights ``w_rec`` and each sample's micro-batch
            (``StepRecord.batches``, or ``None``).
        batched: whether to take the value from the micro-batches.
    """
    ids, recorded, batches = record
    losses = step_loss_terms(module, source.singles(ids), reduction, weight_fn)
    total = (weights.to(losses.dtype) * losses).sum()
    value = micro_batch_loss(module, source, ids, recorded, batches, reduction, weight_fn) if batched else None
    if value is None:
        return total
    return value + ((weights - recorded.to(weights)).to(losses.dtype) * losses).sum()


def micro_batch_loss(module: nn.Module, source: BatchSource, ids: torch.Tensor, recorded: torch.Tensor,
                     batches: torch.Tensor | None, reduction: LossReduction, weight_fn: WeightFn | None
                     ) -> torch.Tensor | None:
    """``sum_z w_rec,z l(theta, z)`` as training formed it: ``sum_b c_b training_step(b)`` over the step's
    micro-batches ``b`` (the whole step where they were not recorded), with ``c_b`` the ratio of the recorded
    weights to the reduction's own in ``b`` (``1 / (n W)`` for ``n`` micro-batches on ``W`` ranks, method.md §2).

    Returns:
        The loss, or ``None`` where a ratio is not one constant (samples the reduction leaves out excepted) or a
        ``training_step`` returns no loss.
    """
    if batches is None:
        warnings.warn("DataValueEmbedding: this store's steps do not record their micro-batches (written before "
                      "they were): the bf16 replay runs each step's whole batch at once, as training did only without "
                      "accumulation and DDP; with either, Adam's scores can be far off. Record the run again.")
    counts = [len(ids)] if batches is None else torch.unique_consecutive(batches, return_counts=True)[1].tolist()
    value: torch.Tensor | None = None
    with muted_logging(module):
        for rows in torch.arange(len(ids)).split(counts):
            loss, batch = replayed_loss(module, source.batch(ids[rows]))  # the weights it may write into the batch
            own = reduction_weights(reduction, batch, len(rows), weight_fn)
            kept = own != 0
            ratios = recorded[rows].to(own)[kept] / own[kept]
            if loss is None or not bool(kept.any()) or not torch.allclose(ratios, ratios[0], rtol=1e-6, atol=0):
                return None
            value = loss * float(ratios[0]) if value is None else value + loss * float(ratios[0])
    return value


def training_data_of(
    loader: Any, sample_ids: str | Callable[[Any], Any] | None, prepare: Callable[[Any], Any] | None = None,
    stage: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    hooks: Callable[[Any], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> TrainingData | None:
    """The dataset and ``collate_fn`` of a training ``DataLoader`` (``None`` for anything without a dataset, or
    whose dataset yields whole batches: ``batch_size=None`` turns automatic batching off)."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or (getattr(loader, "batch_size", 1) is None and getattr(loader, "batch_sampler", 1) is None):
        return None
    return TrainingData(dataset, getattr(loader, "collate_fn", None), sample_ids, prepare, stage, hooks)


def _rows(batch: Any) -> int | None:
    """The samples of a batch (:func:`~lightning_dve.batch_trees.count_samples`), ``None`` if it has none."""
    try:
        return count_samples(batch)
    except ConfigError:
        return None
