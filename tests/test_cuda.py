"""On a CUDA device: a fit on the GPU records and scores what the same fit does on the CPU (float64), so every CPU
oracle test carries over, and its train-end recursion runs on the GPU. Skipped without a CUDA device (CI has
none); the README's "GPU" section gives the command and the last result on one. Mixed precision on a GPU is in
``test_amp.py``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding, callback_setup, recursion_ranks
from lightning_dve.store import TrajectoryStore
from tests.conftest import TinyMLP
from tests.helpers import DigitsDataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class OptimizedMLP(TinyMLP):
    """The tiny MLP under plain SGD, SGD with momentum and weight decay, or AdamW."""

    def __init__(self, optimizer: str) -> None:
        super().__init__(hidden=16, lr=0.01 if optimizer == "adamw" else 0.2)
        self.optimizer = optimizer

    def configure_optimizers(self) -> Any:
        if self.optimizer == "momentum":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)
        return super().configure_optimizers()


def fit(folder: Path, accelerator: str, optimizer: str, **settings: Any) -> tuple[TinyMLP, DataValueEmbedding]:
    """Two epochs of the tiny MLP on 96 digits in float64 (12 steps, batch 16, fixed order) on ``accelerator``,
    rows stored in float64."""
    model = OptimizedMLP(optimizer).double()
    dve = DataValueEmbedding(folder, storage_dtype="float64", report=None, **settings)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=2, precision="64-true", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[dve])
    trainer.fit(model, DataLoader(DigitsDataset(range(96), dtype=torch.float64), batch_size=16))
    return model, dve


CASES = {  # the recursion's paths: blocked SGD, blocked momentum, step by step (exact Adam), curvature rows, factors
    "sgd-exact": ("sgd", dict(projection_dim=None)),
    "sgd-projected": ("sgd", dict(projection_dim=256)),
    "momentum-projected": ("momentum", dict(projection_dim=256)),
    "adamw-exact": ("adamw", dict(projection_dim=None)),
    "adamw-projected": ("adamw", dict(projection_dim=256)),
    "ggn-two-segments": ("sgd", dict(projection_dim=256, curvature="ggn", segments=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_gpu_fit_records_and_scores_what_the_cpu_fit_does(tmp_path: Path, monkeypatch, case: str) -> None:
    """Stored rows of every step and the influence scores on 8 test digits agree to 1e-9 (float64; only the
    kernels' summation order differs), and the final weights too; the GPU fit's recursion ran on the GPU, and
    its query gives those scores with the module on the CPU or on the GPU (the batch stays on the CPU)."""
    devices = []
    embed = recursion_ranks.embed_trajectory
    monkeypatch.setattr(recursion_ranks, "embed_trajectory",
                        lambda *args, device=None, **kw: devices.append(device) or embed(*args, device=device, **kw))
    optimizer, settings = CASES[case]
    model_gpu, dve_gpu = fit(tmp_path / "gpu", "gpu", optimizer, **settings)
    model_cpu, dve_cpu = fit(tmp_path / "cpu", "cpu", optimizer, **settings)
    assert [None if d is None else d.type for d in devices] == ["cuda", None]
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
    scores_cpu = dve_cpu.embeddings.influence(model_cpu, test).scores
    assert scores_cpu.abs().max() > 0
    for module in (model_gpu.cpu(), model_gpu.cuda()):  # a query on the GPU takes the CPU batch there itself
        scores = dve_gpu.embeddings.influence(module, test).scores
        torch.testing.assert_close(scores, scores_cpu, rtol=1e-9, atol=1e-12 * float(scores_cpu.abs().max()))


def test_a_recursion_the_gpu_has_no_room_for_runs_on_the_cpu_and_says_so(caplog) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    assert callback_setup.recursion_device(device, 1 << 20) == device
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # Lightning's logger does not propagate
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            assert callback_setup.recursion_device(device, 1 << 60) is None
    finally:
        logger.removeHandler(caplog.handler)
    assert "runs on the CPU instead" in caplog.text
