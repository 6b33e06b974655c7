"""Expanding step factors (``lightning_dve.stability``): a curvature that overstates the Hessian makes the
recursion's product ``prod (I - lr H)`` grow geometrically, and the fit says so at train end.

Oracles: the explicit ``[K, K]`` matrix ``sum_z lr w_z h_z h_z^T`` and its eigenvalues, and ``exact_influence`` (the
first-order influence through the recorded dynamics) on the same run.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding
from lightning_dve.config import Curvature
from lightning_dve.stability import EXPANDING, ExpansionWatch
from lightning_dve.store import StepRecord
from tests.helpers import make_trainer


def record(rows: dict[str, torch.Tensor], weights: torch.Tensor, lrs: list[float], **extra) -> StepRecord:
    return StepRecord(step=3, sample_ids=torch.arange(len(weights)), weights=weights,
                      lrs=torch.tensor(lrs, dtype=torch.float64), grads=rows, **extra)


@pytest.mark.parametrize("curvature", [Curvature.EMPIRICAL_FISHER, Curvature.GGN])
def test_the_largest_lr_lambda_is_that_of_the_explicit_step_matrix(curvature: Curvature) -> None:
    """Per group of layers: ``lr * lambda_max`` of the explicit ``sum_z lr w_z h_z h_z^T`` over the group's
    columns, with positive, zero and negative weights (the general eigenvalues) and with non-negative ones (the
    symmetric form); the rows are the gradients (empirical Fisher) or the records' Gauss-Newton rows."""
    gen = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(5, 3, generator=gen), "b": torch.randn(5, 4, generator=gen)}
    ggn = {name: torch.randn(t.shape, generator=gen) for name, t in grads.items()}
    rows = ggn if curvature is Curvature.GGN else grads
    extra = {"curvature": ggn} if curvature is Curvature.GGN else {}
    for weights, groups in itertools.product([torch.tensor([0.5, 0.2, 0.0, -0.1, 0.4]), torch.full((5,), 0.2)],
                                             ([["a", "b"]], [["a"], ["b"]])):
        watch = ExpansionWatch(groups, ["a", "b"], curvature)
        expected = 0.0
        for group in groups:
            h = torch.cat([rows[n] for n in group], dim=1).double()
            matrix = sum(0.7 * w * torch.outer(r, r) for w, r in zip(weights.double(), h))
            expected = max(expected, float(torch.linalg.eigvalsh(matrix).max()))
        assert watch._largest(record(grads, weights, [0.7, 0.7], **extra)) == pytest.approx(expected, rel=1e-10)


def test_steps_with_optimizer_terms_or_no_curvature_are_not_judged() -> None:
    rows = {"a": torch.full((2, 3), 10.0)}
    step = record(rows, torch.ones(2), [1.0])
    assert ExpansionWatch([["a"]], ["a"], Curvature.EMPIRICAL_FISHER)._largest(step) == pytest.approx(600.0)
    assert ExpansionWatch([["a"]], ["a"], Curvature.NONE)._largest(step) == 0.0
    momentum = record(rows, torch.ones(2), [1.0], optim={"momentum": torch.tensor([0.9])})
    assert ExpansionWatch([["a"]], ["a"], Curvature.EMPIRICAL_FISHER)._largest(momentum) == 0.0


class Regressor(L.LightningModule):
    """``Linear(10, 32) -> Tanh -> Linear(32, 1)`` on mean squared error, plain SGD."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def diabetes(dtype: torch.dtype, rows: slice, scale: float = 0.1) -> list[dict[str, torch.Tensor]]:
    """sklearn's diabetes regression (targets 25-346 times ``scale``: large residuals for an untrained net)."""
    data = load_diabetes()
    x, y = torch.tensor(data.data, dtype=dtype), torch.tensor(data.target, dtype=dtype)[:, None] * scale
    return [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(len(x))[rows]]


def fit_regressor(tmp_path: Path, curvature: str, dtype: torch.dtype = torch.float64, scale: float = 0.1
                  ) -> tuple[list[str], DataValueEmbedding, Regressor]:
    model = Regressor(lr=0.01).to(dtype)
    dve = DataValueEmbedding(save_dir=tmp_path / curvature, sample_ids="index", projection_dim=None, report=None,
                             curvature=curvature)
    loader = DataLoader(diabetes(dtype, slice(0, 96), scale), batch_size=16, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(3, [dve], precision="64-true" if dtype == torch.float64 else "32-true").fit(model, loader)
    return [str(w.message) for w in caught], dve, model


def test_a_regression_with_large_residuals_warns_that_the_empirical_fisher_expands(tmp_path: Path) -> None:
    """MSE with residuals of 2.5-35: the empirical Fisher's ``lr lambda_max`` reaches ~50 while the loss's Hessian
    gives 0.28 (training is stable), and the recursion's scores are ~1e23 against first-order influences of order
    1 (``exact_influence``, the oracle). The fit warns, naming the steps and what to use; ``curvature="none"`` on the
    same run neither expands nor warns."""
    messages, dve, model = fit_regressor(tmp_path, "empirical_fisher")
    expanding = [m for m in messages if "has an eigenvalue below -1" in m]
    assert len(expanding) == 1, messages
    assert "at 18 of 18 steps (first 0;" in expanding[0] and "curvature='none' for such a loss" in expanding[0]
    test = {k: torch.stack([d[k] for d in diabetes(torch.float64, slice(300, 308))]) for k in ("x", "y", "index")}
    scores = dve.embeddings.influence(model, test, per_step=True).scores
    exact = dve.embeddings.exact_influence(model, test, per_step=True).scores
    assert exact.abs().max() < 10 and scores.abs().max() > 1e15 * exact.abs().max()
    messages, dve, _ = fit_regressor(tmp_path, "none")
    assert not [m for m in messages if "eigenvalue below -1" in m or "not finite" in m], messages
    assert float(torch.linalg.eigvalsh(torch.eye(2)).max()) < EXPANDING  # the bound is above a stable factor's 1


def test_embeddings_that_overflow_float32_are_named(tmp_path: Path) -> None:
    """The same regression in float32 on raw targets (scaled 1.0): the product overflows, so some embeddings are
    inf or NaN; the fit says how many steps' and from which step, besides the expansion."""
    messages, dve, _ = fit_regressor(tmp_path, "empirical_fisher", torch.float32, scale=1.0)
    non_finite = [m for m in messages if "are not finite" in m]
    assert len(non_finite) == 1 and "every score with those occurrences is NaN or inf" in non_finite[0], messages
    arrays = dve.embeddings.store.embedding_arrays()
    _, rows = arrays.rows(0, len(arrays.steps))
    assert not all(bool(r.isfinite().all()) for r in rows.values())
