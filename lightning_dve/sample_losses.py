"""One-sample ``training_step`` losses of many samples in one call, ``torch.func.vmap`` over the samples.

The replay forms a step's per-sample losses ``l(theta, z)`` from ``training_step`` on one-sample batches (method.md
§2): one small forward, and, differentiated, one small backward per sample. Where the step allows it, the same
losses come from one call vmapped over the stacked one-sample batches: one batched forward and backward, the same
function of each sample (the batched products round otherwise, within the replay's landing check). Batches that
differ in more than their tensors' values (shapes, or text), steps that vmap cannot run or differentiate (Python
control flow on a tensor's value, ``.item()``, random operations, activation checkpointing) and steps that assign
module state (a running average, a torchmetrics metric's states) keep the loop over samples, with the module's
attributes and buffers as they were before the attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .batch_trees import map_tensors
from .batches import restore_buffers, saved_buffers


class _NoLoss(Exception):
    """``training_step`` returned no scalar loss on a sample: the loop reports it."""


def _tensors(batch: Any) -> list[torch.Tensor]:
    """``batch``'s tensors, in :func:`~.batch_trees.map_tensors` order."""
    found: list[torch.Tensor] = []
    map_tensors(batch, lambda tensor: found.append(tensor) or tensor)
    return found


def _skeleton(batch: Any) -> Any:
    """``batch`` with each tensor replaced by its shape, dtype and device (the rest as it is), to compare."""
    return map_tensors(batch, lambda tensor: (tuple(tensor.shape), tensor.dtype, tensor.device))


def _alike(batches: list[Any]) -> bool:
    """Whether the one-sample ``batches`` differ in their tensors' values only (containers, dataclasses, shapes,
    dtypes, devices and every other value equal)."""
    try:
        skeleton = _skeleton(batches[0])
        return all(bool(_skeleton(batch) == skeleton) for batch in batches[1:])
    except Exception:  # noqa: BLE001 -- a value without a plain equality (an array) or a dataclass that rejects it
        return False


def vmapped_losses(module: nn.Module, batches: list[Any],
                   loss_of: Callable[[Any], torch.Tensor | None]) -> torch.Tensor | None:
    """``[loss_of(batch) for batch in batches]`` stacked, from one call vmapped over the samples; ``None`` where
    the batches are not alike, ``loss_of`` does not run under vmap, or it assigned module state (the caller loops
    over them then). The state a failed or state-assigning attempt left is put back (:class:`_ModuleState`)."""
    if len(batches) < 2 or not _alike(batches):
        return None
    template, columns = batches[0], [torch.stack(column) for column in zip(*map(_tensors, batches))]

    def one(*tensors: torch.Tensor) -> torch.Tensor:
        given = iter(tensors)
        loss = loss_of(map_tensors(template, lambda _: next(given)))
        if loss is None:
            raise _NoLoss
        return loss

    state = _ModuleState(module)
    try:
        losses = torch.func.vmap(one, randomness="error")(*columns)
        _check_backward(module, losses)
    except Exception:  # noqa: BLE001 -- whatever vmap cannot run is run sample by sample, as before (tried at
        # every call: a step that vmaps on some batches and not on others gives each batch one path, query after query)
        state.put_back()
        return None
    if state.assigned():  # a running average, a metric's state: vmap's tensors must not stay there
        state.put_back()
        return None
    return losses


class _ModuleState:
    """Every submodule's attributes (lists and dicts among them item by item: a metric's list state, ``_buffers``)
    and its buffers' values, to tell whether a call assigned any of them and to put them back."""

    def __init__(self, module: nn.Module) -> None:
        self.attributes = [(m, dict(vars(m)), {k: _copy(v) for k, v in vars(m).items() if isinstance(v, (list, dict))})
                           for m in module.modules()]
        self.buffers = saved_buffers(module)

    def assigned(self) -> bool:
        """Whether an attribute was added or assigned anew, or a list's or dict's items were."""
        return any(vars(m).keys() != saved.keys() or any(v is not saved[k] for k, v in vars(m).items())
                   or any(not _same_items(saved[k], copy) for k, copy in copies.items())
                   for m, saved, copies in self.attributes)

    def put_back(self) -> None:
        """Every attribute and container as it was, then every buffer's value (:func:`~.batches.restore_buffers`)."""
        for m, saved, copies in self.attributes:
            for key in vars(m).keys() - saved.keys():
                del vars(m)[key]
            vars(m).update(saved)
            for key, copy in copies.items():
                if isinstance(copy, list):
                    saved[key][:] = copy
                else:
                    saved[key].clear()
                    saved[key].update(copy)
        restore_buffers(self.buffers)


def _copy(container: list[Any] | dict[Any, Any]) -> list[Any] | dict[Any, Any]:
    return list(container) if isinstance(container, list) else dict(container)


def _same_items(container: list[Any] | dict[Any, Any], copy: list[Any] | dict[Any, Any]) -> bool:
    """Whether ``container`` holds the very objects of its earlier ``copy``."""
    if isinstance(container, list):
        return len(container) == len(copy) and all(a is b for a, b in zip(container, copy))
    return container.keys() == copy.keys() and all(container[k] is v for k, v in copy.items())  # type: ignore


def _check_backward(module: nn.Module, losses: torch.Tensor) -> None:
    """Differentiate ``losses`` once in ``module``'s parameters (kept graph, nothing accumulated): a backward that
    runs code again outside vmap, as activation checkpointing recomputes its forward, fails here, not in the replay.
    """
    weights = [p for p in module.parameters() if p.requires_grad]
    if losses.requires_grad and weights:
        torch.autograd.grad(losses.sum(), weights, retain_graph=True, allow_unused=True)
