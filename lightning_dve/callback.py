"""The Lightning callback: maps trainer hooks onto capture -> store -> recursion -> query. Nothing else.

The per-step hooks are in ``callback_step.py``; this module holds the fit's lifecycle."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

import torch

from . import (batches, callback_segments, callback_setup, callback_store, capture, distributed, recursion_ranks,
               reporting, reporting_reference, sync)
from .call_checks import model_tables
from .callback_step import StepHooks, summarise_scaler_skips
from .checkpoints import CheckpointRecorder
from .config import (AUTO_FULL_MAX_DIM, DEFAULT_PROJECTION_DIM, AccumulatorLayout, Curvature, DVEConfig,
                     EmbeddingMethod, LossReduction, ReportConfig, StorageDtype)
from .curvature import Probe
from .errors import ConfigError, DVEError
from .guards import StepGuard
from .influence import DataValueEmbeddings
from .model_checks import batchnorm_modules, watched_parameters
from .optim import GradMarks, is_adam
from .recursion import layer_groups
from .records import accumulation_dtype
from .store import CHECKPOINTS, TrajectoryStore
from .store_checks import TRAIN_END
from .updates import StepTerms
from .writer import StepWriter


class DataValueEmbedding(StepHooks):
    """Record per-sample gradients during ``fit`` and turn them into data value embeddings at train end.

    The per-step hooks are :class:`lightning_dve.callback_step.StepHooks`; this class holds the fit's lifecycle.

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
            gradient store's) or ``None`` (off). Written on global rank 0 under ``save_dir/checkpoints/`` (with
            ``embeddings="replay"`` under DDP, every rank writes its own copy into its shard).
        adam_second_moment: with Adam/AdamW in exact mode (``projection_dim=None``), also model each removed
            sample's effect on the second moment ``v`` (the "v pass" of the train-end recursion).
        embeddings: ``"recursion"`` (the backward recursion, any model) or ``"replay"`` (then replaced, before
            the report, by embeddings with every update's true curvature,
            :meth:`DataValueEmbeddings.replay_embeddings`: small models; under DDP each rank carries back the
            rows of the layers it owns; :class:`EmbeddingMethod`).
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
        embeddings: str | EmbeddingMethod = "recursion",
    ) -> None:
        self._weight_fn = loss_reduction if callable(loss_reduction) else None
        self.config = DVEConfig(  # it refuses a bare string for layers (tuple() would split it into characters)
            projection_dim=projection_dim, loss_reduction=loss_reduction, layers=layers, exclude=exclude,
            layout=layout, allow_duplicate_ids=allow_duplicate_ids, seed=seed, storage_dtype=storage_dtype,
            segments=segments, curvature=curvature, checkpoint_interval=checkpoint_interval,
            adam_second_moment=adam_second_moment)
        if self._weight_fn is None and self.config.loss_reduction is LossReduction.WEIGHTS:
            raise ConfigError("loss_reduction='weights' names what a callable gives: pass the callable itself, "
                              "batch -> Tensor[B] of each sample's weight in the loss.")
        self.embedding_method = callback_setup.embedding_method(embeddings, self.config)
        self._requested = self.config  # ``config`` is this with the layout resolved at each fit's start
        # "auto" keys like "per_layer", the earlier default; the save_dir parts callbacks whose settings key alike
        keyed = self.config.resolved(AUTO_FULL_MAX_DIM + 1)
        self._state_key = self._generate_state_key(settings_hash=keyed.settings_hash(),
                                                   save_dir=None if save_dir is None else str(save_dir))
        callback_setup.check_arguments(sample_ids, report, describe, save_dir, overwrite, reference)
        self.sample_ids, self.save_dir, self.overwrite = sample_ids, save_dir, overwrite
        self.report_config, self.reference, self.describe = report, reference, describe
        self._store: TrajectoryStore | None = None
        self._writer: StepWriter | None = None  # appends steps to the store in a background thread
        self._capture: capture.GradientCapture | None = None
        self._guard: StepGuard | None = None  # the applied update is the recorded one (guards.py)
        self._batchnorms: dict[str, torch.nn.Module] = {}  # checked for train mode at every step
        self._factor: float | None = None  # modelled applied/backward gradient ratio of the step (None: unchecked)
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
        self._fit_error: BaseException | None = None  # what this callback's last fit raised
        self._boundaries, self._boundary_weights = [], {}  # segment boundaries (steps) and the weights there
        self._planned_steps = -1.0  # the steps they were planned for (trainer.estimated_stepping_batches)
        self._recorder: CheckpointRecorder | None = None  # replay checkpoints (rank 0; every rank with "replay")
        self._training_data: Any = None
        self._train_started, self._resumed, self._train_ended, self._fit_pending = 0.0, False, False, False
        self._batch: Any = None
        self._batch_start: Any = None  # its top level as it started (batch_trees.shallow_copy)
        self._loss_batch: Any = None  # the last training micro-batch of 2 samples or more, its rows (loss check)
        self._backwards = 0  # the micro-batch's backward passes (more than one: its closure was evaluated again)
        self._inner_backward = False  # its training_step ran a backward through the tracked layers itself
        self._preconditioned = False  # projected Adam: rows through its preconditioner too (adam.py)
        self._ggn = False  # Gauss-Newton curvature rows (curvature.py)
        self._probe: Probe | None = None  # the loss's curvature at the logits in this micro-batch (curvature.py)
        self._kinds: tuple[str, ...] = ()  # the rows a step records besides the gradients
        self._loss_scale = 1.0  # the grad scaler's factor on the loss the hooks see (fp16 AMP)
        self._skipped = False  # the grad scaler skips this step (non-finite gradients)
        self._scaler_skips: list[tuple[int, bool]] = []  # the steps it skipped (callback_step)
        self._applied_scale = 0.0  # the highest loss scale a step was applied at
        self._split_biases: set[str] = set()  # layers warned about a bias in another param group (callback_setup)
        self._deferred: DVEError | None = None  # non-finite rows of a scaled step: an error only if applied
        self._reached: set[str] = set()  # layers captured by the step's earlier micro-batches
        self._grad_marks: GradMarks = []  # their gradients at the last micro-batch's end (optim.gradients_reset)

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it at every hook: hashed once

    @property
    def embeddings(self) -> DataValueEmbeddings:
        """The embeddings of the last finished ``fit`` (on any rank: read from rank 0's ``save_dir``).

        Raises:
            ConfigError: if no ``fit`` has finished (the last failed), or this rank cannot see rank 0's save_dir.
        """
        root = self._root or callback_store.spawned_fit_root(self.save_dir)
        callback_store.refuse_after_failed_fit(root, self._fit_error if self._embeddings is None else None)
        if self._embeddings is not None and self._root is None and not (
                self._embeddings.is_current() and self._embeddings.store.root == root):
            self._embeddings = None  # no fit ran here (ddp_spawn runs them in child processes): a later one did
        if self._embeddings is None:
            if root is None or not (root / "manifest.json").is_file():
                raise ConfigError(f"no embeddings at {root}: call trainer.fit(...) with this callback first. Under "
                                  "DDP they are in rank 0's save_dir (use a shared one on other ranks); after strategy="
                                  "'ddp_spawn' the fit ran in child processes: here use DataValueEmbeddings.load("
                                  "save_dir) (save_dir=None is <trainer.default_root_dir>/dve).")
            with warnings.catch_warnings():  # another rank's fit returns while rank 0 reports, its marker still set
                if self._comm.rank > 0 and self._train_ended:
                    warnings.filterwarnings("ignore", message=".*its fit had not finished its train end")
                self._embeddings = DataValueEmbeddings.load(root, self._weight_fn, sample_ids=self.sample_ids)
            self._embeddings.training_data = self._training_data
        return self._embeddings

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the same store. A failed step write is not raised here (in Lightning's
        save, on one rank): the next agreed check raises it, and resuming from this checkpoint is then refused."""
        if self._writer is not None:
            self._writer.wait()
        return {"save_dir": None if self._root is None else str(self._root), "last_step": self._last_step,
                "settings_hash": self.config.settings_hash(), "world_size": self._comm.world_size,
                "run_id": None if self._store is None else self._store.manifest.get("run_id"),
                "recorded_steps": None if self._store is None else sum(s <= self._last_step for s in self._store.steps),
                "before_fit": self._fit_pending, "boundaries": self._boundaries, "planned_steps": self._planned_steps,
                "boundary_weights": self._boundary_weights, "open_step": self._step  # a step not recorded yet
                if self._terms is not None and not self._skipped else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the checkpoint's store state; ``on_fit_start`` continues that store."""
        self._resume = dict(state_dict)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # a recording under other settings has another state key, so Lightning would not pass it to
        # ``load_state_dict``: resuming must still refuse it rather than start a store afresh (validate, test and
        # predict restore checkpoints too, but resume nothing)
        if trainer.state.fn == TrainerFn.FITTING:
            hashes = {self._requested.resolved(dim).settings_hash() for dim in (1, AUTO_FULL_MAX_DIM + 1)}
            self._resume = callback_store.recording_in(checkpoint, self.state_key, self._store_root(trainer), hashes)

    # --- fit lifecycle ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit_pending = stage == "fit"  # until on_fit_start: a state saved now is a tuner's (store_to_continue)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_pending = False
        resume, self._resume = callback_store.store_to_continue(self._resume), None  # a refused one is not retried
        # the checkpoint of ckpt_path, held by Lightning until it has restored the loops (after this hook)
        loaded = getattr(trainer._checkpoint_connector, "_loaded_checkpoint", None)
        callback_store.refuse_unresumable(loaded, resume, 0 if trainer.fit_loop.done else trainer.global_step)
        callback_store.warn_rounded_resume(loaded, pl_module)
        callback_setup.refuse_unsupported(trainer, pl_module, self.config)
        self._comm = distributed.communicator()
        tracked = capture.resolve_layers(pl_module, self.config)
        watched = watched_parameters(pl_module, self.config, list(tracked))
        callback_setup.refuse_staged_unfreezing(trainer, pl_module, watched, list(tracked))
        self._dims = {name: layer.projection.dim for name, layer in tracked.items()}
        self.config = self._requested.resolved(sum(self._dims.values()))
        self._ggn = self.config.curvature is Curvature.GGN
        groups = layer_groups(list(tracked), self.config.layout)
        self._owned = sync.assign_groups(groups, self._dims, self._comm.world_size)
        self._root = self._store_root(trainer)
        others = [c for c in trainer.callbacks if isinstance(c, DataValueEmbedding) and c is not self]
        callback_setup.refuse_sharing(self._root, self.report_config, [(c._store_root(trainer), c.report_config)
                                                                        for c in others], bool(trainer.loggers))
        manifest = callback_store.store_manifest(self.config, tracked, self._comm, self._owned, trainer,
                                                 self.sample_ids if isinstance(self.sample_ids, str) else None)
        scratch = callback_store.fast_dev_run_note(trainer, self._root)  # (its store is replaced each time)
        self._store = callback_store.open_rank_store(self._comm, self._root, manifest, resume,
                                                     self.overwrite or scratch)
        self._writer = StepWriter(self._store, background=pl_module.device.type != "cpu")
        callback_setup.log_settings(trainer, self._store, sum(self._dims.values()), self.embedding_method,
                                   self.report_config)
        # exact mode applies Adam's preconditioner per coordinate; projected mode needs the preconditioned rows
        self._preconditioned = is_adam(trainer.optimizers[0]) and not self.config.exact
        self._kinds = capture.extra_row_kinds(self._ggn, self._preconditioned)
        self._assembler = sync.StepAssembler(self._comm, self._dims, self._owned[self._comm.rank],
                                             getattr(torch, manifest["dtype"]), self.config.allow_duplicate_ids,
                                             extra_kinds=self._kinds)
        # replay checkpoints: the parameters are the same on every rank; each rank replays its own layers' rows
        wanted = self._comm.rank == 0 or self.embedding_method is EmbeddingMethod.REPLAY
        self._recorder = callback_store.open_recorder(self._comm, partial(
            CheckpointRecorder, self._store.root / CHECKPOINTS, self.config.checkpoint_interval,
            self.config.settings_hash(), None if resume is None else int(resume.get("last_step", -1)),
            self.sample_ids if isinstance(self.sample_ids, str) else None, str(trainer.precision)) if wanted else None)
        shared = trainer.__dict__.setdefault("_dve_curvature_pass", capture.CurvaturePass())  # the Trainer's others
        self._capture = capture.GradientCapture(tracked, model_tables(pl_module), shared)
        self._capture.attach()
        self._guard = StepGuard(self._capture, watched)
        self._guard.attach(trainer.optimizers[0])
        self._batchnorms = batchnorm_modules(pl_module)
        # a later fit starts afresh; a resumed one continues after the checkpoint's last step
        was = resume or {}  # the checkpoint's: its boundaries are kept (continue_plan), with their weights by step
        self._last_step, self._planned_steps = int(was.get("last_step", -1)), float(was.get("planned_steps", -1.0))
        self._boundaries, self._boundary_weights = list(was.get("boundaries", [])), {**was.get("boundary_weights", {})}
        self._scaler_skips, self._applied_scale, self._split_biases, self._loss_batch = [], 0.0, set(), None
        self._embeddings, self._deferred_write, self._fit_error = None, None, None
        self._resumed, self._train_ended, self._train_started = resume is not None, False, time.perf_counter()
        # a fit that failed inside a step leaves that step's state behind: none of it belongs to this fit
        self._terms, self._skipped, self._deferred, self._step, self._reached = None, False, None, -1, set()
        callback_setup.warn_approximations(trainer, self._capture.modules(), self.config.adam_second_moment
                                           or self.embedding_method is EmbeddingMethod.REPLAY)  # v modelled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback_setup.check_rank_loaders(trainer, self._comm)
        # segment boundaries are fixed now, so checkpoints can be aligned and the report can take references there
        self._boundaries = callback_segments.plan_at_train_start(trainer, self._boundaries, self._planned_steps,
                                                                 self._last_step, self.config.segments)
        self._planned_steps = float(trainer.estimated_stepping_batches)
        self._training_data = reporting_reference.fit_training_data(trainer, pl_module, self.sample_ids)
        self._train_started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summarise_scaler_skips(self._scaler_skips, self._applied_scale > 0)
        if self._resumed_finished_run():  # its checkpoint was saved in the last step: the store stays as it was
            self._train_ended = True
            self._release()
            return
        self._finish_fit(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit whose loop had nothing to train (Lightning calls no ``on_train_end`` then): finish a resumed store
        whose train end failed (its steps are all on disk), or a fresh one (empty, as when every ``training_step``
        returns ``None``); an earlier store that this fit would overwrite stays as it was."""
        store = self._active_store()
        if self._train_ended:
            return
        replaces = self._comm.any(store.replaces_earlier)  # collective: every rank takes the same branch
        if not replaces and not self._resumed_finished_run():
            self.on_train_start(trainer, pl_module)  # boundaries, training data
            self._finish_fit(trainer, pl_module)
        else:
            self._release()
        if not self._resumed:
            callback_setup.warn_nothing_recorded(store.root)

    def _resumed_finished_run(self) -> bool:
        """Collective: whether this fit resumed a store its earlier fit finished and applied no step itself."""
        store = self._active_store()
        done = store.manifest.get("status") == "complete" and (self._comm.rank > 0 or (  # rank 0 holds the embeddings
            store.manifest.get("embeddings") == "complete" and not store.manifest.get(TRAIN_END)))
        return not self._comm.any(not (self._resumed and self._applied_scale == 0 and done))  # (no step applied)

    def _finish_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the recording on every rank, run the backward recursion and write the report."""
        store, error, replay_error, self._train_ended = self._active_store(), None, None, True
        try:
            self._check_writes()
            self._active_writer().close()  # every queued step is on disk before the store is finished
        except DVEError as err:
            error = err
        sync.agree_on_errors(self._comm, error)
        if self._guard is not None and self._guard.weights_replaced():
            callback_store.warn_weights_replaced(self._recorder)
        try:  # only exact replay needs the final snapshot: its failure does not cost the embeddings
            if self._recorder is not None:
                self._recorder.finish(trainer.global_step, pl_module, trainer.optimizers[0],
                                      time.perf_counter() - self._train_started)
        except DVEError as err:
            replay_error = err
        self._release()
        final = None if self._guard is None else self._guard.final_weights()
        sync.agree_on_errors(self._comm, callback_store.finish_store(store, final, self._boundary_weights))  # all here
        dtype = accumulation_dtype(store.manifest["storage_dtype"])  # as on one process, whatever the ranks
        bounds = callback_segments.train_end_bounds(store.steps, self._boundaries, self.config.segments)
        need = recursion_ranks.device_bytes(store.layer_names, self.config.layout, self._owned[self._comm.rank],
                                            self._dims, dtype, len(bounds))
        watch = recursion_ranks.embed_trajectory(self._comm, store, self.config.layout, self._owned, self._dims,
                                                 dtype, bounds, progress=trainer.progress_bar_callback is not None,
                                                 device=callback_setup.recursion_device(pl_module.device, need))
        if self._comm.rank == 0:
            callback_store.report_disk_use(store)
            callback_setup.clear_report(store.root)
            self._embeddings = DataValueEmbeddings(store, self._weight_fn, self.sample_ids)
            self._embeddings.training_data = self._training_data
        if self.embedding_method is EmbeddingMethod.REPLAY and store.steps:  # (the same steps on every rank)
            carry = callback_setup.replay_carry(store, pl_module, self.config, self._training_data, self._weight_fn,
                                                self._capture.layers, replay_error)
            callback_setup.replay_embeddings(self._comm, store, self._owned, self._dims, carry, self._embeddings)
        if self._comm.rank == 0 and store.manifest.get("embeddings_source") != "replay":  # replayed: exact dynamics
            watch.warn(store.steps)
        loss_batch, self._loss_batch, reported = self._loss_batch, None, True
        if self._comm.rank != 0 or reporting_reference.check_training_loss(
                pl_module, loss_batch, self._embeddings, report=self.report_config is not None):
            reported = callback_setup.report(partial(reporting.report_train_end, trainer, pl_module, self._embeddings,
                                                     self.report_config, self.reference, self.describe,
                                                     self.sample_ids), store.root)
        if replay_error is not None and self.embedding_method is EmbeddingMethod.RECURSION:
            callback_setup.warn_replay_lost(replay_error)
        if self._comm.rank == 0 and reported:  # a report cut off by a full disk is written again by a resume
            callback_store.finish_train_end(store)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._fit_error = exception if trainer.state.fn == TrainerFn.FITTING else self._fit_error
        self._end_recording()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._end_recording()  # a restored resume (validate/test/predict(ckpt_path=...)) is not for a later fit
        self._fit_pending, self._resume = False, None

    # --- helpers -----------------------------------------------------------------------------------------

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.detach()
        if self._guard is not None:
            self._guard.detach()
        if self._recorder is not None:
            self._recorder.store.close()
        if self._writer is not None:  # on an exception: keep what was queued, raise nothing new
            self._writer.close(raise_error=False)

    def _end_recording(self) -> None:
        """:meth:`_release`, and let another fit record into this store's folder (``folder_lock``)."""
        self._release()
        if self._store is not None:
            self._store.unlock()

    def _store_root(self, trainer: pl.Trainer) -> Path:
        return callback_store.store_root(self.save_dir, trainer)
