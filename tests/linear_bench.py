"""A bench where the test-agnostic estimate is exact: one ``nn.Linear`` on digits in float64 with a loss *linear*
in the weights (zero Hessian), recorded with ``curvature="none"`` and ``projection_dim=None``. Then ``influence``
is the exact first-order TSLOO for any modelled optimizer run, and the truth is a retraining with ``torch.optim``
(and ``clip_grad_norm_``) itself with one occurrence's loss weight cut by ``eps`` (``tests/test_state_edits.py``,
``tests/test_clipping.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding
from tests.helpers import load_digits_arrays

BATCH, STEPS_PER_EPOCH, EPOCHS = 16, 3, 3
Edit = Callable[[int, torch.optim.Optimizer, nn.Linear], None]


def data() -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    x, y = load_digits_arrays()
    x, y = torch.tensor(x[:56], dtype=torch.float64), torch.tensor(y[:56])
    train = [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(48)]
    return train, {"x": x[48:], "y": y[48:], "index": torch.arange(48, 56)}


def losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample losses linear in the weights."""
    return -out.gather(1, y[:, None])[:, 0] + 0.1 * out.sum(1)


class Bench(L.LightningModule):
    """The linear-loss bench; ``edit`` runs before each step's forward, ``after_backward`` on its gradients."""

    def __init__(self, make_optimizer: Callable[[Any], torch.optim.Optimizer], edit: Edit | None = None,
                 after_backward: Callable[[nn.Linear], None] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 10).double()
        self.make_optimizer, self.edit, self.after_backward = make_optimizer, edit, after_backward

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return losses(self.lin(batch["x"]), batch["y"]).mean()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.edit is not None:
            self.edit(self.global_step, self.optimizers().optimizer, self.lin)

    def on_after_backward(self) -> None:
        if self.after_backward is not None:
            self.after_backward(self.lin)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


def fit(tmp_path: Path, model: L.LightningModule, clip: float | None = None, **kwargs: Any) -> DataValueEmbedding:
    """Record ``model`` on the bench (3 epochs of 3 steps), with ``Trainer(gradient_clip_val=clip)``."""
    dve = DataValueEmbedding(tmp_path / "dve", **{"sample_ids": "index", "projection_dim": None, "curvature": "none",
                                                   "report": None, **kwargs})
    L.Trainer(max_epochs=EPOCHS, callbacks=[dve], logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, gradient_clip_val=clip).fit(model, DataLoader(data()[0], batch_size=BATCH))
    return dve


def retrain(init: dict[str, torch.Tensor], make_optimizer: Callable[[Any], torch.optim.Optimizer], edit: Edit,
            occurrence: tuple[int, int] | None = None, eps: float = 0.0, clip: float | None = None) -> torch.Tensor:
    """Test losses after the same run with ``torch.optim`` (gradients clipped to norm ``clip`` as Lightning does),
    the loss weight of ``(step, id)`` times ``1 - eps``."""
    train, test = data()
    layer = nn.Linear(64, 10).double()
    layer.load_state_dict(init)
    optimizer = make_optimizer(layer.parameters())
    for step in range(EPOCHS * STEPS_PER_EPOCH):
        start = (step % STEPS_PER_EPOCH) * BATCH
        x = torch.stack([s["x"] for s in train[start:start + BATCH]])
        y = torch.stack([s["y"] for s in train[start:start + BATCH]])
        edit(step, optimizer, layer)
        weights = torch.full((BATCH,), 1.0 / BATCH, dtype=torch.float64)
        if occurrence is not None and occurrence[0] == step:
            weights[occurrence[1] - start] *= 1 - eps
        optimizer.zero_grad()
        (weights * losses(layer(x), y)).sum().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(layer.parameters(), clip)
        optimizer.step()
    with torch.no_grad():
        return losses(layer(test["x"]), test["y"])
