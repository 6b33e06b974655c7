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
    with pytest.raises(UnsupportedError, match=r"layer 'net.2': .* differs .* by \d+%.*tied.*exclude=\('net.2',\)"):
        fit(TiedHeadMLP(), DataValueEmbedding(tmp_path / "dve", projection_dim=32, report=None))


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
