"""Language-model losses over padded sequences: a token-level mean (``cross_entropy`` with ``ignore_index``) weighs
sequence ``i`` by ``n_i / sum_j n_j``, which the callback must be told (``loss_reduction=callable``).

Declared correctly, the recorded rows are the gradients of each sequence's own mean token loss (checked against a
per-example backward loop in float64). Declared as the default ``"mean"``, the rows are off by ``B n_i / sum_j n_j``
while the loss values of two sequences are alike (every loss is near ``log(vocabulary)`` early in training), so a
check on loss values alone passes it: the reduction check compares gradients too and refuses it.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding, LossReductionError, UnsupportedError
from tests.conftest import TinyMLP
from lightning_dve.config import LossReduction
from lightning_dve.layers import gradient_block
from lightning_dve.loss_checks import check_reduction
from lightning_dve.store import TrajectoryStore
from tests.helpers import make_trainer

PAD, VOCAB = -100, 11


def padded_sequences(n: int, context: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` random token sequences of lengths 2..context, targets padded with :data:`PAD`; the first two have
    lengths 2 and 8 (far from the batch's mean length)."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = (2, context)[i] if i < 2 else int(torch.randint(2, context + 1, (1,), generator=generator))
        tokens = torch.randint(1, VOCAB, (length + 1,), generator=generator)
        input_ids = torch.zeros(context, dtype=torch.long)
        labels = torch.full((context,), PAD, dtype=torch.long)
        input_ids[:length], labels[:length] = tokens[:-1], tokens[1:]
        items.append({"input_ids": input_ids, "labels": labels, "index": torch.tensor(i)})
    return items


def token_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``n_i / sum_j n_j``: sequence ``i``'s weight in a token-level mean over the batch."""
    tokens = (batch["labels"] != PAD).sum(dim=1).double()
    return tokens / tokens.sum()


class TokenMeanLM(L.LightningModule):
    """Embedding -> tanh Linear -> LM head; ``training_step`` is the token-level mean cross-entropy of the batch."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.tok, self.fc, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 16), nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(self.tok(input_ids))))

    def sequence_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B]``: each sequence's mean token loss (the per-sample loss)."""
        tokens = F.cross_entropy(self(batch["input_ids"]).transpose(1, 2), batch["labels"], ignore_index=PAD,
                                 reduction="none")
        return tokens.sum(dim=1) / (batch["labels"] != PAD).sum(dim=1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=PAD)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def collated(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def test_a_token_mean_declared_as_a_mean_is_refused_although_the_losses_agree() -> None:
    model, batch = TokenMeanLM().double(), collated(padded_sequences(6))
    params = [model.tok.weight, model.fc.weight, model.head.weight]
    check_reduction(model, batch, LossReduction.MEAN, None)  # the loss values alone cannot tell (the blind spot)
    with pytest.raises(LossReductionError, match=r"loss_reduction='mean' declares: on the batch's first two samples "
                                                 r"the gradient of their joint loss differs by \d+%.*token count"):
        check_reduction(model, batch, LossReduction.MEAN, None, params)
    check_reduction(model, batch, LossReduction.WEIGHTS, token_weights, params)  # the right weights pass


def test_token_mean_rows_are_each_sequences_gradient_and_a_wrong_reduction_is_refused(tmp_path) -> None:
    items = padded_sequences(16)
    loader, test = DataLoader(items, batch_size=8), collated(padded_sequences(6, seed=1))
    initial, model = TokenMeanLM().double(), TokenMeanLM()
    right = DataValueEmbedding(tmp_path / "right", projection_dim=None, loss_reduction=token_weights, report=None)
    make_trainer(1, [right]).fit(model, loader)
    record, batch = TrajectoryStore.open(tmp_path / "right").read_step(0), collated(items[:8])
    modules = dict(initial.named_modules())
    for i in range(8):  # oracle: a per-example backward of each sequence's own mean token loss
        initial.zero_grad()
        initial.sequence_losses({key: value[i:i + 1] for key, value in batch.items()}).sum().backward()
        for name, rows in record.grads.items():
            torch.testing.assert_close(rows[i], gradient_block(modules[name]).flatten(), rtol=1e-10, atol=1e-12)
    assert right.embeddings.influence(model, test).scores.shape == (6, 16)

    wrong_model = TokenMeanLM()
    wrong = DataValueEmbedding(tmp_path / "wrong", projection_dim=None, reference=test)  # loss_reduction="mean"
    with pytest.warns(UserWarning, match=r"report is skipped: .*gradient of their joint loss"):
        make_trainer(1, [wrong]).fit(wrong_model, loader)
    with pytest.raises(LossReductionError, match=r"token count, n_i / sum_j n_j"):
        wrong.embeddings.influence(wrong_model, test)


class PositionTableLM(TokenMeanLM):
    """Adds a learned position embedding looked up once over ``arange(t)`` (nanoGPT's form) or per sample."""

    def __init__(self, per_sample: bool) -> None:
        super().__init__()
        self.pos, self.per_sample = nn.Embedding(8, 8), per_sample

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        positions = torch.arange(t).expand(b, t) if self.per_sample else torch.arange(t)
        return self.head(torch.tanh(self.fc(self.tok(input_ids) + self.pos(positions))))


def test_a_position_table_broadcast_across_the_batch_is_named_with_the_fix(tmp_path) -> None:
    """``pos(torch.arange(t))`` gives ``[t, d]`` rows broadcast over the batch: capture would file them under ``t``
    samples. With batch size ``t`` this was silent (rows 190% off); now a warning names the layer and the per-sample
    lookup; with another batch size the batch-size error names it too. Looked up per sample, nothing is said."""
    items = padded_sequences(16)
    dve = DataValueEmbedding(tmp_path / "equal", projection_dim=None, loss_reduction=token_weights, report=None)
    with pytest.warns(UserWarning, match=r"layer 'pos' \(Embedding\) was called on the ids arange\(8\) alone.*"
                                         r"pos\(torch.arange\(t\).expand\(b, t\)\), or pass exclude=\('pos',\)"):
        make_trainer(1, [dve]).fit(PositionTableLM(per_sample=False), DataLoader(items, batch_size=8))
    dve = DataValueEmbedding(tmp_path / "other", projection_dim=None, loss_reduction=token_weights, report=None)
    with pytest.raises(UnsupportedError, match=r"different batch sizes .*'pos': 8.*pos\(torch.arange\(t\)\.expand"):
        make_trainer(1, [dve]).fit(PositionTableLM(per_sample=False), DataLoader(items, batch_size=4))
    dve = DataValueEmbedding(tmp_path / "per_sample", projection_dim=None, loss_reduction=token_weights, report=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*position table")
        make_trainer(1, [dve]).fit(PositionTableLM(per_sample=True), DataLoader(items, batch_size=8))


class RandomlyMasked(TinyMLP):
    """Drops a random part of each batch inside ``training_step`` (a mask drawn there), a mean over the kept
    samples, and writes the weights it applied into the batch dict for the declared ``loss_reduction``."""

    def __init__(self) -> None:
        super().__init__()
        self.draws = torch.Generator().manual_seed(3)
        self.applied: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        losses = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
        mask = (torch.rand(len(losses), generator=self.draws) < 0.6).to(losses.dtype)
        mask[0] = 1.0  # at least one kept sample
        batch["loss_weights"] = mask / mask.sum()
        if self.training:  # not the train-end check of the loss (report=None), which runs in eval mode
            self.applied.append(batch["loss_weights"].detach().clone())
        return (losses * batch["loss_weights"]).sum()


def test_weights_drawn_inside_training_step_are_declared_through_the_batch(fit, save_dir):
    """A mask drawn in ``training_step`` (random sample dropping, hard-example mining) cannot be computed from the
    batch before it; the ``loss_reduction`` callable runs after ``training_step``, so weights written into the
    batch dict there are read as applied. Oracle: the weights the step itself recorded. Left at ``"mean"`` the
    kept rows came out ``B / kept`` times too large (the curvature scaled by that)."""
    module = RandomlyMasked()
    dve = DataValueEmbedding(save_dir, report=None, projection_dim=None, loss_reduction=lambda b: b["loss_weights"])
    fit(module, dve)
    store = dve.embeddings.store
    assert len(store.steps) == len(module.applied) == 4
    for step, applied in zip(store.steps, module.applied):
        torch.testing.assert_close(store.read_step(step).weights.to(applied.dtype), applied, rtol=1e-6, atol=0)
    assert any(bool((applied == 0).any()) for applied in module.applied)
