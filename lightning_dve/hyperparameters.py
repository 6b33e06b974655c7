"""The param groups' hyperparameters a recorded step read against those its update used (method.md §2: the step
is ``theta_{t+1} = theta_t - lr_t sum_z w_z g_z`` with the ``lr_t`` read in ``on_before_optimizer_step``).

A change between the two (a warm-up set in the LightningModule's ``on_before_optimizer_step``, which runs after
the callbacks', or by a callback listed after this one) would record the rate of the step before, so it is
refused. The values the update used (and the guards' sample of the weights) are noted right before it: an
optimizer step pre-hook wraps the step's closure (which runs the backward and ``on_before_optimizer_step``) and
notes them once it returns, or notes them at once when the step has no closure (a grad scaler's ``step``).
Changes after the update (a schedule in a step post-hook that sets the next step's rate) are not this step's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import UnsupportedError

#: The param-group settings a step's terms read (optim.py, adam.py); other keys may change inside ``step()``
#: itself (e.g. an adaptive optimizer's own estimates), which the SGD proxy never read.
HYPERPARAMETERS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "betas", "eps", "amsgrad")

Settings = list[dict[str, object]]


def hyperparameters(optimizer: torch.optim.Optimizer) -> Settings:
    """Each param group's :data:`HYPERPARAMETERS` it has (tensors as lists)."""
    return [{key: group[key].detach().cpu().tolist() if isinstance(group[key], torch.Tensor) else group[key]
             for key in HYPERPARAMETERS if key in group} for group in optimizer.param_groups]


def values_of(value: object) -> tuple[object, ...]:
    """A hyperparameter's values: a tuple's or list's items (``betas``), else the value itself."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


class HyperparameterWatch:
    """Notes the hyperparameters each step read and those its update used; refuses a step where they differ."""

    def __init__(self, before_update: Callable[[], None] | None = None) -> None:
        """Args:
            before_update: also called right before each update (the guards' sample of the weights).
        """
        self._before_update = before_update
        self._optimizer: torch.optim.Optimizer | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._read: Settings | None = None  # read in on_before_optimizer_step
        self._used: Settings | None = None  # right before the update
        self._last: Settings | None = None  # the previous step's read
        self._updating = False  # the step's update has begun (its first note is taken)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Note the values each ``optimizer.step()`` uses (a step pre-hook)."""
        self.detach()
        self._optimizer = optimizer
        self._hook = optimizer.register_step_pre_hook(self._before_step)

    def detach(self) -> None:
        """Remove the step pre-hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def read(self) -> bool:
        """Note the values the step's terms read (``on_before_optimizer_step``); whether they differ from the
        previous step's (always for the first)."""
        if self._optimizer is None:
            return False
        self._used, self._updating, self._read = None, False, hyperparameters(self._optimizer)
        changed, self._last = self._read != self._last, self._read
        return changed

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: the optimizer itself
        if not callable(closure):
            self._note(optimizer)
            return None

        def noted_closure() -> Any:  # the closure, then what the update is about to use
            result = closure()
            self._note(optimizer)
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": noted_closure}
        return (args[0], noted_closure, *args[2:]), kwargs

    def _note(self, optimizer: torch.optim.Optimizer) -> None:
        """Note the hyperparameters after every evaluation of the closure (the last one's are the update's), and
        call ``before_update`` at the first note of the step only: an optimizer that evaluates the closure again,
        or calls its parent's ``step()`` inside its own, may move the weights around that (LBFGS, sharpness-aware
        minimisation, whose moves there and back round)."""
        self._used = hyperparameters(optimizer)
        if not self._updating and self._before_update is not None:
            self._before_update()
        self._updating = True

    def check(self, step: int) -> None:
        """Refuse a step whose hyperparameters changed between ``on_before_optimizer_step`` (where the recorded
        step's terms are read) and its update.

        Raises:
            UnsupportedError: naming the param group, the hyperparameter, both values and the fix.
        """
        read, used, self._read, self._used = self._read, self._used, None, None
        if read is None or used is None:
            return
        for index, (before, now) in enumerate(zip(read, used)):
            if nans := [key for key, value in now.items() if any(v != v for v in values_of(value))]:  # NaN != NaN
                raise UnsupportedError(f"step {step}: param group {index}'s {nans[0]!r} is NaN, so the update and the "
                                       "recorded step are undefined. Fix the value set or the LR scheduler that set it "
                                       "(e.g. a lambda dividing by zero).")
            for key in before:
                if key in now and now[key] != before[key]:
                    raise UnsupportedError(
                        f"step {step}: param group {index}'s {key!r} was changed from {before[key]!r} to "
                        f"{now[key]!r} after the callback read it in on_before_optimizer_step (by the "
                        "LightningModule's on_before_optimizer_step, which runs after the callbacks', or by a "
                        "callback listed after this one), so the recorded step would not be the applied one. Set "
                        "it before the backward instead (on_train_batch_start, an LR scheduler, or before calling "
                        "optimizer.step(closure=optimizer_closure) in an optimizer_step override).")
