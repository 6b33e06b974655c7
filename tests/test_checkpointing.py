"""Activation checkpointing (``torch.utils.checkpoint``): capture, curvature and queries through recomputed layers.

With ``use_reentrant=False`` the checkpointed layers are called with autograd on and recomputed in the backward;
with ``use_reentrant=True`` their first forward runs with autograd off and only the backward's recomputation
reaches them. Either way the rows, the embeddings and the queries must equal those of the same model without
checkpointing (float64, same trajectory): the oracle is the plain run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


class CheckpointedHidden(CheckpointedMLP):
    """A reentrant checkpoint around the second layer, whose input (the first layer's output) requires grad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](checkpoint(self.net[1], self.net[0](x), use_reentrant=True))


@pytest.mark.slow
def test_exact_replay_of_a_test_loss_through_a_reentrant_checkpoint_is_refused(tmp_path: Path) -> None:
    """Where the test loss's own gradient reaches the reentrant checkpoint first, torch's error (``.grad()`` is
    incompatible) came out raw (a reviewer's finding): refused, naming the fix."""
    model = CheckpointedHidden(True)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    H.make_trainer(1, [dve]).fit(model, H.make_loader(H.DigitsDataset(list(range(64))), 32))
    with pytest.raises(UnsupportedError, match=r"through activation checkpointing with use_reentrant=True "
                                               r"\(torch\.utils\.checkpoint\): use use_reentrant=False"):
        dve.embeddings.exact_influence(model, _test_batch())


class MeasuredMLP(CheckpointedMLP):
    """The plain digits MLP with an ``aux`` head in the loss of even steps only (odd ones do not call it), whose
    even steps also call ``aux`` and the whole model once more under ``torch.no_grad`` (``measure``): a metric."""

    def __init__(self, measure: bool) -> None:
        super().__init__(None)
        self.measure = measure
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.aux = torch.nn.Linear(64, 10, dtype=torch.float64)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx % 2:
            return super().training_step(batch, batch_idx)
        if self.measure:
            with torch.no_grad():
                self.metric = (self(batch["x"]).argmax(-1) == batch["y"]).double().mean() + self.aux(batch["x"]).mean()
        extra = 1e-2 * self.aux(batch["x"]).square().mean()  # before the logits: the last tracked output
        return super().training_step(batch, batch_idx) + extra


@pytest.mark.slow
def test_a_no_grad_forward_beside_the_training_forward_is_not_refused_under_gauss_newton(tmp_path: Path) -> None:
    """Only a layer that no forward of the step called with autograd on is refused (the reentrant case above): a
    metric computed under ``torch.no_grad`` besides the loss, in this step or an earlier one, changes nothing."""
    plain = _fit(tmp_path / "plain", MeasuredMLP(measure=False), curvature="ggn").embeddings
    measured = _fit(tmp_path / "measured", MeasuredMLP(measure=True), curvature="ggn").embeddings
    assert set(plain.embedding_matrix().embeddings) == {"net.0", "net.2", "aux"}
    for name, rows in plain.embedding_matrix().embeddings.items():
        torch.testing.assert_close(measured.embedding_matrix().embeddings[name], rows, rtol=1e-12, atol=1e-16)


class FailsInBackward(torch.autograd.Function):
    """The identity, whose backward raises (a user's hook failing inside the query's backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backward failed on purpose")


@pytest.mark.slow
def test_a_failing_full_backward_of_a_query_gives_back_the_grads_it_put_aside(tmp_path: Path) -> None:
    """Under a reentrant checkpoint the query runs ``loss.backward()`` with ``.grad`` put aside: when that backward
    raises, the error reaches the caller and every ``.grad`` is as it was."""
    model = CheckpointedMLP(True)
    emb = _fit(tmp_path, model).embeddings
    grads = [torch.full_like(param, 0.5) for param in model.parameters()]
    for param, grad in zip(model.parameters(), grads):
        param.grad = grad
    with pytest.raises(RuntimeError, match="backward failed on purpose"):
        emb.influence(model, _test_batch(), loss_fn=lambda m, b: F.cross_entropy(FailsInBackward.apply(m(b["x"])),
                                                                                 b["y"], reduction="none"))
    assert all(param.grad is grad for param, grad in zip(model.parameters(), grads))
