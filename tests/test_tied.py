"""Weights that receive gradient outside their module's own calls are refused, not silently mis-attributed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_dve import DataValueEmbedding, UnsupportedError
from tests.conftest import TiedHeadMLP


def test_weight_also_used_functionally_is_refused(fit: Callable, tmp_path: Path) -> None:
    message = r"layer 'net.2': .* differs .* by \d+%.*tied.*exclude=\('net.2',\)"
    with pytest.raises(UnsupportedError, match=message) as info:
        fit(TiedHeadMLP(), DataValueEmbedding(tmp_path / "dve", projection_dim=32, report=None))
    assert "hold this one weight" not in str(info.value)  # one tracked layer holds it: no list of sharers


def test_weight_shared_by_two_tracked_modules_is_refused(mlp_cls: type, fit: Callable, tmp_path: Path) -> None:
    class Shared(mlp_cls):
        def __init__(self) -> None:
            super().__init__()
            self.square = nn.Linear(10, 10)
            self.square2 = nn.Linear(10, 10)
            self.square2.weight = self.square.weight  # tied: one Parameter, two modules

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.square2(torch.tanh(self.square(self.net(x))))

    with pytest.raises(UnsupportedError, match="tied or shared with another module"):
        fit(Shared(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None))


def test_a_layer_called_in_one_step_and_used_functionally_in_the_next_is_refused(fit: Callable,
                                                                                 tmp_path: Path) -> None:
    """The ``aux`` head is called as a module in step 0 and only used through its weight (``F.linear``) from step
    1 on: step 1 is refused, as a step of its own (being reached in an earlier step does not count)."""
    from tests.conftest import TinyMLP

    class CalledThenFunctional(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.aux = nn.Linear(64, 10)

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            x = batch["x"]
            aux = self.aux(x) if batch_idx == 0 else nn.functional.linear(x, self.aux.weight, self.aux.bias)
            return self.loss(batch) + aux.square().mean()

    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32, report=None)
    with pytest.raises(UnsupportedError, match=r"layer 'aux' received a gradient but its forward was never called"):
        fit(CalledThenFunctional(), dve)


def test_an_lm_head_tied_to_the_embedding_names_both_layers_to_exclude(fit: Callable, tmp_path: Path) -> None:
    """A GPT-style head ``nn.Linear`` whose weight *is* the embedding's, both called as modules: each module's hooks
    see only its own calls, so the shared weight is refused, naming both tracked layers; excluding just one (as a
    message naming one would suggest) leaves the other holding the tied weight, refused again at the next fit."""
    from tests.conftest import TinyMLP

    class TiedLM(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.head = nn.Embedding(10, 16), nn.Linear(16, 10, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.tok(self.net(x).argmax(dim=1)) + self.net[0](x)))

    with pytest.raises(UnsupportedError, match=r"tracked layers 'tok', 'head' hold this one weight\. Untie it, or "
                                               r"pass exclude=\('tok', 'head'\)"):
        fit(TiedLM(), DataValueEmbedding(tmp_path / "both", projection_dim=None, report=None))
    with pytest.raises(UnsupportedError, match=r"layer 'head': .* pass exclude=\('head',\)"):
        fit(TiedLM(), DataValueEmbedding(tmp_path / "one", projection_dim=None, report=None, exclude=("tok",)))
    fit(TiedLM(), DataValueEmbedding(tmp_path / "none", projection_dim=None, report=None, exclude=("tok", "head")))
