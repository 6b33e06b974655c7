"""A real fit SIGKILLed while it packs its steps, resumed in another process, scores as an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding, DataValueEmbeddings, StoreError, step_files
from lightning_dve.store import TrajectoryStore

ROOT = Path(__file__).resolve().parents[1]

#: A fit of 3 epochs of 4 steps, packs of 3 steps, a checkpoint every 4 steps, killed by SIGKILL once the pack
#: of steps 6-8 is written and before its loose files are deleted.
KILLED_FIT = """
import os, signal, sys
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from lightning_dve import DataValueEmbedding, step_files
from tests.conftest import DigitsDict, TinyMLP

write_pack = step_files.write_concatenated_atomic

def write_then_die(path, *args):
    write_pack(path, *args)
    if path.name == "pack_00000006_00000008.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)

step_files.PACK_STEPS, step_files.write_concatenated_atomic = 3, write_then_die
root = sys.argv[1]
trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, precision="64-true", logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                    callbacks=[DataValueEmbedding(root + "/dve", projection_dim=32),
                               ModelCheckpoint(dirpath=root + "/ckpt", save_top_k=-1, every_n_train_steps=4)])
trainer.fit(TinyMLP().double(), DataLoader(DigitsDict(range(64)), batch_size=16))
"""


def trainer_with(root: Path, callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=3, precision="64-true", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                     enable_checkpointing=False, callbacks=callbacks)


@pytest.mark.slow
def test_a_fit_killed_between_a_pack_and_its_deletion_resumes_to_the_uninterrupted_scores(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, test_batch: dict,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_files, "PACK_STEPS", 3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLED_FIT, str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    steps = tmp_path / "dve" / "steps"
    assert sorted(p.name[:22] for p in steps.iterdir()) == [
        "pack_00000000_00000002", "pack_00000003_00000005", "pack_00000006_00000008", "step_00000006.safetens",
        "step_00000007.safetens", "step_00000008.safetens"]  # the last pack and its loose copies
    assert TrajectoryStore.open(tmp_path / "dve").steps == list(range(9))
    with pytest.raises(StoreError, match=r"status='recording', expected 'complete'\. The recording did not finish"):
        DataValueEmbeddings.load(tmp_path / "dve")

    batch = {**test_batch, "x": test_batch["x"].double()}
    reference_model, reference = mlp_cls().double(), DataValueEmbedding(tmp_path / "reference", projection_dim=32)
    trainer_with(tmp_path, [reference]).fit(reference_model, make_loader())
    expected = reference.embeddings.influence(reference_model, batch, per_step=True).scores

    # the checkpoint after step 7: inside the pack of steps 6-8, which the resume rewrites; the copies go
    model, resumed = mlp_cls().double(), DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    trainer_with(tmp_path, [resumed]).fit(model, make_loader(), ckpt_path=tmp_path / "ckpt" / "epoch=1-step=8.ckpt")
    loaded = DataValueEmbeddings.load(tmp_path / "dve")
    assert loaded.steps == list(range(12))
    torch.testing.assert_close(loaded.influence(model, batch, per_step=True).scores, expected, rtol=1e-9, atol=1e-13)
    assert sorted(p.name[:22] for p in steps.iterdir()) == [  # steps 6-7 kept of that pack, then packs afresh
        "pack_00000000_00000002", "pack_00000003_00000005", "pack_00000006_00000007", "pack_00000008_00000010",
        "step_00000011.safetens"]
