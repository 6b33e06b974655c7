"""The Lightning callback: maps trainer hooks onto capture -> store -> recursion -> query. Nothing else."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_dve import capture
from lightning_dve.config import DEFAULT_PROJECTION_DIM, AccumulatorLayout, DVEConfig, LossReduction
from lightning_dve.errors import ConfigError, UnsupportedError
from lightning_dve.influence import DataValueEmbeddings
from lightning_dve.optim import layer_learning_rates, sgd_proxy_reason
from lightning_dve.recursion import compute_embeddings
from lightning_dve.store import STEPS, StepRecord, TrajectoryStore

_SUPPORTED_PRECISION = ("32-true", "32", "64-true", "64")


class DataValueEmbedding(pl.Callback):
    """Record per-sample gradients during ``fit`` and turn them into data value embeddings at train end.

    Args:
        save_dir: store directory; ``None`` means ``<trainer.default_root_dir>/dve``.
        sample_ids: key of the dataset indices in a dict batch, or ``batch -> LongTensor[B]``.
        projection_dim: Kronecker-projected size **per tracked layer** (default 1024); ``None`` stores exact
            per-sample gradients in the training dtype.
        loss_reduction: how ``training_step``'s loss reduces over the batch: ``"mean"``, ``"sum"``, or
            ``batch -> Tensor[B]`` of per-sample weights (e.g. token-mean language-model losses).
        layers: module names to track; default every supported module with trainable parameters.
        exclude: module names (``fnmatch`` patterns, children included) not to track.
        layout: ``"per_layer"`` (one accumulation matrix per layer) or ``"full"`` (one for all layers).
        allow_duplicate_ids: accept the same id twice in one step (sampling with replacement).
        seed: base seed of the projections.
        overwrite: allow a fresh ``fit`` into a non-empty ``save_dir`` (its store is replaced).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        sample_ids: str | capture.IdFn = "index",
        projection_dim: int | None = DEFAULT_PROJECTION_DIM,
        loss_reduction: str | LossReduction | capture.WeightFn = "mean",
        layers: tuple[str, ...] | list[str] | None = None,
        exclude: tuple[str, ...] | list[str] = (),
        layout: str | AccumulatorLayout = "per_layer",
        allow_duplicate_ids: bool = False,
        seed: int = 0,
        overwrite: bool = False,
    ) -> None:
        self._weight_fn = loss_reduction if callable(loss_reduction) else None
        self.config = DVEConfig(
            projection_dim=projection_dim,
            loss_reduction=LossReduction.WEIGHTS if self._weight_fn else loss_reduction,
            layers=None if layers is None else tuple(layers),
            exclude=tuple(exclude),
            layout=layout,
            allow_duplicate_ids=allow_duplicate_ids,
            seed=seed,
        )
        if not (callable(sample_ids) or isinstance(sample_ids, str)):
            raise ConfigError(f"sample_ids must be a dict key (str) or a callable batch -> LongTensor[B]; got "
                              f"{sample_ids!r}.")
        self.sample_ids = sample_ids
        self.save_dir = save_dir
        self.overwrite = overwrite
        self._store: TrajectoryStore | None = None
        self._capture: capture.GradientCapture | None = None
        self._step_lrs: Any = None
        self._step: int = -1
        self._embeddings: DataValueEmbeddings | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(settings_hash=self.config.settings_hash())

    @property
    def embeddings(self) -> DataValueEmbeddings:
        """The embeddings of the last finished ``fit``.

        Raises:
            ConfigError: if no ``fit`` has finished with this callback yet.
        """
        if self._embeddings is None:
            raise ConfigError("no embeddings yet: call trainer.fit(...) with this callback first, or load a finished "
                              "store with DataValueEmbeddings.load(save_dir).")
        return self._embeddings

    # --- fit lifecycle ---------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse_unsupported(trainer, pl_module)
        tracked = capture.resolve_layers(pl_module, self.config)
        root = Path(self.save_dir) if self.save_dir is not None else Path(trainer.default_root_dir) / "dve"
        manifest = {"settings": self.config.to_dict(), "settings_hash": self.config.settings_hash(),
                    "layers": [layer.describe() for layer in tracked.values()]}
        self._store = TrajectoryStore.create(root, manifest, overwrite=self.overwrite)
        self._capture = capture.GradientCapture(tracked)
        self._capture.attach()
        self._embeddings = None
        reason = sgd_proxy_reason(trainer.optimizers[0])
        if reason is not None:
            rank_zero_warn(f"DataValueEmbedding: {reason}; it is treated as plain SGD with its current learning rate "
                           "(method.md §2 is exact for plain SGD only).")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        capture.check_no_batchnorm_training(pl_module)
        self._step_lrs = None
        self._active_capture().begin()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        hooks = self._active_capture()
        hooks.check_all_reached()
        self._step_lrs = layer_learning_rates(optimizer, hooks.weights())
        self._step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        hooks = self._active_capture()
        if self._step_lrs is None or not hooks.captured:  # skipped step: no backward or no optimizer step
            hooks.abort()
            return
        batch_size = hooks.batch_size()
        ids = capture.extract_sample_ids(batch, self.sample_ids, batch_size)
        if not self.config.allow_duplicate_ids:
            capture.check_unique(ids, self._step)
        weights = capture.reduction_weights(self.config.loss_reduction, batch, batch_size, self._weight_fn)
        grads = hooks.finish(weights)
        capture.check_finite(grads, ids, self._step)
        assert self._store is not None
        self._store.append(StepRecord(self._step, ids, weights, self._step_lrs, grads, trainer.current_epoch))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        store = self._store
        assert store is not None
        self._release()
        steps_bytes = store.bytes_on_disk(STEPS)
        store.finish_recording({"bytes_total": steps_bytes,
                                "bytes_per_step": steps_bytes // max(1, len(store.steps))})
        compute_embeddings(store, self.config.layout)
        self._embeddings = DataValueEmbeddings(store, self._weight_fn)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.detach()

    def _active_capture(self) -> capture.GradientCapture:
        assert self._capture is not None, "on_fit_start has not run"
        return self._capture


def _refuse_unsupported(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse training setups the recursion would get wrong (each one lands with a later release).

    Raises:
        UnsupportedError: naming the setting and what to change.
    """
    problems = []
    if trainer.world_size > 1:
        problems.append(f"{trainer.world_size} processes (use devices=1, num_nodes=1)")
    if trainer.accumulate_grad_batches > 1:
        problems.append(f"accumulate_grad_batches={trainer.accumulate_grad_batches} (use 1)")
    if not pl_module.automatic_optimization:
        problems.append("manual optimization (use automatic optimization)")
    if len(trainer.optimizers) != 1:
        problems.append(f"{len(trainer.optimizers)} optimizers (use exactly one)")
    if str(trainer.precision) not in _SUPPORTED_PRECISION:
        problems.append(f"precision={trainer.precision!r} (use '32-true' or '64-true')")
    if problems:
        raise UnsupportedError("DataValueEmbedding does not support " + "; ".join(problems) + " yet: the recorded "
                               "gradients would not match the update the optimizer applied.")
