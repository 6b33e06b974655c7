"""The applied update must be the recorded one: tied weights under accumulation, gradients changed after the
backward outside the Trainer's clipping, parameters frozen or unfrozen during fit (``guards.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_dve import DataValueEmbedding, UnsupportedError
from tests.conftest import TiedHeadMLP, TinyMLP

APPLIED = r"step 0: the gradient the optimizer applied to 'net.0' is the backward's"


def _dve(tmp_path: Path, **kwargs: Any) -> DataValueEmbedding:
    return DataValueEmbedding(tmp_path / "dve", projection_dim=32, report=None, **kwargs)


class ClipsItself(TinyMLP):
    """Clips the gradient norm in ``configure_gradient_clipping``, ignoring the Trainer's setting."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters(), 0.05)


class ClipsInHook(TinyMLP):
    """Clips in its own ``on_before_optimizer_step`` (after the callback's)."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters(), 0.05)


class ClipsValueAfterBackward(TinyMLP):
    """Clamps coordinates in ``on_after_backward`` (after the callback's): not one factor."""

    def on_after_backward(self) -> None:
        for p in self.parameters():
            p.grad.clamp_(-1e-3, 1e-3)


@pytest.mark.parametrize("model_cls", [ClipsItself, ClipsInHook])
def test_clipping_outside_the_trainer_is_refused(model_cls: type, fit: Callable, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match=APPLIED + r" times 0\.\d+ where the Trainer's settings give 1"
                                              r".*gradient_clip_val"):
        fit(model_cls(), _dve(tmp_path))


def test_coordinate_changes_after_backward_are_refused(fit: Callable, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match=APPLIED + r" changed coordinate by coordinate"):
        fit(ClipsValueAfterBackward(), _dve(tmp_path), accumulate_grad_batches=2)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trainer_norm_clipping_passes_the_check(fit: Callable, tmp_path: Path, precision: str) -> None:
    """The modelled factor is the measured one when the Trainer clips (it binds at 0.05 on every step)."""
    trainer = fit(TinyMLP(), _dve(tmp_path), gradient_clip_val=0.05, precision=precision)
    assert trainer.global_step == 4


def test_tied_weight_under_accumulation_is_refused(fit: Callable, tmp_path: Path) -> None:
    """The first micro-batch's ``.grad`` is its own: the tied head is caught with accumulation too."""
    with pytest.raises(UnsupportedError, match=r"layer 'net.2': .* differs .*tied"):
        fit(TiedHeadMLP(), _dve(tmp_path), accumulate_grad_batches=2)


class FreezeAt(L.Callback):
    """Sets ``requires_grad`` of the named parameters at the start of epoch 1."""

    def __init__(self, model: TinyMLP, names: list[str], trainable: bool) -> None:
        self.params = dict(model.named_parameters())
        self.names, self.trainable = names, trainable

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            for name in self.names:
                self.params[name].requires_grad_(self.trainable)


@pytest.mark.parametrize("names", [["net.2.weight", "net.2.bias"], ["net.2.bias"]])
def test_freezing_a_tracked_layer_during_fit_is_refused(fit: Callable, tmp_path: Path, names: list[str]) -> None:
    model = TinyMLP()
    with pytest.raises(UnsupportedError, match=r"step 4: parameters \['net.2.*\] were frozen during fit"):
        fit(model, _dve(tmp_path), max_epochs=2, callbacks=[FreezeAt(model, names, False)])


class FreezeOnTrainStart(TinyMLP):
    """Freezes its head in ``on_train_start``, after the callbacks' hooks took the layout at fit start."""

    def on_train_start(self) -> None:
        self.net[2].requires_grad_(False)


def test_freezing_in_the_module_s_on_train_start_names_where_to_freeze(fit: Callable, tmp_path: Path) -> None:
    """Refused at the first step, saying it happened before it and to freeze in ``__init__`` or ``setup()`` (before:
    'frozen during fit', sending the user to one fit per stage)."""
    with pytest.raises(UnsupportedError, match=r"step 0: .* were frozen before this fit's first step.*__init__ or "
                                               r"setup\(\)"):
        fit(FreezeOnTrainStart(), _dve(tmp_path))


class FreezeAtFirstBatch(TinyMLP):
    """Freezes its head at the first micro-batch: in its own ``on_train_batch_start`` (after the callback's check of
    that batch) or in ``on_after_backward``."""

    def __init__(self, hook: str) -> None:
        super().__init__()
        self.hook = hook

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.hook == "on_train_batch_start" and batch_idx == 0:
            self.net[2].requires_grad_(False)
        if self.hook == "weight for one batch":  # frozen for the odd batches only: every start check passes
            self.net[2].weight.requires_grad_(batch_idx % 2 == 0)
        if self.hook == "bias" and batch_idx == 1:  # the bias alone: the layout check's dimensions, not its weight
            self.net[2].bias.requires_grad_(False)

    def on_after_backward(self) -> None:
        if self.hook == "on_after_backward":
            self.net[2].requires_grad_(False)


@pytest.mark.parametrize(("hook", "message"), [
    ("on_train_batch_start", r"layer 'net.2': its parameters were frozen or unfrozen during fit, after the callback "
                             r"checked them at this batch's start .*freeze in __init__ or setup\(\)"),
    ("weight for one batch", r"layer 'net.2': its parameters were frozen or unfrozen during fit"),
    ("bias", r"layer 'net.2': its parameters were frozen or unfrozen during fit"),
    ("on_after_backward", r"step 0: .* were frozen during fit")])
def test_freezing_during_the_first_step_is_named_as_during_fit(fit: Callable, tmp_path: Path, hook: str,
                                                               message: str) -> None:
    """In the module's ``on_train_batch_start``, after the callback's check: refused at the tracked layer's call,
    naming it (before: torch's bare 'mat1 and mat2 shapes cannot be multiplied' from the bias column; a weight
    frozen for one batch at a time and unfrozen before the next start check passed silently). After the
    first micro-batch's backward (``accumulate_grad_batches=2``): 'during fit', not 'before this fit's first step'
    (the first version of that message keyed on applied steps)."""
    with pytest.raises(UnsupportedError, match=message):
        fit(FreezeAtFirstBatch(hook), _dve(tmp_path), accumulate_grad_batches=2)


def test_unfreezing_an_untracked_layer_during_fit_is_refused(fit: Callable, tmp_path: Path) -> None:
    model = TinyMLP()
    model.net[0].requires_grad_(False)  # frozen at fit start: not tracked
    with pytest.raises(UnsupportedError, match=r"parameters \['net.0.weight', 'net.0.bias'\] were unfrozen"):
        fit(model, _dve(tmp_path), max_epochs=2, callbacks=[FreezeAt(model, ["net.0.weight", "net.0.bias"], True)])


def test_freezing_an_excluded_layer_is_allowed(fit: Callable, tmp_path: Path) -> None:
    model = TinyMLP()
    trainer = fit(model, _dve(tmp_path, exclude=("net.0",)), max_epochs=2,
                  callbacks=[FreezeAt(model, ["net.0.weight", "net.0.bias"], False)])
    assert trainer.global_step == 8


def test_sampled_coordinates_stay_inside_large_weights() -> None:
    from lightning_dve.guards import SAMPLED, sampled_coordinates

    for numel in (1, 5, 64, 65, 50257 * 768, 32000 * 4096, 2**40 + 3):
        index = sampled_coordinates(numel)
        assert index.shape == (SAMPLED,) and int(index[0]) == 0 and int(index[-1]) == numel - 1
        assert bool((index[1:] >= index[:-1]).all())


class Nesterov(TinyMLP):
    """Nesterov SGD, on torch's foreach path (which adds the momentum into ``.grad`` during the step) or not."""

    def __init__(self, foreach: bool = True) -> None:
        super().__init__()
        self.foreach = foreach

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, foreach=self.foreach)


class NesterovClipsInHook(Nesterov):
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters(), 0.05)


@pytest.mark.parametrize("foreach", [True, False])
def test_nesterov_momentum_is_checked_on_both_paths(fit: Callable, tmp_path: Path, foreach: bool) -> None:
    """torch's foreach Nesterov SGD adds the momentum into ``.grad`` in place during the step: not a change to
    refuse. The gradients are sampled right before the update, so Nesterov's are checked too: until session 37
    they were not compared at all, and clipping in a hook gave scores 2.1x the truth, silently (an audit)."""
    assert fit(Nesterov(foreach), _dve(tmp_path / "a"), max_epochs=2, gradient_clip_val=0.5).global_step == 8
    with pytest.raises(UnsupportedError, match=APPLIED + r" times 0\.\d+ where the Trainer's settings give 1"):
        fit(NesterovClipsInHook(foreach), _dve(tmp_path / "b"))


class ZeroesALayer(TinyMLP):
    """Zeroes the first layer's gradient in its own ``on_before_optimizer_step`` (after the callback's)."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.net[0].weight.grad.zero_()


def test_a_layer_zeroed_after_the_backward_is_refused(fit: Callable, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match=APPLIED + r" times 0 where the Trainer's settings give 1"):
        fit(ZeroesALayer(), _dve(tmp_path))


def test_a_tied_weight_is_caught_after_fp16_overflow_steps(fit: Callable, tmp_path: Path) -> None:
    """The first steps overflow at a large loss scale (skipped by the grad scaler): the tied-weight check counts
    only on the first step that is applied."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    with pytest.raises(UnsupportedError, match=r"layer 'net.2': .* differs .*tied"):
        fit(TiedHeadMLP(), _dve(tmp_path), max_epochs=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])


def test_a_checkpoint_of_several_recordings_none_of_them_this_ones_is_refused() -> None:
    from lightning_dve import ConfigError
    from lightning_dve.callback_store import recording_in

    state = {"settings_hash": "a", "last_step": 3, "world_size": 1, "run_id": "r"}
    checkpoint = {"callbacks": {"DVE{a}": {**state, "save_dir": "/x"}, "DVE{b}": {**state, "save_dir": "/y"},
                                "Other": {"best": 1}}}
    assert recording_in(checkpoint, "DVE{a}", Path("/z"), {"a"}) is None  # Lightning passes this key's own state
    assert recording_in(checkpoint, "DVE{c}", Path("/y"), {"a"})["save_dir"] == "/y"
    with pytest.raises(ConfigError, match=r"holds 2 DataValueEmbedding recordings .*'/x', '/y'.* cannot tell"):
        recording_in(checkpoint, "DVE{c}", Path("/z"), {"a"})  # both of these settings, neither in this folder


@pytest.mark.parametrize("how", ["zero", "none"])
def test_a_step_skipped_by_clearing_every_gradient_is_refused(fit: Callable, tmp_path: Path, how: str) -> None:
    class SkipsStep2(TinyMLP):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            if self.trainer.global_step == 2:
                for p in self.parameters():
                    if how == "zero":
                        p.grad.zero_()
                    else:
                        p.grad = None

    with pytest.raises(UnsupportedError, match=r"step 2: .* times 0 where .* return None from training_step"):
        fit(SkipsStep2(), _dve(tmp_path))


def test_a_tied_layer_first_reached_after_the_first_step_is_caught(fit: Callable, tmp_path: Path) -> None:
    """Each layer is checked on the first applied step whose first backward reaches it."""

    class LateTiedHead(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.aux = torch.nn.Linear(16, 10)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx == 0:
                return self.loss(batch)
            hidden = torch.tanh(self.net[0](batch["x"]))
            extra = self.aux(hidden) + 0.5 * torch.nn.functional.linear(hidden, self.aux.weight)
            return self.loss(batch) + extra.square().mean()

    with pytest.raises(UnsupportedError, match=r"layer 'aux': .* differs .*tied"):
        fit(LateTiedHead(), _dve(tmp_path))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradients_freed_after_the_step_are_not_refused(fit: Callable, tmp_path: Path, set_to_none: bool) -> None:
    """An ``optimizer_step`` override that frees the gradients after stepping: the step consumed the backward's
    gradients, which the step post-hook sampled."""

    class FreesAfterStep(TinyMLP):
        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
            optimizer.step(closure=optimizer_closure)
            optimizer.zero_grad(set_to_none=set_to_none)

    assert fit(FreesAfterStep(), _dve(tmp_path), gradient_clip_val=0.05).global_step == 4


def test_an_optimizer_replaced_after_fit_start_is_refused(fit: Callable, tmp_path: Path) -> None:
    class Replaces(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.strategy.optimizers = [torch.optim.SGD(pl_module.parameters(), lr=0.1)]

    with pytest.raises(UnsupportedError, match=r"step 0: the optimizer's step\(\) did not run, or ran on another"):
        fit(TinyMLP(), _dve(tmp_path), callbacks=[Replaces()])


def test_a_change_that_keeps_the_factor_but_not_the_direction_is_refused(fit: Callable, tmp_path: Path) -> None:
    """A hook that writes into the coordinates whose gradient is exactly zero (the first layer's columns of pixels
    that are blank in every digit of the batch, e.g. pixel 0): the least-squares factor of the applied gradient
    against the backward's stays exactly 1, the Trainer's factor, so only its coordinate-wise spread shows that
    the update is not the recorded one."""

    class FillsZeroGradients(TinyMLP):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            grad = self.net[0].weight.grad
            assert bool((grad[:, 0] == 0).all())  # pixel 0 is blank in every digit
            grad.masked_fill_(grad == 0, 1e-3)

    with pytest.raises(UnsupportedError, match=APPLIED + r" changed coordinate by coordinate"):
        fit(FillsZeroGradients(), _dve(tmp_path))


def test_an_optimizer_replaced_during_fit_is_refused_at_its_first_step(fit: Callable, tmp_path: Path) -> None:
    """The optimizer is swapped for a new one before step 2: the steps before are checked as usual, and step 2 is
    refused because the optimizer fit started with did not step (the gradients sampled after step 1 do not count
    for step 2)."""

    class ReplacesAtStep2(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            if trainer.global_step == 2:
                trainer.strategy.optimizers = [torch.optim.SGD(pl_module.parameters(), lr=0.1)]

    with pytest.raises(UnsupportedError, match=r"step 2: the optimizer's step\(\) did not run, or ran on another"):
        fit(TinyMLP(), _dve(tmp_path), callbacks=[ReplacesAtStep2()])


def _lr_at(step: int) -> float:
    return 0.1 if step % 2 == 0 else 0.02


class SetsLrLate(TinyMLP):
    """Sets the step's learning rate in its own ``on_before_optimizer_step``, which Lightning runs after the
    callbacks': the callback has already read the rate of the step before."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(self.trainer.global_step)


class WarmsUpAfterStep(TinyMLP):
    """Lightning's documented manual warm-up: the rate of the next step is set after ``optimizer.step``."""

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        optimizer.step(closure=optimizer_closure)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(self.trainer.global_step + 1)


class WarmsUpInAStepPostHook(TinyMLP):
    """The next step's rate set by a torch step post-hook registered before the callback's hooks (in
    ``configure_optimizers``): it runs after the update, which used the rate the callback read."""

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()

        def next_rate(opt: torch.optim.Optimizer, *_: Any) -> None:
            for group in opt.param_groups:
                group["lr"] = _lr_at(self.trainer.global_step + 1)

        optimizer.register_step_post_hook(next_rate)
        return optimizer


def test_a_learning_rate_set_in_a_step_post_hook_is_recorded_at_the_next_step(fit: Callable, tmp_path: Path) -> None:
    """It was refused as changed after the callback read it (the comparison ran in the callback's own post-hook,
    after the user's); the values are now noted right before the update."""
    dve = _dve(tmp_path)
    fit(WarmsUpInAStepPostHook(), dve, max_epochs=2)
    assert dve.embeddings.learning_rates[:, 0].tolist() == pytest.approx([0.1] + [_lr_at(s) for s in range(1, 8)])


class SetsLrInAStepPreHook(TinyMLP):
    """Sets the step's rate in a torch step pre-hook registered after the callback attached: before the closure,
    i.e. before the backward and the callback's read, so the read sees it."""

    def on_train_start(self) -> None:
        def rate(opt: torch.optim.Optimizer, *_: Any) -> None:
            for group in opt.param_groups:
                group["lr"] = _lr_at(self.trainer.global_step)

        self.trainer.optimizers[0].register_step_pre_hook(rate)


def test_a_learning_rate_set_in_a_step_pre_hook_is_recorded_at_its_step(fit: Callable, tmp_path: Path) -> None:
    dve = _dve(tmp_path)
    fit(SetsLrInAStepPreHook(), dve, max_epochs=2)
    assert dve.embeddings.learning_rates[:, 0].tolist() == pytest.approx([_lr_at(s) for s in range(8)])


def test_a_learning_rate_changed_after_the_callback_read_it_is_refused(fit: Callable, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match=r"step 1: param group 0's 'lr' was changed from 0.1 to 0.02 after "
                                               r"the callback read it"):
        fit(SetsLrLate(), _dve(tmp_path))


def test_a_learning_rate_set_after_optimizer_step_is_recorded_at_the_next_step(fit: Callable, tmp_path: Path) -> None:
    dve = _dve(tmp_path)
    fit(WarmsUpAfterStep(), dve, max_epochs=2)
    assert dve.embeddings.learning_rates[:, 0].tolist() == pytest.approx([0.1] + [_lr_at(s) for s in range(1, 8)])


class SetsGroupOneLate(TinyMLP):
    """Two param groups (one per Linear: weight and bias together), SGD with momentum, weight decay and a tensor
    learning rate; at step 1 its own ``on_before_optimizer_step`` (after the callback's) sets ``key`` of group 1
    to ``value``: a tensor in place, another value by assignment."""

    def __init__(self, key: str, value: float) -> None:
        super().__init__()
        self.key, self.value = key, value

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([{"params": layer.parameters(), "lr": torch.tensor(0.125)}  # a tensor per group
                                for layer in (self.net[0], self.net[2])], momentum=0.5, weight_decay=0.25)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.trainer.global_step == 1:
            group = optimizer.param_groups[1]
            if isinstance(group[self.key], torch.Tensor):
                group[self.key].fill_(self.value)
            else:
                group[self.key] = self.value


@pytest.mark.parametrize(("key", "read", "value"), [("lr", 0.125, 0.0625), ("momentum", 0.5, 0.75),
                                                    ("weight_decay", 0.25, 0.0)])
def test_any_step_hyperparameter_of_any_group_changed_late_is_refused(fit: Callable, tmp_path: Path, key: str,
                                                                      read: float, value: float) -> None:
    """Not the learning rate alone: momentum and weight decay enter the recorded step too; the group is named, and
    a tensor learning rate changed in place counts (what was read is a copy, not the tensor itself)."""
    with pytest.raises(UnsupportedError, match=rf"step 1: param group 1's '{key}' was changed from {read} to "
                                               rf"{value} after the callback read it"):
        fit(SetsGroupOneLate(key, value), _dve(tmp_path))


class SetsBetasLate(TinyMLP):
    """Adam whose ``betas`` it sets in its own ``on_before_optimizer_step`` at step 1 (after the callback's)."""

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.trainer.global_step == 1:
            optimizer.param_groups[0]["betas"] = (0.5, 0.999)


def test_adam_betas_changed_late_are_refused(fit: Callable, tmp_path: Path) -> None:
    """Adam's step terms read ``betas`` (adam.py): a change after the callback read them is refused like ``lr``."""
    with pytest.raises(UnsupportedError, match=r"step 1: param group 0's 'betas' was changed from \(0\.9, 0\.999\) "
                                               r"to \(0\.5, 0\.999\)"):
        fit(SetsBetasLate(), _dve(tmp_path))


def second_evaluation(params: list[torch.nn.Parameter], closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Sharpness-aware minimisation's second closure evaluation: at the weights moved by 0.05 times the gradient of
    the first, which are moved back afterwards (the step then applies the second evaluation's gradient)."""
    with torch.no_grad():
        moves = [0.05 * p.grad for p in params]
        torch._foreach_add_(params, moves)
    with torch.enable_grad():
        loss = closure()
    with torch.no_grad():
        torch._foreach_sub_(params, moves)
    return loss


class SharpnessAware(TinyMLP):
    """Sharpness-aware minimisation in ``optimizer_step``: the closure at the weights, then the step with the gradient
    of a second evaluation at weights moved along it."""

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        optimizer_closure()
        optimizer.step(closure=lambda: second_evaluation(list(self.parameters()), optimizer_closure))


class SharpnessAwareSGD(torch.optim.SGD):
    """The same as an optimizer: ``step(closure)`` evaluates the closure at the weights and at the moved ones."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: ANN401 - torch's signature
        with torch.enable_grad():
            closure()
        loss = second_evaluation([p for group in self.param_groups for p in group["params"]], closure)
        super().step()
        return loss


def test_a_closure_evaluated_again_in_optimizer_step_is_refused_naming_it(fit: Callable, tmp_path: Path) -> None:
    """Before the callback recorded only a micro-batch's first backward, such a step silently recorded the sum of
    both evaluations' gradients while the optimizer applied the second's."""
    with pytest.raises(UnsupportedError, match=r"step 0: the training closure ran 2 times in this step .*sharpness"
                                               r".*applied to 'net.0' is not the first evaluation's"):
        fit(SharpnessAware(), _dve(tmp_path))


def test_a_closure_evaluated_again_inside_the_optimizer_is_the_proxy_at_the_first_evaluation(
        fit: Callable, tmp_path: Path) -> None:
    class Model(TinyMLP):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return SharpnessAwareSGD(self.parameters(), lr=0.1)

    with pytest.warns(UserWarning, match=r"SharpnessAwareSGD overrides the step\(\) of torch.optim.SGD.*first closure"):
        dve = _dve(tmp_path)
        fit(Model(), dve)
    assert dve.embeddings.steps == [0, 1, 2, 3]


class Saliency(TinyMLP):
    """Takes an input-saliency map of the training loss inside ``training_step`` (a backward through every layer)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch["x"].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(self(x), batch["y"])
        (saliency,) = torch.autograd.grad(loss, x, retain_graph=True)
        self.log("saliency", saliency.abs().mean())
        return loss


class GradientPenalty(TinyMLP):
    """Adds an input-gradient penalty to the training loss (a double backward)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch["x"].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(self(x), batch["y"])
        (slope,) = torch.autograd.grad(loss, x, create_graph=True)
        return loss + 0.1 * slope.square().sum()


@pytest.mark.parametrize("model_cls", [Saliency, GradientPenalty])
def test_a_backward_inside_training_step_is_refused(model_cls: type, fit: Callable, tmp_path: Path) -> None:
    """Before, both fitted: the hooks took the inner backward's gradients (and released the projected inputs, so the
    training backward added nothing), which for the penalty leaves its own gradient out of every recorded row."""
    with pytest.raises(UnsupportedError, match=r"step 0: training_step, or the LightningModule's "
                                               r"on_train_batch_start .* ran a backward through the tracked layers "
                                               r"before the training backward .*penalty"):
        fit(model_cls(), _dve(tmp_path))


def _adversarial(module: TinyMLP, batch: dict) -> dict:
    """FGSM: the batch's inputs moved along the sign of the loss's input gradient (a backward through the model)."""
    x = batch["x"].clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(torch.nn.functional.cross_entropy(module(x), batch["y"]), x)
    return {**batch, "x": (x + 0.05 * slope.sign()).detach()}


class AdversarialAtBatchStart(TinyMLP):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        batch.update(_adversarial(self, batch))


class AdversarialAfterTransfer(TinyMLP):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return _adversarial(self, batch) if self.trainer.training else batch


def test_adversarial_examples_are_made_after_transfer_not_at_batch_start(fit: Callable, tmp_path: Path) -> None:
    """The LightningModule's on_train_batch_start runs after the callback's, once capture has begun: the refusal
    told such a user to move the backward where it already was (out of training_step). It names that hook now and
    on_after_batch_transfer, where the same adversarial examples fit."""
    with pytest.raises(UnsupportedError, match=r"on_train_batch_start \(which runs after this callback's.*Make "
                                               r"adversarial examples in on_after_batch_transfer"):
        fit(AdversarialAtBatchStart(), _dve(tmp_path / "start"))
    callback = _dve(tmp_path / "transfer")
    fit(AdversarialAfterTransfer(), callback)
    assert callback.embeddings.steps == [0, 1, 2, 3]


class ScalesItsHiddenGradient(TinyMLP):
    """Rescales the first layer's output gradient with a tensor hook while training (gradient scaling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.net[0](x)
        if self.training:
            hidden.register_hook(lambda g: g * 0.1)
        return self.net[2](self.net[1](hidden))


class MasksItsHeadGradient(TinyMLP):
    """Trains only the head's first five rows through a hook on its weight's gradient."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(10, 1)
        mask[:5] = 1.0
        self.net[2].weight.register_hook(lambda g: g * mask)


def test_a_gradient_hook_on_a_tracked_output_is_recorded_and_one_on_its_weight_is_refused_naming_it(
        fit: Callable, tmp_path: Path) -> None:
    """The output hook's gradient is what the rows hold (refused at step 0 as a tied weight before, while a hook
    that started later went unseen); a hook on the weight's own gradient cannot be recorded per sample: named."""
    fit(ScalesItsHiddenGradient(), _dve(tmp_path / "output"))  # the weight check passes: rows sum to .grad
    with pytest.raises(UnsupportedError, match=r"layer 'net.2': .* differs .*a hook on the weight's gradient "
                                               r"\(weight.register_hook"):
        fit(MasksItsHeadGradient(), _dve(tmp_path / "weight"))


class ScalesLateInACheckpoint(TinyMLP):
    """Rescales the first layer's output gradient from step 3 on (after the weight check's steps 0, 1 and 2), with
    that layer inside an activation checkpoint (``use_reentrant``: its forward runs again in the backward)."""

    reentrant: bool | None = None  # None: no checkpoint

    def block(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.net[0](x)
        if self.training and hidden.requires_grad and self.trainer.global_step >= 3:
            hidden.register_hook(lambda g: g * 0.1)
        return self.net[1](hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return self.net[2](self.block(x))
        inputs = x.detach().requires_grad_(True)
        return self.net[2](torch.utils.checkpoint.checkpoint(self.block, inputs, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_gradient_hook_on_a_checkpointed_output_is_recorded_as_without_the_checkpoint(
        fit: Callable, tmp_path: Path, test_batch: dict, reentrant: bool) -> None:
    """A reentrant checkpoint calls the layer again in the backward, after the capture's hooks were moved last: its
    rows held the gradient before the model's hook, 47 % off the run without the checkpoint, silently (the hook
    starts after the weight check's steps). Oracle: that run, whose rows a per-example loop checks."""
    scores = {}
    for mode in (None, reentrant):
        model = ScalesLateInACheckpoint()
        model.reentrant = mode
        dve = DataValueEmbedding(tmp_path / str(mode), projection_dim=None, report=None)
        fit(model, dve)
        model.reentrant = None
        scores[mode] = dve.embeddings.influence(model, test_batch).scores
    torch.testing.assert_close(scores[reentrant], scores[None], rtol=1e-5, atol=1e-9)
