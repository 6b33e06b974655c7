"""Functional, differentiable copies of the optimizer updates the exact replay differentiates through.

Each update is the math of ``torch.optim`` (its single-tensor code path, ``foreach=False``) written out of place,
so that a vector-Jacobian product through one training step gives the exact first-order effect of removing a
sample's term (issue #6, replay mode). Supported: ``SGD`` (momentum, dampening, Nesterov, weight decay,
``maximize``), ``Adam`` and ``AdamW`` (bias correction, L2 or decoupled weight decay, ``maximize``); ``amsgrad``
is refused (its running maximum is not differentiable in the weights). Gradient clipping by norm or by value
(Lightning's ``gradient_clip_val``) is applied before the update, its factor differentiated too.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedError

Tensor = torch.Tensor
State = dict[str, Tensor]


class OptimizerKind(enum.Enum):
    """Optimizers the replay models exactly (``torch.optim`` class name as value)."""

    SGD = "SGD"
    ADAM = "Adam"
    ADAMW = "AdamW"

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The param-group entries an update reads (recorded at every step, so schedules on any of them work)."""
        if self is OptimizerKind.SGD:
            return ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
        return ("lr", "betas", "eps", "weight_decay", "maximize", "amsgrad", "decoupled_weight_decay")

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Optimizer state entries per parameter (``step`` is a count, not differentiated)."""
        return ("momentum_buffer",) if self is OptimizerKind.SGD else ("exp_avg", "exp_avg_sq", "step")


def optimizer_kind(optimizer: torch.optim.Optimizer) -> OptimizerKind:
    """The replay model of ``optimizer``.

    Raises:
        UnsupportedError: for another optimizer class (subclasses too: they may override ``step``) or ``amsgrad``.
    """
    allowed = ", ".join(kind.value for kind in OptimizerKind)
    name = type(optimizer).__name__
    kind = next((k for k in OptimizerKind if type(optimizer) is getattr(torch.optim, k.value)), None)
    if kind is None:
        raise UnsupportedError(f"exact replay models torch.optim {allowed} exactly; the run used {name}. Train with "
                               "one of those to replay the run (exact_influence, embeddings='replay'; influence() "
                               "works with any optimizer).")
    if kind is not OptimizerKind.SGD and any(group.get("amsgrad") for group in optimizer.param_groups):
        raise UnsupportedError(f"{name}(amsgrad=True): its running maximum of the second moment is not "
                               "differentiable in the weights, so exact replay is refused. Use amsgrad=False.")
    return kind


def group_hyperparameters(optimizer: torch.optim.Optimizer, kind: OptimizerKind) -> list[dict[str, Any]]:
    """JSON-ready hyperparameters of every param group, as the coming ``step()`` will apply them."""
    out = []
    for group in optimizer.param_groups:
        entry = {}
        for key in kind.hyperparameters:
            value = group.get(key, False)
            value = [float(v) for v in value] if isinstance(value, (tuple, list)) else value
            entry[key] = value if isinstance(value, (bool, list)) else float(value)
        out.append(entry)
    return out


def _sqrt_zero_safe(value: Tensor) -> Tensor:
    """``sqrt`` whose derivative at 0 is 0 (not inf): exact for Adam, where ``v = 0`` implies ``m = 0``."""
    positive = value > 0
    return torch.where(positive, value.clamp_min(torch.finfo(value.dtype).tiny).sqrt(), torch.zeros_like(value))


def sgd_update(param: Tensor, grad: Tensor, state: State, h: dict[str, Any]) -> tuple[Tensor, State]:
    """``torch.optim.SGD`` for one parameter: ``g += wd p``; ``b = mu b + (1 - tau) g`` (``b = g`` first);
    ``p -= lr (g + mu b)`` (Nesterov) or ``p -= lr b``."""
    g = -grad if h["maximize"] else grad
    if h["weight_decay"] != 0:
        g = g.add(param, alpha=h["weight_decay"])
    new_state: State = dict(state)  # a buffer stays as it is while momentum is 0, as torch keeps it
    if h["momentum"] != 0:
        buf = state.get("momentum_buffer")
        buf = g if buf is None else buf.mul(h["momentum"]).add(g, alpha=1 - h["dampening"])
        new_state["momentum_buffer"] = buf
        g = g.add(buf, alpha=h["momentum"]) if h["nesterov"] else buf
    return param.add(g, alpha=-h["lr"]), new_state


def adam_update(param: Tensor, grad: Tensor, state: State, h: dict[str, Any], decoupled: bool) -> tuple[Tensor, State]:
    """``torch.optim.Adam`` / ``AdamW`` for one parameter, bias-corrected (Kingma & Ba, Alg. 1; Loshchilov &
    Hutter for the decoupled decay): ``m = lerp(m, g, 1 - b1)``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)``.

    Where ``v`` is still exactly 0 (no gradient yet, so ``m = 0`` and the update is 0) the update is held: its slope
    ``1 / eps`` in ``m`` is not the response to a removed sample, which a step's gradients cancelling exactly (bf16
    rounding) would otherwise scale by ``1 / eps``; that removal moves the update by at most the learning rate.
    The values are torch's."""
    g = -grad if h["maximize"] else grad
    lr, wd, (beta1, beta2) = h["lr"], h["weight_decay"], h["betas"]
    step = state.get("step")
    step = torch.ones((), dtype=torch.float32) if step is None else step.detach() + 1
    if wd != 0:
        if decoupled:
            param = param.mul(1 - lr * wd)
        else:
            g = g.add(param, alpha=wd)
    exp_avg = state.get("exp_avg", torch.zeros_like(param))
    exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(param))
    exp_avg = torch.lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(g, g, value=1 - beta2)
    k = float(step)
    step_size = lr / (1 - beta1**k)
    denom = (_sqrt_zero_safe(exp_avg_sq) / (1 - beta2**k) ** 0.5).add(h["eps"])
    new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": step}
    moving = torch.where(exp_avg_sq == 0, exp_avg.detach(), exp_avg)  # held where v = 0 (docstring)
    return param.addcdiv(moving, denom, value=-step_size), new_state


def update(
    kind: OptimizerKind, param: Tensor, grad: Tensor | None, state: State, h: dict[str, Any]
) -> tuple[Tensor, State]:
    """One optimizer update of one parameter; a parameter without a gradient is skipped, as torch does."""
    if grad is None:
        return param, state
    if kind is OptimizerKind.SGD:
        return sgd_update(param, grad, state, h)
    decoupled = kind is OptimizerKind.ADAMW or bool(h.get("decoupled_weight_decay", False))  # Adam(decoupled=True)
    return adam_update(param, grad, state, h, decoupled=decoupled)


def clip_gradients(
    grads: Sequence[Tensor | None], clip_val: float | None, algorithm: str | None
) -> list[Tensor | None]:
    """Lightning's ``gradient_clip_val``: ``torch.nn.utils.clip_grad_norm_`` (factor
    ``min(1, c / (||g||_2 + 1e-6))`` over all gradients) or ``clip_grad_value_`` (``clamp(g, -c, c)``)."""
    present = [g for g in grads if g is not None]
    if not clip_val or not present:
        return list(grads)
    if algorithm == "value":
        return [None if g is None else g.clamp(-clip_val, clip_val) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in present]), 2.0)
    factor = torch.clamp(clip_val / (total + 1e-6), max=1.0)
    return [None if g is None else g * factor for g in grads]


def layout_change(step: int, manifest: dict[str, Any], parameters: list[tuple[str, nn.Parameter]],
                  optimizer: torch.optim.Optimizer) -> str | None:
    """Why replay cannot follow ``step``: the param groups or the frozen parameters differ from the first step's
    (``manifest["groups"]``, ``manifest["frozen"]``; the guards fix them for tracked layers only), else ``None``.

    Args:
        parameters: ``module.named_parameters()`` as a list.
    """
    sizes, recorded = [len(g["params"]) for g in optimizer.param_groups], [len(g) for g in manifest["groups"]]
    if sizes != recorded:
        return (f"at step {step} the optimizer's param groups changed (parameters per group: {recorded} at the first "
                f"step, {sizes} now; e.g. optimizer.add_param_group by a BaseFinetuning callback), and the replay "
                "follows the first step's groups. To use exact_influence, put every parameter in the optimizer from "
                "the start or fit each stage separately.")
    frozen = {name for name, p in parameters if not p.requires_grad}
    changed = sorted(frozen.symmetric_difference(manifest.get("frozen", ())))
    if changed:
        return (f"at step {step} parameters {changed[:4]}{' ...' if len(changed) > 4 else ''} were "
                f"{'frozen' if changed[0] in frozen else 'unfrozen'} since the first step (e.g. by a BaseFinetuning "
                "callback), and the replay keeps the parameters frozen then constant, the others trained. To use "
                "exact_influence, freeze or unfreeze between fits.")
    return None


def mode_change(step: int, manifest: dict[str, Any], module: nn.Module) -> str | None:
    """Why replay cannot follow ``step``: a module's train/eval mode differs from the first step's
    (``manifest["eval_modules"]``; the replay runs every step in those modes), else ``None``."""
    now = {name for name, m in module.named_modules() if not m.training}
    changed = sorted(now.symmetric_difference(manifest.get("eval_modules", now)))
    if not changed:
        return None
    return (f"at step {step} modules {changed[:4]}{' ...' if len(changed) > 4 else ''} were switched to "
            f"{'eval' if changed[0] in now else 'train'} mode since the first step (e.g. dropout turned on or off "
            "during fit), and the replay runs every step in the first step's modes. To use exact_influence, keep "
            "each module's mode fixed during fit.")
