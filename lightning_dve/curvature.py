"""Curvature rows of the Gauss-Newton option: pseudo-gradients with labels drawn from the model (method.md §2).

For a softmax cross-entropy loss the Hessian in the logits is ``diag(p) - p p^T``. With a label ``y~`` drawn
from the model's own prediction ``p``, the output gradient ``v = p - onehot(y~)`` has ``E[v v^T] = diag(p) -
p p^T``, so the pseudo-gradient ``h = J^T v`` gives ``E[h h^T] = J^T (diag p - p p^T) J``: the Gauss-Newton
matrix of the per-sample loss, without bias, at the cost of one backward pass of activations.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import UnsupportedError


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
            "curvature='empirical_fisher' for other losses, or declare per-sample (e.g. class) weights with "
            "loss_reduction=callable."
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
