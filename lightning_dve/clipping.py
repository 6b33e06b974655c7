"""Norm clipping's own response to a removed sample: the clipped update keeps its length and turns.

Where clipping binds, torch applies ``c g`` with ``c = C / ||g||`` (``g = sum_z w_z g_z`` over every parameter).
Removing occurrence ``z`` changes ``g`` by ``-w_z g_z`` and the applied update by

    d(c g) = -c (I - g^ g^T) w_z g_z,        g^ = g / ||g||

so the step moves the weights only along the part of ``g_z`` orthogonal to the batch's gradient; a sample
aligned with it changes the step's direction, not its length. The same projection acts on a change of the
gradient through the weights (the curvature's left factor). Folding ``c`` into the rate alone, as the recursion
did before, drops the ``g^ g^T`` term: on the fidelity problems with clipping binding on 61-86 % of the steps
that cost the test-agnostic estimators 0.09-0.34 of their Spearman (``benchmarks/fidelity.py``, setting ``clip``).

At the step's end every layer's rows are at hand: :func:`clip_dots` keeps ``g^ . r_z`` per sample (over all
tracked layers, from the projected rows: inner products are kept in expectation). The recursion then projects each
layer's rows with :func:`projected` (``r_z - u a_z`` with ``u = sum_z w_z r_z / (||g|| + 1e-6)``, the ``1e-6`` of
torch's factor): the tracked part of ``g^``, with ``||g||`` the norm clipping measured over every parameter.
"""

from __future__ import annotations

import dataclasses

import torch

from .records import StepRecord

def clip_dots(rows: dict[str, torch.Tensor], weights: torch.Tensor, norm: float) -> dict[str, torch.Tensor]:
    """``g^ . r_z`` per sample for each kind of rows (``{kind: [B, sum k_l]}`` over every tracked layer, the
    gradients under ``"grads"``), ``g^ = sum_z w_z g_z / norm`` from the gradients; ``{}`` when clipping did not
    bind (``norm == 0``)."""
    if not norm:
        return {}
    direction = (weights.to(torch.float64).unsqueeze(1) * rows["grads"].to(torch.float64)).sum(dim=0) / norm
    return {kind: values.to(torch.float64) @ direction for kind, values in rows.items()
            if kind in ("grads", "curvature")}


def projected(record: StepRecord) -> StepRecord:
    """``record`` with its sources and the curvature's left factor projected off the clipped step's gradient
    direction, as the recursion reads them (``preconditioned`` and ``curvature_preconditioned``; the raw rows stay
    the curvature's right factor; the plain-SGD and momentum forms both read them). Adam's preconditioned rows are
    projected with their own direction ``P g^``. Unchanged where clipping did not bind or the store predates this."""
    if not record.clip_norm or "grads" not in record.clip_dots:
        return record
    sources = record.preconditioned or record.grads

    def off(rows: dict[str, torch.Tensor], dots: torch.Tensor) -> dict[str, torch.Tensor]:
        """``r_z - u a_z`` per layer, ``u = sum_z w_z r_z / (||g|| + 1e-6)`` of ``sources`` (``P g^`` for Adam's
        rows): torch's factor is ``C / (||g|| + 1e-6)``, so ``d(c g) = c (dg - g (g^ . dg) / (||g|| + 1e-6))``."""
        out = {}
        for name, values in rows.items():
            weights = record.weights.to(values.device, torch.float64).unsqueeze(1)
            direction = (weights * sources[name].to(torch.float64)).sum(dim=0) / (record.clip_norm + 1e-6)
            out[name] = (values.to(torch.float64) - torch.outer(dots.to(values.device), direction)).to(values.dtype)
        return out

    left = record.curvature_preconditioned or record.curvature
    return dataclasses.replace(  # projected once: a record it returns is returned as it is
        record, preconditioned=off(sources, record.clip_dots["grads"]),
        curvature_preconditioned=off(left, record.clip_dots["curvature"]) if left else {}, clip_norm=0.0,
        clip_dots={})

