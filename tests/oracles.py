"""Ground-truth oracles for DVEmb, in plain torch (no ``lightning_dve`` import: this is what the package is
checked against).

Conventions (``/work/shared/reference/method.md``):

- A step is ``theta_{t+1} = theta_t - lr_t * sum_{z in B_t} w_{t,z} grad l(theta_t, z)`` with ``w = 1/B`` for a
  mean loss.
- An *occurrence* is ``(step, position)``: the sample at ``position`` in the batch of optimizer step ``step``.
- ``TSLOO(step, position; test) = l(theta'_T, test) - l(theta_T, test)`` where ``theta'`` drops that one term
  from that one step (the other samples keep their weights). Positive = the sample helped.
- ``DVEmb(t, z) = lr_t w_{t,z} [prod_{k=T-1 .. t+1} (I - lr_k H_k)] g_{t,z}``; the estimate of TSLOO is
  ``grad l(theta_T, test) . DVEmb``.

Models are any ``nn.Module`` mapping ``x -> logits``, evaluated functionally (``torch.func.functional_call``)
with a dict of parameters; the loss is per-sample cross-entropy. Layer blocks are the ``nn.Linear`` modules
(weight and bias of one layer together), in module order.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

Params = dict[str, torch.Tensor]
Batch = Mapping[str, torch.Tensor]
Occurrence = tuple[int, int]  # (optimizer step from 0, position in that step's batch)


# ----------------------------------------------------------------------------------------------------------------
# parameters and losses


def params_of(model: nn.Module) -> Params:
    """Detached copies of the trainable parameters of ``model``."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def linear_blocks(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped per ``nn.Linear`` module (``[weight, bias]``), in module order."""
    blocks = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            prefix = f"{module_name}." if module_name else ""
            blocks.append([prefix + n for n, p in module.named_parameters(recurse=False) if p.requires_grad])
    return blocks


def per_sample_losses(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``l(theta, z_i)`` for each row: cross-entropy, ``[B]``."""
    return F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")


def _single_loss(model: nn.Module):
    def loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    return loss


def per_sample_grads(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
    """``grad l(theta, z_i)`` of the per-sample loss itself (not divided by B): ``{name: [B, *shape]}``."""
    return vmap(grad(_single_loss(model)), in_dims=(None, 0, 0))(params, x, y)


BlockMap = Callable[[torch.Tensor], torch.Tensor]  # [B, d_l] -> [B, k_l]


def block_grads(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    layout: Literal["per_layer", "full"] = "per_layer",
    block_maps: Sequence[BlockMap] | None = None,
) -> list[torch.Tensor]:
    """Per-sample gradients flattened per layer block: ``[[B, d_l] per Linear]``, or one ``[B, sum d_l]``.

    A block is ``[weight.flatten(), bias]`` of one ``nn.Linear``. ``block_maps`` (one per Linear) are applied
    to the blocks first, e.g. a Kronecker projection (``kronecker_block_map``); ``"full"`` concatenates after.
    """
    grads = per_sample_grads(model, params, x, y)
    n = x.shape[0]
    blocks = [torch.cat([grads[name].reshape(n, -1) for name in names], dim=1) for names in linear_blocks(model)]
    if block_maps is not None:
        blocks = [block_map(block) for block_map, block in zip(block_maps, blocks, strict=True)]
    return [torch.cat(blocks, dim=1)] if layout == "full" else blocks


def kronecker_block_map(linear: nn.Linear, p_out: torch.Tensor, p_in: torch.Tensor) -> BlockMap:
    """``[B, d]`` blocks of ``linear`` -> ``(P_out kron P_in) vec([dW | db])``: ``[B, k_out * k_in]``.

    ``p_out: [k_out, d_out]``, ``p_in: [k_in, d_in (+1 for the bias column)]``; each projected block is
    ``P_out [dW | db] P_in^T`` flattened row-major.
    """
    d_out, d_in = linear.out_features, linear.in_features
    has_bias = linear.bias is not None and linear.bias.requires_grad

    def project(block: torch.Tensor) -> torch.Tensor:
        n = block.shape[0]
        weight = block[:, : d_out * d_in].reshape(n, d_out, d_in)
        matrix = torch.cat([weight, block[:, d_out * d_in :, None]], dim=2) if has_bias else weight
        return (p_out @ matrix @ p_in.T).reshape(n, -1)

    return project


def per_sample_grads_loop(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Slow per-example backward loop, flattened over all Linear blocks: ``[B, D]`` (cross-check of vmap)."""
    names = [name for block in linear_blocks(model) for name in block]
    rows = []
    for i in range(x.shape[0]):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss = per_sample_losses(model, leaves, x[i : i + 1], y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, [leaves[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# the trajectory and exact trajectory-specific leave-one-out


def sample_weights(batch: Batch) -> torch.Tensor:
    """``w_{t,z}`` of a mean-reduced loss: ``1/B`` for every sample, ``[B]``."""
    n = batch["y"].shape[0]
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def sgd_step(
    model: nn.Module,
    params: Params,
    batch: Batch,
    lr: float,
    remove: int | None = None,
    remove_fraction: float = 1.0,
) -> Params:
    """One plain-SGD step on ``sum_{i != remove} l_i / B`` (the removed sample's weight is 0, the others 1/B).

    ``remove_fraction`` < 1 removes only that fraction of the sample's weight (``(1 - f) / B``), for
    finite-difference derivatives of the removal.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    losses = per_sample_losses(model, leaves, batch["x"], batch["y"])
    weights = sample_weights(batch).to(losses.dtype)
    if remove is not None:
        weights = weights.clone()
        weights[remove] = weights[remove] * (1.0 - remove_fraction)
    loss = (losses * weights).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return {n: (params[n] - lr * g).detach() for n, g in zip(names, grads)}


def replay(
    model: nn.Module,
    init_params: Params,
    batches: Sequence[Batch],
    lrs: Sequence[float],
    remove: Occurrence | None = None,
    return_trajectory: bool = False,
    start_step: int = 0,
    remove_fraction: float = 1.0,
) -> Params | list[Params]:
    """Replay plain SGD in float64 with the identical batch order.

    Args:
        model: the network (``x -> logits``); only its structure is used.
        init_params: parameters before step ``start_step`` (``theta_{start_step}``).
        batches: the batch of every optimizer step 0..T-1 (dicts with ``x``, ``y``).
        lrs: the learning rate applied at every step, ``[T]``.
        remove: ``(step, position)`` to drop from that step's update only, or ``None``.
        return_trajectory: return ``[theta_start, ..., theta_T]`` instead of ``theta_T``.
        start_step: first step to replay (``init_params`` is then ``theta_{start_step}``).
        remove_fraction: fraction of the removed sample's weight to drop (1 = the whole term).
    """
    if len(batches) != len(lrs):
        raise ValueError(f"{len(batches)} batches but {len(lrs)} learning rates.")
    params = {k: v.detach().clone() for k, v in init_params.items()}
    trajectory = [params]
    for step in range(start_step, len(batches)):
        drop = remove[1] if remove is not None and remove[0] == step else None
        params = sgd_step(model, params, batches[step], float(lrs[step]), remove=drop, remove_fraction=remove_fraction)
        trajectory.append(params)
    return trajectory if return_trajectory else params


def exact_tsloo(
    model: nn.Module,
    trajectory: Sequence[Params],
    batches: Sequence[Batch],
    lrs: Sequence[float],
    occurrences: Sequence[Occurrence],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
) -> torch.Tensor:
    """Exact TSLOO by replay: ``l(theta'_T, test_i) - l(theta_T, test_i)``, ``[n_test, m]``.

    ``trajectory`` is ``[theta_0, ..., theta_T]`` of the unperturbed run; each counterfactual starts from
    ``theta_{step}`` (identical before the removed step) and replays the rest.
    """
    with torch.no_grad():
        base = per_sample_losses(model, trajectory[-1], test_x, test_y)
    columns = []
    for step, position in occurrences:
        final = replay(model, trajectory[step], batches, lrs, remove=(step, position), start_step=step)
        with torch.no_grad():
            columns.append(per_sample_losses(model, final, test_x, test_y) - base)
    return torch.stack(columns, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# reference DVEmb by the explicit product


@dataclasses.dataclass
class ReferenceEmbeddings:
    """Per-occurrence embeddings, ordered by step then batch position.

    Attributes:
        occurrences: ``(step, position)`` of each column, ``[m]``.
        sample_ids: sample id of each occurrence, ``[m]``.
        blocks: embeddings per layer block, ``[[m, d_l]]`` (one block for layout ``"full"``).
        layout: ``"per_layer"`` or ``"full"``.
    """

    occurrences: list[Occurrence]
    sample_ids: torch.Tensor
    blocks: list[torch.Tensor]
    layout: str

    def scores(self, test_blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """``g_test . e`` summed over blocks: ``[n_test, m]`` from test gradients ``[[n_test, d_l]]``."""
        return sum(g @ e.T for g, e in zip(test_blocks, self.blocks))

    def columns(self, occurrences: Sequence[Occurrence]) -> list[int]:
        """Column index of each requested occurrence."""
        lookup = {occ: j for j, occ in enumerate(self.occurrences)}
        return [lookup[tuple(occ)] for occ in occurrences]


def per_sample_logit_jacobians(
    model: nn.Module, params: Params, x: torch.Tensor, layout: Literal["per_layer", "full"] = "per_layer"
) -> list[torch.Tensor]:
    """``d logits(theta, x_i) / d theta`` per block, ``[[B, C, d_l]]`` (for the Gauss-Newton curvature)."""

    def logits_one(p: Params, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(torch.func.jacrev(logits_one), in_dims=(None, 0))(params, x)
    n = x.shape[0]
    blocks = []
    for names in linear_blocks(model):
        parts = [jac[name].reshape(n, jac[name].shape[1], -1) for name in names]
        blocks.append(torch.cat(parts, dim=2))
    return [torch.cat(blocks, dim=2)] if layout == "full" else blocks


def _batch_loss_hessian(model: nn.Module, params: Params, batch: Batch, names: list[str]) -> torch.Tensor:
    """True Hessian of ``sum_z w_z l(theta, z)`` over the flattened ``names`` parameters, ``[D, D]``."""
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    weights = sample_weights(batch)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        local = dict(params)
        local.update({n: p.reshape(s) for n, p, s in zip(names, pieces, shapes)})
        return (per_sample_losses(model, local, batch["x"], batch["y"]) * weights).sum()

    flat = torch.cat([params[n].reshape(-1) for n in names])
    return hessian(loss)(flat)


def reference_dvemb(
    model: nn.Module,
    trajectory: Sequence[Params],
    batches: Sequence[Batch],
    lrs: Sequence[float],
    layout: Literal["per_layer", "full"] = "per_layer",
    curvature: Literal["fisher", "ggn", "hessian"] = "fisher",
    block_maps: Sequence[BlockMap] | None = None,
) -> ReferenceEmbeddings:
    """Exact DVEmb by the explicit product, independent of the backward recursion.

    ``e_{t,z} = lr_t w_{t,z} (I - lr_{T-1} H_{T-1}) ... (I - lr_{t+1} H_{t+1}) g_{t,z}``, applied factor by
    factor to the vectors (the factor nearest ``g`` is step ``t+1``). With ``curvature="fisher"`` (the paper's)
    ``H_k = sum_z w_{k,z} g_{k,z} g_{k,z}^T`` per block (``(I - lr H) v = v - lr G^T (w * (G v))``); with
    ``curvature="ggn"`` the Gauss-Newton matrix of the cross-entropy ``sum_z w J_z^T (diag p_z - p_z p_z^T) J_z``
    (``J_z`` the logit Jacobian; its diagonal blocks for ``"per_layer"``); with ``curvature="hessian"``
    ``H_k`` is the true Hessian of the step's loss (tiny models, ``layout="full"`` only): the estimate is then
    the exact derivative of TSLOO in the removed weight.

    Args:
        trajectory: ``[theta_0, ..., theta_T]`` (or at least ``theta_0 .. theta_{T-1}``).
        layout: ``"per_layer"`` (one product per ``nn.Linear``, block-diagonal) or ``"full"`` (all layers).
        block_maps: maps applied to every per-sample gradient block first (``curvature="fisher"`` only): the
            same product in a projected space, as the Kronecker-projected method computes it.
    """
    if block_maps is not None and curvature != "fisher":
        raise ValueError("block_maps is implemented for curvature='fisher' only.")
    n_steps = len(batches)
    grads = [block_grads(model, trajectory[t], b["x"], b["y"], layout, block_maps) for t, b in enumerate(batches)]
    weights = [sample_weights(b) for b in batches]
    if curvature == "hessian":
        if layout != "full":
            raise ValueError("curvature='hessian' is implemented for layout='full' only.")
        names = [n for block in linear_blocks(model) for n in block]
        hessians = [_batch_loss_hessian(model, trajectory[k], batches[k], names) for k in range(n_steps)]
    if curvature == "ggn":
        jacobians = [per_sample_logit_jacobians(model, trajectory[k], batches[k]["x"], layout) for k in range(n_steps)]
        probabilities = []
        for k in range(n_steps):
            with torch.no_grad():
                probabilities.append(torch.softmax(functional_call(model, trajectory[k], (batches[k]["x"],)), dim=1))
    n_blocks = len(grads[0])
    out_blocks: list[list[torch.Tensor]] = [[] for _ in range(n_blocks)]
    occurrences: list[Occurrence] = []
    sample_ids = []
    for t in range(n_steps):
        batch_size = batches[t]["y"].shape[0]
        occurrences.extend((t, i) for i in range(batch_size))
        sample_ids.append(batches[t]["index"] if "index" in batches[t] else torch.arange(batch_size))
        for block in range(n_blocks):
            vectors = float(lrs[t]) * weights[t][:, None] * grads[t][block]  # rows e [B_t, d]
            for k in range(t + 1, n_steps):
                if curvature == "fisher":
                    g_k = grads[k][block]
                    vectors = vectors - float(lrs[k]) * ((vectors @ g_k.T) * weights[k][None, :]) @ g_k
                elif curvature == "ggn":
                    jac, prob = jacobians[k][block], probabilities[k]  # [B_k, C, d], [B_k, C]
                    jv = torch.einsum("zcd,md->mzc", jac, vectors)  # J_z v per row v: [m, B_k, C]
                    ajv = prob * jv - prob * (prob * jv).sum(-1, keepdim=True)  # (diag p - p p^T) J v
                    vectors = vectors - float(lrs[k]) * torch.einsum("zcd,mzc,z->md", jac, ajv, weights[k])
                else:
                    vectors = vectors - float(lrs[k]) * vectors @ hessians[k]  # H symmetric
            out_blocks[block].append(vectors)
    return ReferenceEmbeddings(
        occurrences=occurrences,
        sample_ids=torch.cat(sample_ids),
        blocks=[torch.cat(b, dim=0) for b in out_blocks],
        layout=layout,
    )


def dense_product_dvemb(
    model: nn.Module,
    trajectory: Sequence[Params],
    batches: Sequence[Batch],
    lrs: Sequence[float],
    layout: Literal["per_layer", "full"] = "per_layer",
) -> list[torch.Tensor]:
    """The same embeddings with the product formed as dense ``[d, d]`` matrices (small models only).

    Returns per-block embeddings ``[[m, d_l]]`` in occurrence order (a cross-check of ``reference_dvemb``).
    """
    n_steps = len(batches)
    grads = [block_grads(model, trajectory[t], b["x"], b["y"], layout) for t, b in enumerate(batches)]
    weights = [sample_weights(b) for b in batches]
    out = []
    for block in range(len(grads[0])):
        d = grads[0][block].shape[1]
        eye = torch.eye(d, dtype=torch.float64)
        product = eye.clone()  # prod_{k=T-1 .. t+1} (I - lr_k H_k), built from t = T-1 down
        per_step = [None] * n_steps
        for t in range(n_steps - 1, -1, -1):
            g_t = grads[t][block]
            per_step[t] = float(lrs[t]) * weights[t][:, None] * (g_t @ product.T)
            fisher = g_t.T @ (weights[t][:, None] * g_t)
            product = product @ (eye - float(lrs[t]) * fisher)
        out.append(torch.cat(per_step, dim=0))
    return out


def recursion_dvemb(
    model: nn.Module,
    trajectory: Sequence[Params],
    batches: Sequence[Batch],
    lrs: Sequence[float],
    layout: Literal["per_layer", "full"] = "per_layer",
) -> list[torch.Tensor]:
    """The backward recursion of method.md §2 (Theorem 2), per block: ``[[m, d_l]]`` in occurrence order.

    ``e = lr w (g - M g)`` for all of ``B_t`` with the same ``M``, then ``M += sum e g^T``.
    """
    n_steps = len(batches)
    grads = [block_grads(model, trajectory[t], b["x"], b["y"], layout) for t, b in enumerate(batches)]
    weights = [sample_weights(b) for b in batches]
    out = []
    for block in range(len(grads[0])):
        d = grads[0][block].shape[1]
        accumulator = torch.zeros(d, d, dtype=torch.float64)  # M
        per_step = [None] * n_steps
        for t in range(n_steps - 1, -1, -1):
            g_t = grads[t][block]  # [B, d]
            e_t = float(lrs[t]) * weights[t][:, None] * (g_t - g_t @ accumulator.T)  # rows (M g)^T = g^T M^T
            per_step[t] = e_t
            accumulator = accumulator + e_t.T @ g_t
        out.append(torch.cat(per_step, dim=0))
    return out


def grads_at_test_points(
    model: nn.Module,
    final_params: Params,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    layout: Literal["per_layer", "full"] = "per_layer",
    block_maps: Sequence[BlockMap] | None = None,
) -> list[torch.Tensor]:
    """``grad l(theta_T, test_i)`` per block, ``[[n_test, d_l]]`` (mapped by ``block_maps`` if given)."""
    return block_grads(model, final_params, test_x, test_y, layout, block_maps)


def no_curvature_scores(
    model: nn.Module,
    trajectory: Sequence[Params],
    batches: Sequence[Batch],
    lrs: Sequence[float],
    occurrences: Sequence[Occurrence],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
) -> torch.Tensor:
    """Baseline without the product (TracIn-like): ``lr_t w <g_test(theta_T), g_{t,z}>``, ``[n_test, m]``."""
    test = torch.cat(grads_at_test_points(model, trajectory[-1], test_x, test_y, "full"), dim=1)
    columns = []
    cache: dict[int, torch.Tensor] = {}
    for step, position in occurrences:
        if step not in cache:
            b = batches[step]
            cache[step] = block_grads(model, trajectory[step], b["x"], b["y"], "full")[0]
        weight = sample_weights(batches[step])[position]
        columns.append(float(lrs[step]) * weight * (test @ cache[step][position]))
    return torch.stack(columns, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# statistics


def mean_spearman(estimates: torch.Tensor, truth: torch.Tensor) -> tuple[float, list[float]]:
    """Spearman rank correlation per test point (row) between ``[n_test, m]`` matrices; mean and per row."""
    from scipy.stats import spearmanr

    per_row = [float(spearmanr(e.numpy(), t.numpy()).statistic) for e, t in zip(estimates, truth)]
    return sum(per_row) / len(per_row), per_row


def spread_occurrences(batch_sizes: Sequence[int], count: int, seed: int = 0) -> list[Occurrence]:
    """``count`` occurrences spread evenly over the steps, one random position each, sorted by step."""
    n_steps = len(batch_sizes)
    generator = torch.Generator().manual_seed(seed)
    steps = torch.linspace(0, n_steps - 1, count).round().long().tolist()
    chosen = set()
    for step in steps:
        while True:
            position = int(torch.randint(batch_sizes[step], (1,), generator=generator))
            if (step, position) not in chosen:
                chosen.add((step, position))
                break
    return sorted(chosen)


def trainer_tsloo(
    net: nn.Module,
    batches: Sequence[Batch],
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    occurrences: Sequence[Occurrence],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    lrs: Sequence[float] | None = None,
    clip: float | None = None,
    autocast: torch.dtype | None = None,
    remove_fraction: float = 1.0,
) -> tuple[torch.Tensor, Params]:
    """Exact TSLOO ``[n_test, m]`` of a run with a per-step learning rate and norm clipping, and ``theta_T``.

    Works for any ``torch.optim`` optimizer, replayed in float64: each run starts from a deep copy of ``net`` and a
    fresh optimizer (no state is shared between runs), uses the identical batches, and drops occurrence
    ``(t, i)``'s term from step ``t``'s mean loss only (the others keep their ``1/B`` weights). With ``lrs`` and
    ``clip`` it applies exactly what a Lightning Trainer applies at each step ``t`` (without them, the
    optimizer's own rates and no clipping): every param group's learning rate set to ``lrs[t]`` (the rate the Trainer's
    optimizer used at that step, after its scheduler), the gradients of all the optimizer's parameters clipped
    to total 2-norm ``clip`` (``torch.nn.utils.clip_grad_norm_``, Lightning's ``gradient_clip_val`` with the norm
    algorithm; the removal changes the norm, and the replay keeps that), then ``optimizer.step()``.
    ``autocast`` runs the forward and loss under ``torch.autocast("cpu", autocast)`` (to check a mixed-precision
    run's batch order; the ground truth itself is meant to run without it, in float64). Each counterfactual starts
    from a copy of the unperturbed run's model and optimizer state just before its removed step (bitwise the same
    as replaying from the start: the steps before it are identical). ``remove_fraction`` < 1 drops only that
    fraction of the occurrence's weight (for finite-difference derivatives of the removal).

    Returns:
        ``(tsloo [n_test, m], final parameters of the unperturbed run)``.
    """

    starts = {step for step, _ in occurrences}
    saved: dict[int, tuple[dict, dict]] = {}  # step -> (model and optimizer state before it), unperturbed run

    def run(remove: Occurrence | None) -> tuple[torch.Tensor, Params]:
        model = copy.deepcopy(net)
        optimizer = make_optimizer(list(model.parameters()))
        first = 0
        if remove is not None:  # identical to the unperturbed run before the removed step: start from there
            first = remove[0]
            model_state, optimizer_state = saved[first]
            model.load_state_dict(model_state)
            optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        for t in range(first, len(batches)):
            batch = batches[t]
            if remove is None and t in starts:
                saved[t] = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
            if lrs is not None:
                for group in optimizer.param_groups:
                    group["lr"] = float(lrs[t])
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none") / len(batch["y"])
            if remove is not None and remove[0] == t:
                keep = torch.ones(len(losses), dtype=losses.dtype)
                keep[remove[1]] = 1.0 - remove_fraction
                losses = losses * keep
            optimizer.zero_grad()
            losses.sum().backward()
            if clip is not None:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
        with torch.no_grad():
            return F.cross_entropy(model(x_test), y_test, reduction="none"), params_of(model)

    base, final = run(None)
    columns = [run(occurrence)[0] - base for occurrence in occurrences]
    return (torch.stack(columns, dim=1) if columns else base.new_zeros(len(base), 0)), final
