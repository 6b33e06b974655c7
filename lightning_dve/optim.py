"""What the optimizer actually applied in a step: learning rates and SGD terms per tracked layer, clipping.

Which optimizers are modelled is decided here; Adam and AdamW terms are in :mod:`lightning_dve.adam`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, UnsupportedError
from .hyperparameters import values_of

_ADAM = (torch.optim.Adam, torch.optim.AdamW)
_MODELLED = (torch.optim.SGD, *_ADAM)
#: The update functions modelled: a subclass that overrides ``step()`` is not one of them.
_MODELLED_STEPS = {inspect.unwrap(optimizer.step) for optimizer in _MODELLED}


def groups_of(optimizer: torch.optim.Optimizer, weights: dict[str, nn.Parameter]) -> list[dict[str, Any]]:
    """The param group of each tracked weight, in the order of ``weights``.

    Raises:
        UnsupportedError: if a tracked weight is no longer a parameter (pruned or parametrised during ``fit``).
        ConfigError: if a tracked weight is in none of the optimizer's param groups (it is never updated).
    """
    replaced = [name for name, weight in weights.items() if not isinstance(weight, nn.Parameter)]
    if replaced:
        raise UnsupportedError(
            f"tracked layers {replaced} no longer hold their weight as a parameter: it was replaced during fit by a "
            "tensor computed from other parameters (torch.nn.utils.prune, which Lightning's ModelPruning callback "
            "applies at epoch ends, trains 'weight_orig' under a mask; or a parametrization registered during fit). "
            "The recorded gradients would not be those of what the optimizer updates. Prune in a fit without this "
            "callback, leave these layers out of the pruning (ModelPruning(parameters_to_prune=...)), or pass "
            f"exclude={tuple(replaced)!r}.")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, weight in weights.items() if id(weight) not in group_of]
    if missing:
        raise ConfigError(f"tracked layers {missing} are not in any optimizer param group (not given to the "
                          "optimizer, or their group was removed during fit), so the optimizer never updates them; "
                          f"add them to the optimizer (to freeze them during fit, keep their group with lr=0) or "
                          f"pass exclude={tuple(missing)!r}.")
    return [group_of[id(weight)] for weight in weights.values()]


def gradient_sign(group: dict[str, Any]) -> float:
    """-1 for a ``maximize`` param group (torch negates the gradient before momentum, moments and decay), else 1."""
    return -1.0 if group.get("maximize") else 1.0


def split_bias_groups(optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Tracked layers whose trained bias is in no param group or in one with other hyperparameters than the weight's.

    The recursion applies the weight's group to the layer's whole block, bias column included.

    Returns:
        ``{layer: what differs}``, empty when every bias shares its weight's hyperparameters.
    """
    def plain(value: Any) -> Any:  # tensors and lists compare as tuples and numbers
        value = value.tolist() if isinstance(value, torch.Tensor) else value
        return tuple(map(plain, value)) if isinstance(value, (list, tuple)) else value

    def settings(group: dict[str, Any]) -> dict[str, Any]:  # hyperparameters only, not names or other user keys
        return {k: plain(v) for k, v in group.items() if k in optimizer.defaults}

    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out = {}
    for name, module in modules.items():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nn.Parameter) or not bias.requires_grad or id(module.weight) not in group_of:
            continue
        if id(bias) not in group_of:
            out[name] = "its bias is in no param group"
            continue
        weight, other = settings(group_of[id(module.weight)]), settings(group_of[id(bias)])
        differ = sorted(k for k in weight.keys() | other.keys() if weight.get(k) != other.get(k))
        if differ:
            out[name] = ", ".join(f"{k} {other.get(k)} for the bias, {weight.get(k)} for the weight" for k in differ)
    return out


@functools.cache
def _keeps_torch_step(cls: type) -> bool:
    """Whether ``cls`` runs torch's own SGD/Adam ``step()`` (torch wraps it at the first instance, so the unwrapped
    functions are compared; once per class, as every step asks)."""
    return inspect.unwrap(cls.step) in _MODELLED_STEPS


def sgd_proxy_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` is not modelled (treated as plain SGD), or ``None`` if it is.

    ``torch.optim.SGD`` with momentum (heavy-ball or Nesterov), dampening, weight decay and ``maximize``, and Adam /
    AdamW (``maximize`` too) without ``amsgrad`` are modelled (:mod:`lightning_dve.recursion`), subclasses too unless
    they override ``step()``; other optimizers are treated as SGD with their current learning rate.
    """
    name = type(optimizer).__name__
    if not isinstance(optimizer, _MODELLED):
        return f"{name} is not SGD, Adam or AdamW"
    if not _keeps_torch_step(type(optimizer)):
        base = next(b for b in type(optimizer).__mro__ if b in _MODELLED)
        return f"{name} overrides the step() of torch.optim.{base.__name__}"
    amsgrad = isinstance(optimizer, _ADAM) and any(g.get("amsgrad") for g in optimizer.param_groups)
    return f"{name} with amsgrad" if amsgrad else None


def narrow_tensor_hyperparameters(optimizer: torch.optim.Optimizer) -> list[str]:
    """Hyperparameters given as tensors of a floating dtype narrower than their group's parameters
    (``betas=(torch.tensor(0.9), torch.tensor(0.999))`` on float64 weights): torch then computes with them in
    that dtype (Adam's bias corrections in float32), which the replay's Python floats do not reproduce. A tensor
    ``lr`` is not one of them: torch scales by it in the weights' dtype."""
    narrow = []
    for group in optimizer.param_groups:
        widest = max((p.dtype.itemsize for p in group["params"] if p.is_floating_point()), default=0)
        for name, value in group.items():
            if name in ("params", "lr"):
                continue
            if any(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype.itemsize < widest
                   for v in values_of(value)) and name not in narrow:
                narrow.append(name)
    return narrow


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is a modelled Adam or AdamW."""
    return isinstance(optimizer, _ADAM) and sgd_proxy_reason(optimizer) is None


def uses_momentum_or_decay(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a modelled optimizer carries state or decays weights (the two-state recursion)."""
    return is_adam(optimizer) or sgd_proxy_reason(optimizer) is None and any(
        group.get("momentum") or group.get("weight_decay") for group in optimizer.param_groups
    )


def sgd_terms(
    optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module], clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Learning rates ``[L]`` and optimizer terms ``{name: [L]}`` of this step, with norm clipping folded in.

    Read in ``on_before_optimizer_step``, after any scheduler update for this step, so the rates are the ones
    actually applied.

    Plain SGD: the clip factor scales the learning rate (the whole update). With momentum, weight decay or
    ``maximize`` (whose gradient enters with its sign flipped: a negative gain, the rates stay positive) it
    scales only the gradient entering the velocity (``gain = clip * (1 - dampening)``); the weight decay, which
    torch dampens but does not clip, is divided by the clip factor so that ``gain * weight_decay`` is applied.
    Nesterov adds ``lead = momentum`` and ``direct = clip`` (recursion.py, ``BackwardRecursion``). A buffer torch
    starts afresh (its first step, or ``optimizer.state`` cleared during fit) carries no earlier velocity
    (``momentum = 0`` for the recursion's ``mu_t``); a group set to momentum 0 that still holds a buffer applies
    the gradient directly and keeps the buffer as it is for later steps (``direct = clip``, ``lead = gain = 0``,
    ``momentum = 1``). Adam and AdamW: :func:`lightning_dve.adam.adam_terms`.

    Args:
        modules: the tracked layers by name.
    """
    weights = {name: module.weight for name, module in modules.items()}
    groups = groups_of(optimizer, weights)
    # torch skips a weight without a gradient (rate 0); ``maximize`` steps along +grad (the gradient's sign flips)
    reached = [weight.grad is not None for weight in weights.values()]
    ascent = sgd_proxy_reason(optimizer) is None  # other optimizers are the plain-SGD proxy (warned)
    signs = [gradient_sign(group) if ascent else 1.0 for group in groups]
    lrs = torch.tensor([float(g["lr"]) * r for g, r in zip(groups, reached)], dtype=torch.float64)
    if not uses_momentum_or_decay(optimizer) and -1.0 not in signs:
        return lrs * clip, {}
    terms: dict[str, list[float]] = {"momentum": [], "gain": [], "weight_decay": [], "lead": [], "direct": []}
    direct_steps = False
    for weight, group, sign, on in zip(weights.values(), groups, signs, reached):
        buffer = optimizer.state.get(weight, {}).get("momentum_buffer")
        momentum = float(group["momentum"])
        stale = not momentum and buffer is not None  # torch keeps it unused, for when momentum is set again
        nesterov = bool(group.get("nesterov"))
        # torch starts a buffer (its first step, or after optimizer.state was cleared) as the gradient, undampened
        gain = clip * (1.0 if buffer is None or not momentum else 1.0 - float(group["dampening"]))
        carry = 1.0 if stale or not on else 0.0 if buffer is None else momentum  # a skipped layer keeps its velocity
        terms["momentum"].append(carry)
        terms["gain"].append(0.0 if stale else sign * gain * on)
        terms["weight_decay"].append(sign * float(group["weight_decay"]) / clip)  # torch dampens it with the gradient
        terms["lead"].append(0.0 if stale else momentum if nesterov else 1.0)
        terms["direct"].append(sign * clip * on if nesterov or stale else 0.0)
        direct_steps = direct_steps or nesterov or stale
    if not direct_steps:
        del terms["lead"], terms["direct"]
    return lrs, {name: torch.tensor(values, dtype=torch.float64) for name, values in terms.items()}


def clip_factor(optimizer: torch.optim.Optimizer, clip_val: float | None, algorithm: str | None
                ) -> tuple[float, float]:
    """Factor by which norm clipping will scale this step's update (1 when it does not clip), and the gradients'
    norm where it binds (else 0: :mod:`lightning_dve.clipping` models the factor's own response there).

    Lightning clips after ``on_before_optimizer_step``, so the factor is computed here from the same gradients
    and the same rule as ``torch.nn.utils.clip_grad_norm_``: ``min(1, clip_val / (||g|| + 1e-6))``. Folded into
    the learning rate it makes the recorded step equal the applied one. Value clipping is not a scale and returns
    1 (the caller warns).
    """
    if not clip_val or algorithm not in (None, "norm"):
        return 1.0, 0.0
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return 1.0, 0.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]), 2.0))
    factor = min(1.0, float(clip_val) / (norm + 1e-6))
    return factor, norm if factor < 1.0 else 0.0


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient is finite: a ``GradScaler`` skips the step otherwise (checked after unscaling).

    One host read per device, not one per parameter (each read waits for the device).
    """
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                flags.setdefault(p.grad.device, []).append(torch.isfinite(p.grad).all())
    return all(bool(torch.stack(found).all()) for found in flags.values())


#: Parameters with their ``.grad``'s storage and version at a micro-batch's end (``None``: no gradient).
GradMarks = list[tuple[torch.Tensor, "tuple[int, int] | None"]]


def grad_marks(params: list[torch.Tensor]) -> GradMarks:
    """Mark ``params``' gradients right after a micro-batch's backward (:func:`gradients_reset`)."""
    return [(p, None if p.grad is None else (p.grad.data_ptr(), p.grad._version)) for p in params]


def gradients_reset(marks: GradMarks) -> bool:
    """Whether a ``zero_grad`` reset the gradients of ``marks`` (:func:`grad_marks`) before a step applied them:
    none holds a gradient now (``None`` or zeros), and one was set to ``None`` or written in place since the mark.
    A micro-batch that added nothing (a dead ReLU, samples whose gradients cancel) leaves its zeros as they were
    marked: not a reset. (Gradients already all ``None`` at the mark: :func:`reset_before_mark`.)

    The smallest parameter is read first and the scan stops at the first gradient found, so a gradient that is
    still there (accumulation) usually costs one small read.
    """
    if any(p.grad is not None and bool(p.grad.any()) for p, _ in sorted(marks, key=lambda mark: mark[0].numel())):
        return False
    return any(mark is not None and (p.grad is None or (p.grad.data_ptr(), p.grad._version) != mark)
               for p, mark in marks)


def reset_before_mark(marks: GradMarks, rows_add: Callable[[], bool]) -> bool:
    """Whether the gradients of ``marks`` were all ``None`` when marked, right after a backward that gave rows
    (``rows_add``): a callback listed before this one reset them in its ``on_after_backward``."""
    return bool(marks) and all(mark is None for _, mark in marks) and rows_add()
