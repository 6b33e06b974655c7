"""The replay's one-sample ``training_step`` losses vmapped over the samples (``sample_losses``). Oracle: the loop
over one-sample batches it replaces (``step_loss_terms`` with the vmapped path switched off)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_dve import DataValueEmbedding, replay_data
from lightning_dve.batch_trees import split_batch
from lightning_dve.batches import modes, muted_logging
from lightning_dve.config import LossReduction
from lightning_dve.replay_data import step_loss_terms
from lightning_dve.sample_losses import vmapped_losses
from tests.helpers import DigitsDataset, DigitsMLP, make_loader, make_trainer
from tests.test_replay_inputs import CheckpointedMLP


def loop_losses(module: nn.Module, batches: list[Any], monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(replay_data, "vmapped_losses", lambda *args: None)
        return step_loss_terms(module, batches, LossReduction.MEAN, None)


def singles(n: int = 6) -> list[Any]:
    return split_batch({k: v.double() if v.is_floating_point() else v
                        for k, v in DigitsDataset(range(n)).batch().items()})


def test_vmapped_losses_and_their_gradients_equal_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    module = DigitsMLP(hidden=8).double()
    batches = singles()
    got = step_loss_terms(module, batches, LossReduction.MEAN, None)
    with muted_logging(module):
        assert vmapped_losses(module, batches, lambda b: module.training_step(b, 0)) is not None  # the vmapped path
    want = loop_losses(module, batches, monkeypatch)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    weights = [p for p in module.parameters()]
    for g, w in zip(torch.autograd.grad(got.sum(), weights), torch.autograd.grad(want.sum(), weights)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)


@dataclasses.dataclass
class Pair:
    x: torch.Tensor
    y: torch.Tensor
    note: str


class OnPairs(DigitsMLP):
    def training_step(self, batch: Pair, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch.x), batch.y)


def test_dataclass_batches_are_vmapped_and_batches_that_differ_otherwise_are_looped() -> None:
    module = OnPairs(hidden=8).double()
    pairs = [Pair(b["x"], b["y"], "same") for b in singles()]
    assert vmapped_losses(module, pairs, lambda b: module.training_step(b, 0)) is not None
    texts = [dataclasses.replace(p, note=str(i)) for i, p in enumerate(pairs)]  # other text per sample
    assert vmapped_losses(module, texts, lambda b: module.training_step(b, 0)) is None
    longer = [*pairs[:-1], Pair(torch.cat([pairs[-1].x, pairs[-1].x]), pairs[-1].y.repeat(2), "same")]
    assert vmapped_losses(module, longer, lambda b: module.training_step(b, 0)) is None


class ItemCheck(DigitsMLP):
    """Updates a running count in a buffer, then reads a loss's value in Python (``.item()``): not vmappable."""

    def __init__(self) -> None:
        super().__init__(hidden=8)
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen += 1
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        return loss if loss.item() < 1e9 else loss * 0


@pytest.mark.parametrize("module", [ItemCheck(), CheckpointedMLP(hidden=8)], ids=["item", "checkpointing"])
def test_a_step_vmap_cannot_run_or_differentiate_is_looped_with_its_buffers_as_they_were(
        module: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """``.item()`` fails in the vmapped forward, after the buffer was written (restored); activation checkpointing
    fails only in the backward, where it runs its forward again outside vmap (checked before it is used)."""
    module = module.double()
    batches = singles()
    buffers = [b.clone() for b in module.buffers()]
    with muted_logging(module):
        assert vmapped_losses(module, batches, lambda b: module.training_step(b, 0)) is None
    assert all(torch.equal(b, c) for b, c in zip(module.buffers(), buffers))
    torch.testing.assert_close(step_loss_terms(module, batches, LossReduction.MEAN, None),
                               loop_losses(module, batches, monkeypatch), rtol=0, atol=0)


def test_replayed_embeddings_through_training_step_equal_the_loops(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``embeddings="replay"`` without ``train_loss_fn`` (one-sample ``training_step`` losses): the vmapped losses
    give the loop's scores, float64, to round-off."""
    data = DigitsDataset(range(48))
    module = DigitsMLP(hidden=8).double()
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=16, embeddings="replay")
    make_trainer(2, callbacks=[dve]).fit(module, make_loader(data, 16, seed=1))
    test = {k: v.double() if v.is_floating_point() else v for k, v in DigitsDataset(range(1500, 1504)).batch().items()}
    vmapped = dve.embeddings.influence(module, test, per_step=True).scores
    with monkeypatch.context() as patch:
        patch.setattr(replay_data, "vmapped_losses", lambda *args: None)
        dve.embeddings.replay_embeddings(module)
    looped = dve.embeddings.influence(module, test, per_step=True).scores
    torch.testing.assert_close(vmapped, looped, rtol=1e-10, atol=1e-15)


class LossAverage(DigitsMLP):
    """Keeps a running average of its loss in a buffer, assigned anew at each step (not in place)."""

    def __init__(self) -> None:
        super().__init__(hidden=8)
        self.register_buffer("loss_ema", torch.zeros((), dtype=torch.float64))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        self.loss_ema = 0.9 * self.loss_ema + 0.1 * loss.detach()
        return loss


class WithMetric(DigitsMLP):
    """Updates a torchmetrics accuracy in ``training_step`` (its states are attributes it assigns)."""

    def __init__(self) -> None:
        super().__init__(hidden=8)
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["x"])
        self.acc(logits, batch["y"])
        return F.cross_entropy(logits, batch["y"])


@pytest.mark.parametrize("module_cls", [LossAverage, WithMetric], ids=["loss average", "torchmetrics"])
def test_a_step_that_assigns_module_state_is_looped_and_its_state_put_back(
        module_cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A vmapped call that assigns module state (a running average, a metric's states) left vmap's tensors there:
    the next call, the train-end replay and every later query failed ("tensor escaped from inside a function being
    vmapped", a review of session 41). Now the state is put back and the loop runs: the loop's scores, and the
    module usable after."""
    module = module_cls().double()
    batches = singles()
    with modes(module, []):
        assert vmapped_losses(module, batches, lambda b: module.training_step(b, 0)) is None
        step_loss_terms(module, batches, LossReduction.MEAN, None)  # the second call failed
    data, test = DigitsDataset(range(48)), {k: v.double() if v.is_floating_point() else v
                                            for k, v in DigitsDataset(range(1500, 1504)).batch().items()}
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=16, embeddings="replay")
    make_trainer(2, callbacks=[dve]).fit(module, make_loader(data, 16, seed=1))
    assert dve.embeddings.store.manifest["embeddings_source"] == "replay"
    replayed = dve.embeddings.influence(module, test, per_step=True).scores
    with monkeypatch.context() as patch:
        patch.setattr(replay_data, "vmapped_losses", lambda *args: None)
        dve.embeddings.replay_embeddings(module)
    torch.testing.assert_close(replayed, dve.embeddings.influence(module, test, per_step=True).scores, rtol=0, atol=0)


class ReadsItsLoss(DigitsMLP):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        return loss if loss.item() < 1e9 else loss * 0


def test_a_failed_attempt_leaves_an_inference_tensor_buffer_and_falls_back() -> None:
    """Putting the buffers back wrote into every one: an inference tensor (a buffer assigned under
    ``trainer.validate``) raised there instead of the loop running (a review of session 41)."""
    module = ReadsItsLoss(hidden=8).double()
    with torch.inference_mode():
        module.register_buffer("scale", torch.ones((), dtype=torch.float64))
    batches = singles()
    with modes(module, []):
        losses = step_loss_terms(module, batches, LossReduction.MEAN, None)
    assert losses.shape == (len(batches),) and module.scale.is_inference()
