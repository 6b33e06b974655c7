"""Curvature rows of the Gauss-Newton option: pseudo-gradients with labels drawn from the model (method.md §2).

For a softmax cross-entropy loss the Hessian in the logits is ``diag(p) - p p^T``. With a label ``y~`` drawn
from the model's own prediction ``p``, the output gradient ``v = p - onehot(y~)`` has ``E[v v^T] = diag(p) -
p p^T``, so the pseudo-gradient ``h = J^T v`` gives ``E[h h^T] = J^T (diag p - p p^T) J``: the Gauss-Newton
matrix of the per-sample loss, without bias, at the cost of one backward pass of activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import UnsupportedError

if TYPE_CHECKING:
    from .capture import CurvaturePass

#: A probe of the loss's curvature at the logits: ``(logits, v, H v)``, each ``[B, C]``.
Probe = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def label_uniforms(seed: int, step: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """One uniform number in ``[0, 1)`` per sample, a function of ``(seed, step, sample id)`` alone.

    Keyed by the sample rather than drawn from a stream, so the draw does not depend on how the step's samples
    are split over ranks or micro-batches (a data-parallel run equals the single-process one). Negative ids and
    seeds enter as their 64-bit two's complement (``SeedSequence`` takes non-negative integers; others unchanged).
    """
    keys = [[seed % 2**64, step, int(i) % 2**64] for i in sample_ids]
    states = [np.random.SeedSequence(key).generate_state(2, np.uint32) for key in keys]
    values = [(int(a) * 2**32 + int(b)) / 2.0**64 for a, b in states]
    return torch.tensor(values, dtype=torch.float64)


def sampled_label_grad(logits: torch.Tensor, sample_ids: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Output gradients ``v = p - onehot(y~)`` with ``y~ ~ softmax(logits)`` per row, ``[B, C]``.

    Args:
        logits: the last tracked layer's output ``[B, C]``, taken as the logits of a softmax cross-entropy.
        sample_ids: dataset indices ``[B]`` (key the draws).
        seed: the run's seed.
        step: optimizer step (keys the draws, so each step draws afresh).

    Raises:
        UnsupportedError: if the output is not ``[B, C]`` logits of ``B`` samples.
    """
    if logits.dim() != 2 or logits.shape[0] != sample_ids.numel():
        raise UnsupportedError(
            f"curvature='ggn' takes the last tracked layer's output as the [batch, classes] logits of a softmax "
            f"cross-entropy loss; it has shape {tuple(logits.shape)} for a batch of {sample_ids.numel()}. Make the "
            "classifier head the last tracked layer, or use curvature='empirical_fisher'."
        )
    probs = torch.softmax(logits.to(torch.float64), dim=1)
    uniforms = label_uniforms(seed, step, sample_ids).to(probs.device)
    labels = torch.searchsorted(probs.cumsum(dim=1), uniforms.unsqueeze(1)).clamp_max(probs.shape[1] - 1)
    onehot = torch.nn.functional.one_hot(labels.squeeze(1), probs.shape[1]).to(probs.dtype)
    return (probs - onehot).to(logits.dtype)


def check_cross_entropy(logits: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor) -> None:
    """Refuse a training loss whose gradient at ``logits`` is not that of a softmax cross-entropy (``'ggn'``'s
    assumption).

    For a sample's loss ``w CE(softmax(z), t)`` with any target distribution ``t`` (a label, or a smoothed one)
    the gradient at the logits is ``w (softmax(z) - t)``, so ``t = softmax(z) - grad / w`` must be a probability
    vector. Rounding of the logits' dtype is allowed for. The condition is necessary, not sufficient: a
    cross-entropy scaled by ``c <= 1`` per sample also passes.

    Args:
        logits: the last tracked layer's output ``[B, C]`` in the training step.
        grad: its gradient in the training backward ``[B, C]``.
        weights: the weight ``w`` of each sample's loss in that backward ``[B]`` (zero: not checked). Rows with
            non-finite gradients are not checked either: the finiteness check (or the grad scaler) handles them.

    Raises:
        UnsupportedError: naming how far the implied targets are from a probability vector.
    """
    eps = torch.finfo(grad.dtype).eps
    logits, grad, weights = (t.detach().to("cpu", torch.float64) for t in (logits, grad, weights))
    keep = (weights != 0) & torch.isfinite(grad).all(dim=1)
    targets = torch.softmax(logits[keep], dim=1) - grad[keep] / weights[keep].unsqueeze(1)
    if not targets.numel():
        return
    off_sum = float((targets.sum(dim=1) - 1).abs().max())
    below = float(-targets.min().clamp_max(0.0))
    if off_sum > 1e-3 + logits.shape[1] * 4 * eps or below > 1e-3 + 4 * eps:
        raise UnsupportedError(
            "curvature='ggn' needs the training loss to be a softmax cross-entropy of the last tracked layer's "
            f"output, weighted per sample as loss_reduction says; the gradient at that output implies targets "
            f"that are not probabilities (sum off by {off_sum:.2g}, entries down to {-below:.2g}). Use "
            "curvature='empirical_fisher' for other losses (curvature='none' for a regression with large residuals, "
            "where the empirical Fisher diverges), or declare per-sample (e.g. class) weights with "
            "loss_reduction=callable."
        )


@contextlib.contextmanager
def _captures_ignoring(shared: CurvaturePass) -> Iterator[None]:
    """Every capture of the Trainer ignores the backward passes run inside (they are no training backward)."""
    saved, shared.owner = shared.owner, _IGNORED
    try:
        yield
    finally:
        shared.owner = saved


_IGNORED = object()  # the owner of a backward no capture takes rows from


def check_single_logits(counts: dict[str, int]) -> UnsupportedError | None:
    """The refusal of ``curvature="ggn"`` where the last tracked layer (the logits) was called more than once in the
    micro-batch (``counts``: each layer's calls, the last called last): the curvature pass starts from its last
    output only, so a loss over several of its calls (two views of each sample, a model applied twice) would keep
    that call's curvature alone, silently (an audit: 0.49 of the trace)."""
    name, calls = next(reversed(counts.items()), ("", 0))
    if calls < 2:
        return None
    return UnsupportedError(f"curvature='ggn' takes the softmax cross-entropy of one output of the last tracked layer "
                            f"per micro-batch, and {name!r} was called {calls} times (several views of each sample, "
                            "or a model applied twice): the curvature of its other calls would be left out. Use "
                            "curvature='empirical_fisher' (the default), which takes every call.")


def probe_logit_curvature(loss: torch.Tensor, logits: torch.Tensor, shared: CurvaturePass) -> Probe | None:
    """The training loss's Hessian in the logits applied to a fixed sign vector ``v``: ``(logits, v, H v)`` by a
    double backward from ``loss`` to ``logits`` only (``[B, C]`` work; the training graph is kept), for
    :func:`check_logit_curvature`. ``None`` where it cannot be formed (a loss without a second derivative, or one
    that does not reach the logits): not checked then.
    """
    if logits.dim() != 2:
        return None
    signs = torch.randint(0, 2, tuple(logits.shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    v = signs.to(logits.device, logits.dtype)
    try:
        with _captures_ignoring(shared):
            (grad,) = torch.autograd.grad(loss, logits, create_graph=True, allow_unused=True)
            if grad is None:
                return None
            hv = torch.zeros_like(logits) if not grad.requires_grad else torch.autograd.grad(
                grad, logits, v, retain_graph=True, allow_unused=True)[0]
    except RuntimeError:  # a custom autograd function without a double backward
        return None
    return logits.detach(), v, torch.zeros_like(logits) if hv is None else hv.detach()


def check_logit_curvature(probe: Probe | None, weights: torch.Tensor) -> None:
    """Refuse a training loss whose curvature in the logits is not ``w (diag p - p p^T)``, the one the sampled
    labels stand for: ``H v`` of :func:`probe_logit_curvature` against ``w (p * v - p (p . v))`` per sample (5 %).

    The gradient check (:func:`check_cross_entropy`) passes a cross-entropy scaled by ``c < 1`` (``0.1 *
    cross_entropy``; ``KLDivLoss(reduction='mean')``, which also divides by the classes), whose curvature is ``c``
    times the rows'; such a run's GGN scores were meaningless (Spearman near 0). Terms linear in the logits (label
    smoothing, soft targets, a mixture of them) keep the curvature and pass.

    Args:
        probe: :func:`probe_logit_curvature`'s result (``None``: not checked).
        weights: the weight ``w`` of each sample's loss in that backward ``[B]`` (zero: not checked).

    Raises:
        UnsupportedError: naming the measured factor and the fixes.
    """
    if probe is None:
        return
    eps = torch.finfo(probe[2].dtype).eps
    logits, v, hv = (t.detach().to("cpu", torch.float64) for t in probe)
    weights = weights.detach().to("cpu", torch.float64)
    keep = (weights != 0) & torch.isfinite(hv).all(dim=1) & torch.isfinite(logits).all(dim=1)
    p, v, hv, w = torch.softmax(logits[keep], dim=1), v[keep], hv[keep], weights[keep].unsqueeze(1)
    expected = w * (p * v - p * (p * v).sum(dim=1, keepdim=True))
    norm = float(expected.norm())
    # rounding of the double backward: ~eps |w v| per entry, all there is where every prediction is near certain
    rounding = 8 * eps * float((w * v).norm())
    if norm <= rounding:
        return
    factor = float((hv * expected).sum()) / norm**2
    if float((hv - expected).norm()) > 0.05 * norm + rounding:
        raise UnsupportedError(
            f"curvature='ggn' needs the training loss's curvature in the last tracked layer's output to be a softmax "
            f"cross-entropy's weighted as loss_reduction says; this loss's is {factor:.3g} times that (measured by a "
            "double backward at the logits). A cross-entropy scaled by a constant (0.1 * cross_entropy, "
            "KLDivLoss(reduction='mean'), which also divides by the classes) or a loss with other terms in the "
            "logits gives Gauss-Newton rows off by that factor. Train the unscaled loss (with the learning rate "
            "scaled instead, which makes the same SGD run), use KLDivLoss(reduction='batchmean'), declare per-sample "
            "weights with loss_reduction=callable, or use curvature='empirical_fisher'."
        )


def check_autograd_reached(layers: set[str]) -> None:
    """Refuse ``'ggn'`` when tracked layers ran only with autograd off before the Gauss-Newton pass.

    That pass differentiates from the logits to the tracked layers' outputs; a layer whose forward ran without
    autograd (the first forward of ``torch.utils.checkpoint`` with ``use_reentrant=True``, which autograd
    recomputes only in a full backward) has no output to reach, so its curvature rows would be zeros.

    Raises:
        UnsupportedError: naming the layers and the fix.
    """
    if layers:
        raise UnsupportedError(
            f"curvature='ggn' cannot form the Gauss-Newton rows of {sorted(layers)}: the training step called "
            "them only with autograd off (activation checkpointing with use_reentrant=True, or torch.no_grad), so "
            "the Gauss-Newton pass cannot reach them. Use torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=False), or curvature='empirical_fisher'."
        )
