"""One-sample ``training_step`` losses of many samples in one call, ``torch.func.vmap`` over the samples.

The replay forms a step's per-sample losses ``l(theta, z)`` from ``training_step`` on one-sample batches (method.md
§2): one small forward, and, differentiated, one small backward per sample. Where the step allows it, the same
losses come from one call vmapped over the stacked one-sample batches: one batched forward and backward, the same
function of each sample (the batched products round otherwise, within the replay's landing check). Batches that
differ in more than their tensors' values (shapes, or text) and steps that vmap cannot run (Python control flow on a
tensor's value, ``.item()``, random operations, in-place updates of a buffer) keep the loop over samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .batch_trees import map_tensors


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
    the batches are not alike or ``loss_of`` does not run under vmap (the caller loops over them then). A failed
    attempt leaves ``module``'s buffers as they were (a running statistic updated before the failing operation)."""
    if len(batches) < 2 or not _alike(batches):
        return None
    template, columns = batches[0], [torch.stack(column) for column in zip(*map(_tensors, batches))]

    def one(*tensors: torch.Tensor) -> torch.Tensor:
        given = iter(tensors)
        loss = loss_of(map_tensors(template, lambda _: next(given)))
        if loss is None:
            raise _NoLoss
        return loss

    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        losses = torch.func.vmap(one, randomness="error")(*columns)
        _check_backward(module, losses)
        return losses
    except Exception:  # noqa: BLE001 -- whatever vmap cannot run is run sample by sample, as before (tried at
        # every call: a step that vmaps on some batches and not on others gives each batch one path, query after query)
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        return None


def _check_backward(module: nn.Module, losses: torch.Tensor) -> None:
    """Differentiate ``losses`` once in ``module``'s parameters (kept graph, nothing accumulated): a backward that
    runs code again outside vmap, as activation checkpointing recomputes its forward, fails here, not in the replay.
    """
    weights = [p for p in module.parameters() if p.requires_grad]
    if losses.requires_grad and weights:
        torch.autograd.grad(losses.sum(), weights, retain_graph=True, allow_unused=True)
