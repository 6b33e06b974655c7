"""The checks of a query's test loss (and of the train-end loss): one loss per sample, uncoupled samples, a
deterministic ``training_step``, and the declared loss reduction (method.md §2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .batch_trees import batch_rows, count_samples
from .batches import (IdFn, WeightFn, ids_or_none, muted_logging, reduction_weights, training_loss,
                      training_loss_or_refuse)
from .config import LossReduction
from .errors import ConfigError, LossReductionError
from .query_layers import grads_put_aside


def check_loss_count(losses: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Unit weights ``[B]`` of ``loss_fn``'s per-sample losses, once their count is checked against the batch.

    Raises:
        ConfigError: if ``losses`` does not hold one loss per sample of the batch the tracked layers saw.
    """
    if losses.shape[0] != batch_size:
        raise ConfigError(f"loss_fn returned {losses.shape[0]} losses for a batch of {batch_size} samples (the "
                          f"batch size the tracked layers saw): it must return one loss per sample of the batch, "
                          f"a Tensor[B] with B = {batch_size} (e.g. reduction='none'), not a mean or a "
                          "concatenation.")
    return torch.ones(batch_size, dtype=torch.float64)


def check_finite_weights(weights: torch.Tensor, ids: torch.Tensor, step: int) -> None:
    """Refuse NaN or infinite per-sample loss weights ``w_i`` from a ``loss_reduction`` callable (they would make the
    rows, or the recursion's ``w_i g_i`` terms, non-finite and be blamed on the gradients).

    Raises:
        ConfigError: naming the step, the samples and a fix for the usual cause (an empty mask's ``0 / 0``).
    """
    bad = ~torch.isfinite(weights)
    if bool(bad.any()):
        raise ConfigError(f"the loss_reduction callable returned {int(bad.sum())} non-finite weight(s) at step {step} "
                          f"(e.g. {float(weights[bad][0])}) for sample ids {ids[bad][:8].tolist()}: a weight like "
                          "mask / mask.sum() is NaN when a batch's mask is empty. Return finite weights (0 for a "
                          "sample the loss leaves out; e.g. mask / mask.sum().clamp_min(1)). Steps before this one "
                          "are kept in the store.")


def losses_of_a_pair(loss_fn: Any, module: nn.Module, batch: Any) -> torch.Tensor | None:
    """``loss_fn``'s losses of the batch's first two samples as a batch of their own (without gradients), for
    :func:`check_uncoupled`; ``None`` where that cannot be asked (fewer than three samples, a batch the rows cannot
    be taken from, or a ``loss_fn`` that fails on two samples): the check is then skipped, not the query."""
    try:
        n = count_samples(batch)
        if n < 3:
            return None
        with torch.no_grad():
            losses = loss_fn(module, batch_rows(batch, slice(0, 2), n))
    except Exception:  # noqa: BLE001 -- the query itself runs loss_fn on the whole batch and reports its errors
        return None
    return losses.detach() if isinstance(losses, torch.Tensor) and losses.shape == (2,) else None


def check_uncoupled(pair: torch.Tensor | None, losses: torch.Tensor) -> None:
    """Refuse a ``loss_fn`` whose per-sample losses depend on the batch's other samples: ``pair``
    (:func:`losses_of_a_pair`) must equal the first two of the whole batch's ``losses`` (within 1 % of the largest
    loss). The query takes a sample's test gradient from its own forward alone, so a coupled loss (contrastive,
    centred on the batch mean) would give each sample the gradient of every sample's terms through its forward.

    Raises:
        ConfigError: with both pairs of values and the fix.
    """
    if pair is None:
        return
    found, alone = losses[:2].detach().double().cpu(), pair.double().cpu()
    scale = float(losses.detach().abs().max())
    # 1 % of the largest loss: reduced-precision matmuls (TF32, set_float32_matmul_precision("medium")) round the
    # pair's and the batch's forwards apart by ~1e-3; a coupling changes a loss by far more
    if not torch.allclose(alone, found, rtol=0.0, atol=1e-2 * scale):  # False for NaN: refused as coupled
        raise ConfigError(
            f"loss_fn's per-sample losses depend on the other samples of the batch: the first two samples' losses are "
            f"{found.tolist()} in the whole batch and {alone.tolist()} as a batch of their own (a contrastive loss, a "
            "loss centred on the batch mean, batch statistics in the forward, or a random loss_fn). A test point's "
            "influence needs its own loss: return losses each of which depends on its sample alone (for a pairwise "
            "loss, one row per pair in the batch), or use exact_influence, which differentiates each loss itself.")


def check_deterministic(first: torch.Tensor | None, second: torch.Tensor | None) -> None:
    """Refuse a ``training_step`` whose loss on one batch differs between two calls (augmentation drawn with
    ``torch.rand``, noise or functional dropout outside eval-mode modules, an in-place edit of the batch's tensors):
    its test loss is random and its reduction uncheckable. Tolerance: relative 1e-4 (nondeterministic kernels).

    Args:
        first, second: the loss of two calls on the same batch (``None``: no loss returned, not checked).

    Raises:
        ConfigError: with both values and the fix (``loss_fn=``).
    """
    if first is None or second is None:
        return
    a, b = float(first.detach()), float(second.detach())
    if abs(a - b) > 1e-4 * max(abs(a), abs(b)) + 1e-12:  # False for NaN: unchecked
        raise ConfigError(
            f"training_step returned {a:.6g} and then {b:.6g} on the same two test samples, in eval mode: it is "
            "random (e.g. a data augmentation drawn with torch.rand, noise, or F.dropout(..., training=True) in "
            "training_step) or edits the batch's tensors in place (batch['x'].mul_(0.5): assign a new tensor "
            "instead), so a test loss taken through it is random too. Pass loss_fn(module, batch) -> "
            "Tensor[B], the deterministic per-sample test loss, e.g. loss_fn=lambda module, batch: "
            "F.cross_entropy(module(batch['x']), batch['y'], reduction='none') (the train-end report takes its "
            "reference loss from training_step: set report=None or make the augmentation depend on "
            "self.training, which queries turn off).")


def _single_sample_loss(module: nn.Module, batch: Any) -> tuple[torch.Tensor | None, Any]:
    """``training_step`` on a batch of one sample, for :func:`check_reduction` (:func:`training_loss`).

    Raises:
        ConfigError: if it fails there (often a ``.squeeze()`` that also drops the batch dimension), naming the
            check and the fixes.
    """
    return training_loss_or_refuse(
        module, batch, "a batch of one sample", "Queries run it on two samples of the batch alone, to check that its "
        "loss is the per-sample sum loss_reduction declares (method.md §2). Make training_step work on a one-sample "
        "batch (e.g. .squeeze(-1) instead of .squeeze(), which also drops the batch dimension), or pass "
        "loss_fn(module, batch) -> Tensor[B] of per-sample losses to the query (the train-end report has no "
        "loss_fn: it is skipped).")


@contextlib.contextmanager
def _rows_seen(module: nn.Module, weights: Sequence[torch.Tensor]) -> Iterator[list[int]]:
    """The first dimension of the input of every call, in the forwards run inside, of a submodule of ``module``
    holding one of ``weights`` (the tracked layers: they see the batch as their first dimension)."""
    tracked, seen = {id(weight) for weight in weights}, []

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor) and x.dim():
            seen.append(x.shape[0])

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules()
               if id(getattr(m, "weight", None)) in tracked]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _splits_into_samples(module: nn.Module, batch: Any, n: int, rows: int | None,
                         weights: Sequence[torch.Tensor]) -> bool:
    """Whether the batch's first two samples (``batch_rows``) are a part of it in proportion: where its tracked
    layers saw more ``rows`` than its ``n`` samples (views, items of several samples, tokens as samples), those of
    the two must see ``2 rows / n``. Several loaders' batches joined in ``training_step`` (a CombinedLoader's) are
    not: ``count_samples`` reads the first loader's, and the others' parts of other sizes stay whole."""
    if rows is None or rows <= n or n < 2:
        return True
    with _rows_seen(module, weights) as seen, torch.no_grad():
        training_loss(module, batch_rows(batch, slice(0, 2), n))
    return bool(seen) and seen[0] * n == 2 * rows


def check_reduction(module: nn.Module, batch: Any, reduction: LossReduction, weight_fn: WeightFn | None,
                    params: Sequence[torch.Tensor] = (), sample_ids: str | IdFn | None = None,
                    rows: int | None = None) -> None:
    """Refuse a ``training_step`` loss that is not ``L = sum_i w_i l_i`` with the recorded reduction's weights
    (method.md §2), tested on a group of the batch's first samples, two (``a, b``) unless the step drops some: with
    ``l_i = L({i}) / w_i({i})``, ``L({a, b})`` must be ``w_a l_a + w_b l_b`` under the weights of ``{a, b}``
    (within 5 %), and so must its gradient in ``params`` (the tracked weights). A sum declared as a mean, or the
    reverse, is off by a factor of two here; in the recording it scaled every curvature term and test gradient by
    the batch size. The gradients tell apart weights that the loss values cannot, where ``l_a`` and ``l_b`` are
    alike (a token mean over a padded batch declared as a mean: early in training every sequence's loss is near
    ``log(vocabulary)``). A step that filters its batch (hard-example mining) is tested on the first 2, 4 or 8
    samples of which it keeps two or more, the kept ones found by their ids (``sample_ids``); without ids, or where
    it keeps fewer, it is not checked, nor are samples of weight 0, batches of one sample, steps returning no
    loss and batches whose first samples are no part of them in proportion to the ``rows`` their tracked layers saw
    (:func:`_splits_into_samples`: several loaders' batches joined in ``training_step``; views of each sample,
    items of several samples and tokens as samples are checked). A second call on
    the group must give the same loss (:func:`check_deterministic`).

    Raises:
        LossReductionError: naming the declared reduction, the losses and the factor (or the gradients' deviation).
        ConfigError: if ``training_step`` is random.
    """
    n = count_samples(batch)
    with muted_logging(module):
        if not _splits_into_samples(module, batch, n, rows, params):
            return  # several loaders' batches joined: its first samples are no part of it
    params = [p for p in params if p.requires_grad]
    with torch.set_grad_enabled(bool(params)), muted_logging(module):
        group = _kept_group(module, batch, n, sample_ids,
                            lambda part, size: reduction_weights(reduction, part, size, weight_fn))
        if group is None:
            return
        size, total, used, kept = group
        alone, singles_used = zip(*(_single_sample_loss(module, batch_rows(batch, slice(i, i + 1), n)) for i in kept))
        with torch.no_grad():
            again, _ = training_loss(module, batch_rows(batch, slice(0, size), n))
    check_deterministic(total, again)
    if any(count_samples(single) != 1 for single in singles_used):
        return  # the step drops a sample alone that it keeps in the group: no loss of its own to compare
    single_w = [float(reduction_weights(reduction, s, 1, weight_fn)[0]) for s in singles_used]
    if total is None or None in alone or not all(w == w and w != 0 for w in single_w):  # NaN: a 0/0 weight
        return
    scales = [float(w) / sw for w, sw in zip(reduction_weights(reduction, used, len(kept), weight_fn), single_w)]
    value, values = float(total.detach()), [float(loss.detach()) for loss in alone]
    terms = [scale * loss for scale, loss in zip(scales, values)]
    where = ("on the batch's first two samples" if size == 2 else
             f"on the batch's first {size} samples{f' (the {len(kept)} it keeps)' if len(kept) < size else ''}")
    if abs(value - sum(terms)) > 0.05 * sum(map(abs, terms)) + 1e-12:  # False for a NaN loss: unchecked
        raise LossReductionError(
            f"training_step's loss is not the sum of per-sample losses weighted as loss_reduction="
            f"{reduction.value!r} declares: {where} it gives {value:.6g} together and "
            f"{', '.join(f'{v:.6g}' for v in values)} alone, where the declared weights predict {sum(terms):.6g}. "
            f"{_REDUCTION_FIX}"
        )
    deviation = _gradient_deviation(module, [total, *alone], scales, params)
    if deviation > 0.05:  # False for NaN: unchecked
        raise LossReductionError(
            f"training_step's loss is not the sum of per-sample losses weighted as loss_reduction="
            f"{reduction.value!r} declares: {where} the gradient of their joint loss differs by {deviation:.0%} "
            f"from the declared weights ({', '.join(f'{s:.4g}' for s in scales)} times each one's loss alone) "
            f"applied to their gradients alone (their loss values happen to agree). {_REDUCTION_FIX}"
        )


def _kept_group(module: nn.Module, batch: Any, n: int, sample_ids: str | IdFn | None,
                weigh: Callable[[Any, int], torch.Tensor]) -> tuple[int, torch.Tensor | None, Any, list[int]] | None:
    """The first 2, 4 or 8 samples of ``batch`` of which ``training_step`` keeps two or more: their size, loss, the
    batch as the step left it and the kept samples' positions in its row order (by their ids where they are read;
    without ids, only a group kept whole whose loss weights, ``weigh``, are in its order: a step that sorts its
    batch by a weighted property, the length of a sequence, cannot be matched then). ``None`` where there is none."""
    for size in (2, 4, 8):
        if size > n:
            return None
        group = batch_rows(batch, slice(0, size), n)
        total, used = training_loss(module, group)
        kept = count_samples(used)
        ids = (ids_or_none(group, sample_ids, size), ids_or_none(used, sample_ids, kept))
        if ids[0] is not None and ids[1] is not None and len(set(ids[0].tolist())) == size:
            position = {int(i): p for p, i in enumerate(ids[0].tolist())}
            if kept >= 2 and all(int(i) in position for i in ids[1].tolist()):
                return size, total, used, [position[int(i)] for i in ids[1].tolist()]
        elif kept == size:
            return (size, total, used, list(range(size))) if torch.equal(weigh(group, size), weigh(used, size)) \
                else None
        if kept == size:
            return None  # kept whole, but its ids do not match: not checked
    return None


_REDUCTION_FIX = ("The recording used the same weights, so its curvature and test gradients are off by that factor "
                  "and its scores are meaningless. Record again with the reduction your loss uses ('sum' for "
                  "reduction='sum', 'mean' for a mean over the batch, a callable for other weights: a token-level "
                  "mean over a padded batch, cross_entropy with ignore_index, weighs sequence i by its token count, "
                  "n_i / sum_j n_j, so declare loss_reduction=lambda batch: n / n.sum() with n the batch's token "
                  "counts); a loss that couples the samples (contrastive, batch statistics) has no per-sample data "
                  "value; a random training_step (an augmentation drawn in it) fails this check too: pass loss_fn= to "
                  "the query.")


def _gradient_deviation(module: nn.Module, losses: list[torch.Tensor], scales: list[float],
                        params: list[torch.Tensor]) -> float:
    """``|grad L({a,b}) - sum_i s_i grad L({i})| / sum_i |s_i grad L({i})|`` over ``params`` (0 when nothing to
    differentiate), for ``losses = [L({a,b}), L({a}), L({b})]`` and ``scales = s``. A full backward per loss with
    every ``.grad`` put aside, so a reentrant activation checkpoint is recomputed as in training. The difference is
    summed in place, one tensor per parameter (float32 or wider) next to the backward's own ``.grad``, however many
    losses: a float64 copy of the gradients per loss took 15 times the tracked weights' bytes."""
    if not params or not all(loss.requires_grad for loss in losses):
        return 0.0
    residual: list[torch.Tensor | None] = [None] * len(params)
    size = sum(_add_gradient(module, loss, params, residual, scale) for loss, scale in zip(losses[1:], scales))
    _add_gradient(module, losses[0], params, residual, -1.0)
    return 0.0 if size == 0 else _norm(r for r in residual if r is not None) / size


def _add_gradient(module: nn.Module, loss: torch.Tensor, params: list[torch.Tensor],
                  into: list[torch.Tensor | None], scale: float) -> float:
    """Add ``scale * grad loss`` to ``into`` (per parameter; ``None`` is zero) and return that term's norm."""
    with grads_put_aside(module):
        loss.backward()
        grads = [(k, param.grad.detach()) for k, param in enumerate(params) if param.grad is not None]
        for k, grad in grads:
            total = into[k]
            into[k] = grad.to(_wide(grad), copy=True).mul_(scale) if total is None else total.add_(grad, alpha=scale)
        return abs(scale) * _norm(grad for _, grad in grads)


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    """The 2-norm of several tensors together, each reduced in float32 or wider."""
    squares = [torch.linalg.vector_norm(t, dtype=_wide(t)).double().square() for t in tensors]
    return float(sum(squares)) ** 0.5 if squares else 0.0


def _wide(tensor: torch.Tensor) -> torch.dtype:
    """``tensor``'s dtype, at least float32 (a half-precision gradient's sums keep their precision)."""
    return torch.promote_types(tensor.dtype, torch.float32)
