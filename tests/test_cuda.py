"""On a CUDA device: a fit on the GPU records what the same fit records on the CPU (float64, exact and projected),
so every CPU oracle test carries over. Skipped without a CUDA device (CI has none); the README's "GPU" section
gives the command and the last result on one. Mixed precision on a GPU is in ``test_amp.py``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding
from lightning_dve.store import TrajectoryStore
from tests.conftest import TinyMLP
from tests.helpers import DigitsDataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fit(folder: Path, accelerator: str, projection_dim: int | None) -> tuple[TinyMLP, DataValueEmbedding]:
    """Two epochs of the tiny MLP on 96 digits in float64 (12 steps, batch 16, fixed order) on ``accelerator``,
    rows stored in float64."""
    model = TinyMLP(hidden=16, lr=0.2).double()
    dve = DataValueEmbedding(folder, projection_dim=projection_dim, storage_dtype="float64", report=None)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=2, precision="64-true", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[dve])
    trainer.fit(model, DataLoader(DigitsDataset(range(96), dtype=torch.float64), batch_size=16))
    return model, dve


@pytest.mark.parametrize("projection_dim", [None, 256], ids=["exact", "projected"])
def test_a_gpu_fit_records_and_scores_what_the_cpu_fit_does(tmp_path: Path, projection_dim: int | None) -> None:
    """Stored rows of every step and the influence scores on 8 test digits agree to 1e-9 (float64; only the
    summation order of the kernels differs), and the final weights too."""
    model_gpu, dve_gpu = fit(tmp_path / "gpu", "gpu", projection_dim)
    model_cpu, dve_cpu = fit(tmp_path / "cpu", "cpu", projection_dim)
    for name, weight in model_cpu.state_dict().items():
        torch.testing.assert_close(model_gpu.state_dict()[name].cpu(), weight, rtol=1e-9, atol=1e-12)
    gpu, cpu = TrajectoryStore.open(tmp_path / "gpu"), TrajectoryStore.open(tmp_path / "cpu")
    assert gpu.steps == cpu.steps == list(range(12))
    for step in cpu.steps:
        on_gpu, on_cpu = gpu.read_step(step), cpu.read_step(step)
        assert on_gpu.sample_ids.tolist() == on_cpu.sample_ids.tolist()
        for layer, rows in on_cpu.grads.items():
            assert rows.dtype == torch.float64
            torch.testing.assert_close(on_gpu.grads[layer], rows, rtol=1e-9, atol=1e-12)
    test = DigitsDataset(range(1500, 1508), dtype=torch.float64).batch()
    scores_gpu = dve_gpu.embeddings.influence(model_gpu.cpu(), test).scores
    scores_cpu = dve_cpu.embeddings.influence(model_cpu, test).scores
    assert scores_cpu.abs().max() > 0
    torch.testing.assert_close(scores_gpu, scores_cpu, rtol=1e-9, atol=1e-12 * float(scores_cpu.abs().max()))
