"""Opening a recorded run for exact replay: its checkpoints, and a :class:`~lightning_dve.replay.Replayer` of it,
after the checks that it can be replayed at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .batches import WeightFn
from .checkpoints import AUTOCAST_PRECISION, DOUBLE_PRECISION, CheckpointStore
from .config import LossReduction
from .errors import ConfigError, StoreError, UnsupportedError
from .replay import Replayer, TrainLossFn
from .replay_data import BatchSource, TrainingData, step_losses
from .store import CHECKPOINTS, TrajectoryStore


def open_checkpoints(root: Path, interval: int | str | None) -> CheckpointStore:
    """The replay checkpoints of the store at ``root``, refusing a run that cannot be replayed exactly.

    Raises:
        ConfigError: if checkpoints were turned off (``checkpoint_interval=None``).
        UnsupportedError: for an optimizer the replay does not model.
        StoreError: if the checkpoints are missing or training did not finish.
    """
    if interval is None:
        raise ConfigError("this run was recorded with checkpoint_interval=None (no replay checkpoints), so "
                          "exact_influence and replay_embeddings cannot replay it. Record it again with "
                          "checkpoint_interval='auto' (the default) or an int number of steps between checkpoints.")
    checkpoints = CheckpointStore.open(root / CHECKPOINTS)
    manifest = checkpoints.manifest
    if why := manifest.get("refusal") or manifest.get("lost"):
        raise UnsupportedError(f"exact replay is refused for this run: {why}")
    if manifest.get("final_step") is None:
        raise StoreError(f"the replay checkpoints in {checkpoints.root} have no final state: training did not "
                         "finish. Record the run again.")
    return checkpoints


def make_replayer(store: TrajectoryStore, interval: int | str | None, module: nn.Module, data: TrainingData | None,
                  train_loss_fn: TrainLossFn | None, reduction: LossReduction, weight_fn: WeightFn | None) -> Replayer:
    """A :class:`Replayer` of the recorded run, after checking that it can be replayed (arguments as in
    :meth:`lightning_dve.DataValueEmbeddings.exact_influence`)."""
    checkpoints = open_checkpoints(store.root, interval)
    sparse = [name for name, m in module.named_modules() if getattr(m, "sparse", False) is True
              and any(p.requires_grad for p in m.parameters(recurse=False))]
    if sparse:  # (tracked layers refuse sparse=True at fit start; untracked ones are trained all the same)
        raise UnsupportedError(f"modules {sparse} train with sparse gradients (sparse=True), which the replay's "
                               "vector-Jacobian products cannot carry. Train them with sparse=False to replay the run.")
    if data is not None and not (data.sample_ids is None or isinstance(data.sample_ids, str)
                                 or callable(data.sample_ids)):
        raise ConfigError(f"sample_ids must be a dict key (str) or a callable batch -> LongTensor[B], as given to the "
                          f"callback; got {data.sample_ids!r}.")
    if data is not None and data.sample_ids is None:  # after load: the recorded sample_ids key, if it was one
        data = dataclasses.replace(data, sample_ids=checkpoints.manifest.get("sample_ids"))
    if data is None or (data.dataset is None and store.steps):  # a fit that trained no step has nothing to rebuild
        raise ConfigError("exact replay needs the training dataset to rebuild the recorded batches: pass "
                          "dataset= (after load, in the parent process of strategy='ddp_spawn', whose fit ran in "
                          "child processes, or where the training dataloader yields whole batches, batch_size=None; "
                          "after fit it defaults to the training dataloader's dataset).")
    precision = checkpoints.manifest.get("precision")  # float64 inputs as training converted them; bf16 autocast
    source = BatchSource(data, next(module.parameters()).device, torch.float64 if precision in DOUBLE_PRECISION
                         else None)
    losses = step_losses(source, reduction, weight_fn, train_loss_fn, precision == AUTOCAST_PRECISION)
    replayer = Replayer(module, store, checkpoints, source, losses, per_sample_forwards=train_loss_fn is None)
    if store.steps:
        source.check(replayer.record(store.steps[0])[0])
    return replayer
