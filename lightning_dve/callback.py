"""The Lightning callback: maps trainer hooks onto capture -> store -> recursion -> query. Nothing else."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import torch
from torch.utils.data import DistributedSampler

from . import capture, distributed, reporting, sync
from .config import (
    DEFAULT_PROJECTION_DIM,
    AccumulatorLayout,
    DVEConfig,
    LossReduction,
    ReportConfig,
    StorageDtype,
)
from .errors import ConfigError, DVEError, UnsupportedError
from .influence import DataValueEmbeddings
from .optim import clip_factor, sgd_proxy_reason, step_terms, uses_momentum_or_decay
from .dynamics import plan_boundaries
from .recursion import bounds_after, layer_groups, segment_bounds
from .store import SHARDS, STEPS, TrajectoryStore

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
        storage_dtype: dtype of the stored gradients: ``"auto"`` (training dtype in exact mode, row-scaled
            float16 when projected), ``"float64"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        segments: influence checkpointing: run the train-end recursion in this many parallel segments; their
            boundaries also give the data value dynamics (:meth:`DataValueEmbeddings.influence_at`).
        report: what the train-end influence report computes and logs (:class:`ReportConfig`); ``None``
            disables it. It is written to ``<save_dir>/report/`` and to ``trainer.loggers`` on global rank 0.
        reference: a batch or a ``DataLoader`` whose mean test-loss gradient is the report's query; default the
            trainer's validation dataloader (at most ``report.max_reference_samples`` samples).
        describe: ``sample -> str`` text of a training sample (one row of a batch) for the top-k tables.
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
        storage_dtype: str | StorageDtype = "auto",
        segments: int = 1,
        report: ReportConfig | None = ReportConfig(),
        reference: Any = None,
        describe: Callable[[Any], str] | None = None,
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
            storage_dtype=storage_dtype,
            segments=segments,
        )
        if not (callable(sample_ids) or isinstance(sample_ids, str)):
            raise ConfigError(f"sample_ids must be a dict key (str) or a callable batch -> LongTensor[B]; got "
                              f"{sample_ids!r}.")
        self.sample_ids = sample_ids
        self.save_dir = save_dir
        self.overwrite = overwrite
        self.report_config, self.reference, self.describe = report, reference, describe
        self._store: TrajectoryStore | None = None
        self._capture: capture.GradientCapture | None = None
        self._assembler: sync.StepAssembler
        self._comm: distributed.Communicator = distributed.SingleProcess()
        self._owned: list[list[str]] = []
        self._dims: dict[str, int] = {}
        self._root: Path | None = None
        self._resume: dict[str, Any] | None = None
        self._step_lrs: torch.Tensor | None = None
        self._step_optim: dict[str, torch.Tensor] = {}
        self._step = -1
        self._last_step = -1
        self._embeddings: DataValueEmbeddings | None = None
        self._boundaries: list[int] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(settings_hash=self.config.settings_hash())

    @property
    def embeddings(self) -> DataValueEmbeddings:
        """The embeddings of the last finished ``fit`` (on any rank: read from rank 0's ``save_dir``).

        Raises:
            ConfigError: if no ``fit`` has finished, or this rank cannot see rank 0's ``save_dir``.
        """
        if self._embeddings is None:
            root = self._root or (Path(self.save_dir) if self.save_dir is not None else None)
            if root is None or not (root / "manifest.json").is_file():
                raise ConfigError(f"no embeddings at {root}: call trainer.fit(...) with this callback first. Under "
                                  "DDP they live in rank 0's save_dir; on other ranks use a shared save_dir, or "
                                  "DataValueEmbeddings.load(save_dir) on rank 0.")
            self._embeddings = DataValueEmbeddings.load(root, self._weight_fn)
        return self._embeddings

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the same store."""
        return {"save_dir": None if self._root is None else str(self._root), "last_step": self._last_step,
                "settings_hash": self.config.settings_hash(), "world_size": self._comm.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the checkpoint's store state; ``on_fit_start`` continues that store."""
        self._resume = dict(state_dict)

    # --- fit lifecycle ---------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse_unsupported(trainer, pl_module, self.config.segments)
        self._comm = distributed.communicator()
        tracked = capture.resolve_layers(pl_module, self.config)
        self._dims = {name: layer.projection.dim for name, layer in tracked.items()}
        groups = layer_groups(list(tracked), self.config.layout)
        self._owned = sync.assign_groups(groups, self._dims, self._comm.world_size)
        self._root = Path(self.save_dir) if self.save_dir is not None else Path(trainer.default_root_dir) / "dve"
        manifest = self._manifest(tracked, pl_module)
        self._store = self._open_store(manifest)
        self._assembler = sync.StepAssembler(self._comm, self._dims, self._owned[self._comm.rank],
                                             getattr(torch, manifest["dtype"]), self.config.allow_duplicate_ids)
        self._capture = capture.GradientCapture(tracked)
        self._capture.attach()
        self._embeddings = None
        _warn_approximations(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _warn_sampler_padding(trainer)
        # segment boundaries are fixed now, so checkpoints can be aligned and the report can take references there
        self._boundaries = plan_boundaries(trainer.estimated_stepping_batches, self.config.segments)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        capture.check_no_batchnorm_training(pl_module)
        self._active_capture().begin()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        hooks = self._active_capture()
        hooks.check_all_reached()
        if self._last_step < 0 and trainer.accumulate_grad_batches == 1 and self._comm.world_size == 1:
            hooks.check_blocks_sum_to_grad()  # once: tied or functionally used weights
        clip = clip_factor(optimizer, trainer.gradient_clip_val, _clip_algorithm(trainer))
        self._step_lrs, self._step_optim = step_terms(optimizer, hooks.weights(), clip)
        self._step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        hooks, error = self._active_capture(), None
        try:
            if hooks.captured:
                self._assembler.add(self._micro_batch(trainer, batch))
            else:  # skipped micro-batch: training_step returned None
                hooks.abort()
        except DVEError as err:
            error = err
        sync.agree_on_errors(self._comm, error)
        if self._step_lrs is None:  # accumulating, or no optimizer step happened
            return
        record = self._assembler.close(self._step, self._step_lrs, trainer.current_epoch, trainer.is_last_batch,
                                       self._step_optim)
        self._step_lrs = None
        if record is not None:
            assert self._store is not None
            self._store.append(record)
            self._last_step = record.step
            if record.step in self._boundaries:
                reporting.save_boundary_reference(trainer, pl_module, self._store, self.report_config, self.reference)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        store = self._store
        assert store is not None
        self._release()
        steps_bytes = store.bytes_on_disk(STEPS)
        per_step = steps_bytes // max(1, len(store.steps))
        store.finish_recording({"bytes_total": steps_bytes, "bytes_per_step": per_step})
        rank_zero_info(f"DataValueEmbedding: recorded {len(store.steps)} steps in {store.root}: "
                       f"{steps_bytes / 2**20:.1f} MiB ({per_step / 2**10:.1f} KiB per step) on rank 0.")
        dtype = getattr(torch, store.manifest["dtype"])
        bounds = (bounds_after(store.steps, self._boundaries) if self._boundaries
                  else segment_bounds(len(store.steps), self.config.segments))
        sync.embed_trajectory(self._comm, store, self.config.layout, self._owned, self._dims, dtype, bounds,
                              progress=trainer.progress_bar_callback is not None)
        if self._comm.rank == 0:
            self._embeddings = DataValueEmbeddings(store, self._weight_fn)
        reporting.report_train_end(trainer, pl_module, self._embeddings, self.report_config, self.reference,
                                   self.describe, self.sample_ids)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    # --- helpers -----------------------------------------------------------------------------------------

    def _micro_batch(self, trainer: pl.Trainer, batch: Any) -> sync.MicroBatch:
        """Close one micro-batch: ids, the weight the optimizer applies (method.md §2), per-sample gradients.

        The loss the hooks saw is ``sum_i w_i l_i / n`` (``n`` micro-batches); DDP then averages over ``W``
        ranks, so the applied weight is ``w_i / (n W)``.
        """
        hooks = self._active_capture()
        size = hooks.batch_size()
        ids = capture.extract_sample_ids(batch, self.sample_ids, size)
        local = capture.reduction_weights(self.config.loss_reduction, batch, size, self._weight_fn)
        accumulation = trainer.accumulate_grad_batches
        grads = hooks.finish(local / accumulation)
        capture.check_finite(grads, ids, self._step if self._step_lrs is not None else trainer.global_step)
        return sync.MicroBatch(ids, local / (accumulation * self._comm.world_size), grads)

    def _manifest(self, tracked: dict[str, capture.TrackedLayer], pl_module: pl.LightningModule) -> dict[str, Any]:
        """The store manifest: settings, layers and projections, this rank's share, dtypes."""
        training_dtype = str(torch.promote_types(pl_module.dtype, torch.float32)).removeprefix("torch.")
        return {"settings": self.config.to_dict(), "settings_hash": self.config.settings_hash(),
                "layers": [layer.describe() for layer in tracked.values()], "world_size": self._comm.world_size,
                "rank": self._comm.rank, "owned_layers": self._owned[self._comm.rank], "dtype": training_dtype,
                "storage_dtype": self.config.storage_dtype.resolve(training_dtype, self.config.exact).value}

    def _open_store(self, manifest: dict[str, Any]) -> TrajectoryStore:
        """Create (or, after a checkpoint restore, reopen) this rank's store; rank 0's is ``save_dir``."""
        assert self._root is not None
        rank = self._comm.rank
        root = self._root if rank == 0 else self._root / SHARDS / f"rank_{rank}"
        store, error = None, None
        if rank == 0 or self._resume is not None:
            store, error = self._try_open(root, manifest)
        sync.agree_on_errors(self._comm, error)  # rank 0 has checked and cleared save_dir before others write
        if store is None:
            store, error = self._try_open(root, manifest)
        sync.agree_on_errors(self._comm, error)
        assert store is not None
        return store

    def _try_open(self, root: Path, manifest: dict[str, Any]) -> tuple[TrajectoryStore | None, DVEError | None]:
        try:
            if self._resume is None:
                return TrajectoryStore.create(root, manifest, overwrite=self.overwrite), None
            return resume_store(root, self._resume, self.config.settings_hash(), self._comm.world_size), None
        except DVEError as err:
            return None, err

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.detach()

    def _active_capture(self) -> capture.GradientCapture:
        assert self._capture is not None, "on_fit_start has not run"
        return self._capture


def _warn_approximations(trainer: pl.Trainer) -> None:
    """Warn once about what the recursion models only approximately: non-SGD optimizers, value clipping."""
    reason = sgd_proxy_reason(trainer.optimizers[0])
    if reason is not None:
        rank_zero_warn(f"DataValueEmbedding: {reason}; it is treated as plain SGD with its current learning rate "
                       "(method.md §2 is exact for plain SGD only).")
    if trainer.gradient_clip_val and _clip_algorithm(trainer) == "value":
        rank_zero_warn("DataValueEmbedding: gradient_clip_algorithm='value' clips each coordinate, which is not a "
                       "scale of the update; the recursion ignores it. Use 'norm' clipping for an exact step.")


def _clip_algorithm(trainer: pl.Trainer) -> str | None:
    """The trainer's clipping algorithm as a plain string (``"norm"``, ``"value"`` or ``None``)."""
    algorithm = trainer.gradient_clip_algorithm
    return None if algorithm is None else str(getattr(algorithm, "value", algorithm))


def _warn_sampler_padding(trainer: pl.Trainer) -> None:
    """Warn (once per fit) when a ``DistributedSampler`` repeats samples to even out the ranks."""
    sampler = getattr(trainer.train_dataloader, "sampler", None)
    padded = sampler.total_size - len(sampler.dataset) if isinstance(sampler, DistributedSampler) else 0
    if padded > 0:
        rank_zero_warn(f"DataValueEmbedding: the DistributedSampler repeats {padded} sample(s) per epoch to give every "
                       "rank the same count; those copies are trained on, so each is kept as its own occurrence.")


def resume_store(root: Path, state: dict[str, Any], settings_hash: str, world_size: int) -> TrajectoryStore:
    """Reopen the store a checkpoint points to, after checking it was written with the same setup.

    Raises:
        ConfigError: if the checkpoint was recorded with other callback settings or another world size.
    """
    if state.get("settings_hash") != settings_hash:
        raise ConfigError(f"the checkpoint's DataValueEmbedding was recorded with settings {state.get('settings_hash')}"
                          f", this callback has {settings_hash}: resuming would mix two recordings. Resume with the "
                          "same callback arguments, or start a fresh fit without ckpt_path.")
    if state.get("world_size") != world_size:
        raise ConfigError(f"the checkpoint was recorded on {state.get('world_size')} process(es), this run has "
                          f"{world_size}: the store is sharded by rank. Resume with the same number of devices.")
    return TrajectoryStore.reopen(root, int(state.get("last_step", -1)))


def _refuse_unsupported(trainer: pl.Trainer, pl_module: pl.LightningModule, segments: int) -> None:
    """Refuse training setups the recursion would get wrong (each one lands with a later release).

    Raises:
        UnsupportedError: naming the setting and what to change.
    """
    problems = []
    if segments > 1 and trainer.optimizers and uses_momentum_or_decay(trainer.optimizers[0]):
        problems.append(f"segments={segments} with SGD momentum or weight decay (use segments=1)")
    if not pl_module.automatic_optimization:
        problems.append("manual optimization (use automatic optimization)")
    if len(trainer.optimizers) != 1:
        problems.append(f"{len(trainer.optimizers)} optimizers (use exactly one)")
    if str(trainer.precision) not in _SUPPORTED_PRECISION:
        problems.append(f"precision={trainer.precision!r} (use '32-true' or '64-true')")
    if problems:
        raise UnsupportedError("DataValueEmbedding does not support " + "; ".join(problems) + " yet: the recorded "
                               "gradients would not match the update the optimizer applied.")
