"""The report's query: the reference batches (``reference=`` or the validation data) and their mean gradient.

The default reference is the trainer's first validation dataloader, read on global rank 0 through
:func:`~lightning_dve.samples.unsharded` (every rank's part under DDP) and no further than validation reads it:
``Trainer(limit_val_batches=...)`` bounds it as it bounds validation, and ``limit_val_batches=0`` (validation off)
leaves the report without a reference unless ``reference=`` is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .batches import modes
from .errors import ConfigError, LossReductionError
from .influence import DataValueEmbeddings
from .loss_checks import check_reduction
from .query_layers import eager
from .replay_data import TrainingData, training_data_of
from .samples import unsharded


@dataclasses.dataclass(frozen=True)
class Reference:
    """The query of the report.

    Attributes:
        gradients: ``{layer: [1, k_l]}`` mean projected test-loss gradient of the reference samples.
        n_samples: how many reference samples were averaged.
        source: where they came from (for the summary).
    """

    gradients: dict[str, torch.Tensor]
    n_samples: int
    source: str


@dataclasses.dataclass(frozen=True)
class FirstBatches:
    """The first ``limit`` batches of ``batches``; its ``len`` is known where that of ``batches`` is.

    Attributes:
        batches: the loader (or any iterable of batches).
        limit: how many of its batches to read at most.
    """

    batches: Iterable[Any]
    limit: int

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.batches, self.limit)

    def __len__(self) -> int:
        return min(len(self.batches), self.limit)  # type: ignore[arg-type]  # TypeError without a length


def validation_batch_limit(trainer: pl.Trainer, loader: Iterable[Any], sharded: bool) -> tuple[int | None, int]:
    """How many batches of the unsharded ``loader`` validation reads (``None``: all of them), and over how many ranks.

    Where Lightning set the validation loop up, that is its count for the first loader, ``trainer.num_val_batches[0]``
    (``limit_val_batches`` applied to one rank's shard), times ``world_size`` when a ``DistributedSampler`` sharded it
    (rank 0 reads every rank's part). Otherwise (validation never ran, e.g. ``check_val_every_n_epoch`` beyond the
    last epoch) ``limit_val_batches`` is applied to ``loader`` as Lightning would: an int caps each rank's batches
    (of its shard, when ``loader`` is or would be sharded), a fraction ``f`` keeps ``int(f * len(loader))`` (at
    least one) where the length is known.
    """
    limit = trainer.limit_val_batches
    counts = trainer.num_val_batches
    if counts:
        ranks = trainer.world_size if sharded else 1
        return (None if counts[0] == math.inf else int(counts[0]) * ranks), ranks
    if isinstance(limit, int):
        ranks = trainer.world_size if sharded or _would_shard(trainer, loader) else 1
        return limit * ranks, ranks
    try:
        return (max(1, int(limit * len(loader))) if limit < 1.0 else None), 1  # type: ignore[arg-type]
    except TypeError:  # no length: Lightning allows only 1.0 (or an int) here
        return None, 1


def _would_shard(trainer: pl.Trainer, loader: Iterable[Any]) -> bool:
    """Whether Lightning gives ``loader`` a ``DistributedSampler`` when it sets validation up (its own test)."""
    try:
        return isinstance(loader, DataLoader) and trainer._data_connector._requires_distributed_sampler(loader)
    except AttributeError:  # another Lightning version: as on one process
        return False


def _validation_source(trainer: pl.Trainer) -> Any:
    """The validation dataloader(s) of ``fit`` where validation never set them up: those passed as
    ``fit(val_dataloaders=...)``, or the DataModule's or module's ``val_dataloader()`` (the order in which Lightning
    takes them; ``None`` if there are none)."""
    source = trainer.fit_loop.epoch_loop.val_loop._data_source  # Lightning's record of where they come from
    return source.dataloader() if source.instance is not None and source.is_defined() else None


def resolve_reference(trainer: pl.Trainer, reference: Any) -> tuple[Iterable[Any] | None, str]:
    """The reference batches and a description of their source.

    ``reference=`` (a batch or a loader) is used whole; the validation dataloader up to
    :func:`validation_batch_limit`. The batches are ``None`` if there is no reference; the description then says why
    (empty if there is no validation dataloader at all).
    """
    if reference is not None:
        if isinstance(reference, DataLoader):
            return unsharded(reference), "the `reference` DataLoader"
        return [reference], "the `reference` batch"
    if trainer.limit_val_batches == 0:
        return None, "`Trainer(limit_val_batches=0)` turns validation off"
    loaders = trainer.val_dataloaders if trainer.val_dataloaders is not None else _validation_source(trainer)
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    name = "the validation dataloader"
    if isinstance(loaders, (list, tuple)):
        if len(loaders) > 1:
            name = f"the first of {len(loaders)} validation dataloaders"
            rank_zero_info(f"DataValueEmbedding: {len(loaders)} validation dataloaders; the first is the reference "
                           "(reference= takes another).")
        loaders = loaders[0] if loaders else None
    if loaders is None:
        return None, ""
    whole = unsharded(loaders)
    limit, ranks = validation_batch_limit(trainer, loaders, sharded=whole is not loaders)
    try:
        binding = limit is not None and limit < len(whole)  # type: ignore[arg-type]
    except TypeError:  # a stream: any limit binds
        binding = limit is not None
    if not binding:
        return whole, name
    per_rank = f": {limit // ranks} on each of {ranks} ranks" if ranks > 1 else ""
    return FirstBatches(whole, limit), f"{name} (its first {limit} batches{per_rank}, `limit_val_batches`)"


def prepare_batch(trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                  hooks: Callable[[Any], contextlib.AbstractContextManager[None]] = contextlib.nullcontext) -> Any:
    """What the training loop does to a batch (precision conversion, the transfer hooks, device), for the replay's
    rebuilt training batches (in the Trainer's stage as in training: ``TrainingData.stage``).

    The transfer hooks go through Lightning's dispatch (``_on_before_batch_transfer``, and ``batch_to_device`` for
    the others), which calls a DataModule's override instead of the module's, as the training loop does; ``hooks``
    puts the fit's dispatch in place (:func:`fit_batch_hooks`).
    """
    batch = trainer.precision_plugin.convert_input(batch)
    with hooks(module):
        return trainer.strategy.batch_to_device(module._on_before_batch_transfer(batch, 0))


def fit_training_data(trainer: pl.Trainer, module: pl.LightningModule,
                      sample_ids: str | Callable[[Any], Any] | None) -> TrainingData | None:
    """Where the replay rebuilds this fit's training batches from, and how the queries prepare a test batch: the
    training loader's dataset and ``collate_fn``, prepared through the fit's batch transfer hooks in the training
    stage (``None`` for a loader without a dataset of samples)."""
    hooks = partial(fit_batch_hooks, trainer, datahook_selector(trainer), trainer.datamodule)
    return training_data_of(trainer.train_dataloader, sample_ids, partial(prepare_batch, trainer, module, hooks=hooks),
                            partial(trainer_stage, trainer, RunningStage.TRAINING), hooks)


def datahook_selector(trainer: pl.Trainer) -> object | None:
    """The object by which the Trainer dispatches a module's batch transfer hooks now (Lightning's private
    ``_DataHookSelector``; ``None`` where this Lightning has none)."""
    return getattr(getattr(trainer, "_data_connector", None), "_datahook_selector", None)


@contextlib.contextmanager
def fit_batch_hooks(trainer: pl.Trainer, selector: object | None, datamodule: pl.LightningDataModule | None,
                    module: Any) -> Iterator[None]:
    """The fit's batch transfer hooks for the block, where ``module`` is the module the fit trained: its hook
    dispatch (``selector``, :func:`datahook_selector` during ``fit``) and its DataModule. Another module (one a
    later ``trainer.test`` attached) keeps the Trainer's dispatch, which Lightning checks against its class.

    Lightning dispatches a LightningModule's transfer hooks to the DataModule of the Trainer's latest ``fit``,
    ``validate``, ``test`` or ``predict`` call: a ``trainer.test(model, dataloaders=...)`` after ``fit`` would
    leave a fit's DataModule hooks out of the queries and the replay (scores 0.4 off, silently, and the replay
    refused), and ``trainer.test(datamodule=other)`` would run the other one's.
    """
    connector, saved = getattr(trainer, "_data_connector", None), (datahook_selector(trainer), trainer.datamodule)
    if selector is None or saved[0] is None or getattr(selector, "model", None) is not module:
        yield
        return
    connector._datahook_selector, trainer.datamodule = selector, datamodule
    try:
        yield
    finally:
        connector._datahook_selector, trainer.datamodule = saved


@contextlib.contextmanager
def trainer_stage(trainer: pl.Trainer, stage: RunningStage | None) -> Iterator[None]:
    """The Trainer in ``stage`` for the block. The report scores its reference batches with none (as after ``fit``,
    though at train end and at segment boundaries it is still training), so transfer hooks that augment under
    ``self.trainer.training`` leave them as the queries after ``fit`` see them; the replay runs training's steps
    in ``TRAINING``."""
    saved = trainer.state.stage
    trainer.state.stage = stage
    try:
        yield
    finally:
        trainer.state.stage = saved


def convert_batch(trainer: pl.Trainer, batch: Any) -> Any:
    """A reference batch as the training loop converts a loader's batch before the transfer hooks (precision);
    the queries run those hooks and move it to the module's device (``batches.on_module_device``)."""
    return trainer.precision_plugin.convert_input(batch)


def reference_gradient(
    embeddings: DataValueEmbeddings,
    module: pl.LightningModule,
    batches: Iterable[Any],
    prepare: Callable[[Any], Any],
    max_samples: int,
    source: str,
    show_progress: bool,
) -> Reference:
    """Mean projected test-loss gradient over the first ``max_samples`` reference samples, ``{layer: [1, k_l]}``.

    ``g_ref = (1/n) sum_i grad l(theta_T, z_i)`` (per-sample gradients of the per-sample loss, projected), which
    is the gradient of the mean reference loss. ``prepare`` readies a batch for the query (precision).

    Raises:
        ConfigError: if the reference holds no sample, or its gradient is not finite.
    """
    sums: dict[str, torch.Tensor] = {}
    count = 0
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:  # a generator, or a DataLoader over an IterableDataset without __len__
        total = None
    with tqdm(total=total, desc="DVE reference gradient", disable=not show_progress, leave=False) as bar:
        for batch in batches:
            grads = embeddings.test_gradients(module, prepare(batch))
            rows = min(next(iter(grads.values())).shape[0], max_samples - count)
            for name, grad in grads.items():
                part = grad[:rows].detach().to("cpu", torch.float64).sum(dim=0, keepdim=True)
                sums[name] = sums[name] + part if name in sums else part
            count += rows
            bar.update(1)
            if count >= max_samples:
                break
    if count == 0:
        raise ConfigError(f"the reference set ({source}) holds no sample; pass a non-empty `reference=`.")
    if not all(bool(torch.isfinite(total_grad).all()) for total_grad in sums.values()):
        raise ConfigError(f"the reference gradient is not finite (NaN or inf) over {count} samples of {source}, e.g. "
                          "a NaN in the reference or validation data, or a loss that overflows at the final weights. "
                          "Clean the reference data (or pass a finite `reference=`).")
    return Reference({name: total_grad / count for name, total_grad in sums.items()}, count, source)


def check_training_loss(pl_module: pl.LightningModule, loss_batch: tuple[Any, int] | None,
                        embeddings: DataValueEmbeddings | None, report: bool) -> bool:
    """Test ``training_step``'s loss at train end on a training batch of two samples or more (``loss_batch``: the
    batch and the rows its tracked layers saw in training), as a query would
    (:func:`~lightning_dve.loss_checks.check_reduction`: the declared reduction's weights, no coupling of the
    samples, method.md §2), in eval mode, and warn: the recording used those weights. The report's reference
    batches may not test it (batches of one sample, or the report off). A ``training_step`` that is random or fails
    on two samples is left to the queries (said when the report is off). Compiled modules run eagerly here
    (``torch.compile`` leaves hooks out of its guards: a graph compiled without the capture's hooks would be reused
    by later queries).

    Returns:
        ``False`` where the loss is refused (then the report, ``report``, is skipped).
    """
    if embeddings is None or loss_batch is None:
        return True
    batch, rows = loss_batch
    params = [pl_module.get_submodule(name).weight for name in embeddings.store.layer_names]
    try:  # eagerly: a graph compiled now, with the capture's hooks detached, would be reused by the queries
        with modes(pl_module, None), eager():
            check_reduction(pl_module, batch, embeddings.config.loss_reduction, embeddings.loss_weights, params,
                            embeddings.test_ids(), rows)
    except LossReductionError as err:
        skipped = "the influence report is skipped: " if report else ""
        rank_zero_warn(f"DataValueEmbedding: {skipped}{err} (tested at train end on a training batch)")
        return False
    except Exception as err:  # noqa: BLE001 -- an optional check of a finished fit: the queries raise it
        if not report:
            rank_zero_info(f"DataValueEmbedding: the train-end check of training_step's loss reduction could not "
                           f"run on two training samples in eval mode ({type(err).__name__}: {err}); queries check "
                           "it on their test batches.")
    return True

