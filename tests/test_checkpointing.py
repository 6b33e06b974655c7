"""Activation checkpointing (``torch.utils.checkpoint``): capture, curvature and queries through recomputed layers.

With ``use_reentrant=False`` the checkpointed layers are called with autograd on and recomputed in the backward;
with ``use_reentrant=True`` their first forward runs with autograd off and only the backward's recomputation
reaches them. Either way the rows, the embeddings and the queries must equal those of the same model without
checkpointing (float64, same trajectory): the oracle is the plain run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lightning_dve import DataValueEmbedding, UnsupportedError
from tests import helpers as H


class CheckpointedMLP(H.DigitsMLP):
    """The digits MLP with its first block (``Linear -> Tanh``) under activation checkpointing (``reentrant``:
    ``None`` for none, else ``use_reentrant``), in training and in queries alike."""

    def __init__(self, reentrant: bool | None, loss: str = "cross_entropy") -> None:
        super().__init__(hidden=16)
        self.reentrant, self.loss_kind = reentrant, loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return self.net(x)
        if self.reentrant:  # the reentrant form differentiates only through inputs that require grad
            x = x.detach().requires_grad_()
        hidden = checkpoint(lambda v: self.net[1](self.net[0](v)), x, use_reentrant=self.reentrant)
        return self.net[2](hidden)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["x"])
        if self.loss_kind == "mse":
            return F.mse_loss(logits, F.one_hot(batch["y"], 10).to(logits.dtype))
        return F.cross_entropy(logits, batch["y"])


def _fit(save_dir: Path, model: CheckpointedMLP, **settings) -> DataValueEmbedding:
    dve = DataValueEmbedding(save_dir, projection_dim=None, report=None, checkpoint_interval=None, **settings)
    H.make_trainer(1, [dve]).fit(model, H.make_loader(H.DigitsDataset(list(range(128))), 32))
    return dve


def _test_batch() -> dict[str, torch.Tensor]:
    return next(iter(H.make_loader(H.DigitsDataset(list(range(1000, 1008))), 8)))


@pytest.mark.slow
@pytest.mark.parametrize(("reentrant", "curvature"), [(False, "empirical_fisher"), (True, "empirical_fisher"),
                                                      (False, "ggn")])
def test_checkpointed_layers_record_and_score_what_plain_training_does(tmp_path: Path, reentrant: bool,
                                                                        curvature: str) -> None:
    plain_model, model = CheckpointedMLP(None), CheckpointedMLP(reentrant)
    plain = _fit(tmp_path / "plain", plain_model, curvature=curvature).embeddings
    checkpointed = _fit(tmp_path / "checkpointed", model, curvature=curvature).embeddings
    for name, rows in plain.embedding_matrix().embeddings.items():
        torch.testing.assert_close(checkpointed.embedding_matrix().embeddings[name], rows, rtol=1e-12, atol=1e-16)
    grads = [torch.full_like(param, 0.5) for param in model.parameters()]  # .grad a query must leave alone
    for param, grad in zip(model.parameters(), grads):
        param.grad = grad
    scores = checkpointed.influence(model, _test_batch(), per_step=True).scores  # checkpointing on in the query
    expected = plain.influence(plain_model, _test_batch(), per_step=True).scores
    assert expected.abs().max() > 0
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-16)
    assert all(param.grad is grad and bool((grad == 0.5).all()) for param, grad in zip(model.parameters(), grads))


@pytest.mark.slow
def test_gauss_newton_through_reentrant_checkpointing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match=r"curvature='ggn' cannot form the Gauss-Newton rows of \['net.0'\]"
                                               r".*use_reentrant=False"):
        _fit(tmp_path / "dve", CheckpointedMLP(True), curvature="ggn")


@pytest.mark.slow
def test_the_cross_entropy_check_of_gauss_newton_still_runs_under_checkpointing(tmp_path: Path) -> None:
    # a recomputed forward must not take the place of the logits whose training gradient the check reads
    with pytest.raises(UnsupportedError, match=r"needs the training loss to be a softmax cross-entropy"):
        _fit(tmp_path / "dve", CheckpointedMLP(False, loss="mse"), curvature="ggn")


@pytest.mark.slow
def test_exact_replay_through_reentrant_checkpointing_is_refused(tmp_path: Path) -> None:
    # the reentrant form hides the checkpointed weights from the functional replay, whose check of the recorded
    # parameters refuses it, naming the fix (use_reentrant=False replays exactly: tests/test_replay_inputs.py)
    model = CheckpointedMLP(True)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    H.make_trainer(1, [dve]).fit(model, H.make_loader(H.DigitsDataset(list(range(128))), 32))
    with pytest.raises(UnsupportedError, match=r"activation checkpointing with use_reentrant=True.*use "
                                               r"use_reentrant=False"):
        dve.embeddings.exact_influence(model, _test_batch(), per_step=True)
