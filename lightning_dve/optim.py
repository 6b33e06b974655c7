"""What the optimizer actually applied in a step: learning rates per tracked layer, and the SGD model check."""

from __future__ import annotations

import torch
from torch import nn


def layer_learning_rates(optimizer: torch.optim.Optimizer, weights: dict[str, nn.Parameter]) -> torch.Tensor:
    """Learning rate applied to each tracked layer's weight in this step, ``[L]`` in the order of ``weights``.

    Read in ``on_before_optimizer_step``, i.e. after any scheduler update for this step, so it is the rate
    actually applied.

    Raises:
        ValueError: if a tracked weight is in none of the optimizer's param groups (it is never updated).
    """
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    rates = []
    for name, weight in weights.items():
        group = group_of.get(id(weight))
        if group is None:
            raise ValueError(f"tracked layer {name!r} is not in any optimizer param group, so the optimizer never "
                             f"updates it; add it to the optimizer or pass exclude=({name!r},).")
        rates.append(float(group["lr"]))
    return torch.tensor(rates, dtype=torch.float64)


def sgd_proxy_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` is not plain SGD (no momentum, no weight decay), or ``None`` if it is.

    The recursion of method.md §2 is exact for plain SGD; anything else is treated as SGD with its current
    learning rate.
    """
    name = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.SGD):
        return f"{name} is not SGD"
    for group in optimizer.param_groups:
        extras = {k: group.get(k) for k in ("momentum", "weight_decay", "dampening") if group.get(k)}
        if group.get("nesterov"):
            extras["nesterov"] = True
        if extras:
            return f"SGD with {extras}"
    return None


def clip_factor(optimizer: torch.optim.Optimizer, clip_val: float | None, algorithm: str | None) -> float:
    """Factor by which norm clipping will scale this step's update (1 when it does not clip).

    Lightning clips after ``on_before_optimizer_step``, so the factor is computed here from the same gradients
    and the same rule as ``torch.nn.utils.clip_grad_norm_``: ``min(1, clip_val / (||g|| + 1e-6))``. Folded into
    the learning rate it makes the recorded step equal the applied one (to first order in the removed sample,
    whose effect on the norm is neglected). Value clipping is not a scale and returns 1 (the caller warns).
    """
    if not clip_val or algorithm not in (None, "norm"):
        return 1.0
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return 1.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]), 2.0)
    return min(1.0, float(clip_val) / (float(norm) + 1e-6))
