"""Dataclass batches in queries and replay, and exact replay of a run whose optimizer param groups or frozen
parameters changed during ``fit`` in modules left out of the recording (a ``BaseFinetuning`` callback).

Every run is a real Lightning ``fit`` on 48 digits (batch 16) in float64.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning
from torch.utils.data import Dataset

from lightning_dve import DataValueEmbedding, UnsupportedError
from lightning_dve.batch_trees import split_batch, to_device
from tests.helpers import DigitsDataset, DigitsMLP, make_loader, make_trainer, split_indices


@dataclasses.dataclass
class DigitBatch:
    """A batch as a dataclass (Lightning moves these to the device like dicts)."""

    x: torch.Tensor
    y: torch.Tensor
    idx: list[int]


@dataclasses.dataclass
class DigitItem:
    """One sample as a dataclass."""

    x: torch.Tensor
    y: torch.Tensor
    idx: int


class Items(Dataset):
    """Digits as ``(x, y, id)`` tuples or :class:`DigitItem` dataclasses, with a plain ``int`` id."""

    def __init__(self, digits: DigitsDataset, dataclass_items: bool = False) -> None:
        self.digits, self.dataclass_items = digits, dataclass_items

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int] | DigitItem:
        item = self.digits[i]
        values = (item["x"], item["y"], int(item["index"]))
        return DigitItem(*values) if self.dataclass_items else values


def collate_dataclass(items: list[Any]) -> DigitBatch:
    xs, ys, ids = zip(*(dataclasses.astuple(i) if isinstance(i, DigitItem) else i for i in items))
    return DigitBatch(torch.stack(xs), torch.stack(ys), list(ids))


class DataclassMLP(DigitsMLP):
    def training_step(self, batch: DigitBatch, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch.x), batch.y)


def per_sample_loss(module: DigitsMLP, batch: DigitBatch) -> torch.Tensor:
    return F.cross_entropy(module(batch.x), batch.y, reduction="none")


@pytest.fixture(scope="module")
def digits() -> tuple[DigitsDataset, DigitsDataset]:
    train, test = split_indices(48, 5, seed=2)
    return DigitsDataset(train), DigitsDataset(test)


def test_split_batch_and_to_device_traverse_dataclasses() -> None:
    batch = DigitBatch(torch.ones(3, 2, dtype=torch.float32), torch.arange(3), [10, 11, 12])
    singles = split_batch(batch)
    assert len(singles) == 3 and all(type(s) is DigitBatch for s in singles)
    assert singles[2].x.shape == (1, 2) and torch.equal(singles[2].y, torch.tensor([2])) and singles[2].idx == [12]
    moved = to_device(batch, torch.device("cpu"), torch.float64)
    assert type(moved) is DigitBatch and moved.x.dtype == torch.float64 and moved.idx == [10, 11, 12]


@pytest.mark.parametrize("dataclass_items", [False, True])
def test_dataclass_batches_query_and_replay(tmp_path: Path, digits, dataclass_items: bool) -> None:
    """A dataclass batch (trained on) is split into samples by queries and rebuilt by replay, also from dataclass
    items (read twice to check they do not change): the scores equal those of the same queries with an explicit
    per-sample loss (before: 'no tensor with a batch dimension', and a RuntimeError comparing dataclass items)."""
    train, test = digits
    module = DataclassMLP(hidden=8)
    dve = DataValueEmbedding(tmp_path, report=None, projection_dim=None, checkpoint_interval=2,
                             sample_ids=lambda b: b.idx)
    loader = torch.utils.data.DataLoader(Items(train, dataclass_items), batch_size=16, shuffle=False, collate_fn=collate_dataclass)
    make_trainer(1, callbacks=[dve]).fit(module, loader)
    test_batch = collate_dataclass([Items(test)[i] for i in range(len(test))])
    emb = dve.embeddings
    scores = emb.influence(module, test_batch, per_step=True).scores
    reference = emb.influence(module, test_batch, loss_fn=per_sample_loss, per_step=True).scores
    torch.testing.assert_close(scores, reference, rtol=1e-12, atol=0)
    exact = emb.exact_influence(module, test_batch, per_step=True).scores
    exact_ref = emb.exact_influence(module, test_batch, per_step=True, loss_fn=per_sample_loss,
                                    train_loss_fn=per_sample_loss).scores
    torch.testing.assert_close(exact, exact_ref, rtol=1e-10, atol=1e-16)


# --- param groups and frozen parameters changed during fit, outside the tracked layers ------------------------


class UnfreezeFirstLayer(BaseFinetuning):
    """Freezes ``net.0`` before training and unfreezes it at epoch 1, by ``add_param_group`` or in place."""

    def __init__(self, add_group: bool) -> None:
        super().__init__()
        self.add_group = add_group

    def freeze_before_training(self, pl_module: DigitsMLP) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: DigitsMLP, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == 1 and self.add_group:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=0.05, initial_denom_lr=1.0)
        elif epoch == 1:
            self.make_trainable(pl_module.net[0])  # the optimizer holds it from the start


class TrainableOnlyMLP(DigitsMLP):
    """Optimizes only the parameters trainable when the optimizer is made (BaseFinetuning's usual setup)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


@pytest.mark.parametrize(("add_group", "message"), [(True, "param groups changed"), (False, r"'net.0.bias', "
                                                                                             r"'net.0.weight'\] were unfrozen")])
def test_exact_replay_names_a_layout_changed_outside_the_tracked_layers(tmp_path: Path, digits, add_group: bool,
                                                                        message: str) -> None:
    """An excluded backbone unfrozen mid-fit is trained untracked (documented); exact replay, which follows the
    first step's param groups and frozen set, is refused naming that step and change (before: 'replaying the
    recorded steps does not reproduce the parameters checkpointed', listing causes that did not apply)."""
    train, test = digits
    module = (TrainableOnlyMLP if add_group else DigitsMLP)(hidden=8, lr=0.2)
    dve = DataValueEmbedding(tmp_path, report=None, projection_dim=None, checkpoint_interval=2, exclude=("net.0",))
    make_trainer(2, callbacks=[dve, UnfreezeFirstLayer(add_group)]).fit(module, make_loader(train, 16, seed=1))
    emb = dve.embeddings
    assert emb.influence(module, test.batch()).scores.shape == (5, 48)  # the estimator is unaffected
    with pytest.raises(UnsupportedError, match=rf"at step 3 .*{message}"):
        emb.exact_influence(module, test.batch())


class BackboneMLP(DigitsMLP):
    """The digits MLP as ``backbone`` (``Linear(64, 8)``, tanh) and ``head``, for ``BackboneFinetuning``."""

    def __init__(self) -> None:
        super().__init__(hidden=8, lr=0.2)
        self.backbone, self.head = torch.nn.Sequential(self.net[0], self.net[1]), self.net[2]
        del self.net  # each layer under one name only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


@pytest.mark.parametrize(("epochs", "max_steps"), [(2, -1), (1, -1), (3, 1000), (-1, 1000)])
def test_backbone_finetuning_of_a_watched_backbone_is_refused_at_fit_start(tmp_path: Path, digits, epochs: int,
                                                                           max_steps: int) -> None:
    """``BackboneFinetuning`` froze the backbone in its ``setup`` to unfreeze it at epoch 1, which the step guard
    refuses at that step: refused before anything is recorded, naming ``exclude=`` with its modules (before: refused
    at step 3, after a whole epoch, leaving a store in status 'recording' that neither loads nor resumes past it).
    A fit that ends before the unfreeze epoch trains as before; a max_steps beyond it (a safety cap) is refused too.
    """
    train, _ = digits
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=None)
    trainer = make_trainer(epochs, callbacks=[dve, BackboneFinetuning(unfreeze_backbone_at_epoch=1)],
                           max_steps=max_steps)
    if epochs == 1:
        trainer.fit(BackboneMLP(), make_loader(train, 16, seed=1))
        assert dve.embeddings.store.layer_names == ["head"]
        return
    with pytest.raises(UnsupportedError, match=r"BackboneFinetuning froze the backbone \(\['backbone.0'\]\) to "
                                               r"unfreeze it at epoch 1.*exclude=\('backbone.0',\)"):
        trainer.fit(BackboneMLP(), make_loader(train, 16, seed=1))
    assert trainer.global_step == 0 and not (tmp_path / "dve" / "manifest.json").exists()


def test_only_the_backbone_is_refused_where_another_module_is_frozen_for_good(tmp_path: Path, digits) -> None:
    """A module frozen in ``__init__`` outside the backbone is no part of the refusal: it is not named, and with the
    backbone excluded the fit trains."""
    class WithFrozenProbe(BackboneMLP):
        def __init__(self) -> None:
            super().__init__()
            self.probe = torch.nn.Linear(64, 2).requires_grad_(False)

    train, _ = digits
    with pytest.raises(UnsupportedError, match=r"froze the backbone \(\['backbone.0'\]\) to unfreeze it"):
        make_trainer(2, callbacks=[DataValueEmbedding(tmp_path / "a", report=None, projection_dim=None),
                                   BackboneFinetuning(unfreeze_backbone_at_epoch=1)]).fit(
            WithFrozenProbe(), make_loader(train, 16, seed=1))


@pytest.mark.parametrize(("accumulate", "max_steps", "reached"), [(1, 5, False), (1, 6, True), (2, 3, False),
                                                                  (2, 4, True)])
def test_an_epoch_is_reached_under_max_steps_only_past_the_earlier_epochs_optimizer_steps(
        accumulate: int, max_steps: int, reached: bool) -> None:
    """Five batches an epoch: epoch 1 starts after 5 optimizer steps, or 3 with two micro-batches a step (the
    last one alone), so a cap of exactly that many ends the fit before it."""
    from types import SimpleNamespace

    from lightning_dve.callback_setup import _reaches_epoch

    trainer = SimpleNamespace(max_epochs=-1, max_steps=max_steps, num_training_batches=5,
                              accumulate_grad_batches=accumulate, fit_loop=SimpleNamespace(setup_data=lambda: None))
    assert _reaches_epoch(trainer, 1) is reached
    assert _reaches_epoch(trainer, 0) and not _reaches_epoch(SimpleNamespace(**{**vars(trainer), "max_epochs": 1}), 1)


@pytest.mark.parametrize("max_epochs", [None, 20])
def test_backbone_finetuning_under_max_steps_warns_instead(tmp_path: Path, digits, max_epochs: int | None) -> None:
    """Where ``max_steps`` may end the fit first the unfreeze epoch may never come: a warning names the backbone,
    and a fit that ends first trains (before: refused though it never reached epoch 10)."""
    train, _ = digits
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=None)
    trainer = make_trainer(max_epochs, callbacks=[dve, BackboneFinetuning(unfreeze_backbone_at_epoch=10)],
                           max_steps=8)
    with pytest.warns(UserWarning, match=r"BackboneFinetuning is in the Trainer and modules \['backbone.0'\]"):
        trainer.fit(BackboneMLP(), make_loader(train, 16, seed=1))
    assert dve.embeddings.steps == list(range(8))


def test_another_finetuning_callback_with_frozen_modules_warns_at_fit_start(tmp_path: Path, digits) -> None:
    """A ``BaseFinetuning`` subclass's plan is its own code: the frozen modules outside the tracked layers are named
    at fit start, and the fit goes on (it is refused at the step that unfreezes them, as before)."""
    train, _ = digits
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=None)
    with pytest.warns(UserWarning, match=r"UnfreezeFirstLayer is in the Trainer and modules \['net.0'\] are frozen"):
        with pytest.raises(UnsupportedError, match=r"step 3: .*were unfrozen during fit"):
            make_trainer(2, callbacks=[dve, UnfreezeFirstLayer(add_group=False)]).fit(
                DigitsMLP(hidden=8, lr=0.2), make_loader(train, 16, seed=1))


@dataclasses.dataclass
class CountedBatch:
    """A dataclass batch with a field computed in ``__post_init__`` (``init=False``)."""

    x: torch.Tensor
    n: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.n = self.x.shape[0]


def test_a_dataclass_field_computed_after_init_is_computed_again() -> None:
    singles = split_batch(CountedBatch(torch.ones(3, 2)))
    assert [s.n for s in singles] == [1, 1, 1]
    assert to_device(CountedBatch(torch.ones(3, 2)), torch.device("cpu"), torch.float64).x.dtype == torch.float64
