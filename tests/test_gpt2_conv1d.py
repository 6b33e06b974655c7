"""transformers' GPT-2 ``Conv1D`` (``x @ weight + bias``, weight ``[d_in, d_out]``), tracked as a linear layer with
its weight transposed. Oracles: per-example autograd for the stored rows, and the same network built from
``nn.Linear`` with the transposed weights (the tested linear path), which must record and score the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dve import DataValueEmbedding
from lightning_dve.errors import UnsupportedError
from lightning_dve.store import TrajectoryStore
from tests.conftest import TinyMLP


class Conv1D(nn.Module):
    """As ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP projections)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class TokenNet(TinyMLP):
    """Digits as 4 tokens of 16 pixels: ``c_fc`` (Conv1D or ``nn.Linear``) per token, tanh, token mean, head."""

    def __init__(self, linear: bool = False, optimizer: str = "sgd") -> None:
        super().__init__()
        torch.manual_seed(0)
        conv, self.head = Conv1D(12, 16), nn.Linear(12, 10)
        self.optimizer = optimizer
        if linear:
            self.c_fc = nn.Linear(16, 12)
            with torch.no_grad():
                self.c_fc.weight.copy_(conv.weight.T)
                self.c_fc.bias.copy_(conv.bias)
        else:
            self.c_fc = conv
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.c_fc(x.view(-1, 4, 16))).mean(dim=1))

    def configure_optimizers(self) -> Any:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)


def test_stored_rows_are_the_per_example_gradients(fit: Callable, tmp_path: Path) -> None:
    model = TokenNet().double()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    fit(model, dve, precision="64-true")
    store = TrajectoryStore.open(tmp_path / "dve")
    record = store.read_step(store.steps[0])
    assert {layer["name"]: layer["kind"] for layer in store.manifest["layers"]} == {"c_fc": "conv1d_gpt2",
                                                                                    "head": "linear"}
    oracle = TokenNet().double()
    oracle.load_state_dict(initial)
    from tests.conftest import DigitsDict
    data = DigitsDict(range(16)).batch()
    for row, i in zip(record.grads["c_fc"], record.sample_ids.tolist()):
        oracle.zero_grad()
        F.cross_entropy(oracle(data["x"][i:i + 1].double()), data["y"][i:i + 1]).backward()
        expected = torch.cat([oracle.c_fc.weight.grad.T, oracle.c_fc.bias.grad[:, None]], dim=1).reshape(-1)
        torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("optimizer", "projection_dim", "curvature", "embeddings"), [
    ("sgd", None, "empirical_fisher", "recursion"), ("sgd", 64, "ggn", "recursion"),
    ("adamw", None, "empirical_fisher", "recursion"), ("adamw", 64, "empirical_fisher", "recursion"),
    ("sgd", 64, "empirical_fisher", "replay")])
def test_a_conv1d_network_scores_as_its_linear_twin(fit: Callable, tmp_path: Path, test_batch: dict,
                                                    optimizer: str, projection_dim: int | None, curvature: str,
                                                    embeddings: str) -> None:
    """Momentum and AdamW (its preconditioner maps the weight's second moment into the block layout), exact and
    projected (the projections are seeded by layer name: the same for both), GGN rows, exact replay and the
    replayed embeddings (which map each projection row back to the weight's layout)."""
    runs = []
    for linear in (False, True):
        model = TokenNet(linear, optimizer).double()
        dve = DataValueEmbedding(tmp_path / str(linear), projection_dim=projection_dim, report=None,
                                 curvature=curvature, embeddings=embeddings)
        fit(model, dve, precision="64-true")
        runs.append((dve.embeddings, model))
    double = {k: v.double() if v.is_floating_point() else v for k, v in test_batch.items()}
    (conv, conv_model), (linear, linear_model) = runs
    torch.testing.assert_close(conv.influence(conv_model, double, per_step=True).scores,
                               linear.influence(linear_model, double, per_step=True).scores, rtol=1e-9, atol=1e-12)
    if projection_dim is None:
        torch.testing.assert_close(conv.exact_influence(conv_model, double).scores,
                                   linear.exact_influence(linear_model, double).scores, rtol=1e-9, atol=1e-12)


def test_a_module_named_conv1d_of_another_form_is_refused(fit: Callable, tmp_path: Path) -> None:
    class Odd(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = Conv1D(12, 64)
            del self.c_fc.nf  # not GPT-2's form

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) + self.c_fc.weight.sum() * 0

    with pytest.raises(UnsupportedError, match="is a Conv1D that is not transformers' GPT-2 Conv1D"):
        fit(Odd(), DataValueEmbedding(tmp_path / "dve", report=None))
    other = Odd()
    other.c_fc.nf = 10  # an nf that is not its weight's second dimension, with a bias of nf still
    other.c_fc.bias = nn.Parameter(torch.zeros(10))
    with pytest.raises(UnsupportedError, match="is a Conv1D that is not transformers' GPT-2 Conv1D"):
        fit(other, DataValueEmbedding(tmp_path / "other", report=None))
