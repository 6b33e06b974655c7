"""What the optimizer applied: learning rates per layer and norm-clipping factors, against the real update."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch

from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding
from lightning_dve.store import TrajectoryStore
from tests.conftest import DigitsDict


class UpdateProbe(L.Callback):
    """Records, per step, the raw (unclipped) gradient and the update the optimizer applied to ``net.0``."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []
        self.updates: list[torch.Tensor] = []
        self._before: torch.Tensor | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        weight = pl_module.net[0].weight
        self.grads.append(weight.grad.detach().clone())
        self._before = weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert self._before is not None
        self.updates.append(pl_module.net[0].weight.detach() - self._before)


@pytest.mark.parametrize("clip", [None, 0.05, 1e3])
def test_recorded_learning_rate_times_gradient_is_the_applied_update(
    mlp_cls: type, tmp_path: Path, clip: float | None
) -> None:
    """With a step schedule and (optionally) norm clipping, ``-lr_recorded * grad == update``; a clip value above
    the gradient norm leaves the rate alone (torch's factor is ``min(1, c / ||g||)``, never above 1)."""

    class Scheduled(mlp_cls):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)]

    probe, dve = UpdateProbe(), DataValueEmbedding(tmp_path / "dve", projection_dim=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision="64-true", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        gradient_clip_val=clip, callbacks=[dve, probe])
    trainer.fit(Scheduled().double(), DataLoader(DigitsDict(range(64)), batch_size=16))
    store = TrajectoryStore.open(tmp_path / "dve")
    lrs = store.learning_rates[:, store.layer_names.index("net.0")]
    clipped = 0
    for step, (grad, update) in enumerate(zip(probe.grads, probe.updates)):
        torch.testing.assert_close(update, -lrs[step] * grad, rtol=1e-10, atol=1e-15)
        scheduled = 0.5 * 0.7**step
        clipped += bool(lrs[step] < scheduled * (1 - 1e-9))
    assert clipped == (4 if clip == 0.05 else 0)  # the clip binds on every step at 0.05, never at 1e3


def test_value_clipping_warns_that_it_is_ignored(mlp_cls: type, fit: Callable, tmp_path: Path) -> None:
    """The recursion ignores it; the warning names what models it (exact replay and the replayed embeddings)."""
    with pytest.warns(UserWarning, match="gradient_clip_algorithm='value' clips each coordinate.*recursion ignores it "
                                         r"\(exact_influence and embeddings='replay' model it exactly\)"):
        fit(mlp_cls(), DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None), gradient_clip_val=0.1,
            gradient_clip_algorithm="value")


class DropHeadGroup(L.Callback):
    """Removes the head's param group at the start of epoch 1 (the head trained in epoch 0)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            del trainer.optimizers[0].param_groups[1]


def test_a_param_group_removed_during_fit_is_named_so(mlp_cls: type, fit: Callable, tmp_path: Path) -> None:
    """The message says the group may have been removed during fit and how to freeze instead (before: it read as a
    setup mistake, though the head had trained)."""
    from lightning_dve import ConfigError

    class TwoGroups(mlp_cls):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.net[0].parameters()}, {"params": self.net[2].parameters()}],
                                   lr=0.1)

    with pytest.raises(ConfigError, match=r"tracked layers \['net.2'\] are not in any optimizer param group \(not "
                                          r"given to the optimizer, or their group was removed during fit\).*lr=0"):
        fit(TwoGroups(), DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None), max_epochs=2,
            callbacks=[DropHeadGroup()])


def test_tracked_layer_outside_the_optimizer_is_refused(mlp_cls: type, fit: Callable, tmp_path: Path) -> None:
    from lightning_dve import ConfigError

    class HeadOnly(mlp_cls):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net[2].parameters(), lr=0.1)

    with pytest.raises(ConfigError, match=r"tracked layers \['net.0'\] are not in any optimizer param group.*"
                                          r"exclude=\('net.0',\)"):
        fit(HeadOnly(), DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None))


def test_maximize_steps_along_the_gradient(tmp_path: Path) -> None:
    """``SGD(maximize=True)`` applies ``+lr * grad``: recorded in the momentum form with a negative gain (so the
    recorded learning rates, which the report's curves divide by, stay the optimizer's; with momentum:
    tests/test_momentum.py)."""
    from tests.conftest import TinyMLP

    class Ascent(TinyMLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, maximize=True)

    probe, dve = UpdateProbe(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision="64-true", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[dve, probe])
    trainer.fit(Ascent().double(), DataLoader(DigitsDict(range(64)), batch_size=16))
    store = TrajectoryStore.open(tmp_path / "dve")
    assert bool((store.learning_rates == 0.05).all())
    for step, (grad, update) in enumerate(zip(probe.grads, probe.updates)):
        terms = store.read_step(step).optim
        assert float(terms["gain"][0]) == -1.0 and float(terms["momentum"][0]) == 0.0
        torch.testing.assert_close(update, 0.05 * grad, rtol=1e-10, atol=1e-15)  # = -lr * gain * grad
    # one step, no curvature: the estimate is the exact first-order influence, sign included
    model, dve = Ascent().double(), DataValueEmbedding(tmp_path / "one", projection_dim=None, report=None,
                                                       curvature="none")
    L.Trainer(accelerator="cpu", devices=1, max_steps=1, precision="64-true", logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False, callbacks=[dve]).fit(
        model, DataLoader(DigitsDict(range(64)), batch_size=16))
    test = {k: v.double() if v.is_floating_point() else v for k, v in DigitsDict(range(1500, 1504)).batch().items()}
    expected = dve.embeddings.exact_influence(model, test).scores
    torch.testing.assert_close(dve.embeddings.influence(model, test).scores, expected, rtol=1e-9, atol=1e-12)
    # ascent carries no optimizer state: segments are allowed and chain to the same final embeddings
    scores = []
    for segments in (1, 2):
        model, dve = Ascent().double(), DataValueEmbedding(tmp_path / f"s{segments}", projection_dim=None,
                                                           report=None, segments=segments)
        L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision="64-true", logger=False,
                  enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                  callbacks=[dve]).fit(model, DataLoader(DigitsDict(range(64)), batch_size=16))
        scores.append(dve.embeddings.influence(model, test).scores)
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("projection_dim", [None, 16])
def test_a_layer_the_step_does_not_reach_is_skipped_as_torch_skips_it(
    tmp_path: Path, optimizer: str, projection_dim: int | None
) -> None:
    """A head used on even steps only has no ``.grad`` on odd steps: torch neither moves it nor its optimizer
    state, so its recorded rate and gain are 0 and its momentum 1 (the velocity carries over unchanged)."""
    from tests.conftest import TwoHeadMLP

    class TwoHeads(TwoHeadMLP):
        def configure_optimizers(self):
            if optimizer == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)

    model = TwoHeads()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=projection_dim, report=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[dve])
    trainer.fit(model, DataLoader(DigitsDict(range(64)), batch_size=16))
    store = TrajectoryStore.open(tmp_path / "dve")
    aux = store.layer_names.index("aux")
    for step in store.steps:
        record = store.read_step(step)
        skipped = step % 2 == 1
        assert (float(record.lrs[aux]) == 0.0) == skipped
        assert (float(record.optim["gain"][aux]) == 0.0) == skipped
        assert (float(record.optim["momentum"][aux]) == 1.0) == skipped
        assert bool((record.grads["aux"] == 0).all()) == skipped
    # the reported learning rate (curves' influence / lr) is the head's param-group rate, 0 where it was skipped
    group_lr = model.configure_optimizers().param_groups[0]["lr"]
    expected = torch.tensor([0.0 if step % 2 else group_lr for step in store.steps], dtype=torch.float64)
    torch.testing.assert_close(dve.embeddings.learning_rates[:, aux].to(torch.float64), expected, rtol=0, atol=0)
    assert dve.embeddings.influence(model, DigitsDict(range(1500, 1504)).batch()).scores.isfinite().all()


def test_a_bias_in_another_param_group_warns(mlp_cls: type, fit: Callable, tmp_path: Path) -> None:
    """The recursion applies the weight's group to the whole layer: a bias group with its own learning rate (or
    no group at all) is named in a warning; biases that share their weight's settings are not."""
    class SplitGroups(mlp_cls):
        def configure_optimizers(self):
            first, head = self.net[0], self.net[2]
            return torch.optim.SGD([{"params": [first.weight, head.weight, head.bias]},
                                    {"params": [first.bias], "lr": 0.01}], lr=0.1)

    with pytest.warns(UserWarning, match=r"from step 0, net\.0: lr 0\.01 for the bias, 0\.1 for the weight\. The "
                                         r"recursion applies the weight's param group") as record:
        fit(SplitGroups(), DataValueEmbedding(tmp_path / "a", projection_dim=16, report=None))
    assert not any("net.2" in str(w.message) for w in record)

    class SameSettings(mlp_cls):
        def configure_optimizers(self):
            weights = [p for n, p in self.named_parameters() if n.endswith("weight")]
            biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
            return torch.optim.SGD([{"params": weights, "name": "weights"}, {"params": biases, "name": "biases"}],
                                   lr=0.1)  # a name is not a hyperparameter

    class ListBetas(mlp_cls):  # betas from a config file arrive as a list: the same values as the tuple
        def configure_optimizers(self):
            weights = [p for n, p in self.named_parameters() if n.endswith("weight")]
            biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
            return torch.optim.AdamW([{"params": weights}, {"params": biases, "betas": [0.9, 0.999]}], lr=0.01)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*param group.*")
        fit(SameSettings(), DataValueEmbedding(tmp_path / "b", projection_dim=16, report=None))
        fit(ListBetas(), DataValueEmbedding(tmp_path / "c", projection_dim=16, report=None))


def test_a_bias_group_whose_schedule_parts_it_from_its_weight_later_warns_at_that_step(
        mlp_cls: type, fit: Callable, tmp_path: Path) -> None:
    """The same settings when fit starts, a per-group schedule (``LambdaLR``) that lowers the bias group's rate from
    step 1: it was never warned about (only the settings at fit start were compared), and the scores were up to 16 %
    off. Now the groups are compared whenever the hyperparameters change, and the first step that parts them is
    named, once."""
    class PartedLater(mlp_cls):
        def configure_optimizers(self):
            first = self.net[0]
            rest = [p for n, p in self.named_parameters() if n != "net.0.bias"]
            optimizer = torch.optim.SGD([{"params": rest}, {"params": [first.bias]}], lr=0.1)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 1.0, lambda s: 0.5 ** s])
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    with pytest.warns(UserWarning, match=r"from step 1, net\.0: lr 0\.05 for the bias, 0\.1 for the weight\. The "
                                         r"recursion applies the weight's param group") as record:
        fit(PartedLater(), DataValueEmbedding(tmp_path / "a", projection_dim=16, report=None))
    assert sum("for the bias" in str(w.message) for w in record) == 1


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_grads_finite_is_false_when_any_gradient_has_a_non_finite_entry(bad: float | None) -> None:
    """What a ``GradScaler`` skips: one non-finite entry in any parameter's gradient (parameters without a
    gradient do not count). Oracle: ``torch.isfinite`` over every gradient."""
    from lightning_dve.optim import grads_finite

    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4)),
              torch.nn.Parameter(torch.ones(1))]
    optimizer = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    assert grads_finite(optimizer)  # no gradients at all
    params[0].grad, params[1].grad = torch.randn(3, 2), torch.randn(4)
    if bad is not None:
        params[1].grad[2] = bad
    expected = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
    assert grads_finite(optimizer) is expected and expected == (bad is None)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_gradient_ascent_on_a_proper_loss_keeps_its_curvature_sign(tmp_path: Path, optimizer: str) -> None:
    """``maximize=True`` on ``+CE`` (gradient-ascent unlearning): the curvature rows stand for the Hessian of the
    loss ``training_step`` returns, and the ascent descends its negative, so each step's factor is ``I + lr H``.
    Oracle: ``exact_influence`` (the first-order influence through the actual ascent). A linear softmax model,
    whose Gauss-Newton matrix is its Hessian: relative error 0.07 / 0.04 (SGD / momentum); the opposite
    convention (``I - lr H``, briefly shipped after a review that judged it by maximising ``-CE``, where the
    empirical Fisher of the written loss has the wrong sign) gave 0.54 / 0.36."""
    from scipy.stats import spearmanr

    from tests.conftest import TinyMLP

    class Ascent(TinyMLP):
        def __init__(self) -> None:
            super().__init__(lr=0.0)
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 10))

        def configure_optimizers(self):
            if optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=0.05, maximize=True)
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.5, maximize=True)

    model = Ascent().double()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None, curvature="ggn")
    L.Trainer(accelerator="cpu", devices=1, max_epochs=2, precision="64-true", logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False, callbacks=[dve]).fit(
        model, DataLoader(DigitsDict(range(96)), batch_size=16))
    test = {k: v.double() if v.is_floating_point() else v for k, v in DigitsDict(range(1500, 1508)).batch().items()}
    found = dve.embeddings.influence(model, test, per_step=True).scores
    exact = dve.embeddings.exact_influence(model, test, per_step=True).scores
    assert float((found - exact).norm() / exact.norm()) < 0.1  # measured 0.07 / 0.04
    assert sum(spearmanr(f, e).statistic for f, e in zip(found, exact)) / len(found) > 0.95


def test_hyperparameter_tensors_narrower_than_the_weights_are_warned_about_naming_them(
    mlp_cls: type, fit: Callable, tmp_path: Path
) -> None:
    """``Adam(betas=(torch.tensor(0.9), torch.tensor(0.999)))`` on float64 weights: torch computes the bias
    corrections in float32, the replay in float64, so ``exact_influence`` refused the run as "not a deterministic
    function of the recorded batches", naming a dozen causes but not this one."""
    from lightning_dve.optim import narrow_tensor_hyperparameters

    weights = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    narrow = torch.optim.Adam(weights, betas=(torch.tensor(0.9), torch.tensor(0.999)), lr=torch.tensor(1e-3))
    assert narrow_tensor_hyperparameters(narrow) == ["betas"]  # a float32 lr replays exactly (a review's check)
    wide = (torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64))
    assert narrow_tensor_hyperparameters(torch.optim.Adam(weights, betas=wide)) == []
    assert narrow_tensor_hyperparameters(torch.optim.Adam(weights, betas=(0.9, 0.999))) == []

    class TensorBetas(mlp_cls):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3, betas=(torch.tensor(0.9), torch.tensor(0.999)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TensorBetas(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None),
            precision="64-true")
    assert any("the optimizer's ['betas'] are tensors of a narrower dtype than the weights" in str(w.message)
               for w in caught)
