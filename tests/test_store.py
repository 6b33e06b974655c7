"""The on-disk store: loading in a fresh process, and refusing every kind of damaged or foreign store.

Damage is done to a copy of the session's finished recording (``trained`` fixture), one kind per test.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from torch.utils.data import DataLoader

import lightning_dve.files
import lightning_dve.step_files
import lightning_dve.store
from lightning_dve import (ConfigError, DataValueEmbedding, DataValueEmbeddings, DVEConfig, GradientError,
                          StoreError)
from lightning_dve.folder_lock import LOCK_FILE
from lightning_dve.step_files import step_name
from lightning_dve.store import StepRecord, TrajectoryStore
from tests.conftest import DigitsDict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store_copy(trained, tmp_path) -> Path:
    """A private copy of the finished recording, free to damage."""
    return Path(shutil.copytree(trained.root, tmp_path / "copy"))


def tmp_files(root: Path) -> list[str]:
    return [name for _, _, files in os.walk(root) for name in files if name.endswith(".tmp")]


# --- a fresh process ---------------------------------------------------------------------------------------

FRESH_PROCESS = textwrap.dedent(
    """
    import sys

    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file
    from torch import nn

    from lightning_dve import DataValueEmbeddings

    store, weights, batch, out = sys.argv[1:]


    class Model(nn.Module):  # the trained architecture, rebuilt from scratch: no state shared with the test
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch["x"]), batch["y"])


    model = Model()
    model.load_state_dict(load_file(weights))
    result = DataValueEmbeddings.load(store).influence(model, load_file(batch), per_step=True)
    save_file({"scores": result.scores, "sample_ids": result.sample_ids, "steps": result.steps}, out)
    """
)


def test_load_in_a_fresh_process_scores_like_in_process(trained, tmp_path, test_batch):
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, tmp_path / "model.safetensors")
    save_file(test_batch, tmp_path / "batch.safetensors")
    script = tmp_path / "score.py"
    script.write_text(FRESH_PROCESS)
    out = tmp_path / "scores.safetensors"
    done = subprocess.run([sys.executable, str(script), str(trained.root), str(tmp_path / "model.safetensors"),
                           str(tmp_path / "batch.safetensors"), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's package
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = load_file(out)

    in_process = trained.dve.embeddings.influence(trained.model, test_batch, per_step=True)
    reloaded = DataValueEmbeddings.load(trained.root).influence(trained.model, test_batch, per_step=True)
    assert fresh["scores"].shape == (12, 8 * 16)
    assert fresh["sample_ids"].tolist() == in_process.sample_ids.tolist() == list(range(64)) * 2
    assert fresh["steps"].tolist() == in_process.steps.tolist()
    assert in_process.scores.abs().max() > 0
    torch.testing.assert_close(reloaded.scores, in_process.scores, rtol=0, atol=0)
    torch.testing.assert_close(fresh["scores"], in_process.scores)


# --- damaged manifest --------------------------------------------------------------------------------------


def test_truncated_manifest(store_copy):
    manifest = store_copy / "manifest.json"
    text = manifest.read_bytes()
    manifest.write_bytes(text[: len(text) // 2])
    with pytest.raises(StoreError, match=r"manifest\.json is truncated or corrupt"):
        DataValueEmbeddings.load(store_copy)


def test_missing_manifest(store_copy):
    (store_copy / "manifest.json").unlink()
    with pytest.raises(StoreError, match=r"manifest\.json is missing"):
        DataValueEmbeddings.load(store_copy)


def test_manifest_of_another_schema_version(store_copy):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"schema 999.*reads schema 2"):
        DataValueEmbeddings.load(store_copy)


def test_the_settings_named_as_changed_leave_out_those_an_earlier_version_lacks_at_their_default():
    """A store of an earlier version lacks the settings added since: a resume refused for another seed also named
    curvature, checkpoint_interval and adam_second_moment as changed from None (a review of session 39)."""
    from lightning_dve.config import ADDED_FIELDS
    from lightning_dve.store_checks import settings_changes

    recorded = {k: v for k, v in DVEConfig(seed=0).to_dict().items() if k not in ADDED_FIELDS}
    assert settings_changes(recorded, DVEConfig(seed=1).to_dict()) == {"seed": (0, 1)}
    assert settings_changes(recorded, DVEConfig(curvature="ggn").to_dict()) == {"curvature": (None, "ggn")}


@pytest.mark.parametrize("key", ["layers", "rows", "settings_hash", "steps"])
def test_a_manifest_without_a_key_is_refused_as_damaged(store_copy, key):
    """Each gave a bare KeyError (an audit of session 39)."""
    manifest = json.loads((store_copy / "manifest.json").read_text())
    del manifest[key]
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"manifest\.json lacks the key\(s\) \['{key}'\] \(edited or damaged\): "
                                         "restore it from a backup or record the run again"):
        DataValueEmbeddings.load(store_copy)


def _in_dim(manifest: dict) -> None:
    manifest["layers"][0]["in_dim"] -= 1


@pytest.mark.parametrize("edit, named", [
    (lambda m: m.update(rows="8"), "rows is not a list of ints"),
    (lambda m: m.update(steps=None), "steps is not a list of ints"),
    (lambda m: m.update(segments=None), r"segments is not a list of \[first, last\] step pairs"),
    (lambda m: m.update(final_weights="x"), "final_weights is not a mapping or null"),
    (lambda m: m.update(layers=m["layers"][::-1]), "its layer entries are not the ones written with it"),
    (_in_dim, "its layer entries are not the ones written with it"),
    (lambda m: m["layers"][0]["projection"]["in"].pop("dim"), "its layer entries are not the ones written with it"),
    (lambda m: m["layers"][0].pop("name"), "layers is not a list of named layer entries"),
    (lambda m: m.update(layers=[m["layers"][0]] * 2), "layers names a layer twice"),
], ids=["rows", "steps", "segments", "final_weights", "layer order", "in_dim", "projection", "name", "a layer twice"])
def test_a_manifest_with_a_key_of_another_shape_is_refused_as_damaged(store_copy, edit, named):
    """Such edits failed later in a query with a bare TypeError or KeyError, or with a refusal naming another cause
    (an ``in_dim`` edited: "parameters frozen or unfrozen during fit"; a helper's audit of session 42). The layer
    entries are checked against a checksum written with them."""
    manifest = json.loads((store_copy / "manifest.json").read_text())
    edit(manifest)
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"manifest\.json is not the manifest its store wrote: {named}.*\(edited or "
                                         "damaged\): restore it from a backup or record the run again"):
        DataValueEmbeddings.load(store_copy)


@pytest.mark.parametrize("parent", [False, True], ids=["save_dir", "its parent"])
def test_a_save_dir_that_is_a_file_is_refused_by_name(fit, mlp_cls, tmp_path, parent):
    """A file as save_dir gave pathlib's bare NotADirectoryError; a file as its parent, advice to free disk space."""
    (tmp_path / "taken").write_text("a file")
    save_dir = tmp_path / "taken" / "dve" if parent else tmp_path / "taken"
    taken = re.escape(str(tmp_path / "taken"))
    with pytest.raises(StoreError, match=rf"save_dir {re.escape(str(save_dir))} cannot be a folder: {taken} is a "
                                         r"file\. Point save_dir to a folder"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, projection_dim=32))
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.parametrize("edit", [{"curvature": "ggn"}, {"projection_dim": 8}, {"seed": 7}, {"layout": "per_layer"}, None],
                         ids=["curvature", "projection_dim", "seed", "layout", "no settings"])
def test_manifest_settings_edited_by_hand_are_refused(store_copy, edit):
    """Settings that are not the ones the manifest's settings_hash was made from: they loaded and answered with
    the edited settings (a layout edit failed in a query's matrix product)."""
    manifest = json.loads((store_copy / "manifest.json").read_text())
    if edit is None:
        del manifest["settings"]
    else:
        manifest["settings"].update(edit)
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"damaged manifest: its settings are missing or not the ones its "
                                         r"settings_hash \w+ was made from"):
        DataValueEmbeddings.load(store_copy)


@pytest.mark.parametrize("edited, named", [([[0, 4], [5, 7]], r"\[\[0, 4\], \[5, 7\]\]"), ([[0, 7]], r"\[\[0, 7\]\]"),
                                           (None, "None")], ids=["moved", "one", "deleted"])
def test_manifest_segments_edited_by_hand_are_refused(fit, mlp_cls, save_dir, test_batch, edited, named):
    """The queries chain the segment factors at the manifest's boundaries, which the settings hash does not cover:
    boundaries edited by hand loaded and changed every score, silently (an audit). The factors' file names the
    boundaries it was written for. One segment, or none named (the key deleted), left the factors out of every
    score, silently, until session 42 (a helper's audit: the first segment's columns 0.05 off)."""
    model = mlp_cls()
    fit(model, DataValueEmbedding(save_dir, projection_dim=32, segments=2, report=None), max_epochs=2)
    manifest = json.loads((save_dir / "manifest.json").read_text())
    assert manifest["segments"] == [[0, 3], [4, 7]]
    DataValueEmbeddings.load(save_dir).influence(model, test_batch)
    manifest = {**manifest, "segments": edited} if edited else {k: v for k, v in manifest.items() if k != "segments"}
    (save_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"damaged manifest: its segments {named} are not the ones its "
                                         r"segment factors were written for, \[\[0, 3\], \[4, 7\]\]"):
        DataValueEmbeddings.load(save_dir)


# --- missing, truncated or foreign data files --------------------------------------------------------------


@pytest.mark.parametrize("path, message", [
    ("steps/step_00000003.safetensors", r"missing the steps file\(s\) of 1 step\(s\), first of steps \[3\]"),
    ("steps/step_00000000.safetensors", r"missing the steps file\(s\) of 1 step\(s\), first of steps \[0\]"),
    ("embeddings/index.safetensors", r"embeddings/index\.safetensors is missing"),
    ("embeddings/sample_ids.npy", r"embeddings/sample_ids\.npy is missing"),
], ids=["steps", "first step", "embeddings index", "embeddings sample ids"])  # a missing layer file: test_queries
def test_missing_data_file(store_copy, path, message):
    (store_copy / path).unlink()
    with pytest.raises(StoreError, match=rf"{message}.*record the run again"):
        DataValueEmbeddings.load(store_copy)


@pytest.mark.parametrize("keep", ["half", "all but 7 bytes", "4 bytes"])
def test_truncated_embeddings_file_fails_before_scoring(store_copy, keep):
    """The arrays are memory-mapped: a truncated one is refused when opened (at load, and by the store read that
    queries use), never read past its end."""
    path = store_copy / "embeddings" / "layer_001.npy"
    data = path.read_bytes()
    size = {"half": len(data) // 2, "all but 7 bytes": len(data) - 7, "4 bytes": 4}[keep]
    path.write_bytes(data[:size])
    for read in (DataValueEmbeddings.load, lambda root: TrajectoryStore.open(root).embedding_arrays().step(2)):
        with pytest.raises(StoreError, match=r"layer_001\.npy is truncated or corrupt.*record the run again"):
            read(store_copy)


def test_truncated_step_file(store_copy):
    path = store_copy / "steps" / "step_00000005.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    store = TrajectoryStore.open(store_copy)
    store.read_step(4)
    with pytest.raises(StoreError, match=r"step_00000005\.safetensors is corrupt or truncated"):
        store.read_step(5)


def test_file_from_a_run_with_other_settings(store_copy, fit, mlp_cls, tmp_path):
    other = tmp_path / "other"
    fit(mlp_cls(), DataValueEmbedding(other, projection_dim=64, seed=1), max_epochs=2)
    shutil.rmtree(store_copy / "embeddings")
    shutil.copytree(other / "embeddings", store_copy / "embeddings")  # same steps and shapes, other settings
    shutil.copy(other / "steps" / "step_00000006.safetensors", store_copy / "steps" / "step_00000006.safetensors")
    with pytest.raises(StoreError, match=r"embeddings/index\.safetensors was written with settings.*two runs are "
                                         r"mixed"):
        DataValueEmbeddings.load(store_copy)
    with pytest.raises(StoreError, match=r"two runs are mixed"):
        TrajectoryStore.open(store_copy).read_step(6)


def test_a_step_file_of_another_fit_with_the_same_settings_is_refused(store_copy, fit, mlp_cls, tmp_path):
    """Same settings, same step numbers: only the run id tells the files apart (accepted before session 40)."""
    other = tmp_path / "other"
    fit(mlp_cls(), DataValueEmbedding(other, projection_dim=64), max_epochs=2)
    assert TrajectoryStore.open(other).settings_hash == TrajectoryStore.open(store_copy).settings_hash
    shutil.copy(other / "steps" / step_name(6), store_copy / "steps" / step_name(6))
    with pytest.raises(StoreError, match=r"step_00000006\.safetensors holds step 6 of another recording \(run "
                                         r"\w+; this store records run \w+.*Put back this run's own file"):
        TrajectoryStore.open(store_copy).read_step(6)
    assert torch.equal(TrajectoryStore.open(store_copy).read_step(5).sample_ids,
                       TrajectoryStore.open(other).read_step(5).sample_ids)  # the same batches: only the run differs


def test_embeddings_and_segment_factors_of_another_fit_with_the_same_settings_are_refused(fit, mlp_cls, tmp_path):
    """Same settings, same steps and shapes, another model: the other fit's embeddings folder or segment factors,
    copied in, were read as this store's and changed every score, silently (a helper's audit of session 42; the
    step files were checked since session 40). Both now name the recording that wrote them."""
    runs = {name: tmp_path / name for name in ("this", "other")}
    for seed, root in enumerate(runs.values()):
        fit(mlp_cls(seed=seed), DataValueEmbedding(root, projection_dim=64, segments=2, report=None), max_epochs=2)
    copy = Path(shutil.copytree(runs["this"], tmp_path / "copy"))
    DataValueEmbeddings.load(copy)
    shutil.copy(runs["other"] / "segments.safetensors", copy / "segments.safetensors")
    with pytest.raises(StoreError, match=r"segments\.safetensors was written by another recording \(run \w+\) than "
                                         r"its manifest's \(run \w+\), with the same settings"):
        DataValueEmbeddings.load(copy).influence_at(0, mlp_cls(), DigitsDict(range(8)).batch())
    shutil.copy(runs["this"] / "segments.safetensors", copy / "segments.safetensors")
    shutil.rmtree(copy / "embeddings")
    shutil.copytree(runs["other"] / "embeddings", copy / "embeddings")
    with pytest.raises(StoreError, match=r"index\.safetensors was written by another recording"):
        DataValueEmbeddings.load(copy)


def test_load_with_other_settings_lists_the_differences(trained):
    with pytest.raises(StoreError, match=r"other settings.*'projection_dim': \(64, 32\)") as info:
        DataValueEmbeddings.load(trained.root, settings=DVEConfig(projection_dim=32))
    assert "seed" not in str(info.value)  # only the fields that differ
    with pytest.raises(StoreError, match=r"'projection_dim': \(64, 32\).*'seed': \(0, 3\)"):
        DataValueEmbeddings.load(trained.root, settings=DVEConfig(projection_dim=32, seed=3))
    assert DataValueEmbeddings.load(trained.root, settings=DVEConfig(projection_dim=64)).steps == list(range(8))
    # "auto" (the default) resolves with the store's 128 dims to "full", as the recording did; "per_layer" differs
    assert trained.dve.embeddings.store.manifest["settings"]["layout"] == "full"
    with pytest.raises(StoreError, match=r"'layout': \('full', 'per_layer'\)"):
        DataValueEmbeddings.load(trained.root, settings=DVEConfig(projection_dim=64, layout="per_layer"))


# --- unfinished recordings ---------------------------------------------------------------------------------


def test_store_whose_recording_did_not_finish(fit, mlp_cls, save_dir):
    class FailsAtStep2(mlp_cls):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        fit(FailsAtStep2(), DataValueEmbedding(save_dir))
    assert len(list((save_dir / "steps").glob("*.safetensors"))) == 2
    with pytest.raises(StoreError, match=r"status='recording', expected 'complete'.*did not finish"):
        DataValueEmbeddings.load(save_dir)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_loading_a_store_whose_fit_is_still_recording_reads_no_step_file(tmp_path, damage):
    """A fit still recording packs its step files and deletes the loose ones: a load listed them and read each one,
    so one deleted meanwhile gave torch's "unable to open file", and one caught mid-write "corrupt or truncated ...
    record again" (an audit, racing a load against an overwriting fit). Unfinished, the store is refused as
    unfinished, from the files' names alone."""
    recorded(tmp_path, 3, finish=False)
    step = tmp_path / "steps" / step_name(1)
    step.unlink() if damage == "deleted" else step.write_bytes(step.read_bytes()[:40])
    with pytest.raises(StoreError, match=r"The recording did not finish\. If that fit is still running, wait for it"):
        DataValueEmbeddings.load(tmp_path)
    for path in (tmp_path / "steps").iterdir():
        path.unlink()
    with pytest.raises(StoreError, match=r"did not finish\. It holds no step"):
        DataValueEmbeddings.load(tmp_path)


def test_disk_full_during_append(fit, mlp_cls, save_dir, monkeypatch):
    real_save_file = lightning_dve.files.write_safetensors

    def save_file_until_full(tensors, filename, metadata=None):
        if "step_00000003" in filename:
            Path(filename).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(lightning_dve.files, "write_safetensors", save_file_until_full)
    model = mlp_cls()
    with pytest.raises(StoreError, match=r"step_00000003\.safetensors: the disk is full.*kept"):
        fit(model, DataValueEmbedding(save_dir))
    assert sorted(p.name for p in (save_dir / "steps").glob("*")) == [
        f"step_0000000{s}.safetensors" for s in range(3)]
    assert tmp_files(save_dir) == []
    manifest = json.loads((save_dir / "manifest.json").read_text())
    for step in range(3):  # intact and readable
        tensors = load_file(save_dir / "steps" / f"step_0000000{step}.safetensors")
        assert tensors["sample_ids"].tolist() == list(range(16 * step, 16 * step + 16))
    assert manifest["status"] == "recording"
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_other_write_error_during_append(fit, mlp_cls, save_dir, monkeypatch):
    def failing_save_file(tensors, filename, metadata=None):
        raise OSError(errno.EACCES, "Permission denied", filename)

    monkeypatch.setattr(lightning_dve.files, "write_safetensors", failing_save_file)
    with pytest.raises(StoreError, match=r"the write failed .*Permission denied"):
        fit(mlp_cls(), DataValueEmbedding(save_dir))
    assert tmp_files(save_dir) == []


@pytest.mark.parametrize("text", ["null", "[]"])
def test_manifest_that_is_json_but_not_an_object(store_copy, text):
    (store_copy / "manifest.json").write_text(text)
    with pytest.raises(StoreError, match=r"manifest\.json holds a JSON \w+, not a JSON object"):
        DataValueEmbeddings.load(store_copy)


# --- a store written step by step (no Trainer) -------------------------------------------------------------

SMALL = {"settings": {}, "settings_hash": "h", "storage_dtype": "float32", "layers": [{"name": "a"}]}


def record(step: int) -> StepRecord:
    """A one-layer step of 2 occurrences (ids ``2 step, 2 step + 1``)."""
    return StepRecord(step, torch.arange(2) + 2 * step, torch.full((2,), 0.5, dtype=torch.float64),
                      torch.tensor([0.1], dtype=torch.float64), {"a": torch.full((2, 3), float(step))})


def recorded(root: Path, steps: int, finish: bool = True, **manifest) -> TrajectoryStore:
    """A store of ``steps`` steps in ``root`` (finished, with embeddings, references and segments, or interrupted)."""
    store = TrajectoryStore.create(root, {**SMALL, **manifest}, overwrite=False)
    for step in range(steps):
        store.append(record(step))
    if finish:
        store.finish_recording({})
        store.begin_embeddings({"a": 3}, torch.float32)
        for step in range(steps):
            store.write_embeddings(step, {"a": torch.ones(2, 3)}, torch.arange(2))
        store.finish_embeddings()
        store.write_reference(1, {"a": torch.ones(1, 3)})
        store.write_segments([(0, 1), (1, steps)], [{}, {"a": torch.eye(3)}])
        store.manifest["embeddings"] = "complete"
        store.record_disk_use()
    return store


def files_of(root: Path) -> dict[str, bytes]:
    """The store's files (without the lock file a recording holds, folder_lock.py)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


def test_resume_does_not_read_a_corrupt_step_file_after_the_checkpoint(tmp_path):
    """A run killed in the middle of step 5's file (zero bytes after a power loss) resumes from a checkpoint after
    step 3: the resumed run redoes steps 4 and 5, so that file is deleted unread; a corrupt step the checkpoint
    keeps is still refused."""
    root = tmp_path / "dve"
    recorded(root, 6, finish=False)
    (root / "steps" / "step_00000005.safetensors").write_bytes(b"")
    with pytest.raises(StoreError, match=r"step_00000005\.safetensors is corrupt or truncated"):
        TrajectoryStore.open(root)
    store = TrajectoryStore.reopen(root, last_step=3)
    assert store.steps == [0, 1, 2, 3] and (root / "steps" / "step_00000005.safetensors").is_file()
    store.append(record(4))
    assert sorted(p.name for p in (root / "steps").iterdir()) == [f"step_0000000{s}.safetensors" for s in range(5)]
    assert TrajectoryStore.open(root).steps == [0, 1, 2, 3, 4]
    (root / "steps" / "step_00000002.safetensors").write_bytes(b"")
    with pytest.raises(StoreError, match=r"step_00000002\.safetensors is corrupt or truncated"):
        TrajectoryStore.reopen(root, last_step=3)


def test_a_step_file_whose_sample_ids_are_not_a_list_is_refused_when_reopened(tmp_path):
    """An interrupted store lists its steps (and their occurrences) from the step files' headers: a file whose
    ``sample_ids`` is a scalar is damaged, not a crash."""
    root = tmp_path / "dve"
    recorded(root, 3, finish=False)
    path = root / "steps" / "step_00000002.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({**load_file(path), "sample_ids": torch.tensor(4)}, path, metadata)
    with pytest.raises(StoreError, match=r"step_00000002\.safetensors is corrupt or truncated"):
        TrajectoryStore.open(root)


@pytest.mark.parametrize("reopen", ["open", "reopen"])
def test_a_store_listed_from_its_step_files_embeds_each_steps_occurrences(tmp_path, reopen):
    """An interrupted store (opened, or reopened at an earlier checkpoint and continued) knows each step's
    occurrences from its step files: the embeddings of every step fit and read back."""
    root = tmp_path / "dve"
    recorded(root, 4, finish=False)
    store = TrajectoryStore.open(root) if reopen == "open" else TrajectoryStore.reopen(root, last_step=1)
    if reopen == "reopen":
        store.append(dataclasses.replace(record(2), sample_ids=torch.arange(5),
                                         weights=torch.ones(5, dtype=torch.float64), grads={"a": torch.zeros(5, 3)}))
    store.finish_recording({})
    store.begin_embeddings({"a": 3}, torch.float32)
    counts = [2, 2, 2, 2] if reopen == "open" else [2, 2, 5]
    for step, n in zip(store.steps, counts):
        store.write_embeddings(step, {"a": torch.full((n, 3), float(step))}, torch.arange(n))
    store.finish_embeddings()
    ids, embeddings = TrajectoryStore.open(root).embedding_arrays().rows(0, len(counts))
    assert torch.equal(embeddings["a"][:, 0], torch.tensor([float(s) for s, n in enumerate(counts) for _ in range(n)]))


def test_a_step_file_copied_over_another_is_refused(tmp_path):
    """Step 1's file renamed to step 2's name: its gradients would be replayed as step 2's."""
    root = tmp_path / "dve"
    recorded(root, 3)
    shutil.copy(root / "steps" / "step_00000001.safetensors", root / "steps" / "step_00000002.safetensors")
    with pytest.raises(StoreError, match=r"step_00000002\.safetensors holds step 1's data, not step 2's"):
        TrajectoryStore.open(root).read_step(2)


def test_a_resume_deletes_the_embeddings_of_the_branch_it_leaves(tmp_path):
    """The finished embeddings belong to steps the resumed run redoes: none are left to read (or to hold disk)."""
    root = tmp_path / "dve"
    recorded(root, 4)
    store = TrajectoryStore.reopen(root, last_step=1)
    store.append(record(2))
    assert not (root / "embeddings").exists()


def test_overwrite_keeps_the_earlier_store_until_the_first_write(tmp_path):
    root = tmp_path / "dve"
    recorded(root, 4)
    before = files_of(root)
    with pytest.raises(StoreError, match="is not empty"):  # refused at create, without overwrite
        TrajectoryStore.create(root, SMALL, overwrite=False)
    store = TrajectoryStore.create(root, {**SMALL, "settings_hash": "h2"}, overwrite=True)
    assert files_of(root) == before  # a fit that trains nothing changes nothing
    assert TrajectoryStore.open(root).steps == [0, 1, 2, 3]
    store.append(record(0))
    assert sorted(files_of(root)) == ["manifest.json", "steps/step_00000000.safetensors"]
    reopened = TrajectoryStore.open(root)
    assert reopened.manifest["status"] == "recording" and reopened.steps == [0] and reopened.settings_hash == "h2"


@pytest.mark.parametrize("write", ["finish_recording", "write_manifest", "begin_embeddings", "write_reference",
                                   "write_segments", "truncate_for_resume"])
def test_every_first_write_clears_the_store_it_overwrites(tmp_path, write):
    root = tmp_path / "dve"
    recorded(root, 3)
    store = TrajectoryStore.create(root, SMALL, overwrite=True)
    args = {"finish_recording": ({},), "begin_embeddings": ({"a": 3}, torch.float32),
            "write_reference": (0, {"a": torch.ones(1, 3)}), "write_segments": ([(0, 0)], [{}])}
    made = {"begin_embeddings": {f"embeddings.partial/{name}" for name in ("index.safetensors", "layer_000.npy",
                                                                         "sample_ids.npy")},
            "write_reference": {"references/step_00000000.safetensors"}}  # by the write itself
    getattr(store, write)(*args.get(write, ()))
    left = {name for name in files_of(root) if name != "manifest.json"}
    assert left == made.get(write, set())
    assert TrajectoryStore.open(root).manifest["run_id"] == store.manifest["run_id"]


def test_a_run_killed_while_clearing_the_store_it_overwrites_leaves_no_store(tmp_path, monkeypatch):
    """The earlier manifest goes first: an interrupted clearing leaves no store, never a damaged one."""
    root = tmp_path / "dve"
    recorded(root, 3)
    store = TrajectoryStore.create(root, SMALL, overwrite=True)

    def killed(paths):
        raise KeyboardInterrupt

    monkeypatch.setattr(lightning_dve.store, "remove_files", killed)
    with pytest.raises(KeyboardInterrupt):
        store.append(record(0))
    with pytest.raises(StoreError, match=r"manifest\.json is missing"):
        TrajectoryStore.open(root)


def test_ranks_clear_only_their_own_folder_of_an_overwritten_ddp_store(tmp_path):
    """An earlier 3-rank store overwritten by a 2-rank run: rank 0 clears its files and rank 2's stale shard at its
    first write, never rank 1's folder, which rank 1 clears at its own first write (whenever that comes)."""
    root = tmp_path / "dve"
    recorded(root, 2, world_size=3)
    for rank in (1, 2):
        recorded(root / "shards" / f"rank_{rank}", 2, world_size=3, rank=rank)
    rank0 = TrajectoryStore.create(root, {**SMALL, "world_size": 2, "rank": 0}, overwrite=True)
    rank1 = TrajectoryStore.create(root / "shards" / "rank_1", {**SMALL, "world_size": 2, "rank": 1}, overwrite=True)
    shard1 = files_of(root / "shards" / "rank_1")
    rank0.append(record(0))
    assert not (root / "shards" / "rank_2").exists()
    assert files_of(root / "shards" / "rank_1") == shard1
    rank1.append(record(0))
    assert sorted(files_of(root / "shards" / "rank_1")) == ["manifest.json", "steps/step_00000000.safetensors"]
    assert sorted(files_of(root)) == ["manifest.json", "shards/rank_1/manifest.json",
                                      "shards/rank_1/steps/step_00000000.safetensors",
                                      "steps/step_00000000.safetensors"]


# --- overwrite and disk use through the Trainer ------------------------------------------------------------


@pytest.mark.parametrize("again", ["same trainer", "no batches"])
def test_an_overwriting_fit_that_trains_nothing_keeps_the_finished_store(fit, mlp_cls, save_dir, test_batch, again):
    model, dve = mlp_cls(), DataValueEmbedding(save_dir, projection_dim=32, overwrite=True, report=None)
    trainer = fit(model, dve, max_epochs=2)
    expected = DataValueEmbeddings.load(save_dir).influence(model, test_batch).scores
    before = files_of(save_dir)
    if again == "same trainer":  # max_epochs already reached: the fit loop is done at once
        trainer.fit(model, DataLoader(DigitsDict(range(64)), batch_size=16))
    else:
        fit(model, DataValueEmbedding(save_dir, projection_dim=32, overwrite=True, report=None), max_epochs=2,
            limit_train_batches=0)
    assert files_of(save_dir) == before
    torch.testing.assert_close(DataValueEmbeddings.load(save_dir).influence(model, test_batch).scores, expected)


def test_an_overwriting_fit_that_fails_in_its_first_step_leaves_a_store_that_says_it_holds_no_step(
        fit, mlp_cls, save_dir):
    fit(mlp_cls(), DataValueEmbedding(save_dir, projection_dim=32, report=None))

    class NaNLoss(mlp_cls):
        def training_step(self, batch, batch_idx):
            return self.loss(batch) * float("nan")

    with pytest.raises(GradientError):  # the finished store was cleared at this step's first write
        fit(NaNLoss(), DataValueEmbedding(save_dir, projection_dim=32, overwrite=True, report=None))
    with pytest.raises(StoreError, match=r"It holds no step: its fit is at its first step or failed there "
                                         r"\(overwrite=True cleared any earlier store"):
        DataValueEmbeddings.load(save_dir)


def test_a_fit_that_fails_before_its_first_write_keeps_the_store_and_its_callback_serves_none(
        fit, mlp_cls, save_dir, test_batch):
    """A second fit of the same callback (``overwrite=True``) that fails in its first ``training_step``, before
    anything is written, keeps the first fit's store; its ``embeddings`` used to load that store and return it
    as this fit's, silently (an audit). They now name the failure; ``load`` still reads the folder."""
    model, dve = mlp_cls(), DataValueEmbedding(save_dir, projection_dim=32, overwrite=True, report=None)
    fit(model, dve)
    expected = dve.embeddings.influence(model, test_batch).scores

    class Fails(mlp_cls):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit(Fails(), dve)
    with pytest.raises(ConfigError, match=r"last fit failed \(RuntimeError: boom\) before it wrote its embeddings, "
                                          r"so .* holds an earlier fit's store or an unfinished one"):
        dve.embeddings
    torch.testing.assert_close(DataValueEmbeddings.load(save_dir).influence(model, test_batch).scores, expected)
    fit(model, dve)  # a fit that finishes serves its own again
    assert dve.embeddings.steps == list(range(4))


def test_bytes_total_is_the_whole_store(fit, mlp_cls, save_dir):
    fit(mlp_cls(), DataValueEmbedding(save_dir, report=None, segments=2), max_epochs=2)
    manifest = json.loads((save_dir / "manifest.json").read_text())
    size = {sub: sum(p.stat().st_size for p in (save_dir / sub).rglob("*") if p.is_file())
            for sub in ("steps", "embeddings", "checkpoints", "references")}
    whole = sum(p.stat().st_size for p in save_dir.rglob("*") if p.is_file())
    assert size["embeddings"] > 0 and size["checkpoints"] > 0 and (save_dir / "segments.safetensors").is_file()
    assert manifest["bytes_steps"] == size["steps"] and manifest["bytes_per_step"] == size["steps"] // 8
    assert manifest["bytes_total"] == whole  # the manifest itself as written included
    assert manifest["bytes_total"] > size["steps"] + size["embeddings"] + size["checkpoints"]


def test_bytes_total_counts_the_shards_of_other_ranks(store_copy):
    """Rank 0's ``bytes_total`` includes the ``shards`` folder (other ranks' parts of a DDP store; one file here)."""
    from lightning_dve.store import SHARDS

    shard = store_copy / SHARDS / "rank_1" / "part.bin"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(bytes(4096))
    TrajectoryStore.open(store_copy).record_disk_use()
    whole = sum(p.stat().st_size for p in store_copy.rglob("*") if p.is_file())
    assert json.loads((store_copy / "manifest.json").read_text())["bytes_total"] == whole


def test_train_end_reports_the_whole_stores_disk_use(fit, mlp_cls, save_dir, caplog):
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # Lightning's logger does not propagate
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            fit(mlp_cls(), DataValueEmbedding(save_dir, report=None), max_epochs=2)
    finally:
        logger.removeHandler(caplog.handler)
    manifest = json.loads((save_dir / "manifest.json").read_text())
    said = [r.getMessage() for r in caplog.records if "DataValueEmbedding: recorded" in r.getMessage()]
    assert said == [f"DataValueEmbedding: recorded 8 steps in {save_dir}: {manifest['bytes_total'] / 2**20:.2f} MiB "
                    f"in all, of which step files {manifest['bytes_steps'] / 2**20:.2f} MiB "
                    f"({manifest['bytes_per_step'] / 2**10:.1f} KiB per step, every rank's)."]


def test_float16_steps_read_back_each_row_at_the_float16_precision_of_its_own_size(tmp_path: Path) -> None:
    """Oracle: the appended float32 rows. A float16 store scales each row by its own largest magnitude, so a row a
    billion times smaller than the step's largest (a sample the model already fits) keeps float16's relative
    precision, and an all-zero row (a layer a micro-batch did not reach) reads back as zeros, not 0/0 = NaN."""
    rows = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    rows[1] *= 1e-9
    rows[2] = 0.0
    store = TrajectoryStore.create(tmp_path / "dve", {**SMALL, "storage_dtype": "float16"}, overwrite=False)
    store.append(StepRecord(0, torch.arange(3), torch.full((3,), 1 / 3, dtype=torch.float64),
                            torch.tensor([0.1], dtype=torch.float64), {"a": rows}))
    back = TrajectoryStore.open(tmp_path / "dve").read_step(0).grads["a"]
    assert back.dtype == torch.float32
    for i in range(2):
        assert ((back[i] - rows[i]).norm() / rows[i].norm()).item() < 1e-3
    assert torch.equal(back[2], torch.zeros(64))


def test_a_reopened_store_lists_the_applied_learning_rates_its_step_files_hold(tmp_path: Path) -> None:
    """Oracle: the rates appended. The recursion's rate (``lrs``, a binding clip folded in) and the param group's
    (``applied_lrs``, which the report's ``influence / lr`` divides by) differ; a store opened mid-recording (an
    interrupted run, or a resume) rebuilds both lists from its step files."""
    root = tmp_path / "dve"
    store = TrajectoryStore.create(root, SMALL, overwrite=False)
    for step in range(3):
        store.append(dataclasses.replace(record(step), lrs=torch.tensor([0.1 / (step + 2)], dtype=torch.float64),
                                         applied_lrs=torch.tensor([0.1], dtype=torch.float64)))
    for reopened in (TrajectoryStore.open(root), TrajectoryStore.reopen(root, last_step=2)):
        assert torch.equal(reopened.learning_rates, store.learning_rates)
        assert torch.equal(reopened.applied_learning_rates, store.applied_learning_rates)
        assert not torch.equal(reopened.applied_learning_rates, reopened.learning_rates)
        assert torch.equal(reopened.read_step(1).applied_lrs, torch.tensor([0.1], dtype=torch.float64))


@pytest.mark.parametrize("steps, branches, refused", [
    (6, [(3, (4, 5))], 4),
    (10, [(7, (8, 9)), (3, range(4, 10))], 5),
], ids=["one branch", "a later branch cuts further back"])
def test_a_checkpoint_of_an_earlier_branch_resumes_up_to_the_last_shared_step_only(
    tmp_path: Path, steps: int, branches: list, refused: int
) -> None:
    """Oracle: the steps the runs share. Run A records its steps; each resume from one of A's checkpoints starts a
    branch that records the later steps anew. A shares only steps 0..3 with the store afterwards: its checkpoint
    after a later step would splice another branch's steps into A's trajectory, refused with the store unchanged
    (with two branches, A's own branch point, 7, used to let its checkpoint after step 5 through); after step 3
    it is accepted."""
    root = tmp_path / "dve"
    run_a = recorded(root, steps, finish=False).manifest["run_id"]
    for last, again in branches:
        branch = TrajectoryStore.reopen(root, last_step=last, run_id=run_a)
        for step in again:
            branch.append(record(step))
    before = files_of(root)
    with pytest.raises(StoreError, match=rf"another recording than the checkpoint's .*{run_a} after step {refused}"):
        TrajectoryStore.reopen(root, last_step=refused, run_id=run_a)
    assert files_of(root) == before
    assert TrajectoryStore.reopen(root, last_step=3, run_id=run_a).steps == [0, 1, 2, 3]


def test_a_resume_keeps_the_reference_gradients_taken_up_to_the_checkpoint(tmp_path: Path) -> None:
    """Oracle: the step each reference was taken after. A boundary reference taken at the weights after step ``s``
    belongs to every run that reached step ``s``: a resume from a checkpoint after step ``s`` keeps it (the resumed
    run does not take it again), one from before step ``s`` drops it with the steps it redoes."""
    root = tmp_path / "dve"
    recorded(root, 4)  # a reference after step 1
    TrajectoryStore.reopen(root, last_step=1).append(record(2))
    assert list(TrajectoryStore.open(root).read_references()) == [1]
    TrajectoryStore.reopen(root, last_step=0).append(record(1))
    assert TrajectoryStore.open(root).read_references() == {}


@pytest.mark.parametrize("pack_steps", [256, 3], ids=["loose steps", "packed steps"])
def test_a_resume_after_a_killed_resume_refuses_the_steps_the_kill_deleted(tmp_path, monkeypatch, pack_steps):
    """A resume from step 3 killed while it deleted the later steps (packed: after writing the pack of step 3,
    before deleting the old pack of steps 3-5; loose: after deleting the files of steps 4 and 5) leaves the finished manifest
    listing steps 0-7, and the Lightning checkpoints after step 5 are still there: a resume from one of them is
    refused, not continued with steps 4 and 5 silently left out; the killed resume's checkpoint still resumes."""
    monkeypatch.setattr(lightning_dve.step_files, "PACK_STEPS", pack_steps)
    root = tmp_path / "dve"
    recorded(root, 8)
    if pack_steps == 3:
        real = lightning_dve.step_files.write_groups_atomic

        def killed(*args):
            real(*args)
            raise KeyboardInterrupt  # the process dies here

        monkeypatch.setattr(lightning_dve.step_files, "write_groups_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            TrajectoryStore.reopen(root, last_step=3).append(record(4))
        monkeypatch.setattr(lightning_dve.step_files, "write_groups_atomic", real)
    else:
        for step in (4, 5):
            (root / "steps" / f"step_0000000{step}.safetensors").unlink()
    with pytest.raises(StoreError, match=r"missing the steps file\(s\) of 2 step\(s\) up to the checkpoint's step 5, "
                                         r"first of steps \[4, 5\]"):
        TrajectoryStore.reopen(root, last_step=5)
    TrajectoryStore.reopen(root, last_step=3).append(record(4))
    assert TrajectoryStore.open(root).steps == [0, 1, 2, 3, 4]
