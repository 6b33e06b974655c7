"""Setups of convolutional vision models: normalisation, frozen backbones, augmentation, conv subclasses.

Each test is a setup a CNN user writes, checked against an oracle (a per-example backward loop, or the same run
without the variation) or refused with a message that names the cause and the fix:

- BatchNorm without running statistics (``track_running_stats=False``) normalises with the batch's statistics in
  eval mode too, so it mixes the samples like BatchNorm in train mode (per-sample gradients 56% off in a probe);
- a frozen backbone (``requires_grad=False``) whose parameters the optimizer still holds (``self.parameters()``)
  is replayed by ``exact_influence`` as training ran it: torch skips parameters without a gradient;
- a ``training_step`` that draws an augmentation is random, so a query's test loss through it is random too;
- a ``Conv2d`` subclass whose ``forward`` pads its input itself, or uses a function of its weight (a mask).
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dve import ConfigError, DataValueEmbedding, LossReductionError, UnsupportedError
from lightning_dve.capture import GradientCapture, resolve_layers
from lightning_dve.config import DVEConfig
from tests.conftest import DigitsDict, TinyMLP
from tests.helpers import DigitsDataset
from tests.test_layers import batch_weights, captured_grads, make_capture, oracle_grads

DTYPE = torch.float64


class DigitsCNN(TinyMLP):
    """``[B, 64]`` digits as ``[B, 1, 8, 8]`` images through ``net`` (a CNN), mean cross-entropy, SGD(lr)."""

    def __init__(self, net: nn.Module, lr: float = 0.1, momentum: float = 0.0, all_parameters: bool = True) -> None:
        super().__init__(lr=lr)
        self.net, self.momentum, self.all_parameters = net, momentum, all_parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, 1, 8, 8))

    def on_train_epoch_start(self) -> None:
        for module in self.modules():  # a frozen BatchNorm stays in eval mode (the fix the guard suggests)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def configure_optimizers(self) -> Any:
        params = self.parameters() if self.all_parameters else [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


def _cnn(*middle: Callable[[], nn.Module], seed: int = 0) -> nn.Sequential:
    """``Conv2d(1, 4) -> middle -> Tanh -> Flatten -> Linear(256, 10)``, every layer built under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *(make() for make in middle), nn.Tanh(), nn.Flatten(),
                             nn.Linear(256, 10))


# --- normalisation ---------------------------------------------------------------------------------------------


def test_batchnorm_without_running_statistics_in_eval_mode_is_refused(fit, save_dir):
    """``BatchNorm2d(track_running_stats=False)`` kept in eval mode still normalises with the batch's statistics:
    the recorded rows would be the batch-coupled gradients, not per-sample ones. Refused naming the module and the
    fix; the same model with running statistics in eval mode trains."""
    net = _cnn(lambda: nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    with pytest.raises(UnsupportedError, match=r"'net\.1' \(BatchNorm2d\) has track_running_stats=False.*GroupNorm"):
        fit(DigitsCNN(net), DataValueEmbedding(save_dir, report=None))
    tracked = DigitsCNN(_cnn(lambda: nn.BatchNorm2d(4, affine=False)))
    trainer = fit(tracked, DataValueEmbedding(save_dir, report=None, overwrite=True))
    assert trainer.global_step == 4


def test_batchnorm_without_running_statistics_couples_the_samples():
    """Why it is refused: with batch statistics the hooked rows are not the per-example loop's gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, affine=False, track_running_stats=False),
                          nn.Flatten(), nn.Linear(3 * 16, 2)).to(DTYPE).eval()
    x, target = torch.randn(4, 2, 4, 4, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    tracked, capture = make_capture(model)
    grads = captured_grads(capture, model, x, target, "mean", batch_weights("mean", 4))
    expected = torch.stack([torch.cat([g.flatten() for g in sample.values()])
                            for sample in oracle_grads(model, model[3], x, target)])
    got = grads["3"]  # the Linear after the norm: [weight | bias] per sample, the same flattening as the loop's
    got = torch.cat([got.reshape(4, 2, -1)[:, :, :-1].flatten(1), got.reshape(4, 2, -1)[:, :, -1]], dim=1)
    assert float((got - expected).abs().max() / expected.abs().max()) > 0.1


# --- a frozen backbone under exact replay ----------------------------------------------------------------------


def _frozen_backbone(seed: int = 0) -> nn.Sequential:
    """A conv stem and a BatchNorm, both frozen (``requires_grad=False``; the norm in eval mode), then a trainable
    conv and head: a fine-tuning setup."""
    net = _cnn(lambda: nn.BatchNorm2d(4), nn.Tanh, lambda: nn.Conv2d(4, 4, 3, padding=1), seed=seed)
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(seed))
        net[1].running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(seed + 1))
    for param in [*net[0].parameters(), *net[1].parameters()]:
        param.requires_grad_(False)
    return net


def test_exact_influence_of_a_frozen_backbone_held_by_the_optimizer(fit, make_loader, tmp_path: Path):
    """``SGD(self.parameters())`` holds the frozen parameters too; training skips them (no gradient), and so must
    the replay: it was refused (the replay trained them and missed the checkpoints). Oracle: the same run with an
    optimizer over the trainable parameters only, bitwise the same training; momentum and norm clipping (whose
    norm must leave the frozen parameters out) included."""
    test = DigitsDataset(range(1500, 1503)).batch()  # float64, as the 64-true run
    train_loss_fn = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    scores = []
    for all_parameters in (False, True):
        module = DigitsCNN(_frozen_backbone(), lr=0.05, momentum=0.9, all_parameters=all_parameters)
        dve = DataValueEmbedding(tmp_path / f"dve_{all_parameters}", report=None, projection_dim=None)
        fit(module, dve, make_loader(n=32, batch_size=8), max_epochs=1, precision="64-true", gradient_clip_val=0.5)
        scores.append(dve.embeddings.exact_influence(module, test, per_step=True, train_loss_fn=train_loss_fn).scores)
    assert scores[0].shape == (3, 32) and scores[0].abs().max() > 0
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-9, atol=1e-12)


# --- augmentation in training_step ------------------------------------------------------------------------------


class JitteredCNN(DigitsCNN):
    """Brightness jitter drawn with ``torch.rand`` in ``training_step`` (not tied to ``self.training``)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x = batch["x"] * (0.8 + 0.4 * torch.rand(batch["x"].shape[0], 1))
        return F.cross_entropy(self(x), batch["y"])


def test_query_through_a_random_training_step_is_refused_naming_loss_fn(fit, save_dir):
    """A query's default test loss is ``training_step``: with an augmentation drawn in it, the test loss is random.
    It was refused as a wrong ``loss_reduction`` (a misleading fix); now the message names the randomness and
    ``loss_fn=``, which works."""
    module = JitteredCNN(_cnn())
    dve = DataValueEmbedding(save_dir, report=None)
    fit(module, dve)
    test = DigitsDict(range(1500, 1506)).batch()
    with pytest.raises(ConfigError, match=r"training_step returned .* on the same two test samples.*random.*loss_fn") \
            as info:
        dve.embeddings.influence(module, test)
    assert not isinstance(info.value, LossReductionError)
    loss_fn = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    first, second = (dve.embeddings.influence(module, test, loss_fn=loss_fn).scores for _ in range(2))
    assert torch.equal(first, second) and bool(first.isfinite().all())


# --- Conv2d subclasses ------------------------------------------------------------------------------------------


class PadInForwardConv(nn.Conv2d):
    """'Same' padding applied inside ``forward`` (like timm's ``Conv2dSame``): ``module.padding`` stays 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaskedConv(nn.Conv2d):
    """A masked convolution (PixelCNN-style): ``forward`` uses ``weight * mask``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        mask = torch.ones_like(self.weight)
        mask[:, :, self.kernel_size[0] // 2 + 1:] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_subclass_padding_in_forward_is_refused_naming_it(groups: int):
    """Was a raw ``RuntimeError`` from ``bmm`` (input patches and output positions differ in number); a grouped
    one, whose block is formed in the backward from the input, is checked on its output size."""
    model = nn.Sequential(PadInForwardConv(2, 2, 2, groups=groups), nn.Flatten(), nn.Linear(2 * 64, 3))
    capture = GradientCapture(resolve_layers(model, DVEConfig(projection_dim=None)))
    capture.attach()
    capture.begin()
    with pytest.raises(UnsupportedError, match=r"layer '0' \(PadInForwardConv\).*Conv2dSame.*exclude=\('0',\).*"
                                               r"49 positions.*its output 64"):
        model(torch.randn(3, 2, 8, 8))


def test_masked_conv_subclass_is_refused_naming_the_cause(fit, save_dir):
    """Its captured rows are gradients in ``weight * mask``, not in ``weight``; the check of the first step against
    ``.grad`` refuses it, and now names a forward that transforms the weight as a cause."""
    net = nn.Sequential(MaskedConv(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 10))
    with pytest.raises(UnsupportedError, match=r"layer 'net\.0'.*masked or weight-standardised convolution.*"
                                               r"exclude=\('net\.0',\)"):
        fit(DigitsCNN(net), DataValueEmbedding(save_dir, report=None))


@pytest.mark.parametrize("setup", ["channels_last", "conv_reused_in_a_residual_block"])
def test_vision_setups_match_the_per_example_loop(setup):
    """Rows of a ``channels_last`` CNN (model and input) and of a conv called twice per forward with a skip
    connection (both calls summed) equal the per-example loop's gradients."""
    torch.manual_seed(1)
    conv, stem, head = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Linear(3, 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.conv, self.head = stem, conv, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.stem(x))
            if setup == "conv_reused_in_a_residual_block":
                h = h + self.conv(torch.tanh(self.conv(h)))
            return self.head(torch.tanh(h).mean((2, 3)))

    model, x = Net().to(DTYPE), torch.randn(4, 2, 8, 8, dtype=DTYPE)
    if setup == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    target = torch.randn(4, 2, dtype=DTYPE)
    tracked, capture = make_capture(model)
    grads = captured_grads(capture, model, x, target, "mean", batch_weights("mean", 4))
    for name, layer in tracked.items():
        expected = oracle_grads(model, layer.module, x, target)
        for i, sample in enumerate(expected):
            block = grads[name][i].reshape(layer.spec.dims(layer.module))
            torch.testing.assert_close(block[:, :-1].reshape(sample["weight"].shape), sample["weight"],
                                       rtol=0, atol=1e-10)
            torch.testing.assert_close(block[:, -1], sample["bias"], rtol=0, atol=1e-10)


# --- 1-D, depthwise and grouped convolutions, end to end ----------------------------------------------------------


class SignalCNN(DigitsCNN):
    """Digits as 1-D signals ``[B, 1, 64]``: convolutions of the kinds an audio or time-series model uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, 1, 64))


def _signal_net() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Conv1d(1, 4, 4, padding="same", padding_mode="reflect"), nn.Tanh(),  # even kernel: 1 more on the right
            nn.Conv1d(4, 4, 3, padding=1, groups=4, padding_mode="circular"), nn.Tanh(),  # depthwise
            nn.Conv1d(4, 6, 3, stride=2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 31, 10),
        )


def _explicit_product_scores(net: nn.Module, params: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
                             lr: float, test: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grad l(theta_T, test) . lr w prod_{k>t} (I - lr H_k) g_{t,z}`` over all parameters as one block, with the
    empirical Fisher ``H_k = sum_z w g g^T`` of per-sample gradients from ``torch.func`` along a plain-SGD replay
    (method.md §2, written independently of the package); returns ``[n_test, occurrences]`` and ``theta_T``."""
    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(net, p, (x.reshape(1, 1, 64),)), y.reshape(1))

    def flat_grads(p: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(p, batch["x"].double(), batch["y"])
        return torch.cat([g[name].reshape(len(batch["y"]), -1) for name in p], dim=1)

    rows = []
    for batch in batches:
        g = flat_grads(params, batch)
        rows.append(g)
        step = -lr * g.mean(0)
        offsets = torch.cumsum(torch.tensor([0] + [v.numel() for v in params.values()]), 0).tolist()
        params = {name: v + step[a:b].reshape(v.shape) for (name, v), a, b in zip(params.items(), offsets, offsets[1:])}
    embeddings = []
    for t, g_t in enumerate(rows):
        vectors = lr / len(g_t) * g_t
        for g_k in rows[t + 1:]:
            vectors = vectors - lr * ((vectors @ g_k.T) / len(g_k)) @ g_k
        embeddings.append(vectors)
    return flat_grads(params, test) @ torch.cat(embeddings).T, params


def test_conv1d_depthwise_and_grouped_scores_equal_the_explicit_product(fit, make_loader, save_dir):
    """A 1-D CNN with reflect / circular padding, an even kernel under 'same', a depthwise and a grouped
    convolution: exact-mode scores (one full ``M``) equal the explicit product of method.md §2 over every
    parameter, and the fit's weights the oracle's replay."""
    module, lr = SignalCNN(_signal_net(), lr=0.1), 0.1
    initial = {name: p.detach().double().clone() for name, p in module.net.named_parameters()}
    dve = DataValueEmbedding(save_dir, report=None, projection_dim=None)
    loader = make_loader(n=32, batch_size=8)
    fit(module, dve, loader, precision="64-true")
    test = DigitsDataset(range(1500, 1504)).batch()  # float64, as the 64-true run
    expected, final = _explicit_product_scores(module.net.double(), initial, list(loader), lr, test)
    for name, p in module.net.named_parameters():
        torch.testing.assert_close(p.detach(), final[name], rtol=0, atol=1e-12)
    scores = dve.embeddings.influence(module, test, per_step=True).scores
    assert scores.shape == (4, 32) and expected.abs().max() > 1e-6
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)
