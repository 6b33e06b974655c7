"""Fits that do not run the usual way: a checkpoint of other settings, a train end that failed and is finished by
resuming, a fit with nothing to train, checkpoints restored by validate, a report or replay write that fails,
weights averaged in at train end, tuner callbacks that restore their own checkpoint."""

from __future__ import annotations

import errno
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_dve import ConfigError, DataValueEmbedding, DataValueEmbeddings, StoreError, UnsupportedError
from lightning_dve.store import TrajectoryStore
from tests.conftest import DigitsDict, TinyMLP
from tests.test_resume_accumulation import checkpointing_trainer


class Validated(TinyMLP):
    """TinyMLP with a validation loss (``trainer.validate`` needs one)."""

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overwrite", [False, True])
def test_resume_from_a_checkpoint_of_other_settings_is_refused_and_keeps_the_store(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, overwrite: bool
) -> None:
    """Other settings key the callback's state differently, so Lightning does not pass it to ``load_state_dict``;
    ``on_load_checkpoint`` still finds it and the resume is refused, even with ``overwrite=True``."""
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
        mlp_cls().double(), make_loader())
    before = _files(tmp_path / "dve")
    epoch0 = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    other = DataValueEmbedding(tmp_path / "dve", projection_dim=16, overwrite=overwrite)
    with pytest.raises(ConfigError, match="recorded with settings .* resuming would mix two recordings"):
        checkpointing_trainer(tmp_path, 3, [other]).fit(mlp_cls().double(), make_loader(), ckpt_path=epoch0)
    assert _files(tmp_path / "dve") == before


def test_a_failed_train_end_is_finished_by_resuming_from_the_last_checkpoint(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, test_batch: dict,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recursion fails (here: a full disk while writing embeddings) after every step is on disk; resuming from
    ``last.ckpt`` trains nothing, so Lightning calls no ``on_train_end``: ``on_fit_end`` finishes the store, with
    the embeddings of an uninterrupted run."""
    from lightning_dve import store as store_module

    batch = {**test_batch, "x": test_batch["x"].double()}
    reference_model, reference = mlp_cls().double(), DataValueEmbedding(tmp_path / "reference", projection_dim=32)
    checkpointing_trainer(tmp_path, 2, [reference]).fit(reference_model, make_loader())
    expected = reference.embeddings.influence(reference_model, batch, per_step=True).scores

    def full_disk(*args: object, **kwargs: object) -> None:
        raise StoreError(f"cannot write: {errno.errorcode[errno.ENOSPC]}")

    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with monkeypatch.context() as patch:
        patch.setattr(store_module.TrajectoryStore, "write_embeddings", full_disk)
        with pytest.raises(StoreError, match="ENOSPC"):
            checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
                mlp_cls().double(), make_loader())
    with pytest.raises(StoreError, match=r"backward recursion did not finish\. If that fit is still running, wait for "
                                         r"it to return; if it was interrupted, resume it with trainer\.fit"):
        DataValueEmbeddings.load(tmp_path / "dve")
    model, again = mlp_cls().double(), DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    checkpointing_trainer(tmp_path, 2, [again]).fit(model, make_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    torch.testing.assert_close(model.net[0].weight, reference_model.net[0].weight, rtol=0, atol=0)
    assert again.embeddings.steps == list(range(8))
    torch.testing.assert_close(again.embeddings.influence(model, batch, per_step=True).scores, expected,
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("stage", ["report", "replay"])
def test_a_train_end_stopped_after_the_embeddings_is_finished_by_resuming(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """The fit stops (here: an error standing for a kill) in the report, or in ``embeddings="replay"``'s replay,
    after the recursion's embeddings were written: ``load`` warns that the train end did not finish, and a fit
    resumed from ``last.ckpt`` runs it again, writing the report and the replayed embeddings (before: the store
    counted as finished, so the resume left the report missing, or partial, and the recursion's embeddings in
    place of the requested replay, silently)."""
    from lightning_dve import callback_setup, reporting

    def settings() -> DataValueEmbedding:
        return DataValueEmbedding(tmp_path / "dve", projection_dim=None, embeddings=stage == "replay" and "replay"
                                  or "recursion", reference=DigitsDict(range(1500, 1512)).batch())

    def stopped(*args: object, **kwargs: object) -> None:
        (tmp_path / "dve" / "report").mkdir(exist_ok=True)
        (tmp_path / "dve" / "report" / "curve.csv").write_text("step\n")  # what a report writes first
        raise RuntimeError("stopped")

    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with monkeypatch.context() as patch:
        patch.setattr(*((reporting, "report_train_end") if stage == "report" else
                        (callback_setup, "replay_embeddings")), stopped)
        with pytest.raises(RuntimeError, match="stopped"):
            checkpointing_trainer(tmp_path, 2, [settings(), ckpts]).fit(mlp_cls().double(), make_loader())
    with pytest.warns(UserWarning, match=r"had not finished its train end after writing the recursion's embeddings "
                                         r"\(it is still running there, or it stopped there\).*If that fit is still "
                                         r"running, wait for it to return"):
        DataValueEmbeddings.load(tmp_path / "dve")
    again = settings()
    checkpointing_trainer(tmp_path, 2, [again]).fit(mlp_cls().double(), make_loader(),
                                                    ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert (tmp_path / "dve" / "report" / "summary.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = DataValueEmbeddings.load(tmp_path / "dve")
    assert loaded.store.manifest["embeddings_source"] == ("replay" if stage == "replay" else "recursion")


def test_a_fit_with_nothing_to_train_warns_and_keeps_the_store(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, test_batch: dict
) -> None:
    """A second ``fit`` of the same trainer (its loop already done) records nothing and says so; the first fit's
    store stays complete and queryable, even with ``overwrite=True``."""
    model, dve = mlp_cls().double(), DataValueEmbedding(tmp_path / "dve", projection_dim=32, overwrite=True)
    trainer = checkpointing_trainer(tmp_path, 1, [dve])
    trainer.fit(model, make_loader())
    before = _files(tmp_path / "dve")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, make_loader())
    said = [str(w.message) for w in caught]
    assert any("this fit trained no optimizer step, so nothing was recorded" in m for m in said)
    assert not any("continues a Trainer" in m for m in said)  # it replaces nothing
    assert _files(tmp_path / "dve") == before
    assert dve.embeddings.steps == list(range(4))
    trainer.fit_loop.max_epochs = 2  # continued with more epochs: a new run from step 4, said (session 30: silent)
    with pytest.warns(UserWarning, match="this fit continues a Trainer at global step 4 .* The earlier steps' "
                                         "occurrences are not in it"):
        trainer.fit(model, make_loader())
    assert dve.embeddings.steps == [4, 5, 6, 7]


def test_a_checkpoint_restored_by_validate_is_not_resumed_by_a_later_fit(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32, overwrite=True, report=None)
    model = Validated().double()
    checkpointing_trainer(tmp_path, 1, [dve, ckpts]).fit(model, make_loader())
    trainer = checkpointing_trainer(tmp_path, 2, [dve])
    trainer.validate(model, make_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    trainer.fit(model, make_loader())  # fresh: two epochs from step 0
    assert TrajectoryStore.open(tmp_path / "dve").steps == list(range(8))


def test_a_report_that_cannot_be_written_warns_and_keeps_the_embeddings(
    mlp_cls: type, make_loader: Callable[..., DataLoader], fit: Callable, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_dve import reporting

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    """The fit warns and ends; the train end stays pending (load warns), so a resume writes the report again."""
    monkeypatch.setattr(reporting, "report_train_end", full_disk)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    with pytest.warns(UserWarning, match=r"report could not be written .*No space left.* embeddings are complete.*"
                                         "writes and logs the report again"):
        fit(mlp_cls(), dve, make_loader(), make_loader(n=16, offset=100))
    assert dve.embeddings.steps == list(range(4))
    with pytest.warns(UserWarning, match="the report may be missing or partial"):
        DataValueEmbeddings.load(tmp_path / "dve")


def test_a_report_written_whose_logging_fails_is_said_to_be_written(
    mlp_cls: type, make_loader: Callable[..., DataLoader], fit: Callable, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B staging an artifact in an unwritable HOME: the report's files were written, the logging failed; the
    warning said the report could not be written (before session 30)."""
    from lightning_dve import reporting_loggers

    def unwritable_home(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system: '/home/user/.local/share/wandb'")

    monkeypatch.setattr(reporting_loggers, "log_to_loggers", unwritable_home)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    with pytest.warns(UserWarning, match=r"report was written, but logging it to the Trainer's loggers "
                                         r"failed \(\[Errno 30\] Read-only"):
        fit(mlp_cls(), dve, make_loader(), make_loader(n=16, offset=100))
    assert (tmp_path / "dve" / "report" / "summary.json").is_file()


def test_a_failed_final_replay_checkpoint_keeps_the_embeddings(
    mlp_cls: type, make_loader: Callable[..., DataLoader], fit: Callable, tmp_path: Path, test_batch: dict,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_dve.checkpoints import CheckpointRecorder

    def full_disk(*args: object, **kwargs: object) -> None:
        raise StoreError("cannot write the final snapshot: disk full")

    monkeypatch.setattr(CheckpointRecorder, "finish", full_disk)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32, report=None)
    with pytest.warns(UserWarning, match="final replay checkpoint could not be written .*disk full.* exact_influence "
                                         "will refuse"):
        model = mlp_cls()
        fit(model, dve, make_loader())
    assert dve.embeddings.steps == list(range(4))
    with pytest.raises(StoreError):
        dve.embeddings.exact_influence(model, test_batch)


@pytest.mark.parametrize("embeddings", ["recursion", "replay"])
def test_a_first_fit_with_no_batches_ends_with_an_empty_complete_store(
    mlp_cls: type, make_loader: Callable[..., DataLoader], fit: Callable, tmp_path: Path, test_batch: dict,
    embeddings: str
) -> None:
    """Nothing to train: an empty store, no warning but that one (``"replay"`` has nothing to replay); the queries
    and the exact replay give empty results."""
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32, report=None, embeddings=embeddings)
    model, loader = mlp_cls(), make_loader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, dve, loader, limit_train_batches=0)
    assert [str(w.message) for w in caught if "DataValueEmbedding" in str(w.message)] == [
        f"DataValueEmbedding: this fit trained no optimizer step, so nothing was recorded in {tmp_path / 'dve'} (a "
        "store of an earlier fit there is kept as it was)."]
    assert dve.embeddings.steps == [] and DataValueEmbeddings.load(tmp_path / "dve").steps == []
    assert dve.embeddings.influence(model, test_batch).scores.shape == (12, 0)
    # no training dataloader was built: exact replay has nothing to rebuild and needs no dataset= (it demanded one)
    assert dve.embeddings.exact_influence(model, test_batch).scores.shape == (12, 0)


def test_validate_from_a_checkpoint_of_two_other_recordings_is_not_refused(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """Only a fit resumes: validate, test and predict restore a checkpoint without resuming any recording."""

    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    two = [DataValueEmbedding(tmp_path / name, projection_dim=k, report=None) for name, k in (("a", 32), ("b", 48))]
    model = Validated().double()
    checkpointing_trainer(tmp_path, 1, [*two, ckpts]).fit(model, make_loader())
    third = DataValueEmbedding(tmp_path / "c", projection_dim=16, report=None)
    checkpointing_trainer(tmp_path, 1, [third]).validate(model, make_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(ConfigError, match="holds 2 DataValueEmbedding recordings"):
        checkpointing_trainer(tmp_path, 2, [third]).fit(model, make_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("order", ["averaging_first", "dve_first", "no_averaging"])
def test_weights_averaged_in_at_train_end(fit, tmp_path: Path, test_batch: dict, order: str) -> None:
    """StochasticWeightAveraging puts its average into the module in its ``on_train_end``. Listed before the callback,
    the train end sees averaged weights: warned, and exact replay, which lands on the last step's weights, is refused
    naming the cause (before session 31 it replayed and failed on the final checkpoint with a list of every possible
    cause). Listed after, the replay checkpoint holds the last step's weights and a query of the averaged module is
    refused with the cause named. Without averaging: neither."""
    import warnings

    from lightning.pytorch.callbacks import StochasticWeightAveraging

    model = TinyMLP()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    callbacks = {"averaging_first": [swa, dve], "dve_first": [dve, swa], "no_averaging": [dve]}[order]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, None, max_epochs=3, callbacks=callbacks)
    warned = [w for w in caught if "tracked weights changed after the last optimizer step" in str(w.message)]
    assert len(warned) == (order == "averaging_first")
    if order == "averaging_first":
        with pytest.raises(UnsupportedError, match=r"exact replay is refused for this run: the tracked weights changed "
                                                   r"after the last optimizer step.*List DataValueEmbedding before"):
            dve.embeddings.exact_influence(model, test_batch)
    if order == "dve_first":
        with pytest.raises(ConfigError, match=r"after its last optimizer step.*StochasticWeightAveraging"):
            dve.embeddings.exact_influence(model, test_batch)
    elif order == "no_averaging":
        assert dve.embeddings.exact_influence(model, test_batch).scores.shape[0] == 12


def test_weights_changed_by_one_part_in_a_million_at_train_end_are_warned(fit, tmp_path: Path) -> None:
    """An EMA of high decay moves the weights little: any change after the last optimizer step is one."""
    import warnings

    class Nudge(Callback):
        def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            with torch.no_grad():
                for param in pl_module.parameters():
                    param.mul_(1 + 1e-6)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None, checkpoint_interval=None)
        fit(TinyMLP(), None, callbacks=[Nudge(), dve])  # listed before: the callback sees the changed weights
    assert [w for w in caught if "tracked weights changed after the last optimizer step" in str(w.message)]


def test_resuming_a_failed_run_from_an_earlier_checkpoint_with_nothing_to_train_finishes_that_checkpoints_steps(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, test_batch: dict,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-epoch run records 8 steps and fails at its train end; resuming from the epoch-0 checkpoint with
    ``max_epochs=1`` trains nothing, so the store is finished at that checkpoint: steps 0..3, the embeddings of an
    uninterrupted 1-epoch run, and the disk use in the manifest counts the step files left on disk."""
    from lightning_dve import store as store_module
    from lightning_dve.store import STEPS

    batch = {**test_batch, "x": test_batch["x"].double()}
    reference_model, reference = mlp_cls().double(), DataValueEmbedding(tmp_path / "reference", projection_dim=32)
    checkpointing_trainer(tmp_path, 1, [reference]).fit(reference_model, make_loader())
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    with monkeypatch.context() as patch:
        patch.setattr(store_module.TrajectoryStore, "write_embeddings",
                      lambda *args, **kwargs: (_ for _ in ()).throw(StoreError("cannot write: ENOSPC")))
        with pytest.raises(StoreError, match="ENOSPC"):
            checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
                mlp_cls().double(), make_loader())
    failed = TrajectoryStore.open(tmp_path / "dve")
    assert failed.steps == list(range(8))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "dve").rglob("*") if p.is_file())
    assert failed.manifest["bytes_total"] == on_disk  # counted when the recording finished, before the recursion
    epoch0 = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    model, again = mlp_cls().double(), DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    checkpointing_trainer(tmp_path, 1, [again]).fit(model, make_loader(), ckpt_path=epoch0)
    torch.testing.assert_close(model.net[0].weight, reference_model.net[0].weight, rtol=0, atol=0)
    assert again.embeddings.steps == list(range(4))
    torch.testing.assert_close(again.embeddings.influence(model, batch, per_step=True).scores,
                               reference.embeddings.influence(reference_model, batch, per_step=True).scores,
                               rtol=1e-10, atol=1e-14)
    manifest = again.embeddings.store.manifest
    on_disk = sum(p.stat().st_size for p in (tmp_path / "dve" / STEPS).rglob("*") if p.is_file())
    assert len(list((tmp_path / "dve" / STEPS).iterdir())) == 4
    assert (manifest["bytes_steps"], manifest["bytes_per_step"]) == (on_disk, on_disk // 4)


class Batched(TinyMLP):
    """TinyMLP with its own training loader of ``batch_size`` (``BatchSizeFinder`` changes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 16

    def train_dataloader(self) -> DataLoader:
        return DataLoader(DigitsDict(range(64)), batch_size=self.batch_size)


@pytest.mark.parametrize("finder", ["lr", "batch_size"])
def test_a_tuner_callback_that_restores_its_checkpoint_leaves_the_recording_of_a_plain_fit(
    fit, tmp_path: Path, test_batch: dict, finder: str
) -> None:
    """``LearningRateFinder`` and ``BatchSizeFinder`` save a checkpoint in their ``on_fit_start`` (run before this
    callback's), search, and restore it: the callback's state in it was saved before any store existed, so the fit
    records afresh (it was refused as a resume of other settings) and scores as a plain fit at the same settings."""
    tuner = (LearningRateFinder(num_training_steps=3, update_attr=False) if finder == "lr"
             else BatchSizeFinder(max_trials=1, steps_per_trial=1))
    model, dve = Batched(), DataValueEmbedding(tmp_path / "tuned", projection_dim=None, report=None)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, max_epochs=1, num_sanity_val_steps=0, callbacks=[dve, tuner],
                      default_root_dir=tmp_path)
    trainer.fit(model)
    plain, oracle = Batched(), DataValueEmbedding(tmp_path / "plain", projection_dim=None, report=None)
    plain.batch_size = model.batch_size
    fit(plain, oracle, train=plain.train_dataloader())
    tuned, expected = (d.embeddings.influence(m, test_batch, per_step=True) for d, m in ((dve, model), (oracle, plain)))
    assert torch.equal(tuned.steps, expected.steps)
    torch.testing.assert_close(tuned.scores, expected.scores)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_fit_with_a_tuner_callback_records_a_new_run_as_without_it(tmp_path: Path, overwrite: bool) -> None:
    """In a second fit of the same Trainer the finder's checkpoint (saved in its ``on_fit_start``, before this
    callback's) holds the first fit's store: the restore must not continue it. As without a finder, the second fit
    is refused in the non-empty ``save_dir`` (``overwrite=False``) or records only its own steps (``True``); it
    resumed the first run instead (steps 0-7 in one store, even with ``overwrite=False``)."""
    model = Batched()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None, overwrite=overwrite)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, max_epochs=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
                      callbacks=[dve, LearningRateFinder(num_training_steps=3, update_attr=False)])
    trainer.fit(model)
    trainer.fit_loop.max_epochs = 2
    if not overwrite:
        with pytest.raises(StoreError, match="is not empty: each fit records a new run"):
            trainer.fit(model)
        return
    trainer.fit(model)
    assert dve.embeddings.steps == [4, 5, 6, 7]


def test_a_resume_with_a_tuner_callback_is_recorded_as_the_run_lightning_trains(tmp_path: Path) -> None:
    """``fit(ckpt_path=...)`` with ``LearningRateFinder``: the finder saves its checkpoint before Lightning restores
    the loops and restores it after the search, so Lightning trains again from step 0 (from the checkpoint's
    weights). The callback must not append those steps to the store of the checkpoint's run (steps 0-3, then 0-7
    again): the pending resume is dropped, so the fit records a new run, refused in the non-empty ``save_dir``."""
    root = tmp_path / "run"
    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, default_root_dir=root)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    Trainer(max_epochs=1, callbacks=[DataValueEmbedding(root / "dve", projection_dim=None, report=None), ckpt],
            **common).fit(Batched())
    dve = DataValueEmbedding(root / "dve", projection_dim=None, report=None)
    trainer = Trainer(max_epochs=2, callbacks=[dve, LearningRateFinder(num_training_steps=3, update_attr=False)],
                      enable_checkpointing=False, **common)
    with pytest.raises(StoreError, match="is not empty: each fit records a new run"):
        trainer.fit(Batched(), ckpt_path=root / "ckpt" / "last.ckpt")
    assert TrajectoryStore.open(root / "dve").steps == [0, 1, 2, 3]


def test_pruning_during_fit_is_refused_naming_it(fit, tmp_path: Path) -> None:
    """Lightning's ModelPruning prunes at epoch ends: ``weight`` becomes ``weight_orig`` under a mask, which the
    optimizer updates. The next step is refused naming pruning (it used to say the layers were in no param group);
    the steps before it stay readable."""
    from lightning.pytorch.callbacks import ModelPruning

    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None, checkpoint_interval=None)
    pruning = ModelPruning("l1_unstructured", amount=0.3, verbose=0)
    with pytest.raises(UnsupportedError, match=r"\['net\.0', 'net\.2'\] no longer hold their weight as a "
                                               r"parameter.*ModelPruning.*exclude="):
        fit(TinyMLP(), dve, max_epochs=2, callbacks=[pruning])
    assert TrajectoryStore.open(tmp_path / "dve").steps == list(range(4))


def test_a_layer_pruned_before_fit_is_refused_at_fit_start(fit, tmp_path: Path) -> None:
    from lightning_dve import UnsupportedError

    model = TinyMLP()
    torch.nn.utils.prune.l1_unstructured(model.net[0], "weight", amount=0.3)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None, checkpoint_interval=None)
    with pytest.raises(UnsupportedError, match=r"'net\.0' \(Linear\) has a parametrised weight.*prune.*exclude="):
        fit(model, dve)


def test_a_fast_dev_run_records_into_a_scratch_folder_and_leaves_the_store(fit, tmp_path: Path) -> None:
    """``Trainer(fast_dev_run=True)`` (Lightning suppresses logging and checkpointing then) replaced the store in
    save_dir by its one step with ``overwrite=True``, and without it left a non-empty folder that refused the real
    run. It records into ``<save_dir>.fast_dev_run``, replaced by each fast_dev_run."""
    save_dir = tmp_path / "dve"
    for _ in range(2):  # the scratch store is replaced without overwrite=True; save_dir is not created
        fit(TinyMLP(), DataValueEmbedding(save_dir, projection_dim=16, report=None), fast_dev_run=True)
        assert DataValueEmbeddings.load(tmp_path / "dve.fast_dev_run").steps == [0] and not save_dir.exists()
    fit(TinyMLP(), DataValueEmbedding(save_dir, projection_dim=16, report=None))
    stored = _files(save_dir)
    assert DataValueEmbeddings.load(save_dir).steps == [0, 1, 2, 3]
    fit(TinyMLP(), DataValueEmbedding(save_dir, projection_dim=16, report=None, overwrite=True), fast_dev_run=True)
    assert _files(save_dir) == stored


def test_a_callback_whose_fits_ran_elsewhere_reads_the_last_store_written(fit, tmp_path: Path) -> None:
    """The parent process of ``ddp_spawn`` runs no hook (its fits run in child processes): its ``embeddings`` came
    from save_dir even after a fast_dev_run had recorded into the scratch folder. Here the fits run under other
    callback objects with the same save_dir, and ``parent`` is never fitted."""
    save_dir, parent = tmp_path / "dve", DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None)
    fit(TinyMLP(), DataValueEmbedding(save_dir, projection_dim=16, report=None))
    assert parent.embeddings.store.root == save_dir and parent.embeddings.steps == [0, 1, 2, 3]
    fit(TinyMLP(), DataValueEmbedding(save_dir, projection_dim=16, report=None), fast_dev_run=True)
    assert parent.embeddings.store.root == tmp_path / "dve.fast_dev_run" and parent.embeddings.steps == [0]
    fit(TinyMLP(), DataValueEmbedding(save_dir, projection_dim=16, report=None, overwrite=True), max_epochs=2)
    assert parent.embeddings.store.root == save_dir and len(parent.embeddings.steps) == 8
