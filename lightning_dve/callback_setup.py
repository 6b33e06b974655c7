"""What the callback reads from and checks on the Trainer: supported setups, warnings, clipping, the grad
scaler, the report and replayed embeddings at train end (each rank's store: :mod:`lightning_dve.callback_store`).
Framework glue for :mod:`lightning_dve.callback`, nothing else."""

from __future__ import annotations

import numbers
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DistributedSampler

import torch

from . import reporting, reporting_loggers
from .batches import WeightFn
from .capture import TrackedLayer
from .config import DVEConfig, EmbeddingMethod, ReportConfig
from .device_memory import available_bytes
from .distributed import Communicator
from .errors import ConfigError, DVEError, UnsupportedError
from .influence import DataValueEmbeddings
from .optim import (is_adam, narrow_tensor_hyperparameters, sgd_proxy_reason, split_bias_groups,
                    uses_momentum_or_decay)
from .query_layers import eager
from .replay import ReplayCost
from .replay_data import TrainingData
from .replay_embeddings import carried_rows
from .replay_ranks import CarryFn, replay_on_ranks
from .replay_setup import make_replayer
from .store import TrajectoryStore

#: Trainer precisions whose gradients the hooks capture as applied (mixed precision: see the callback).
SUPPORTED_PRECISION = ("32-true", "32", "64-true", "64", "bf16-mixed", "16-mixed")
#: Subclasses of DDPStrategy that shard the optimizer state (DeepSpeed) or gather through XLA's own collectives
#: (named, so that their optional packages need not be installed).
REFUSED_STRATEGIES = ("DeepSpeedStrategy", "XLAStrategy")


def supported_strategy(strategy: pl.strategies.Strategy) -> bool:
    """Whether ``strategy`` runs on one device, or is DDP (any launcher) with whole weights on every rank.

    FSDP, DeepSpeed and model parallelism shard the weights, their ``.grad`` or the optimizer state that the
    guards and the optimizer models read; multi-device XLA is untested.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not names & set(REFUSED_STRATEGIES)


def check_arguments(sample_ids: Any, report: Any, describe: Any, save_dir: Any, overwrite: Any, reference: Any
                    ) -> None:
    """Refuse the callback's arguments that :class:`~lightning_dve.config.DVEConfig` does not hold, when it is built
    (not after training, and not by truthiness: ``overwrite="no"`` is a string, not ``False``).

    Raises:
        ConfigError: naming the argument, the value and what it must be.
    """
    if not (callable(sample_ids) or isinstance(sample_ids, str) and sample_ids):
        raise ConfigError(f"sample_ids must be a dict key (str) or a callable batch -> LongTensor[B]; got "
                          f"{sample_ids!r}.")
    if isinstance(reference, (str, bytes, numbers.Number)):  # (a string would be iterated as characters)
        raise ConfigError(f"reference must be a batch as the training loader yields one, a DataLoader or another "
                          f"iterable of batches, or None (the validation dataloader); got {reference!r}.")
    if report is not None and not isinstance(report, ReportConfig):
        raise ConfigError(f"report must be a ReportConfig or None (no report); got {report!r}. Use e.g. "
                          "report=ReportConfig(top_k=5), or leave the default.")
    if describe is not None and not callable(describe):
        raise ConfigError(f"describe must be a callable sample -> str or None; got {describe!r}.")
    if save_dir is not None and not (isinstance(save_dir, (str, os.PathLike)) and os.fspath(save_dir)):
        empty = " (an empty one would be the working directory itself)" if save_dir == "" else ""
        raise ConfigError(f"save_dir must be a path (str or os.PathLike) or None (<trainer.default_root_dir>/dve); "
                          f"got {save_dir!r}{empty}.")
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite must be a bool (True replaces the store in a non-empty save_dir); got "
                          f"{overwrite!r}.")


def note_untracked(pl_module: pl.LightningModule, modules: dict[str, torch.nn.Module]) -> None:
    """Name the trainable parameters that no tracked layer holds: they train, but the embeddings, scores and
    report measure influence through the tracked layers only (method.md §3: the gradient restricted to them)."""
    held = {id(p) for module in modules.values() for p in module.parameters()}
    untracked = [name for name, p in pl_module.named_parameters() if p.requires_grad and id(p) not in held]
    if untracked:
        more = f" and {len(untracked) - 5} more" if len(untracked) > 5 else ""
        rank_zero_info(f"DataValueEmbedding: {len(untracked)} trainable parameter(s) are in no tracked layer "
                       f"({', '.join(untracked[:5])}{more}): they train, but the scores and the report measure "
                       f"influence through the {len(modules)} tracked layer(s) only.")


def warn_approximations(trainer: pl.Trainer, modules: dict[str, torch.nn.Module], second_moment: bool) -> None:
    """Warn once about what the recursion models only approximately: non-SGD optimizers, Adam's second moment
    without the v pass (``second_moment``), value clipping (biases in other param groups than their weights:
    :func:`warn_split_biases`, at each step); and say which trainable parameters no tracked layer holds
    (``modules``: the tracked layers; left out by ``layers=`` or ``exclude=``)."""
    note_untracked(trainer.lightning_module, modules)
    if is_adam(trainer.optimizers[0]) and not second_moment:
        rank_zero_warn(f"DataValueEmbedding: {type(trainer.optimizers[0]).__name__}'s second moment v is held fixed "
                       "when a sample is removed (the single pass). While v holds few batches a removed sample moves "
                       "it as much as the momentum, so the scores of the first steps, and of a layer's first steps "
                       "where it starts training mid-run (a backbone unfrozen or detached until then), can have the "
                       "wrong sign and several times their size, and with them the report's early stage. "
                       "adam_second_moment=True (exact mode, projection_dim=None) models it; exact_influence(...) and "
                       "embeddings='replay' follow the exact dynamics.")
    reason = sgd_proxy_reason(trainer.optimizers[0])
    if reason is not None:
        rank_zero_warn(f"DataValueEmbedding: {reason}; it is treated as plain SGD with its current learning rate, "
                       "at the gradients of each step's first closure evaluation (LBFGS evaluates the closure several "
                       "times); method.md §2 is exact for plain SGD only.")
    narrow = narrow_tensor_hyperparameters(trainer.optimizers[0])
    if narrow:
        rank_zero_warn(f"DataValueEmbedding: the optimizer's {narrow} are tensors of a narrower dtype than the weights "
                       "(e.g. float32 betas on float64 weights), which torch computes with in that dtype: "
                       "exact_influence and embeddings='replay' replay them as floats and will refuse this run as "
                       "not reproduced. Pass them as Python floats (the scores of influence() are not affected).")
    if trainer.gradient_clip_val and clip_algorithm(trainer) == "value":
        rank_zero_warn("DataValueEmbedding: gradient_clip_algorithm='value' clips each coordinate, which is not a "
                       "scale of the update; the recursion ignores it (exact_influence and embeddings='replay' model "
                       "it exactly). Use 'norm' clipping for an exact step in the recursion.")


def warn_split_biases(optimizer: torch.optim.Optimizer, modules: dict[str, torch.nn.Module], step: int,
                      warned: set[str]) -> None:
    """Warn about tracked layers whose bias is in a param group with other hyperparameters than the weight's, at
    the first step where it is (a per-group schedule can part them later), once per layer (``warned``, updated)."""
    split = {name: what for name, what in split_bias_groups(optimizer, modules).items() if name not in warned}
    if split:
        warned.update(split)
        rank_zero_warn(f"DataValueEmbedding: from step {step}, {'; '.join(f'{k}: {v}' for k, v in split.items())}. "
                       "The recursion applies the weight's param group to the whole layer, bias included; put each "
                       "tracked layer's bias in its weight's group, with the same schedule, for exact terms "
                       "(exact_influence replays every parameter exactly).")


def grad_scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's ``GradScaler`` (fp16 mixed precision), or ``None``."""
    return getattr(trainer.precision_plugin, "scaler", None)


def clip_algorithm(trainer: pl.Trainer) -> str | None:
    """The trainer's clipping algorithm as a plain string (``"norm"``, ``"value"`` or ``None``)."""
    algorithm = trainer.gradient_clip_algorithm
    return None if algorithm is None else str(getattr(algorithm, "value", algorithm))


def check_rank_loaders(trainer: pl.Trainer, comm: Communicator) -> None:
    """Collective: refuse training loaders of different lengths on the ranks, then :func:`warn_sampler_padding`.

    Every rank takes every optimizer step under DDP: a rank with more batches waits in the gradient all-reduce,
    or in the callback's agreement at the step's end, until the process group times out (30 minutes by default),
    with a traceback into this package.

    Raises:
        ConfigError: naming each rank's number of batches and the fix.
    """
    if comm.world_size > 1:
        mine = torch.tensor([[float(trainer.num_training_batches)]], dtype=torch.float64)
        counts = [float(count.item()) for count in comm.all_gather_rows(mine)]
        if len(set(counts)) > 1:
            raise ConfigError(f"the ranks' training loaders have different numbers of batches per epoch ({counts}, "
                              "by rank): under DDP every rank takes every optimizer step, so the run would hang "
                              "where one rank runs out. Keep Lightning's DistributedSampler "
                              "(use_distributed_sampler=True, the default), or give every rank's sampler as many "
                              "samples (drop_last=True where the remainder differs).")
    warn_sampler_padding(trainer)


def warn_sampler_padding(trainer: pl.Trainer) -> None:
    """Warn (once per fit) when a ``DistributedSampler`` repeats samples to even out the ranks, and the copies are
    trained (not in a last partial batch that the loader's ``drop_last`` drops)."""
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    padded = sampler.total_size - len(sampler.dataset) if isinstance(sampler, DistributedSampler) else 0
    batch_size = getattr(loader, "batch_size", None)
    if padded > 0 and getattr(loader, "drop_last", False) and batch_size and sampler.num_samples % batch_size:
        padded = 0  # each rank's copies are its last samples, in the partial batch it drops
    if padded > 0:
        rank_zero_warn(f"DataValueEmbedding: the DistributedSampler repeats {padded} sample(s) per epoch to give every "
                       "rank the same count; those copies are trained on, so each is kept as its own occurrence.")


def warn_nothing_recorded(root: Path) -> None:
    """Say that a fit trained no optimizer step (its loop was done, or had no batches): nothing was recorded."""
    rank_zero_warn(f"DataValueEmbedding: this fit trained no optimizer step, so nothing was recorded in {root} (a "
                   "store of an earlier fit there is kept as it was).")


def refuse_sharing(root: Path, report: ReportConfig | None, others: list[tuple[Path, ReportConfig | None]],
                   loggers: bool) -> None:
    """Refuse a callback whose folder or logging another ``DataValueEmbedding`` of the trainer shares (``others``:
    their folders and reports): the folder lock excludes other processes only, and two reports under one
    namespace would write the same logger keys (where the trainer has ``loggers``), the second overwriting the
    first's dashboards.

    Raises:
        ConfigError: naming the folder or the namespace, and what to set.
    """
    resolved = root.resolve()
    if any(other.resolve() == resolved for other, _ in others):
        raise ConfigError(f"two DataValueEmbedding callbacks of this Trainer would record into {resolved}: give each "
                          "its own save_dir (save_dir=None is <trainer.default_root_dir>/dve).")
    if loggers and report is not None and report.log_to_loggers and any(
            other is not None and other.log_to_loggers and other.namespace == report.namespace for _, other in others):
        raise ConfigError(f"two DataValueEmbedding callbacks of this Trainer would log their reports under the same "
                          f"keys '{report.namespace}/...' (the second would overwrite the first's dashboards and "
                          "settings): give each its own report=ReportConfig(namespace=...), e.g. 'dve_a' and "
                          "'dve_b', or log_to_loggers=False on all but one.")


def log_settings(trainer: pl.Trainer, store: TrajectoryStore, dims: int, method: EmbeddingMethod,
                 report_config: ReportConfig | None) -> None:
    """Log the recording's settings (storage dtype resolved), its folder and ``dims``, the width of an embedding,
    to the trainer's loggers, unless the report does not log to them (``report=None`` or ``log_to_loggers=False``).
    """
    if not trainer.is_global_zero or report_config is None or not report_config.log_to_loggers:
        return
    manifest = store.manifest
    settings = {**manifest["settings"], "storage_dtype": manifest["storage_dtype"], "embeddings": method.value,
                "store": str(store.root), "settings_hash": manifest["settings_hash"],
                "tracked_layers": len(manifest["layers"]), "embedding_dims": dims}
    reporting_loggers.log_settings(trainer, settings, report_config.namespace)


def clear_report(root: Path) -> None:
    """Delete the report of earlier embeddings in the store at ``root`` (a resumed fit's): the folder then holds the
    current embeddings' report or none, never an earlier one that looks current after a failed or skipped one."""
    shutil.rmtree(root / reporting.REPORT_DIR, ignore_errors=True)


def report(write: Callable[[], None], root: Path) -> bool:
    """Write (then log) the train-end report; a failure (a full disk) warns instead of failing a finished fit: the
    embeddings are complete by then. Returns whether it was not cut off (done, or skipped on purpose)."""
    try:
        write()
    except OSError as err:
        written = (root / reporting.REPORT_DIR / "summary.json").is_file()  # its files come before the logging
        what = "was written, but logging it to the Trainer's loggers failed" if written else "could not be written"
        rank_zero_warn(f"DataValueEmbedding: the train-end report {what} ({err}). The embeddings are complete in "
                       f"{root}: query them with DataValueEmbeddings.load({str(root)!r}); a fit resumed from this "
                       "run's last checkpoint writes and logs the report again.")
        return False
    return True


def recursion_device(device: torch.device, need: int) -> torch.device | None:
    """The training device for the train-end recursion when it is a GPU with room for ``need`` bytes (free, or
    cached by torch and unused), else ``None``: the CPU, said on rank 0 when the GPU lacks the room."""
    if device.type != "cuda":
        return None
    free = available_bytes(device) or 0
    if need <= free:
        return device
    rank_zero_info(f"lightning_dve: the train-end recursion needs about {need / 2**30:.1f} GiB on {device}, where "
                   f"{free / 2**30:.1f} GiB are free: it runs on the CPU instead (slower, same result). Free GPU "
                   "memory before train end, or use a smaller projection_dim or layout='per_layer', to keep it there.")
    return None


def warn_replay_lost(error: DVEError) -> None:
    """Say that exact replay is unavailable because the final replay checkpoint failed (the embeddings are fine)."""
    rank_zero_warn(f"DataValueEmbedding: the final replay checkpoint could not be written ({error}); the embeddings "
                   "and report are complete, but exact_influence will refuse this run.")


def embedding_method(value: Any, config: DVEConfig) -> EmbeddingMethod:
    """The ``embeddings=`` option, refused where replayed embeddings cannot be formed.

    Raises:
        ConfigError: for an unknown value, or ``"replay"`` without replay checkpoints or with segments.
    """
    method = EmbeddingMethod.parse(value, "embeddings")
    unmet = [need for need, missing in (("checkpoint_interval (got None)", config.checkpoint_interval is None),
                                        (f"segments=1 (got {config.segments})", config.segments > 1)) if missing]
    if method is EmbeddingMethod.REPLAY and unmet:
        raise ConfigError("embeddings='replay' replays training from its checkpoints into the final model's "
                          f"embeddings; it needs {' and '.join(unmet)}. Keep the defaults, or use "
                          "embeddings='recursion'.")
    return method


def replay_carry(store: TrajectoryStore, module: pl.LightningModule, config: DVEConfig, data: TrainingData | None,
                 weight_fn: WeightFn | None, tracked: dict[str, TrackedLayer], checkpoint_error: DVEError | None
                 ) -> CarryFn:
    """This rank's part of ``embeddings="replay"``: its layers' projection rows carried back through the run
    replayed from its own store and checkpoints (the final checkpoint's failed write is the reason it cannot)."""
    def carry(layers: list[str]) -> tuple[torch.Tensor, dict[str, slice], ReplayCost]:
        if checkpoint_error is not None:
            raise checkpoint_error
        replayer = make_replayer(store, config.checkpoint_interval, module, data, None, config.loss_reduction,
                                 weight_fn)
        return carried_rows(store, replayer, {name: tracked[name].projection for name in layers})
    return carry


def replay_embeddings(comm: Communicator, store: TrajectoryStore, owned: list[list[str]], dims: dict[str, int],
                      carry: CarryFn, embeddings: DataValueEmbeddings | None) -> None:
    """``embeddings="replay"`` at train end (collective, every rank its own layers' rows): replace the recursion's
    embeddings by replayed ones, or keep them with a warning saying why the run could not be replayed."""
    with torch.inference_mode(False), torch.enable_grad(), eager():  # compiled submodules: their double backward
        cost, failure = replay_on_ranks(comm, store, owned, dims, carry)
    if failure is not None:
        rank_zero_warn(f"DataValueEmbedding: embeddings='replay' could not replay this run ({failure}); the report "
                       "and the store keep the recursion's embeddings.")
        return
    if embeddings is not None:  # rank 0
        embeddings.replay_cost = cost
    if cost is not None:
        share = f", rank 0's share of the rows over {comm.world_size} ranks" if comm.world_size > 1 else ""
        rank_zero_info(f"DataValueEmbedding: replayed the embeddings in {cost.seconds:.1f} s "
                       f"({cost.relative:.1f}x the training loop{share}).")


def refuse_unsupported(trainer: pl.Trainer, pl_module: pl.LightningModule, config: DVEConfig) -> None:
    """Refuse training setups the recursion would get wrong (each one lands with a later release).

    Raises:
        UnsupportedError: naming the setting and what to change.
    """
    problems = []
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    if config.segments > 1 and optimizer is not None and uses_momentum_or_decay(optimizer):
        problems.append(f"segments={config.segments} with optimizer state (SGD momentum, weight decay, Adam; use "
                        "segments=1)")
    if config.adam_second_moment and not (optimizer is not None and is_adam(optimizer)):
        problems.append(f"adam_second_moment=True with {type(optimizer).__name__} (it models the second moment of "
                        "Adam/AdamW; drop the setting)")
    if not supported_strategy(trainer.strategy):
        problems.append(f"strategy {type(trainer.strategy).__name__} (use one device or DDP: strategy='ddp', "
                        "'ddp_spawn', 'ddp_fork'; FSDP, DeepSpeed and model parallelism shard the weights, gradients "
                        "or optimizer state the recursion reads)")
    if not pl_module.automatic_optimization:
        problems.append("manual optimization (use automatic optimization)")
    if len(trainer.optimizers) != 1:
        problems.append(f"{len(trainer.optimizers)} optimizers (use exactly one)")
    if str(trainer.precision) not in SUPPORTED_PRECISION:
        problems.append(f"precision={trainer.precision!r} (use '32-true', '64-true', 'bf16-mixed' or '16-mixed')")
    half = next(((name, p.dtype) for name, p in pl_module.named_parameters()
                 if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)), None)
    if half is not None:
        problems.append(f"half-precision weights (parameter {half[0]!r} is {str(half[1]).removeprefix('torch.')}, so "
                        "each update is rounded to it; keep the weights in float32 and use precision='bf16-mixed' "
                        "or '16-mixed' for half-precision compute)")
    if problems:
        raise UnsupportedError("DataValueEmbedding does not support " + "; ".join(problems) + ". Under these "
                               "settings the recorded gradients would not match the update the optimizer applied.")


def _reaches_epoch(trainer: pl.Trainer, epoch: int) -> bool:
    """Whether the fit certainly trains in ``epoch``: before ``max_epochs`` and, under ``max_steps``, past that
    many epochs' optimizer steps (the fit loop's ``setup_data`` loads the training loader to count them)."""
    if trainer.max_epochs not in (None, -1) and epoch >= trainer.max_epochs:
        return False
    if trainer.max_steps in (None, -1) or epoch == 0:
        return True
    trainer.fit_loop.setup_data()  # num_training_batches (Lightning's loop calls it again, a no-op then)
    steps = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)  # per epoch (inf: no __len__)
    return trainer.max_steps > epoch * steps  # False for inf (or nan)


def refuse_staged_unfreezing(trainer: pl.Trainer, pl_module: pl.LightningModule,
                             watched: dict[str, torch.nn.Parameter], tracked: list[str]) -> None:
    """Refuse at fit start a ``BackboneFinetuning`` that froze a watched ``backbone`` it unfreezes during this fit,
    which the step guard refuses at that step, after every earlier step was recorded into a store that cannot be
    used or resumed past it; for another ``BaseFinetuning`` callback, whose plan is its own code, name the frozen
    modules outside the tracked layers that it could unfreeze (a warning).

    Raises:
        UnsupportedError: naming the callback, the backbone and the fixes.
    """
    stagers = [c for c in trainer.callbacks if isinstance(c, BaseFinetuning)]
    frozen = sorted({n.rpartition(".")[0] for n, p in watched.items() if not p.requires_grad} - set(tracked))
    held = {id(p) for p in getattr(pl_module, "backbone", torch.nn.Module()).parameters()}  # by identity: aliases
    backbone = sorted({n.rpartition(".")[0] for n, p in watched.items() if not p.requires_grad and id(p) in held})
    unfreezes = [c for c in stagers if isinstance(c, BackboneFinetuning) and backbone and _reaches_epoch(
        trainer, c.unfreeze_backbone_at_epoch)]  # certain: refused; else warned
    fix = ("(they then train untracked once unfrozen, and the scores measure influence through the other layers), or "
           "train each stage in a fit of its own without the finetuning callback.")
    if unfreezes and backbone:
        raise UnsupportedError(
            f"BackboneFinetuning froze the backbone ({backbone[:4]}{' ...' if len(backbone) > 4 else ''}) to "
            f"unfreeze it at epoch {unfreezes[0].unfreeze_backbone_at_epoch}, and the tracked layers are fixed when "
            f"fit starts: that step would be refused, after every earlier one was recorded. Pass exclude="
            f"{tuple(backbone)!r} {fix}")
    if stagers and (frozen or backbone) and not unfreezes:
        named = sorted(set(frozen) | set(backbone))
        rank_zero_warn(f"DataValueEmbedding: {type(stagers[0]).__name__} is in the Trainer and modules {named[:6]}"
                       f"{' ...' if len(named) > 6 else ''} are frozen: if it unfreezes them during fit, that step "
                       f"will be refused, after every earlier one was recorded. If it will, pass exclude=(...) {fix}")
