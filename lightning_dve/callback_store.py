"""The callback's store glue: each rank's store created or reopened from a checkpoint, its manifest, and its
completion with the disk use. Framework glue for :mod:`lightning_dve.callback`, nothing else."""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from . import sync
from .capture import TrackedLayer
from .checkpoints import CheckpointRecorder
from .config import DVEConfig
from .distributed import Communicator
from .errors import ConfigError, DVEError, StoreError
from .manifest_checks import LAYERS_CHECKSUM, layers_checksum
from .store import MANIFEST, SHARDS, TrajectoryStore
from .store_checks import TRAIN_END, settings_changes
from .store_resume import SHARED_RUN_ID


#: Appended to the store folder's name under ``Trainer(fast_dev_run=...)``.
FAST_DEV_RUN_SUFFIX = ".fast_dev_run"


def store_root(save_dir: str | os.PathLike[str] | None, trainer: pl.Trainer) -> Path:
    """The store folder of a fit: ``save_dir``, or ``<default_root_dir>/dve``, absolute (a handle, checkpoint or
    logged path stays this store's after the working directory changes); a ``fast_dev_run``'s scratch folder."""
    root = (Path(save_dir) if save_dir is not None else Path(trainer.default_root_dir) / "dve").absolute()
    return fast_dev_run_root(root) if trainer.fast_dev_run else root


def fast_dev_run_root(root: Path) -> Path:
    """The scratch store folder of a ``fast_dev_run`` next to ``root``: a smoke test runs every part of the
    callback, as Lightning runs the loops, but leaves the store in ``root`` alone (Lightning suppresses logging and
    checkpointing then), and each one replaces the last."""
    return root.with_name(root.name + FAST_DEV_RUN_SUFFIX)


def spawned_fit_root(save_dir: str | os.PathLike[str] | None) -> Path | None:
    """Where the last fit recorded when it ran in other processes (``ddp_spawn``), as far as this process can
    tell: ``save_dir``, or its :func:`fast_dev_run_root` where that store was written later (``None`` without a
    ``save_dir``)."""
    if save_dir is None:
        return None
    roots = [root for root in (Path(save_dir), fast_dev_run_root(Path(save_dir))) if (root / MANIFEST).is_file()]
    return max(roots, key=lambda root: (root / MANIFEST).stat().st_mtime_ns, default=Path(save_dir))


def refuse_after_failed_fit(root: Path | None, error: BaseException | None) -> None:
    """Refuse ``callback.embeddings`` after a fit that raised ``error`` before it wrote its embeddings: ``root``
    then holds an earlier fit's store (an ``overwrite=True`` fit clears it at its first write) or an unfinished one.

    Raises:
        ConfigError: naming the failure and how to read what the folder holds.
    """
    if error is not None:
        raise ConfigError(f"this callback's last fit failed ({type(error).__name__}: {error}) before it wrote its "
                          f"embeddings, so {root} holds an earlier fit's store or an unfinished one, not that fit's. "
                          "Fix the failure and fit again (or resume it with ckpt_path=...); "
                          "DataValueEmbeddings.load(save_dir) reads whatever the folder holds.")


def fast_dev_run_note(trainer: pl.Trainer, root: Path) -> bool:
    """Whether this fit is a ``fast_dev_run`` (recording into :func:`fast_dev_run_root`), said on rank 0."""
    if trainer.fast_dev_run:
        rank_zero_info(f"DataValueEmbedding: fast_dev_run records into the scratch folder {root}, replaced by each "
                       "fast_dev_run; the store of save_dir is left as it is.")
    return bool(trainer.fast_dev_run)


def recording_in(checkpoint: dict[str, Any], state_key: str, root: Path, hashes: set[str]) -> dict[str, Any] | None:
    """The store state a Lightning checkpoint holds for this callback under another state key (other settings, or
    an earlier version's key), for the fit to continue or refuse; ``None`` when it has this key's (Lightning passes
    that one) or none.

    A checkpoint of several such callbacks picks the one that recorded into ``root``, else the one of this
    callback's settings (``hashes``: under each layout "auto" resolves to), as an earlier version's relative
    save_dir resumed from another folder needs.

    Raises:
        ConfigError: if several recordings are candidates and none recorded into ``root``.
    """
    states = {key: state for key, state in (checkpoint.get("callbacks") or {}).items()
              if isinstance(state, dict) and {"settings_hash", "last_step"} <= state.keys()}
    if state_key in states or not states:
        return None
    same_dir = [state for state in states.values() if state.get("save_dir") is not None
                and Path(state["save_dir"]).absolute() == root]
    same_settings = [state for state in states.values() if state.get("settings_hash") in hashes]
    candidates = same_dir or (same_settings if len(same_settings) == 1 else list(states.values()))
    if len(candidates) > 1:
        raise ConfigError(f"the checkpoint holds {len(candidates)} DataValueEmbedding recordings (save_dirs "
                          f"{sorted(str(s.get('save_dir')) for s in candidates)}), none with this callback's settings "
                          f"or save_dir {root}: resuming cannot tell which one it continues. Resume with the settings "
                          "and save_dir of one of them, or start a fresh fit without ckpt_path.")
    return dict(candidates[0])


def refuse_unresumable(checkpoint: dict[str, Any] | None, state: dict[str, Any] | None, trainer_step: int) -> None:
    """Refuse, before anything is opened, a fit from a ``checkpoint`` (``None`` or empty: a fresh fit) it cannot
    continue exactly: one of weights only, or one saved inside an optimizer step after its update and before this
    callback recorded the step (saved in ``on_train_batch_end`` by a callback listed before it: the weights are
    after step N, the callback's ``state`` ends at N - 1). A fresh fit of a Trainer that has trained before
    (``trainer_step``, its global step, above 0) records a new run from its step on, which is warned about.

    Raises:
        ConfigError: naming the checkpoint's kind and the fix.
    """
    if not checkpoint:
        if trainer_step > 0 and state is None:
            rank_zero_warn(f"DataValueEmbedding: this fit continues a Trainer at global step {trainer_step} (a "
                           "second trainer.fit of it): it records a new run from that step on, from the weights the "
                           "earlier fit left, and replaces the earlier store (overwrite=True; refused without it). "
                           "The earlier steps' occurrences are not in it: per-sample totals leave them out. To score "
                           "the whole run, train it in one fit, or continue it with trainer.fit(..., ckpt_path=) "
                           "from a checkpoint of the first fit.")
        return
    if "optimizer_states" not in checkpoint:
        raise ConfigError("the checkpoint holds the model's weights only (ModelCheckpoint(save_weights_only=True)): "
                          "a fit cannot resume from it, as it has no optimizer, loop or DataValueEmbedding state. "
                          "Resume from a full checkpoint, or load the weights into the module (load_state_dict) and "
                          "start a fresh fit without ckpt_path into an empty save_dir.")
    step, applied = (state or {}).get("open_step"), checkpoint.get("global_step")
    if step is not None and applied is not None and applied > step:
        raise ConfigError(f"the checkpoint was saved during step {step}, after its update was applied and before "
                          "DataValueEmbedding recorded it (by a callback listed before DataValueEmbedding, in its "
                          f"on_train_batch_end): resuming from it would leave step {step} out of the recording. "
                          "Resume from a checkpoint saved at another point (ModelCheckpoint's: Lightning runs it "
                          "last), and list DataValueEmbedding before callbacks that save in on_train_batch_end.")


def warn_rounded_resume(checkpoint: dict[str, Any] | None, module: torch.nn.Module) -> None:
    """Warn where the module's weights are not the checkpoint's as a resumed fit starts: under
    ``precision="64-true"`` Lightning loads them into the module before converting it, so a module built in
    float32 gets them rounded to float32, and the fit continues from other weights than the run it resumes (exact
    replay of it is then refused at that step, as not reproducing its checkpoints)."""
    saved = (checkpoint or {}).get("state_dict") or {}
    changed = [name for name, p in module.named_parameters()
               if isinstance(saved.get(name), torch.Tensor) and saved[name].dtype == p.dtype
               and not torch.equal(saved[name].to(p.device), p.detach())]
    if changed:
        rank_zero_warn(f"DataValueEmbedding: the resumed module's weights are not the checkpoint's ({changed[:3]}"
                       f"{' ...' if len(changed) > 3 else ''}). Under precision='64-true' Lightning loads the "
                       "checkpoint's float64 weights into a module built in float32 before converting it, rounding "
                       "them (or a callback listed before DataValueEmbedding changed them). The fit goes on from "
                       "other weights than the run it resumes, and exact_influence / embeddings='replay' of it will be "
                       "refused. Build the module in float64 (self.double() in __init__) to resume exactly.")


def store_to_continue(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The restored callback state a fit continues: ``None`` when there is none, or when it was saved by this fit
    before its ``on_fit_start`` (``before_fit``). ``LearningRateFinder`` and ``BatchSizeFinder`` (also through
    ``Tuner``) save a checkpoint in their ``on_fit_start``, which runs before this callback's, and restore it after
    their search: it holds no store (a first fit) or the first fit's (a second one), which the fit must not
    continue."""
    return None if state is None or state.get("before_fit") else state


def store_manifest(config: DVEConfig, tracked: dict[str, TrackedLayer], comm: Communicator,
                   owned: list[list[str]], trainer: pl.Trainer, sample_ids: str | None) -> dict[str, Any]:
    """The store manifest: settings (layout resolved), layers and projections, this rank's share, dtypes, the
    Trainer's ``precision`` (queries convert test batches as it converted the training batches), the batch transfer
    hooks its DataModule overrides (:func:`datamodule_hooks`) and the batches' id key (``None`` for a callable;
    queries match a test batch's rows by it, ``batches.align_test_rows``).

    The training dtype is the widest of the tracked weights' (float32 at least), not the LightningModule's
    ``dtype``, which ``"32-true"`` leaves at float32 for a model whose layers were made float64 one by one. The
    rows are stored in it (``storage_dtype="auto"``) where no side of any layer is projected, whatever
    ``projection_dim``: they are exact then.
    """
    widest = functools.reduce(torch.promote_types, (layer.module.weight.dtype for layer in tracked.values()),
                              torch.float32)
    training_dtype = str(widest).removeprefix("torch.")
    exact = all(layer.projection.output.is_identity and layer.projection.input.is_identity
                for layer in tracked.values())
    return {"settings": config.to_dict(), "settings_hash": config.settings_hash(),
            "layers": [layer.describe() for layer in tracked.values()], "world_size": comm.world_size,
            "rank": comm.rank, "owned_layers": owned[comm.rank], "dtype": training_dtype,
            "storage_dtype": config.storage_dtype.resolve(training_dtype, exact).value,
            "precision": str(trainer.precision), "datamodule_hooks": datamodule_hooks(trainer),
            "sample_ids": sample_ids}


def datamodule_hooks(trainer: pl.Trainer) -> list[str]:
    """The batch transfer hooks that the fit's ``LightningDataModule`` overrides: Lightning runs them on every training
    batch, and a handle from ``DataValueEmbeddings.load`` cannot (it warns at its first query)."""
    hooks = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
    datamodule = trainer.datamodule
    return [] if datamodule is None else [h for h in hooks if is_overridden(h, datamodule, pl.LightningDataModule)]


def open_rank_store(comm: Communicator, root: Path, manifest: dict[str, Any], resume: dict[str, Any] | None,
                    overwrite: bool) -> TrajectoryStore:
    """Collective: create (or, after a checkpoint restore, reopen) this rank's store; rank 0's is ``root``.

    Rank 0 checks ``root`` (a non-empty one needs ``overwrite``) before the other ranks create their shards under
    it; each rank's store clears what it replaces at its own first write. An error on any rank is raised on every
    rank.
    """
    rank_root = root if comm.rank == 0 else root / SHARDS / f"rank_{comm.rank}"
    if resume is None:  # one run id for every rank's store: a resume checks each shard against the checkpoint's
        manifest = {**manifest, "run_id": sync.rank_zero_text(comm, uuid.uuid4().hex), SHARED_RUN_ID: True}

    def attempt() -> tuple[TrajectoryStore | None, DVEError | None]:
        try:
            if resume is None:
                return TrajectoryStore.create(rank_root, manifest, overwrite=overwrite), None
            recorded = resume.get("save_dir")
            if recorded is not None and Path(recorded).absolute() != root and not (rank_root / MANIFEST).is_file():
                raise StoreError(f"no store at {root} to resume: the checkpoint's DataValueEmbedding recorded into "
                                 f"{recorded}. Pass save_dir={recorded!r} (or move that folder here), or start a "
                                 "fresh fit without ckpt_path.")
            if comm.rank > 0 and not (rank_root / MANIFEST).is_file():
                raise StoreError(f"rank {comm.rank} has no shard to resume at {rank_root}: each rank keeps its layers' "
                                 "steps in its own shard (on its machine's disk). Resume with every rank's shard in "
                                 "place (the same machines and save_dir as the run), or start a fresh fit without "
                                 "ckpt_path.")
            return resume_store(rank_root, resume, manifest), None
        except DVEError as err:
            return None, err

    store, error = attempt() if comm.rank == 0 or resume is not None else (None, None)
    _agree(comm, store, error)  # rank 0 has checked save_dir before the others create their shards
    if store is None:
        store, error = attempt()
    _agree(comm, store, error)
    assert store is not None
    return store


def _agree(comm: Communicator, store: TrajectoryStore | None, error: DVEError | None) -> None:
    """:func:`sync.agree_on_errors`, letting go of this rank's store folder (its lock) when any rank failed, so that
    a next fit in this process (a notebook's) can record there (with ``overwrite=True``, as after any failed fit)."""
    try:
        sync.agree_on_errors(comm, error)
    except DVEError:
        if store is not None:
            store.unlock()
        raise


def _changes(root: Path, state: dict[str, Any], manifest: dict[str, Any]) -> str:
    """The callback settings that differ from those of the checkpoint's recording, as text for a refusal (read from
    the store at ``root`` where it holds that recording; else nothing)."""
    try:
        recorded = TrajectoryStore.open(root, scan=False).manifest
        same = recorded["settings_hash"] == state.get("settings_hash")
        return f" (recorded, requested: {settings_changes(recorded['settings'], manifest['settings'])})" if same else ""
    except (DVEError, OSError, ValueError, KeyError, AttributeError):  # no store, or a damaged one: the hashes only
        return ""


def resume_store(root: Path, state: dict[str, Any], manifest: dict[str, Any]) -> TrajectoryStore:
    """Reopen the store a checkpoint points to, after checking it was written with the same setup as ``manifest``
    (this rank's, as :func:`store_manifest` builds it).

    Raises:
        ConfigError: if the checkpoint was recorded with other callback settings, sample ids or world size.
        StoreError: if the store tracked other layers or projections, is not the one the checkpoint was saved
            with (its ``run_id``, every rank's store's since session 40), or lacks the checkpoint's last step.
    """
    if state.get("settings_hash") != manifest["settings_hash"]:
        raise ConfigError(f"the checkpoint's DataValueEmbedding was recorded with settings {state.get('settings_hash')}"
                          f", this callback has {manifest['settings_hash']}{_changes(root, state, manifest)}: resuming "
                          "would mix two recordings. Resume with the same callback arguments, or start a fresh fit "
                          "without ckpt_path.")
    if state.get("world_size") != manifest["world_size"]:
        raise ConfigError(f"the checkpoint was recorded on {state.get('world_size')} process(es), this run has "
                          f"{manifest['world_size']}: the store is sharded by rank. Resume with the same number of "
                          "devices.")
    store = TrajectoryStore.reopen(root, int(state.get("last_step", -1)), manifest["layers"], state.get("run_id"),
                                   state.get("recorded_steps"))  # None: a checkpoint of an earlier version
    for key in {"precision", "datamodule_hooks"} & manifest.keys():  # a store of an earlier version has none
        store.manifest.setdefault(key, manifest[key])
    store.manifest.setdefault(LAYERS_CHECKSUM, layers_checksum(store.manifest["layers"]))
    # the id key (``None``: a callable, whose ids cannot be compared); a store of an earlier version has none
    if (recorded := store.manifest.get("sample_ids", manifest["sample_ids"])) != manifest["sample_ids"]:
        store.unlock()
        raise ConfigError(f"the checkpoint's recording read the sample ids {_id_source(recorded)}, this callback "
                          f"{_id_source(manifest['sample_ids'])}: resuming would file later steps under other ids "
                          "(a sample's scores split between two). Resume with the sample_ids the run started with, or "
                          "start a fresh fit without ckpt_path.")
    return store


def _id_source(key: str | None) -> str:
    """How a store's or a callback's sample ids are read, for a message."""
    return "through a callable" if key is None else f"from the batch key {key!r}"


def finish_store(store: TrajectoryStore, final_weights: dict[str, list[float]] | None,
                 boundary_weights: dict[str, dict[str, list[float]] | None]) -> DVEError | None:
    """Mark this rank's store complete with its disk use and report it; return the error instead of raising it, for
    the ranks to agree on, with its disk use so far (rank 0's is recounted once the embeddings are written, every
    rank's step files included: ``TrajectoryStore.record_disk_use``);
    ``final_weights`` are the tracked weights' sampled coordinates after the last step (``StepGuard``),
    ``boundary_weights`` theirs at the segment boundaries (by step), which queries compare with the module they are
    given."""
    try:
        store.truncate_for_resume()  # a resumed run that recorded nothing new
        store.finish_recording({"final_weights": final_weights, "boundary_weights": boundary_weights,
                                TRAIN_END: 1})
        store.record_disk_use()
    except DVEError as err:
        return err
    return None


def finish_train_end(store: TrajectoryStore) -> None:
    """Record that the train end is done, the replay and the report included: a fit resumed from a checkpoint
    of this run leaves the store as it is. Until then such a fit runs the train end again (a kill during the
    report or the replay left the recursion's embeddings and no sign of what was missing) and ``load`` warns."""
    store.manifest[TRAIN_END] = 0
    try:
        store.record_disk_use()  # the manifest is part of bytes_total
    except StoreError as err:
        rank_zero_warn(f"DataValueEmbedding: {str(err).rstrip('.')}. The train end is done in {store.root}, but its "
                       "manifest says otherwise: load warns, and a fit resumed from this run's checkpoints runs it "
                       "again.")


def report_disk_use(store: TrajectoryStore) -> None:
    """Say what the finished store takes on disk (rank 0's: the whole store once the embeddings are written)."""
    manifest = store.manifest
    rank_zero_info(f"DataValueEmbedding: recorded {len(store.steps)} steps in {store.root}: "
                   f"{manifest['bytes_total'] / 2**20:.2f} MiB in all, of which step files "
                   f"{manifest['bytes_steps'] / 2**20:.2f} MiB ({manifest['bytes_per_step'] / 2**10:.1f} KiB per "
                   "step, every rank's).")


def open_recorder(comm: Communicator, open_: Callable[[], CheckpointRecorder] | None) -> CheckpointRecorder | None:
    """Collective: ``open_()`` the replay checkpoints' recorder where it is given (rank 0, or every rank under
    ``embeddings="replay"``); an error on any rank (a damaged ``hyper.jsonl`` of a resumed run) is raised on every
    rank, so none waits at Lightning's next barrier for one that has stopped."""
    recorder, error = None, None
    if open_ is not None:
        try:
            recorder = open_()
        except DVEError as err:
            error = err
    sync.agree_on_errors(comm, error)
    if recorder is not None and (lost := recorder.store.manifest.get("lost")):  # a resume whose folder was lost
        rank_zero_warn(f"DataValueEmbedding: {lost}. The recording itself continues; exact_influence and "
                       "embeddings=\"replay\" of this run are refused.")
    return recorder


def warn_weights_replaced(recorder: CheckpointRecorder | None) -> None:
    """Say that the weights at train end are not those after the last optimizer step (weight averaging), and
    refuse exact replay of the run, which reproduces the last step's weights, with that reason."""
    why = ("the tracked weights changed after the last optimizer step (averaged weights put in at train end by "
           "StochasticWeightAveraging or an EMA, or a constraint after that step)")
    rank_zero_warn(f"DataValueEmbedding: {why}. The embeddings describe the trained trajectory, which ends at the "
                   "last step; the report and queries of this module use the changed weights, and exact_influence "
                   "is refused. List DataValueEmbedding before the averaging callback to keep the last step's weights.")
    if recorder is not None:  # exact replay lands on the last step's weights, not these
        recorder.store.manifest.update(refusal=f"{why}. List DataValueEmbedding before the averaging callback in "
                                               "Trainer(callbacks=...) and fit again.")
