"""The Lightning callback: maps trainer hooks onto capture -> store -> recursion -> query. Nothing else."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

import torch

from . import batches, callback_setup, capture, distributed, reporting, sync
from .adam import adam_factors
from .checkpoints import CHECKPOINTS, CheckpointRecorder
from .config import (
    AUTO_FULL_MAX_DIM,
    DEFAULT_PROJECTION_DIM,
    AccumulatorLayout,
    Curvature,
    DVEConfig,
    LossReduction,
    ReportConfig,
    StorageDtype,
)
from .curvature import check_cross_entropy, sampled_label_grad
from .dynamics import plan_boundaries
from .errors import ConfigError, DVEError, GradientError
from .influence import DataValueEmbeddings
from .optim import clip_factor, grads_finite, is_adam
from .recursion import bounds_after, layer_groups, segment_bounds
from .replay_data import training_data_of
from .store import TrajectoryStore
from .updates import StepTerms, step_terms
from .writer import StepWriter


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
        layout: ``"auto"`` (default: ``"full"`` when the tracked layers have at most 4096 projected
            dimensions in all, else ``"per_layer"``), ``"per_layer"`` (one accumulation matrix per layer) or
            ``"full"`` (one for all layers, which also carries cross-layer curvature).
        allow_duplicate_ids: accept the same id twice in one step (sampling with replacement).
        seed: base seed of the projections.
        overwrite: allow a fresh ``fit`` into a non-empty ``save_dir`` (its store is replaced).
        storage_dtype: dtype of the stored gradients: ``"auto"`` (training dtype in exact mode, row-scaled
            float16 when projected), ``"float64"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        segments: influence checkpointing: run the train-end recursion in this many parallel segments; their
            boundaries also give the data value dynamics (:meth:`DataValueEmbeddings.influence_at`).
        curvature: the step Hessian of the recursion: ``"empirical_fisher"`` (the paper's, free),
            ``"ggn"`` (Gauss-Newton of a softmax cross-entropy on the last tracked layer's output, one extra
            activation backward per step and twice the stored rows) or ``"none"`` (:class:`Curvature`).
        report: what the train-end influence report computes and logs (:class:`ReportConfig`); ``None``
            disables it. It is written to ``<save_dir>/report/`` and to ``trainer.loggers`` on global rank 0.
        reference: a batch or a ``DataLoader`` whose mean test-loss gradient is the report's query; default the
            trainer's validation dataloader (at most ``report.max_reference_samples`` samples).
        describe: ``sample -> str`` text of a training sample (one row of a batch) for the top-k tables.
        checkpoint_interval: steps between the parameter and optimizer-state checkpoints of exact replay
            (:meth:`DataValueEmbeddings.exact_influence`): an int, ``"auto"`` (disk use at most 10% of the
            gradient store's) or ``None`` (off). Written on global rank 0 under ``save_dir/checkpoints/``.
        adam_second_moment: with Adam/AdamW in exact mode (``projection_dim=None``), also model each removed
            sample's effect on the second moment ``v`` (the "v pass" of the train-end recursion).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        sample_ids: str | batches.IdFn = "index",
        projection_dim: int | None = DEFAULT_PROJECTION_DIM,
        loss_reduction: str | LossReduction | batches.WeightFn = "mean",
        layers: tuple[str, ...] | list[str] | None = None,
        exclude: tuple[str, ...] | list[str] = (),
        layout: str | AccumulatorLayout = "auto",
        allow_duplicate_ids: bool = False,
        seed: int = 0,
        overwrite: bool = False,
        storage_dtype: str | StorageDtype = "auto",
        segments: int = 1,
        curvature: str | Curvature = "empirical_fisher",
        report: ReportConfig | None = ReportConfig(),
        reference: Any = None,
        describe: Callable[[Any], str] | None = None,
        checkpoint_interval: int | str | None = "auto",
        adam_second_moment: bool = False,
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
            curvature=curvature,
            checkpoint_interval=checkpoint_interval,
            adam_second_moment=adam_second_moment,
        )
        self._requested = self.config  # ``config`` is this with the layout resolved at each fit's start
        # "auto" keys like "per_layer", the earlier default, so checkpoints of earlier versions still find this state
        keyed = self.config.resolved(AUTO_FULL_MAX_DIM + 1)
        self._state_key = self._generate_state_key(settings_hash=keyed.settings_hash())
        if not (callable(sample_ids) or isinstance(sample_ids, str)):
            raise ConfigError(f"sample_ids must be a dict key (str) or a callable batch -> LongTensor[B]; got "
                              f"{sample_ids!r}.")
        self.sample_ids = sample_ids
        self.save_dir = save_dir
        self.overwrite = overwrite
        self.report_config, self.reference, self.describe = report, reference, describe
        self._store: TrajectoryStore | None = None
        self._writer: StepWriter | None = None  # appends steps to the store in a background thread
        self._capture: capture.GradientCapture | None = None
        self._assembler: sync.StepAssembler
        self._comm: distributed.Communicator = distributed.SingleProcess()
        self._owned: list[list[str]] = []
        self._dims: dict[str, int] = {}
        self._root: Path | None = None
        self._resume: dict[str, Any] | None = None
        self._deferred_write: DVEError | None = None  # rank 0's failed boundary-reference write, for the next check
        self._terms: StepTerms | None = None  # set by an optimizer step, consumed when the step is closed
        self._step = self._last_step = -1
        self._embeddings: DataValueEmbeddings | None = None
        self._boundaries: list[int] = []
        self._recorder: CheckpointRecorder | None = None  # replay checkpoints (global rank 0)
        self._training_data: Any = None
        self._train_started = 0.0
        self._batch: Any = None
        self._preconditioned = False  # projected Adam: rows through its preconditioner too (adam.py)
        self._ggn = False  # Gauss-Newton curvature rows (curvature.py)
        self._kinds: tuple[str, ...] = ()  # the rows a step records besides the gradients
        self._loss_scale = 1.0  # the grad scaler's factor on the loss the hooks see (fp16 AMP)
        self._skipped = False  # the grad scaler skips this step (non-finite gradients)
        self._deferred: DVEError | None = None  # non-finite rows of a scaled step: an error only if applied
        self._reached: set[str] = set()  # layers captured by the step's earlier micro-batches

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it at every hook: hashed once

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
                                  "DDP they are in rank 0's save_dir (use a shared one on other ranks); after strategy="
                                  "'ddp_spawn' the fit ran in child processes: here use DataValueEmbeddings.load("
                                  "save_dir) (save_dir=None is <trainer.default_root_dir>/dve).")
            self._embeddings = DataValueEmbeddings.load(root, self._weight_fn)
            self._embeddings.training_data = self._training_data
        return self._embeddings

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the same store. A failed step write is not raised here (in Lightning's
        save, on one rank): the next agreed check raises it, and resuming from this checkpoint is then refused."""
        if self._writer is not None:
            self._writer.wait()
        return {"save_dir": None if self._root is None else str(self._root), "last_step": self._last_step,
                "settings_hash": self.config.settings_hash(), "world_size": self._comm.world_size,
                "run_id": None if self._store is None else self._store.manifest.get("run_id")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the checkpoint's store state; ``on_fit_start`` continues that store."""
        self._resume = dict(state_dict)

    # --- fit lifecycle ---------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resume, self._resume = self._resume, None  # a refused resume is not retried by a later fit
        callback_setup.refuse_unsupported(trainer, pl_module, self.config)
        self._comm = distributed.communicator()
        tracked = capture.resolve_layers(pl_module, self.config)
        self._dims = {name: layer.projection.dim for name, layer in tracked.items()}
        self.config = self._requested.resolved(sum(self._dims.values()))
        self._ggn = self.config.curvature is Curvature.GGN
        groups = layer_groups(list(tracked), self.config.layout)
        self._owned = sync.assign_groups(groups, self._dims, self._comm.world_size)
        self._root = Path(self.save_dir) if self.save_dir is not None else Path(trainer.default_root_dir) / "dve"
        manifest = callback_setup.store_manifest(self.config, tracked, pl_module, self._comm, self._owned)
        self._store = callback_setup.open_rank_store(self._comm, self._root, manifest, resume, self.overwrite)
        self._writer = StepWriter(self._store, background=pl_module.device.type != "cpu")
        # exact mode applies Adam's preconditioner per coordinate; projected mode needs the preconditioned rows
        self._preconditioned = is_adam(trainer.optimizers[0]) and not self.config.exact
        self._kinds = capture.extra_row_kinds(self._ggn, self._preconditioned)
        self._assembler = sync.StepAssembler(self._comm, self._dims, self._owned[self._comm.rank],
                                             getattr(torch, manifest["dtype"]), self.config.allow_duplicate_ids,
                                             extra_kinds=self._kinds)
        if self._comm.rank == 0:  # replay checkpoints: parameters are the same on every rank
            after = None if resume is None else int(resume.get("last_step", -1))
            self._recorder = CheckpointRecorder(self._root / CHECKPOINTS, self.config.checkpoint_interval,
                                                self.config.settings_hash(), after,
                                                self.sample_ids if isinstance(self.sample_ids, str) else None,
                                                str(trainer.precision))
        self._capture = capture.GradientCapture(tracked)
        self._capture.attach()
        # a later fit starts afresh; a resumed one continues after the checkpoint's last step
        self._last_step = -1 if resume is None else int(resume.get("last_step", -1))
        self._embeddings, self._deferred_write = None, None
        # a fit that failed inside a step leaves that step's state behind: none of it belongs to this fit
        self._terms, self._skipped, self._deferred, self._step, self._reached = None, False, None, -1, set()
        callback_setup.warn_approximations(trainer, self._capture.modules())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback_setup.warn_sampler_padding(trainer)
        # segment boundaries are fixed now, so checkpoints can be aligned and the report can take references there
        self._boundaries = plan_boundaries(trainer.estimated_stepping_batches, self.config.segments)
        self._training_data = training_data_of(trainer.train_dataloader, self.sample_ids,
                                               partial(reporting.prepare_batch, trainer, pl_module))
        self._train_started = time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        capture.check_no_batchnorm_training(pl_module)
        hooks = self._active_capture()
        hooks.begin(keep_outputs=self._ggn)
        if self._preconditioned:
            hooks.set_preconditioner(adam_factors(trainer.optimizers[0], hooks.modules()))
        self._batch = batch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        hooks = self._active_capture()
        scaler = callback_setup.grad_scaler(trainer)
        self._loss_scale = 1.0 if scaler is None else float(scaler.get_scale())
        if self._ggn and hooks.outputs:  # Gauss-Newton rows from labels drawn from the model (curvature.py)
            ids = batches.extract_sample_ids(self._batch, self.sample_ids, hooks.outputs[-1].shape[0])
            hooks.curvature_backward(lambda logits: sampled_label_grad(logits, ids, self.config.seed,
                                                                       trainer.global_step))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        hooks = self._active_capture()
        reached = sync.reached_on_any_rank(self._comm, list(hooks.layers), self._reached | hooks.reached())
        hooks.check_all_reached(reached)  # a layer reached by no micro-batch of any rank, yet with a gradient
        self._skipped = callback_setup.grad_scaler(trainer) is not None and not grads_finite(optimizer)
        if self._last_step < 0 and trainer.accumulate_grad_batches == 1 and self._comm.world_size == 1 \
                and not self._skipped:
            hooks.check_blocks_sum_to_grad(self._loss_scale)  # once: tied or functionally used weights
        algorithm = callback_setup.clip_algorithm(trainer)
        clip = clip_factor(optimizer, trainer.gradient_clip_val, algorithm)
        self._terms = step_terms(optimizer, hooks.modules(), clip, self.config)
        self._step = trainer.global_step
        try:  # a resumed run's first step: both stores drop their later steps now (the replay checkpoints below)
            self._active_store().truncate_for_resume()
        except DVEError as err:  # raised at the step's end, where the ranks agree
            self._deferred_write = self._deferred_write or err
        if self._recorder is not None:
            clipping = {"value": trainer.gradient_clip_val, "algorithm": algorithm}
            self._recorder.before_step(self._step, pl_module, optimizer, clipping, clip)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        hooks, error = self._active_capture(), None
        try:
            self._check_writes()
            if hooks.captured:
                self._reached |= hooks.reached()
                self._assembler.add(self._micro_batch(trainer, batch))
            else:  # skipped micro-batch: training_step returned None
                hooks.abort()
            if self._terms is not None and not self._skipped and self._deferred is not None:
                raise self._deferred
        except DVEError as err:
            error = err
        sync.agree_on_errors(self._comm, error)
        if self._terms is None:  # accumulating, or no optimizer step happened
            return
        self._deferred, self._reached = None, set()
        if self._skipped or (not outputs and callback_setup.grad_scaler(trainer) is not None):
            self._assembler.discard()  # not applied: skipped by the scaler, or by Lightning (last micro-batch None)
            self._terms = None
            return
        record = self._assembler.close(self._step, self._terms.lrs, trainer.current_epoch, trainer.is_last_batch,
                                       self._terms.optim, self._terms.vectors)
        self._terms = None
        if record is not None:
            assert self._store is not None
            self._active_writer().append(record)
            self._last_step = record.step
            if self._recorder is not None:
                self._recorder.after_step(record, self._store.manifest["storage_dtype"], pl_module)
            if record.step in self._boundaries:  # rare: let the store catch up, then take the boundary reference
                self._active_writer().wait()  # a failed write is raised at the next (agreed) check
                try:  # rank 0 only: a failed write is raised at the next check, where the ranks agree
                    reporting.save_boundary_reference(trainer, pl_module, self._store, self.report_config,
                                                      self.reference, record.step)
                except DVEError as err:
                    self._deferred_write = err

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        store = self._store
        assert store is not None
        error = None
        try:
            self._check_writes()
            if self._recorder is not None:
                self._recorder.finish(trainer.global_step, pl_module, trainer.optimizers[0],
                                      time.perf_counter() - self._train_started)
            self._active_writer().close()  # every queued step is on disk before the store is finished
        except DVEError as err:
            error = err
        sync.agree_on_errors(self._comm, error)
        self._release()
        sync.agree_on_errors(self._comm, callback_setup.finish_store(store))  # only once every rank got here
        dtype = getattr(torch, store.manifest["dtype"])
        bounds = (bounds_after(store.steps, self._boundaries) if self._boundaries
                  else segment_bounds(len(store.steps), self.config.segments))
        sync.embed_trajectory(self._comm, store, self.config.layout, self._owned, self._dims, dtype, bounds,
                              progress=trainer.progress_bar_callback is not None)
        if self._comm.rank == 0:
            self._embeddings = DataValueEmbeddings(store, self._weight_fn)
            self._embeddings.training_data = self._training_data
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
        ids = batches.extract_sample_ids(batch, self.sample_ids, size)
        local = batches.reduction_weights(self.config.loss_reduction, batch, size, self._weight_fn)
        accumulation = trainer.accumulate_grad_batches
        scale = local * self._loss_scale / accumulation
        extra = {kind: hooks.take(kind, scale if kind == capture.GRADS_Q else None)
                 for kind in self._kinds}
        if self._ggn and hooks.logits is not None and hooks.logits[1] is not None:
            check_cross_entropy(hooks.logits[0], hooks.logits[1], scale)
        grads = hooks.finish(scale)
        step = self._step if self._terms is not None else trainer.global_step
        try:
            for rows in (grads, *extra.values()):
                batches.check_finite(rows, ids, step)
        except GradientError as err:
            if callback_setup.grad_scaler(trainer) is None:
                raise
            self._deferred = err  # a scaled fp16 step may overflow; the scaler then skips it
        return sync.MicroBatch(ids, local / (accumulation * self._comm.world_size), grads, extra)

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.detach()
        if self._recorder is not None:
            self._recorder.store.close()
        if self._writer is not None:  # on an exception: keep what was queued, raise nothing new
            self._writer.close(raise_error=False)

    def _check_writes(self) -> None:
        """Raise a write that failed since the last check: the step store's (e.g. a full disk), and on rank 0 the
        replay checkpoints' or a boundary reference's. Called where the ranks agree on errors."""
        self._active_writer().check()
        if self._recorder is not None:
            self._recorder.check()
        error, self._deferred_write = self._deferred_write, None
        if error is not None:
            raise error

    def _active_store(self) -> TrajectoryStore:
        assert self._store is not None, "on_fit_start has not run"
        return self._store

    def _active_writer(self) -> StepWriter:
        assert self._writer is not None, "on_fit_start has not run"
        return self._writer

    def _active_capture(self) -> capture.GradientCapture:
        assert self._capture is not None, "on_fit_start has not run"
        return self._capture
