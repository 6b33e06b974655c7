"""The callback's per-step hooks: capture during the step, close it in ``on_train_batch_end`` (method.md §2).

:class:`StepHooks` is the half of :class:`lightning_dve.callback.DataValueEmbedding` that runs at every step; the
fit lifecycle (store, train-end recursion, report, checkpoint state) is in ``callback.py``, which sets every
attribute declared here in ``__init__`` and ``on_fit_start``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import torch
from torch.nn.parallel import DistributedDataParallel

from . import batches, callback_setup, capture, distributed, reporting, sync
from .adam import adam_factors
from .batch_trees import as_started, shallow_copy
from .checkpoints import CheckpointRecorder, step_store_bytes
from .config import DVEConfig, ReportConfig
from .curvature import (Probe, check_autograd_reached, check_cross_entropy, check_logit_curvature,
                        check_single_logits, probe_logit_curvature, sampled_label_grad)
from .errors import DVEError, GradientError, UnsupportedError
from .guards import StepGuard
from .loss_checks import check_finite_weights
from .model_checks import check_all_reached, check_layers_held, check_no_batchnorm_training, check_no_inner_backward
from .optim import (clip_factor, grad_marks, gradients_reset, grads_finite, reset_before_mark,
                    sgd_proxy_reason, uses_momentum_or_decay)
from .store import TrajectoryStore
from .updates import StepTerms, step_terms
from .writer import StepWriter

#: A flag next to the layers in the step's reached-on-any-rank exchange: some rank refused a call (call_checks).
_REFUSED = "<a call was refused>"


class StepHooks(pl.Callback):
    """Per-step hooks of :class:`lightning_dve.callback.DataValueEmbedding` (not used on its own)."""

    config: DVEConfig
    sample_ids: str | batches.IdFn
    report_config: ReportConfig | None
    reference: Any
    _weight_fn: batches.WeightFn | None
    _comm: distributed.Communicator
    _zeroed = False  # the micro-batch's gradients were reset before its on_after_backward here (on_after_backward)
    _store: TrajectoryStore | None
    _writer: StepWriter | None
    _recorder: CheckpointRecorder | None
    _capture: capture.GradientCapture | None
    _guard: StepGuard | None
    _batchnorms: dict[str, torch.nn.Module]
    _assembler: sync.StepAssembler
    _kinds: tuple[str, ...]
    _dims: dict[str, int]
    _ggn: bool
    _probe: Probe | None
    _preconditioned: bool
    _boundaries: list[int]
    _boundary_weights: dict[str, dict[str, list[float]] | None]
    _batch: Any
    _batch_start: Any
    _backwards: int
    _inner_backward: bool
    _loss_scale: float
    _skipped: bool
    _scaler_skips: list[tuple[int, bool]]
    _applied_scale: float
    _factor: float | None
    _terms: StepTerms | None
    _step: int
    _last_step: int
    _reached: set[str]
    _deferred: DVEError | None
    _deferred_write: DVEError | None
    _split_biases: set[str]
    _loss_batch: Any

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        check_no_batchnorm_training(self._batchnorms)
        self._active_guard().check_trainable(trainer.global_step)  # before the forward hooks read the layout
        hooks = self._active_capture()
        check_layers_held(pl_module, hooks.modules(), trainer.global_step)
        hooks.begin(keep_outputs=self._ggn, batch=batch)
        if self._preconditioned:
            hooks.set_preconditioner(adam_factors(trainer.optimizers[0], hooks.modules()))
        self._batch, self._backwards, self._inner_backward = batch, 0, False
        self._batch_start = shallow_copy(batch)  # a training_step may edit the batch: as_started reads it

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._backwards:  # the closure is evaluated again (LBFGS): the step is recorded at its first evaluation
            return
        hooks = self._active_capture()
        self._drop_reset_micro_batches()
        self._inner_backward = hooks.captured  # rows before the training backward: training_step ran one itself
        scaler = callback_setup.grad_scaler(trainer)
        self._loss_scale = 1.0 if scaler is None else float(scaler.get_scale())
        if self._ggn:
            check_autograd_reached(hooks.without_autograd())
        if self._ggn and hooks.outputs:  # Gauss-Newton rows from labels drawn from the model (curvature.py)
            hooks.calls.refused = hooks.calls.refused or check_single_logits(hooks.calls.counts)
            # DDP(static_graph=True) queues its all-reduce in the first backward through its output: not the probe's
            static = isinstance(trainer.strategy.model, DistributedDataParallel) and trainer.strategy.model.static_graph
            self._probe = None if static else probe_logit_curvature(loss, hooks.outputs[-1], hooks.shared)
            ids = batches.extract_sample_ids(as_started(self._batch, self._batch_start), self.sample_ids,
                                             hooks.outputs[-1].shape[0])
            hooks.curvature_backward(lambda logits: sampled_label_grad(logits, ids, self.config.seed,
                                                                       trainer.global_step))
        hooks.start_backward()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backwards += 1
        if self._backwards > 1:
            return
        # under DDP .grad holds the ranks' mean after a synchronised backward
        self._active_guard().after_backward(None if self._comm.world_size == 1
                                            else partial(sync.mean_over_ranks, self._comm))
        hooks = self._active_capture()
        hooks.pause()  # a closure evaluated again adds nothing to the rows
        modules = hooks.modules()  # the gradients right after the backward, before the module's on_after_backward
        self._grad_marks = grad_marks([p for name in self._reached | hooks.reached()
                                       for p in modules[name].parameters(recurse=False) if p.requires_grad])
        self._zeroed = reset_before_mark(self._grad_marks, lambda: any(
            hooks.block_mass(name) > 0 for name in hooks.reached()) or self._assembler.contributes())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._terms is not None:  # called after each closure evaluation: the step was read at the first
            return
        hooks = self._active_capture()
        refused = {_REFUSED} if hooks.calls.refused is not None else set()  # its rank raises it at the step's end
        reached = sync.reached_on_any_rank(self._comm, [*hooks.layers, _REFUSED],
                                           self._reached | hooks.reached() | refused)
        if _REFUSED not in reached:  # a refused call leaves its layer uncaptured: not "used functionally"
            check_all_reached(hooks, reached)  # a layer reached by no micro-batch of any rank, yet with a gradient
        self._skipped = callback_setup.grad_scaler(trainer) is not None and not grads_finite(optimizer)
        try:  # a tied weight is refused where the ranks agree (on_train_batch_end): under DDP one may refuse alone
            self._active_guard().before_step(self._skipped, _REFUSED in reached)
        except DVEError as err:
            self._deferred = err
        if self.config.segments > 1 and uses_momentum_or_decay(optimizer):  # turned on during fit (refused at start)
            self._deferred = self._deferred or UnsupportedError(
                f"segments={self.config.segments} with optimizer state (SGD momentum, weight decay, Adam), turned on "
                f"during fit at step {trainer.global_step} (a hook or a schedule): each segment's recursion starts "
                "without it, so the scores would drop its carry across segments. Use segments=1.")
        if self._active_guard().settings.read():  # the first step's, or changed since the step before
            callback_setup.warn_split_biases(optimizer, hooks.modules(), trainer.global_step, self._split_biases)
        algorithm = callback_setup.clip_algorithm(trainer)
        # a step the grad scaler skips has an infinite norm (clip factor 0, which decay terms divide by): unused
        clip, norm = (1.0, 0.0) if self._skipped else clip_factor(optimizer, trainer.gradient_clip_val, algorithm)
        modelled = algorithm != "value" and sgd_proxy_reason(optimizer) is None and not self._skipped
        self._factor = clip / self._loss_scale if modelled else None  # .grad was as scaled as the loss then
        self._terms = step_terms(optimizer, hooks.modules(), clip, self.config, norm)
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
        applied = outputs or callback_setup.grad_scaler(trainer) is None  # else Lightning skips the optimizer step
        try:
            self._check_writes()
            hooks.calls.raise_refused()  # a call refused in a forward hook
            if hooks.captured and self._zeroed:  # reset before this callback saw it: no micro-batch so far applies
                self._drop_unapplied()
                hooks.abort()
            elif hooks.captured:
                self._reached |= hooks.reached()
                self._assembler.add(self._micro_batch(trainer, batch))
            else:  # skipped micro-batch: training_step returned None
                hooks.abort()
            if self._terms is not None and not self._skipped and self._deferred is not None:
                raise self._deferred
            if self._terms is not None and self._factor is not None and applied:
                self._active_guard().check_applied(self._step, self._factor, self._backwards)
            if self._terms is not None and applied and not self._skipped:
                self._active_guard().check_update(self._step)
        except DVEError as err:
            error = err
        sync.agree_on_errors(self._comm, error)
        if self._terms is None:  # accumulating, or no optimizer step happened
            return
        self._deferred, self._reached = None, set()
        if self._skipped:  # (step, at a loss scale a step was applied at): said at train end (summarise_scaler_skips)
            self._scaler_skips.append((self._step, self._loss_scale <= self._applied_scale))
        if self._skipped or not applied:
            self._assembler.discard()  # not applied: skipped by the scaler, or by Lightning (last micro-batch None)
            self._terms = None
            return
        self._applied_scale = max(self._applied_scale, self._loss_scale)
        record = self._assembler.close(self._step, self._terms, trainer.current_epoch, trainer.is_last_batch)
        self._terms = None
        if record is not None:
            assert self._store is not None
            self._active_writer().append(record)
            self._last_step = record.step
            if self._recorder is not None:  # the step's bytes are counted only while "auto" is unresolved
                others = [dim for name, dim in self._dims.items() if name not in self._assembler.owned]
                self._recorder.after_step(partial(step_store_bytes, record, self._store.manifest["storage_dtype"],
                                                  others, len(self._assembler.kinds)), pl_module)
            if record.step in self._boundaries:  # rare: let the store catch up, then take the boundary reference
                assert self._guard is not None
                self._boundary_weights[str(record.step)] = self._guard.final_weights()  # for influence_at's check
                self._active_writer().wait()  # a failed write is raised at the next (agreed) check
                try:  # rank 0 only: a failed write is raised at the next check, where the ranks agree
                    reporting.save_boundary_reference(trainer, pl_module, self._store, self.report_config,
                                                      self.reference, record.step)
                except DVEError as err:
                    self._deferred_write = err

    def _drop_reset_micro_batches(self) -> None:
        """Drop the buffered micro-batches whose gradients a ``zero_grad`` reset before any optimizer step applied
        them (an ``optimizer_step`` that ran the closure without ``optimizer.step()``), with a warning: merged into
        the next step they would be recorded as applied. Runs after Lightning's ``zero_grad`` of this micro-batch.
        Micro-batches whose gradients are still there (accumulation), or that add none, stay."""
        if self._assembler.pending and gradients_reset(self._grad_marks):
            self._drop_unapplied()

    def _drop_unapplied(self) -> None:
        """Drop the buffered micro-batches a ``zero_grad`` reset before any step applied them, with a warning."""
        _warn_unapplied()
        self._assembler.discard()
        self._reached, self._deferred, self._zeroed = set(), None, False

    def _micro_batch(self, trainer: pl.Trainer, batch: Any) -> sync.MicroBatch:
        """Close one micro-batch: ids, the weight the optimizer applies (method.md §2), per-sample gradients.

        The loss the hooks saw is ``sum_i w_i l_i / n`` (``n`` micro-batches); DDP then averages over ``W``
        ranks, so the applied weight is ``w_i / (n W)``.
        """
        hooks = self._active_capture()
        step = self._step if self._terms is not None else trainer.global_step
        check_no_inner_backward(self._inner_backward, step)
        size = hooks.batch_size()
        batch = as_started(batch, self._batch_start)
        ids = batches.extract_sample_ids(batch, self.sample_ids, size)
        self._loss_batch = (self._batch_start, size) if size > 1 else self._loss_batch  # before the step's edits
        local = batches.reduction_weights(self.config.loss_reduction, batch, size, self._weight_fn)
        check_finite_weights(local, ids, step)
        accumulation = trainer.accumulate_grad_batches
        scale = local * self._loss_scale / accumulation
        extra = {kind: hooks.take(kind, scale if kind == capture.GRADS_Q else None)
                 for kind in self._kinds}
        if self._ggn and hooks.logits is not None and hooks.logits[1] is not None:
            check_cross_entropy(hooks.logits[0], hooks.logits[1], scale)
            check_logit_curvature(self._probe, scale)
        grads = hooks.finish(scale)
        try:
            narrow = self._active_store().manifest["storage_dtype"] != "float64"  # (float64 rows overflow there)
            for rows in (grads, *extra.values()):
                batches.check_finite(rows, ids, step, narrow)
        except GradientError as err:
            if callback_setup.grad_scaler(trainer) is None:
                raise
            self._deferred = err  # a scaled fp16 step may overflow; the scaler then skips it
        return sync.MicroBatch(ids, local / (accumulation * self._comm.world_size), grads, extra)

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

    def _active_guard(self) -> StepGuard:
        assert self._guard is not None, "on_fit_start has not run"
        return self._guard

    def _active_capture(self) -> capture.GradientCapture:
        assert self._capture is not None, "on_fit_start has not run"
        return self._capture


def summarise_scaler_skips(skips: list[tuple[int, bool]], applied: bool) -> None:
    """Say which steps the grad scaler skipped for non-finite gradients (their samples are not recorded): a warning
    where a skip came at a loss scale an earlier step was applied at, or where no step was applied at all, else an
    info line (the scaler calibrating its scale at the start, or a growth of the scale overflowing once).

    Args:
        skips: ``(step, whether an earlier step was applied at its loss scale or a higher one)`` of each skip.
        applied: whether any step was applied.
    """
    if not skips:
        return
    steps = [step for step, _ in skips]
    text = (f"DataValueEmbedding: the grad scaler skipped {len(steps)} optimizer step(s) for non-finite gradients "
            f"(steps {steps[:10]}{' ...' if len(steps) > 10 else ''}); their samples are not recorded.")
    if not applied:
        rank_zero_warn(f"{text} It skipped every step: nothing was trained or recorded. The gradients overflow "
                       "float16 at every loss scale it tried (non-finite losses or inputs, or values beyond float16's "
                       "range); train in float32 or precision='bf16-mixed', or find the non-finite values.")
    elif any(late for _, late in skips):
        rank_zero_warn(f"{text} Skips at a loss scale that earlier steps were applied at point at non-finite data or "
                       "losses: a sample with NaN or inf inputs drops every step it is in (fp32 training refuses its "
                       "gradients, naming it).")
    else:
        rank_zero_info(f"{text} (The scaler calibrates its loss scale at the start, and a growth of the scale may "
                       "overflow once.)")


def _warn_unapplied() -> None:
    """Say that micro-batches whose gradients were reset before any optimizer step are left out of the record."""
    rank_zero_warn("DataValueEmbedding: the gradients of a training batch were reset (zero_grad) before any optimizer "
                   "step applied them (an optimizer_step override that ran optimizer_closure() without "
                   "optimizer.step(), a zero_grad in a hook while gradients were being accumulated, or an epoch "
                   "ended inside an accumulation window: on_train_batch_start returned -1, or a stop was asked). "
                   "That batch changed no weight, so its samples are not recorded at any step. To accumulate "
                   "gradients over batches, use Trainer(accumulate_grad_batches=...).")
