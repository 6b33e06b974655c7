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
