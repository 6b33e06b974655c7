"""Mixed precision: bf16 autocast and fp16 with a grad scaler against float32 (tolerances stated per test)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding
from lightning_dve.layers import split_block
from lightning_dve.store import TrajectoryStore
from tests.conftest import DigitsDict, TinyMLP


State = dict[str, torch.Tensor]


ACCELERATORS = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA device"))]


def fit(tmp: Path, name: str, accelerator: str = "cpu", model: TinyMLP | None = None,
        **trainer_args) -> tuple[TinyMLP, DataValueEmbedding, list[State]]:
    """Fit the tiny MLP (or ``model``) on 96 digits (6 steps) in exact mode on ``accelerator``; also return the
    parameters before each step."""
    model = TinyMLP(hidden=16, lr=0.2) if model is None else model
    seen: list[State] = []

    class Weights(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    dve = DataValueEmbedding(tmp / name, projection_dim=None, report=None)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[dve, Weights()],
                        **trainer_args)
    trainer.fit(model, DataLoader(DigitsDict(range(96)), batch_size=16))
    return model, dve, seen


def per_sample_rows(state: State, batch: dict) -> torch.Tensor:
    """Float32 per-example gradients of ``net.0`` (weight and bias) at parameters ``state``, ``[B, 16 * 65]``."""
    model = TinyMLP(hidden=16)
    model.load_state_dict(state)
    layer = model.net[0]
    rows = []
    for i in range(len(batch["y"])):
        loss = F.cross_entropy(model(batch["x"][i : i + 1]), batch["y"][i : i + 1])
        w, b = torch.autograd.grad(loss, [layer.weight, layer.bias])
        rows.append(torch.cat([w, b.unsqueeze(1)], dim=1).flatten())
    return torch.stack(rows)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_bf16_autocast_rows_and_scores_match_float32(tmp_path: Path, accelerator: str) -> None:
    """bf16 autocast (8-bit mantissa): stored rows within 1% of float32 rows at the same weights; influence
    scores of all occurrences keep a Spearman >= 0.95 against the float32 run (on the CPU and on a GPU)."""
    model16, dve16, seen = fit(tmp_path, "bf16", accelerator, precision="bf16-mixed")
    model32, dve32, _ = fit(tmp_path, "fp32", accelerator)
    store = TrajectoryStore.open(tmp_path / "bf16")
    data = DigitsDict(range(96))
    for step in (0, 5):
        record = store.read_step(step)
        batch = {k: torch.stack([torch.as_tensor(data[int(i)][k]) for i in record.sample_ids]) for k in ("x", "y")}
        expected = per_sample_rows(seen[step], batch)
        error = (record.grads["net.0"] - expected).norm() / expected.norm()
        assert error < 0.01, float(error)
    test = {k: torch.stack([torch.as_tensor(v[k]) for v in (data[i] for i in range(96))]) for k in ("x", "y")}
    test = {"x": test["x"][:8], "y": test["y"][:8]}
    scores16 = dve16.embeddings.influence(model16, test).scores
    scores32 = dve32.embeddings.influence(model32, test).scores
    rho = spearmanr(scores16.flatten().numpy(), scores32.flatten().numpy())[0]
    assert rho >= 0.95, rho


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_fp16_grad_scaler_scale_is_divided_out_and_skipped_steps_are_dropped(tmp_path: Path,
                                                                             accelerator: str) -> None:
    """A GradScaler at 2**22 overflows fp16 for the first steps: those are skipped by torch and absent from the
    store (``.steps`` has gaps); recorded rows equal float32 per-example gradients within 1% (CPU and GPU)."""
    device = "cuda" if accelerator == "gpu" else "cpu"
    scaler = torch.amp.GradScaler(device, init_scale=2.0**22)
    model, dve, seen = fit(tmp_path, "fp16", accelerator, plugins=[MixedPrecision("16-mixed", device, scaler)])
    applied = [s for s in range(len(seen) - 1) if not torch.equal(seen[s]["net.0.weight"], seen[s + 1]["net.0.weight"])]
    steps = dve.embeddings.steps
    assert 0 < len(steps) < 6 and steps[0] > 0  # some steps were skipped, the rest recorded
    assert steps[:-1] == applied[: len(steps) - 1]
    store = TrajectoryStore.open(tmp_path / "fp16")
    data = DigitsDict(range(96))
    for step in steps[:2]:
        record = store.read_step(step)
        batch = {k: torch.stack([torch.as_tensor(data[int(i)][k]) for i in record.sample_ids]) for k in ("x", "y")}
        expected = per_sample_rows(seen[step], batch)
        got = record.grads["net.0"]
        assert (got - expected).norm() / expected.norm() < 0.01
        assert split_block(model.net[0], got[0])["weight"].shape == (16, 64)


class DecayMLP(TinyMLP):
    """TinyMLP trained with SGD momentum and weight decay, or Adam with L2 decay."""

    def __init__(self, optimizer: str) -> None:
        super().__init__(hidden=16, lr=0.05)
        self.optimizer = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3, weight_decay=1e-3)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fp16_skipped_steps_under_norm_clipping_with_decay_are_dropped(tmp_path: Path, optimizer: str) -> None:
    """A step the scaler skips has an infinite gradient norm, so a clip factor of 0, which the momentum SGD and Adam
    L2 decay terms divide by: the fit failed with a ZeroDivisionError at the first skipped step. Now the skipped
    steps are dropped and the others recorded, as without clipping."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    _, dve, seen = fit(tmp_path, "fp16", model=DecayMLP(optimizer), gradient_clip_val=0.3,
                       plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    applied = [s for s in range(len(seen) - 1) if not torch.equal(seen[s]["net.0.weight"], seen[s + 1]["net.0.weight"])]
    steps = dve.embeddings.steps
    assert 0 < len(steps) < 6 and steps[0] > 0 and steps[:-1] == applied[: len(steps) - 1]


def test_a_fit_whose_every_step_the_scaler_skips_is_warned_about(tmp_path: Path) -> None:
    """A loss that overflows float16 at every scale: every step was skipped, yet the fit said only that the scaler
    "calibrates its loss scale at the start" (an info line) and queries returned empty results."""
    class Overflowing(TinyMLP):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1e30

    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    with pytest.warns(UserWarning, match=r"skipped 4 optimizer step\(s\).* It skipped every step: nothing was trained"):
        L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                  enable_checkpointing=False, enable_model_summary=False, callbacks=[dve],
                  plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]).fit(
            Overflowing(), DataLoader(DigitsDict(range(64)), batch_size=16))
    assert TrajectoryStore.open(tmp_path / "dve").steps == []


def test_fp16_step_whose_last_micro_batch_returned_none_is_not_recorded(tmp_path: Path) -> None:
    """With a grad scaler, Lightning skips the whole optimizer step when the last micro-batch's ``training_step``
    returns None (the earlier micro-batches' gradients are never applied): nothing is recorded for it."""
    class LastSkipped(TinyMLP):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) if batch_idx % 2 == 0 else None

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    model, dve = LastSkipped(hidden=16, lr=0.2), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False, callbacks=[dve], accumulate_grad_batches=2,
              plugins=[MixedPrecision("16-mixed", "cpu", scaler)]).fit(model, DataLoader(DigitsDict(range(64)),
                                                                                         batch_size=16))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no step was applied
    assert TrajectoryStore.open(tmp_path / "dve").steps == []


class NaNSample(DigitsDict):
    """Digits 0..95 with a NaN pixel in sample 40."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i == 40:
            item = {**item, "x": item["x"].clone()}
            item["x"][0] = float("nan")
        return item


@pytest.mark.parametrize("case", ["calibration", "growth", "nan"])
def test_fp16_skipped_steps_are_said_at_train_end(tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    """A scaler starting at 2**22 skips its first steps to calibrate its scale, and one grown 64-fold every step
    overflows at each new scale: info lines. From 2**4, a sample with a NaN input makes it skip the step it is in,
    at a scale earlier steps were applied at: that was silent (only a gap in ``.steps``); now a warning."""
    import logging
    import warnings

    scaler = {"calibration": torch.amp.GradScaler("cpu", init_scale=2.0**22),
              "growth": torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=2.0**6, growth_interval=1),
              "nan": torch.amp.GradScaler("cpu", init_scale=2.0**4)}[case]
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[dve],
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    data = (NaNSample if case == "nan" else DigitsDict)(range(96))
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # Lightning's logger does not propagate
    logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger=logger.name):
            warnings.simplefilter("always")
            trainer.fit(TinyMLP(hidden=16, lr=0.2), DataLoader(data, batch_size=16))
    finally:
        logger.removeHandler(caplog.handler)
    warned = [str(w.message) for w in caught if "the grad scaler skipped" in str(w.message)]
    assert len(warned) == (case == "nan"), warned
    if case == "nan":
        assert "(steps [2])" in warned[0] and "a sample with NaN or inf inputs" in warned[0]
        assert dve.embeddings.steps == [0, 1, 3, 4, 5]  # samples 32..47 are in step 2
    else:
        skipped = [s for s in range(6) if s not in dve.embeddings.steps]
        assert skipped and f"for non-finite gradients (steps {skipped})" in caplog.text, caplog.text
