"""The on-disk store: loading in a fresh process, and refusing every kind of damaged or foreign store.

Damage is done to a copy of the session's finished recording (``trained`` fixture), one kind per test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_dve.files
from lightning_dve import DataValueEmbedding, DataValueEmbeddings, DVEConfig, StoreError
from lightning_dve.store import TrajectoryStore

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
                          cwd=REPO, capture_output=True, text=True, timeout=120)
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
    with pytest.raises(StoreError, match=r"schema 999.*reads schema 1"):
        DataValueEmbeddings.load(store_copy)


# --- missing, truncated or foreign data files --------------------------------------------------------------


@pytest.mark.parametrize("sub", ["steps", "embeddings"])
def test_missing_data_file(store_copy, sub):
    (store_copy / sub / "step_00000003.safetensors").unlink()
    with pytest.raises(StoreError, match=rf"missing 1 {sub} file\(s\), first for steps \[3\]"):
        DataValueEmbeddings.load(store_copy)


@pytest.mark.parametrize("keep", ["half", "all but 7 bytes", "4 bytes"])
def test_truncated_embeddings_file_fails_when_scoring(store_copy, trained, test_batch, keep):
    path = store_copy / "embeddings" / "step_00000002.safetensors"
    data = path.read_bytes()
    size = {"half": len(data) // 2, "all but 7 bytes": len(data) - 7, "4 bytes": 4}[keep]
    path.write_bytes(data[:size])
    embeddings = DataValueEmbeddings.load(store_copy)  # only presence is checked on load
    with pytest.raises(StoreError, match=r"step_00000002\.safetensors is corrupt or truncated"):
        embeddings.influence(trained.model, test_batch)


def test_truncated_step_file(store_copy):
    path = store_copy / "steps" / "step_00000005.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    store = TrajectoryStore.open(store_copy)
    store.read_step(4)
    with pytest.raises(StoreError, match=r"step_00000005\.safetensors is corrupt or truncated"):
        store.read_step(5)


def test_file_from_a_run_with_other_settings(store_copy, trained, fit, mlp_cls, tmp_path, test_batch):
    other = tmp_path / "other"
    fit(mlp_cls(), DataValueEmbedding(other, projection_dim=64, seed=1), max_epochs=2)
    for sub in ("embeddings", "steps"):
        shutil.copy(other / sub / "step_00000006.safetensors", store_copy / sub / "step_00000006.safetensors")
    embeddings = DataValueEmbeddings.load(store_copy)
    with pytest.raises(StoreError, match=r"step_00000006\.safetensors was written with settings.*two runs are mixed"):
        embeddings.influence(trained.model, test_batch)
    with pytest.raises(StoreError, match=r"two runs are mixed"):
        TrajectoryStore.open(store_copy).read_step(6)


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
