"""Adam and AdamW as the recursion sees them: momentum on preconditioned gradients (recursion.py).

Adam's step is ``m_t = beta1 m_{t-1} + (1 - beta1) g'_t``, ``v_t = beta2 v_{t-1} + (1 - beta2) g'_t^2`` and
``theta_{t+1} = (1 - lr lambda_W) theta_t - lr / (1 - beta1^t) P_t m_t`` with ``P_t = 1 / (sqrt(v_hat_t) + eps)``,
``v_hat_t = v_t / (1 - beta2^t)`` and ``g'_t = clip g_t (+ lambda theta_t`` for Adam's L2 decay). With ``v`` held
fixed (a removed sample's effect on it neglected), this is the heavy-ball recursion with a per-coordinate rate:

- exact mode (``projection_dim=None``): the rate ``lr / (1 - beta1^t) P_t`` per coordinate, exactly
  (``vectors["precond"]``);
- projected mode: a per-coordinate ``P`` cannot act on projected rows, so the hooks capture ``P g`` through the
  rank-1 (Adafactor) factors ``r c^T`` of the second moment before the step (:func:`adam_factors`) and the
  momentum carries ``u = P m``.

The second-moment channel (``adam_second_moment``, exact mode) adds the removed sample's effect on ``v``
(:func:`second_moment_terms`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .layers import has_trainable_bias, parameter_block
from .optim import gradient_sign, groups_of

Terms = dict[str, torch.Tensor]
Vectors = dict[str, dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class _Moments:
    """One layer's Adam quantities at this step, in block layout ``[d_out, d_in]`` (computed before the step)."""

    step_grad: torch.Tensor  # g'_t
    momentum: torch.Tensor  # m_t
    v_hat: torch.Tensor  # v_t / (1 - beta2^t)
    previous_v_hat: torch.Tensor | None  # v_{t-1} / (1 - beta2^(t-1)), None on the first step
    count: float  # t


def _state_block(optimizer: torch.optim.Optimizer, module: nn.Module, key: str) -> torch.Tensor | None:
    """An optimizer state tensor of a layer (``exp_avg``, ``exp_avg_sq``) in block layout, or ``None`` before step 1."""
    state = optimizer.state.get(module.weight, {})
    if key not in state:
        return None
    bias = optimizer.state.get(module.bias, {}).get(key) if has_trainable_bias(module) else None
    return parameter_block(module, state[key], bias)


def _block_zeros(module: nn.Module) -> torch.Tensor:
    """Zeros, one per entry of the layer's block (its weight, and the bias column when the bias is trained)."""
    size = module.weight.numel() + (module.bias.numel() if has_trainable_bias(module) else 0)
    return torch.zeros(size, dtype=module.weight.dtype)


def decoupled_decay(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``group``'s weight decay is decoupled (AdamW, or ``Adam(decoupled_weight_decay=True)``, which is the
    same update) rather than added to the gradient (Adam's L2 decay)."""
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def _moments(optimizer: torch.optim.Optimizer, module: nn.Module, group: dict[str, Any], clip: float) -> _Moments:
    """``g'_t``, ``m_t`` and ``v_hat_t`` from the state before the step and the (unclipped) ``.grad`` (negated by
    ``maximize``, as torch does before the decay)."""
    beta1, beta2 = group["betas"]
    bias = module.bias if has_trainable_bias(module) else None
    grad = parameter_block(module, module.weight.grad, None if bias is None else bias.grad)
    step_grad = gradient_sign(group) * clip * grad
    if not decoupled_decay(optimizer, group):
        step_grad = step_grad + group["weight_decay"] * parameter_block(
            module, module.weight.detach(), None if bias is None else bias.detach())
    first, second = (_state_block(optimizer, module, key) for key in ("exp_avg", "exp_avg_sq"))
    count = float(optimizer.state[module.weight]["step"]) + 1.0 if second is not None else 1.0
    momentum = (1 - beta1) * step_grad + (0.0 if first is None else beta1 * first)
    v = (1 - beta2) * step_grad**2 + (0.0 if second is None else beta2 * second)
    previous = None if second is None else second / (1 - beta2 ** (count - 1))
    return _Moments(step_grad, momentum, v / (1 - beta2**count), previous, count)


def _preconditioner(v_hat: torch.Tensor, eps: float) -> torch.Tensor:
    """``P = 1 / (sqrt(v_hat) + eps)`` elementwise, and 0 where ``v_hat`` is 0: a coordinate with no gradient yet
    holds still (:func:`lightning_dve.replay_optim.adam_update`), not ``1 / eps`` times a gradient that the step's
    others cancelled exactly."""
    return torch.where(v_hat > 0, 1.0 / (v_hat.sqrt() + eps), torch.zeros_like(v_hat))


def _weighted_preconditioner(v_hat: torch.Tensor, eps: float) -> float:
    """Mean of ``P`` weighted by ``v_hat``: the step scale where gradients live (coordinates that never get a
    gradient have ``P = 1 / eps`` and would swamp a plain mean)."""
    total = float(v_hat.sum())
    return float((v_hat * _preconditioner(v_hat, eps)).sum()) / total if total > 0 else 1.0


def _rank_one(v_hat: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, c)`` with ``r c^T ~ 1 / (sqrt(v_hat) + eps)``, from ``v_hat ~ R C^T / S`` (Adafactor).

    With ``rho = R / sqrt(S)`` and ``gamma = C / sqrt(S)``: ``r = 1 / (sqrt(rho) + sqrt(eps))`` and
    ``c = 1 / (sqrt(gamma) + sqrt(eps))``, finite where a row or column has no second moment.
    """
    norm = v_hat.sum().sqrt().clamp_min(torch.finfo(v_hat.dtype).tiny)
    root_eps = eps**0.5
    return 1.0 / ((v_hat.sum(dim=1) / norm).sqrt() + root_eps), 1.0 / ((v_hat.sum(dim=0) / norm).sqrt() + root_eps)


def adam_factors(
    optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Projected mode: rank-1 factors ``(r [d_out], c [d_in])`` of each layer's preconditioner before this step.

    ``r c^T ~ P_{t-1}`` (:func:`_rank_one`). Before the first step (no ``v`` yet) the factors are ones: that
    step's mean preconditioner goes into its learning rate instead (:func:`adam_terms`).
    """
    weights = {name: module.weight for name, module in modules.items()}
    factors = {}
    for (name, module), group in zip(modules.items(), groups_of(optimizer, weights)):
        second = _state_block(optimizer, module, "exp_avg_sq")
        if second is None:
            d_out, d_in = parameter_block(module, module.weight, None).shape
            factors[name] = (module.weight.new_ones(d_out), module.weight.new_ones(d_in))
        else:
            count = float(optimizer.state[module.weight]["step"])
            factors[name] = _rank_one(second / (1.0 - group["betas"][1] ** count), float(group["eps"]))
    return factors


def adam_terms(
    optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module], clip: float, exact: bool
) -> tuple[torch.Tensor, Terms, Vectors]:
    """Rates ``lr / (1 - beta1^t)`` ``[L]``, momentum terms and per-coordinate vectors of an Adam/AdamW step.

    ``gain = (1 - beta1) clip``; AdamW's decoupled decay is ``shrink = lr lambda``. Exact mode: the exact
    ``P_t`` is the per-coordinate rate factor (``vectors["precond"]``) and Adam's L2 decay is
    ``weight_decay = lambda / clip``. Projected mode: the rows carry ``P`` (:func:`adam_factors`); Adam's L2 decay
    uses the layer's ``v``-weighted mean ``P``, and on the first step (unpreconditioned rows) that mean of
    ``P_1`` scales the rate.
    """
    weights = {name: module.weight for name, module in modules.items()}
    terms: dict[str, list[float]] = {"momentum": [], "gain": [], "weight_decay": [], "shrink": []}
    lrs, precond = [], {}
    for (name, module), group in zip(modules.items(), groups_of(optimizer, weights)):
        if module.weight.grad is None:  # torch skips the layer: no update, its moments kept as they are
            lrs.append(0.0)
            for key, value in (("momentum", 1.0), ("gain", 0.0), ("weight_decay", 0.0), ("shrink", 0.0)):
                terms[key].append(value)
            if exact:
                precond[name] = _block_zeros(module)
            continue
        beta1, eps = group["betas"][0], float(group["eps"])
        decay, decoupled = float(group["weight_decay"]), decoupled_decay(optimizer, group)
        moments = _moments(optimizer, module, group, clip)
        scale, decay_scale = 1.0, 1.0
        if exact:
            precond[name] = _preconditioner(moments.v_hat, eps).flatten()
        elif moments.previous_v_hat is None:
            scale = _weighted_preconditioner(moments.v_hat, eps)
        else:
            decay_scale = _weighted_preconditioner(moments.previous_v_hat, eps)
        lrs.append(float(group["lr"]) / (1.0 - beta1**moments.count) * scale)
        terms["momentum"].append(float(beta1) if moments.count > 1 else 0.0)  # fresh state: no earlier m carried
        terms["gain"].append(gradient_sign(group) * (1.0 - beta1) * clip)  # gain * weight_decay keeps the decay's sign
        terms["weight_decay"].append(0.0 if decoupled else gradient_sign(group) * decay * decay_scale / clip)
        terms["shrink"].append(float(group["lr"]) * decay if decoupled else 0.0)
    return (torch.tensor(lrs, dtype=torch.float64), {k: torch.tensor(v, dtype=torch.float64) for k, v in terms.items()},
            {"precond": precond} if exact else {})


def second_moment_terms(
    optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module], clip: float
) -> tuple[Terms, Vectors]:
    """The second-moment channel of an Adam/AdamW step (``adam_second_moment``, recursion.py).

    Removing a sample changes ``v_t`` by ``2 (1 - beta2) g'_t * dg'``; that change decays by ``beta2`` per step
    and moves ``theta_{t+1}`` by ``kappa_t * dv`` with ``kappa_t = lr m_t / ((1 - beta1^t)(1 - beta2^t)
    2 sqrt(v_hat_t) (sqrt(v_hat_t) + eps)^2)``, the derivative of Adam's update in ``v_t``.

    Returns:
        ``({"v_decay": [L], "v_gain": [L]}, {"kappa": {layer: [k_l]}, "batch_grad": {layer: [k_l]}})`` with
        ``v_gain = 2 (1 - beta2) clip`` and ``batch_grad = g'_t`` (flattened block layout).
    """
    weights = {name: module.weight for name, module in modules.items()}
    terms: dict[str, list[float]] = {"v_decay": [], "v_gain": []}
    vectors: Vectors = {"kappa": {}, "batch_grad": {}}
    for (name, module), group in zip(modules.items(), groups_of(optimizer, weights)):
        if module.weight.grad is None:  # skipped by torch: v kept, no update through it
            zeros = _block_zeros(module)
            vectors["kappa"][name], vectors["batch_grad"][name] = zeros, zeros
            terms["v_decay"].append(1.0)
            terms["v_gain"].append(0.0)
            continue
        beta1, beta2 = group["betas"]
        moments = _moments(optimizer, module, group, clip)
        root = moments.v_hat.sqrt()
        kappa = torch.where(root > 0, group["lr"] * moments.momentum / (2 * root * (root + group["eps"]) ** 2), 0.0)
        vectors["kappa"][name] = (kappa / ((1 - beta1**moments.count) * (1 - beta2**moments.count))).flatten()
        vectors["batch_grad"][name] = moments.step_grad.flatten()
        terms["v_decay"].append(float(beta2) if moments.count > 1 else 0.0)  # fresh state: no earlier v carried
        terms["v_gain"].append(gradient_sign(group) * 2 * (1 - beta2) * clip)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in terms.items()}, vectors
