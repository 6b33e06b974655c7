"""A fit continued later or elsewhere: the segment boundaries of a resumed fit, and a store named by a relative
path after the working directory changed."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lightning_dve import ConfigError, DataValueEmbedding, DataValueEmbeddings
from lightning_dve.callback_store import recording_in
from lightning_dve.dynamics import continue_plan, plan_boundaries
from lightning_dve.manifest_checks import layers_checksum
from tests.conftest import TinyMLP
from tests.test_resume_accumulation import checkpointing_trainer
from tests.test_segments_storage import WithValidation


def test_a_resumed_plan_keeps_the_boundaries_passed_and_plans_the_rest_after_them() -> None:
    assert continue_plan([], -1.0, -1, 12, 3) == plan_boundaries(12, 3) == [3, 7]  # a first fit
    assert continue_plan([3, 7], 12, 4, 12, 3) == [3, 7]  # as many steps as planned: the plan stays whole
    assert continue_plan([2, 4], 8, 7, 12, 3) == [2, 4]  # both passed: the resumed fit ends the last segment
    assert continue_plan([3, 7], 12, 5, 18, 3) == [3, 11]  # one passed: the other splits the 12 steps after 5
    assert continue_plan([3, 7], 12, 3, 18, 3) == [3, 10]  # a checkpoint at a boundary keeps it (its reference)
    assert continue_plan([3, 7], 12, 2, 18, 3) == plan_boundaries(18, 3) == [5, 11]  # none passed: afresh
    assert continue_plan([3, 7], 12, 5, float("inf"), 3) == [3]  # an unknown length plans no more
    assert continue_plan([], -1.0, -1, 24, 2, first_step=12) == [17]  # a store from step 12: over its own steps


def test_a_store_that_starts_at_a_later_step_plans_its_segments_over_its_steps_and_says_so(
    make_loader: Callable[..., DataLoader], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A later fit of the same Trainer with ``overwrite=True`` (like a checkpoint resumed without this callback's
    store) records from step 4: the plan over steps 0..11 put its first boundary before the store's first step,
    so the recursion ran as one segment and the warning blamed training_step returning None. Now the boundaries
    split the store's own steps, and an info line says which steps are not recorded."""
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None, overwrite=True, segments=2)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, callbacks=[dve])
    model, loader = TinyMLP(), make_loader()
    trainer.fit(model, loader)
    trainer.fit_loop.max_epochs = 3
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # Lightning's logger does not propagate
    logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger=logger.name):
            warnings.simplefilter("always")
            trainer.fit(model, loader)
    finally:
        logger.removeHandler(caplog.handler)
    assert dve.embeddings.steps == list(range(4, 12)) and dve.embeddings.segment_boundaries == [7, 11]
    assert not [w for w in caught if "segments=2, but" in str(w.message)]
    assert "recording starts at step 4" in caplog.text and "steps 0-3 are not recorded" in caplog.text


def test_a_fit_resumed_for_more_epochs_keeps_the_boundaries_it_passed_and_their_references(
    make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """A finished 2-epoch fit (8 steps, boundaries after steps 2 and 4, their references saved) resumed to 3
    epochs: the resumed fit planned [3, 7] afresh from the 12 steps, so its dynamics report held the final model
    only (no reference at 3 or 7) while the references at 2 and 4 went unused, without a word. The passed
    boundaries are kept: dynamics at all three, each boundary's rows the boundary scores of its saved reference."""
    model_cls = type("MLPWithValidation", (WithValidation, TinyMLP), {})
    model, val = model_cls().double(), make_loader(n=40, batch_size=20, offset=100)

    def run(epochs: int, ckpt_path: Path | None = None) -> DataValueEmbedding:
        dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32, segments=3)
        checkpointing_trainer(tmp_path, epochs, [dve, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(
            model, make_loader(), val, ckpt_path=ckpt_path)
        return dve

    assert run(2).embeddings.segment_boundaries == [2, 4, 7]
    emb = run(3, ckpt_path=tmp_path / "ckpt" / "last.ckpt").embeddings
    assert emb.steps == list(range(12)) and emb.segment_boundaries == [2, 4, 11]
    saved = emb.store.read_references()
    assert sorted(saved) == [2, 4]
    rows = [line.split(",") for line in (tmp_path / "dve" / "report" / "dynamics.csv").read_text().splitlines()[1:]]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [(0, 2, 0), (1, 4, 0), (1, 4, 1), (2, 11, 0),
                                                                 (2, 11, 1), (2, 11, 2)]
    for boundary, step in enumerate([2, 4]):
        scores = emb.score(saved[step], per_step=True, boundary=boundary).scores
        assert sum(float(r[5]) for r in rows if int(r[0]) == boundary) == pytest.approx(float(scores.sum()), rel=1e-9)


def test_a_fit_resumed_with_the_steps_it_planned_keeps_its_whole_plan(make_loader: Callable[..., DataLoader],
                                                                       tmp_path: Path) -> None:
    """A 12-step run (3 segments: boundaries after steps 3 and 7) that crashed at step 6, resumed from a checkpoint
    after step 4: the first version of the resumed plan split the 7 steps after step 4 anew ([3, 8]), away from
    the uninterrupted run's boundaries that checkpoints are aligned with."""
    class Crash(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
            if trainer.global_step == 6:
                raise RuntimeError("crash")

    def run(callbacks: list, ckpt_path: Path | None = None) -> None:
        checkpointing_trainer(tmp_path, 3, callbacks).fit(TinyMLP().double(), make_loader(), ckpt_path=ckpt_path)

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    with pytest.raises(RuntimeError, match="crash"):
        run([DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None, segments=3), Crash(), saver])
    resumed = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None, segments=3)
    run([resumed], ckpt_path=next((tmp_path / "ckpt").glob("*step=5.ckpt")))
    assert resumed.embeddings.steps == list(range(12)) and resumed.embeddings.segment_boundaries == [3, 7, 11]
    # the weights at boundary 3, passed before the checkpoint, came with it (influence_at's check)
    assert sorted(resumed.embeddings.store.manifest["boundary_weights"]) == ["3", "7"]


def test_a_relative_save_dir_stays_with_its_store_when_the_working_directory_changes(
    fit: Callable, tmp_path: Path, test_batch: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two experiments record into ``save_dir="runs/dve"`` from their own folders: the first one's handles,
    loaded or from its callback, were refused once the process moved to the second folder ("recorded again"),
    their store root resolving there. The store root is absolute from fit start and from ``load``."""
    handles = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        torch.manual_seed(0 if name == "a" else 1)
        model, dve = TinyMLP(), DataValueEmbedding("runs/dve", projection_dim=16, report=None)
        fit(model, dve)
        handles[name] = (model, dve, DataValueEmbeddings.load("runs/dve"))
    model, dve, loaded = handles["a"]
    assert dve.embeddings.store.root == loaded.store.root == tmp_path / "a" / "runs" / "dve"
    monkeypatch.chdir(tmp_path / "b")
    expected = DataValueEmbeddings.load(tmp_path / "a" / "runs" / "dve").influence(model, test_batch).scores
    for handle in (loaded, dve.embeddings):
        torch.testing.assert_close(handle.influence(model, test_batch).scores, expected, rtol=0, atol=0)
    assert os.getcwd() == str(tmp_path / "b")


class SaveAtStep(Callback):
    """Saves a checkpoint in ``on_train_batch_end`` once ``global_step`` reaches ``step``."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


class OverflowAtStep(TinyMLP):
    """With ``overflow`` set, its loss overflows float16 at batch 1 (the grad scaler skips that step)."""

    overflow = False

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e8 if batch_idx == 1 and self.overflow else loss


@pytest.mark.parametrize("case", ["saver listed first", "saver listed after", "skipped step"])
def test_a_checkpoint_saved_inside_a_step_before_it_was_recorded_is_not_resumed(
    make_loader: Callable[..., DataLoader], tmp_path: Path, case: str
) -> None:
    """A callback listed before DataValueEmbedding saved a checkpoint in ``on_train_batch_end`` after step 1's
    update: its weights are after step 1, its recording ends at step 0. Resuming from it trained on from step 2 and
    silently dropped step 1 from the store. Now it is refused, naming the step, and the store is untouched; the
    same saver listed after the callback, or after a step the grad scaler skipped (nothing to record), resumes to
    the uninterrupted run's steps."""
    path, skipped = tmp_path / "inside.ckpt", case == "skipped step"

    def trainer(epochs: int, saver_first: bool) -> Trainer:
        dve = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None)
        plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if skipped else []
        return Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp_path, plugins=plugins,
                       callbacks=[SaveAtStep(path, 2), dve] if saver_first else [dve, SaveAtStep(path, 2)])

    first = OverflowAtStep()
    first.overflow = skipped
    trainer(1, case != "saver listed after").fit(first, make_loader())
    before, model = _store_files(tmp_path / "dve"), OverflowAtStep()
    if case == "saver listed first":
        with pytest.raises(ConfigError, match="saved during step 1, after its update was applied"):
            trainer(2, False).fit(model, make_loader(), ckpt_path=path)
        assert _store_files(tmp_path / "dve") == before
    else:
        trainer(2, False).fit(model, make_loader(), ckpt_path=path)
        recorded = DataValueEmbeddings.load(tmp_path / "dve").steps
        assert recorded == [step for step in range(8) if step != 1 or not skipped]


def test_a_weights_only_checkpoint_is_refused_as_such(make_loader: Callable[..., DataLoader], tmp_path: Path) -> None:
    """``ModelCheckpoint(save_weights_only=True)``: resuming from it was refused as a fresh fit into a non-empty
    save_dir ("or continue an interrupted run with ckpt_path", which the user had just done)."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_weights_only=True)
    checkpointing_trainer(tmp_path, 1, [DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None),
                                        saver]).fit(TinyMLP().double(), make_loader())
    before = _store_files(tmp_path / "dve")
    with pytest.raises(ConfigError, match=r"weights only \(ModelCheckpoint\(save_weights_only=True\)\)"):
        checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None)]).fit(
            TinyMLP().double(), make_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert _store_files(tmp_path / "dve") == before


@pytest.mark.parametrize("other", [dict(layout="per_layer"), dict(embeddings="replay"), {}],
                         ids=["layout auto and per_layer", "embeddings recursion and replay", "same settings"])
def test_two_callbacks_whose_settings_key_alike_record_side_by_side(fit: Callable, tmp_path: Path,
                                                                     other: dict) -> None:
    """Each with its own save_dir: Lightning refused the Trainer ("more than one stateful callback ... state_key
    must be unique"), as the state key held the settings only, and "auto" keys like "per_layer"."""
    first = DataValueEmbedding(tmp_path / "a", projection_dim=16, report=None)
    second = DataValueEmbedding(tmp_path / "b", projection_dim=16, report=None, **other)
    assert first.state_key != second.state_key
    fit(TinyMLP(), first, callbacks=[second])
    assert first.embeddings.steps == second.embeddings.steps == [0, 1, 2, 3]


def test_a_checkpoint_keyed_without_the_save_dir_still_resumes(make_loader: Callable[..., DataLoader],
                                                                tmp_path: Path, test_batch: dict) -> None:
    """A checkpoint of an earlier version keys the callback's state by its settings only: Lightning does not pass
    it to the new key, and the callback finds it by its save_dir; the resumed run equals an uninterrupted one."""
    def run(root: Path, epochs: int, ckpt_path: Path | None = None) -> tuple[TinyMLP, DataValueEmbedding]:
        torch.manual_seed(0)
        model = TinyMLP().double()
        dve = DataValueEmbedding(root / "dve", projection_dim=16, storage_dtype="float64", report=None)
        checkpointing_trainer(root, epochs, [dve, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)]).fit(
            model, make_loader(), ckpt_path=ckpt_path)
        return model, dve

    model, whole = run(tmp_path / "whole", 2)
    _, first = run(tmp_path / "cut", 1)
    path = tmp_path / "cut" / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    old_key = f"DataValueEmbedding{ {'settings_hash': first.config.settings_hash()} !r}"
    checkpoint["callbacks"] = {old_key if key == first.state_key else key: state
                               for key, state in checkpoint["callbacks"].items()}
    torch.save(checkpoint, path)
    resumed_model, resumed = run(tmp_path / "cut", 2, path)
    assert resumed.embeddings.steps == whole.embeddings.steps == list(range(8))
    batch = {key: value.double() if value.is_floating_point() else value for key, value in test_batch.items()}
    torch.testing.assert_close(resumed.embeddings.influence(resumed_model, batch).scores,
                               whole.embeddings.influence(model, batch).scores, rtol=1e-12, atol=0)


def test_resuming_a_finished_run_from_its_last_steps_checkpoint_leaves_the_store(
    make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """``ModelCheckpoint(every_n_train_steps=4)`` saves in the last step (4 steps): resuming from it trains
    nothing, but Lightning still calls ``on_train_end``, which ran the train end again (a new run id and lineage,
    the recursion, the report). Now the store stays byte for byte, as from an epoch-end checkpoint."""
    def run(ckpt_path: Path | None = None) -> None:
        dve = DataValueEmbedding(tmp_path / "dve", projection_dim=16)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        checkpointing_trainer(tmp_path, 1, [dve, saver]).fit(TinyMLP().double(), make_loader(), ckpt_path=ckpt_path)

    run()
    before = _store_files(tmp_path / "dve")
    run(next((tmp_path / "ckpt").glob("*step=4.ckpt")))
    assert _store_files(tmp_path / "dve") == before


def test_an_earlier_versions_two_recordings_with_relative_save_dirs_are_told_apart_by_their_settings(
    tmp_path: Path
) -> None:
    """A checkpoint of an earlier version keys each callback's state by its settings only, with save_dir as given
    (relative): resumed from another folder with absolute paths, neither matched by folder and the resume was
    refused ("cannot tell which one it continues"). The callback's own settings pick its state."""
    states = {f"DataValueEmbedding{ {'settings_hash': h} !r}": {"settings_hash": h, "last_step": 3, "save_dir": d}
              for h, d in (("aaaa", "run/dve"), ("bbbb", "run/dve2"))}
    checkpoint = {"callbacks": states}
    root = tmp_path / "elsewhere" / "run" / "dve"
    assert recording_in(checkpoint, "new key", root, {"bbbb"})["save_dir"] == "run/dve2"
    with pytest.raises(ConfigError, match="holds 2 DataValueEmbedding recordings"):
        recording_in(checkpoint, "new key", root, {"cccc"})


def test_a_store_of_an_earlier_version_resumed_records_the_precision(make_loader: Callable[..., DataLoader],
                                                                       tmp_path: Path) -> None:
    """Stores of an earlier version have no "precision" in their manifest; one resumed and finished by this
    version under 64-true kept none, so its queries did not convert float32 test batches as the Trainer did. Nor
    did it get the DataModule's hooks (session 41) or its layer entries' checksum (session 42), which it records
    now too."""
    def run(epochs: int, ckpt_path: Path | None = None) -> None:
        dve = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None)
        checkpointing_trainer(tmp_path, epochs, [dve, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(
            TinyMLP().double(), make_loader(), ckpt_path=ckpt_path)

    run(1)
    manifest_path = tmp_path / "dve" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("precision", "datamodule_hooks", "layers_checksum"):
        del manifest[key]
    manifest_path.write_text(json.dumps(manifest))
    run(2, tmp_path / "ckpt" / "last.ckpt")
    resumed = json.loads(manifest_path.read_text())
    assert (resumed["precision"], resumed["datamodule_hooks"]) == ("64-true", [])
    assert resumed["layers_checksum"] == layers_checksum(resumed["layers"])


@pytest.mark.parametrize("built", ["float32", "float64"])
def test_a_resume_that_rounds_the_weights_is_warned_about_at_fit_start(make_loader: Callable[..., DataLoader],
                                                                       tmp_path: Path, built: str) -> None:
    """Under ``precision="64-true"`` Lightning loads the checkpoint into a module built in float32 before converting
    it, rounding the weights: the fit warns as it starts, naming the cause and the fix (before: exact replay refused
    the run later, blaming randomness in ``training_step``). A module built in float64 resumes exactly, silently."""
    def run(ckpt_path: Path | None = None) -> list[str]:
        dve = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        module = TinyMLP() if built == "float32" else TinyMLP().double()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpointing_trainer(tmp_path, 1 if ckpt_path is None else 2, [dve, saver]).fit(
                module, make_loader(), ckpt_path=ckpt_path)
        return [str(w.message) for w in caught if "weights are not the checkpoint's" in str(w.message)]

    assert run() == []
    warned = run(tmp_path / "ckpt" / "last.ckpt")
    assert len(warned) == (built == "float32")
    if warned:
        assert "['net.0.weight', 'net.0.bias', 'net.2.weight'] ..." in warned[0] and "self.double()" in warned[0]


def test_a_rank_resumed_without_its_shard_is_told_so(tmp_path: Path) -> None:
    """Rank 1 of a DDP resume whose shard is not on its disk: the store's own 'no store, point to the save_dir of a
    finished fit' did not say that each rank needs its own shard (before session 30)."""
    from lightning_dve.callback_store import open_rank_store
    from lightning_dve.distributed import SingleProcess
    from lightning_dve.errors import StoreError

    class RankOne(SingleProcess):  # a rank 1 whose collectives see no other failure
        rank, world_size = 1, 2

    (tmp_path / "dve").mkdir()
    with pytest.raises(StoreError, match=r"rank 1 has no shard to resume at .*shards/rank_1: each rank keeps its "
                                         r"layers' steps in its own shard"):
        open_rank_store(RankOne(), tmp_path / "dve", {}, {"last_step": 3, "save_dir": str(tmp_path / "dve")}, False)
