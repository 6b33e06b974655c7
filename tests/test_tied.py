"""Weights that receive gradient outside their module's own calls are refused, not silently mis-attributed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_dve import DataValueEmbedding, UnsupportedError
from tests.conftest import TiedHeadMLP, TinyMLP


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


class _LateHead(TinyMLP):
    """TinyMLP with an ``aux`` head used from its second step on; ``tied``: also through ``F.linear``."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.aux, self.tied, self.use_aux = nn.Linear(64, 10), tied, False

    def loss(self, batch: dict) -> torch.Tensor:
        if not self.use_aux:
            return super().loss(batch)
        tied = nn.functional.linear(batch["x"].flip(1), self.aux.weight) if self.tied else 0
        return super().loss(batch) + (self.aux(batch["x"]) + tied).square().mean()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("synchronised", [True, False], ids=["synchronised", "accumulating"])
def test_the_ddp_check_compares_grad_with_the_ranks_mean_or_the_own_sum(tied: bool, synchronised: bool) -> None:
    """Two ranks simulated in one process: ``.grad`` is the ranks' mean (DDP after a synchronised backward) or
    this rank's own (a micro-batch of gradient accumulation, not synchronised); ``mean_over_ranks`` averages this
    rank's block sums and reached flags with the other rank's. A head no rank reached in the first step is not
    checked there; in the next it is, and the tied one fails, both ways."""
    from lightning_dve.capture import GradientCapture, resolve_layers
    from lightning_dve.config import DVEConfig
    from lightning_dve.guards import check_blocks_sum_to_grad
    from tests.conftest import DigitsDict

    net, batches = _LateHead(tied), [DigitsDict(range(lo, lo + 8)).batch() for lo in (0, 8)]
    capture = GradientCapture(resolve_layers(net, DVEConfig(projection_dim=32)))
    capture.attach()

    def check(only: set[str]) -> set[str]:
        sums, grads = [], []
        for batch in batches:  # rank 1, then rank 0: the capture keeps rank 0's blocks
            net.zero_grad()
            capture.begin()
            net.loss(batch).backward()
            layers = [layer for name, layer in capture.layers.items() if name in only]
            reached = list(capture.block_sums([layer.name for layer in layers]).values())
            flags = torch.tensor([float(s is not None) for s in reached], dtype=torch.float64)
            sums.append(torch.cat([*(torch.zeros(layer.projection.dim, dtype=torch.float64) if s is None
                                     else s.double() for s, layer in zip(reached, layers)), flags]))
            grads.append([p.grad for p in net.parameters()])
        if synchronised:
            for p, first, second in zip(net.parameters(), *grads):
                p.grad = None if first is None else (first + second) / 2
        return check_blocks_sum_to_grad(capture, only=only, mean_over_ranks=lambda v: (v + sums[0]) / 2)

    assert check({"net.0", "net.2", "aux"}) == {"net.0", "net.2"}  # aux reached by no rank: left unchecked
    net.use_aux = True
    if tied:
        with pytest.raises(UnsupportedError, match=r"layer 'aux': its weight's gradient differs"):
            check({"aux"})
    else:
        assert check({"aux"}) == {"aux"}
    capture.detach()
