"""The terms of one optimizer step as the recursion needs them: SGD (:mod:`lightning_dve.optim`) or Adam/AdamW
(:mod:`lightning_dve.adam`), read in ``on_before_optimizer_step`` from the optimizer's type and state."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .adam import Vectors, adam_terms, second_moment_terms
from .config import DVEConfig
from .optim import groups_of, is_adam, sgd_terms


@dataclasses.dataclass(frozen=True)
class StepTerms:
    """What a ``StepRecord`` carries about the update besides the rows.

    Attributes:
        lrs: the recursion's rate of each tracked layer ``[L]`` (clipping folded in for plain SGD, Adam's bias
            correction for Adam).
        optim: optimizer terms per layer ``{name: [L]}`` (empty for plain SGD).
        vectors: per-coordinate terms ``{kind: {layer: [k_l]}}`` (exact-mode Adam, the second-moment channel).
        applied_lrs: each tracked layer's param-group learning rate ``[L]``, 0 where the step does not reach it
            (``StepRecord.applied_lrs``).
        clip_norm: the gradients' norm where norm clipping binds, else 0 (``StepRecord.clip_norm``).
    """

    lrs: torch.Tensor
    optim: dict[str, torch.Tensor]
    vectors: Vectors
    applied_lrs: torch.Tensor | None = None
    clip_norm: float = 0.0


def step_terms(optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module], clip: float,
               config: DVEConfig, clip_norm: float = 0.0) -> StepTerms:
    """The step's terms for the recursion (recursion.py, ``BackwardRecursion``).

    Args:
        modules: the tracked layers by name.
        clip: the factor norm clipping applies to this step's gradient.
        clip_norm: the gradients' norm where clipping binds, else 0.
        config: the recording's settings (exact mode, ``adam_second_moment``).
    """
    if is_adam(optimizer):
        lrs, optim, vectors = adam_terms(optimizer, modules, clip, config.exact)
    else:
        (lrs, optim), vectors = sgd_terms(optimizer, modules, clip), {}
    if config.adam_second_moment:
        terms, channel = second_moment_terms(optimizer, modules, clip)
        optim, vectors = {**optim, **terms}, {**vectors, **channel}
    weights = [module.weight for module in modules.values()]
    groups = groups_of(optimizer, dict(zip(modules, weights)))
    applied = [float(group["lr"]) * (weight.grad is not None) for group, weight in zip(groups, weights)]
    return StepTerms(lrs, optim, vectors, torch.tensor(applied, dtype=torch.float64), clip_norm)
