"""Checks of the recursion's product of step factors: where it expands, the embeddings are not influences.

The embedding of occurrence ``(t, z)`` is ``(prod_{k>t} (I - lr_k H_k)) lr_t w g`` (method.md §2, Thm. 2). With a
positive semi-definite step curvature ``H_k = sum_z w_z h_z h_z^T`` (the empirical Fisher or the Gauss-Newton
rows, plain SGD) each factor has eigenvalues ``1 - lr_k lambda`` with ``lambda >= 0``: the product shrinks or keeps a
direction unless ``lr_k lambda_max(H_k) > 2``, where that factor flips and stretches it. Training itself is
stable only below that bound for the true Hessian, so a curvature that crosses it overstates the Hessian; the
empirical Fisher does so when the gradients are large against the loss's curvature (a regression loss with large
residuals: ``g g^T`` grows with the squared residual, the Hessian does not), and the product then grows
geometrically, by up to ``1e23`` in a short MSE run (``tests/test_stability.py``).

:class:`ExpansionWatch` computes ``lr_k lambda_max(H_k)`` of every plain-SGD step the recursion reads, per group of
layers that shares one ``M``, from the ``[B, B]`` Gram matrix of the step's rows (``B^2 K`` flops, against the
recursion's ``B K^2``), and counts steps whose embeddings are not finite; :meth:`ExpansionWatch.warn` says what was
found, once, at the end of the recursion.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field

import torch

from .config import Curvature
from .store import StepRecord

#: ``lr lambda_max`` above which a step factor ``I - lr H`` expands (an eigenvalue below -1).
EXPANDING = 2.0


@dataclass
class ExpansionWatch:
    """What the recursion's steps say about its product's stability (module docstring).

    Attributes:
        groups: the layer groups whose ``M`` this rank runs.
        layer_order: every tracked layer in manifest order (the order of ``StepRecord.lrs``).
        curvature: the recursion's curvature (``NONE``: the product is the identity, nothing to check).
        expanding: ``(lr lambda_max, step)`` of each step above :data:`EXPANDING`.
        non_finite: the steps with a non-finite embedding.
    """

    groups: list[list[str]]
    layer_order: list[str]
    curvature: Curvature
    expanding: list[tuple[float, int]] = field(default_factory=list)
    non_finite: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)  # segments: threads

    def observe(self, record: StepRecord, embeddings: dict[str, torch.Tensor]) -> None:
        """Note ``record``'s largest ``lr lambda_max`` over the groups (plain SGD) and non-finite embeddings."""
        value = self._largest(record)
        finite = all(bool(e.isfinite().all()) for e in embeddings.values())
        with self._lock:
            if value > EXPANDING:
                self.expanding.append((value, record.step))
            if not finite:
                self.non_finite.append(record.step)

    def _largest(self, record: StepRecord) -> float:
        """``max over groups of max(rate) lambda_max(sum_z w_z h_z h_z^T)``: the eigenvalues of ``diag(w) R R^T``
        (``R`` the ``[B, K]`` rows), which are those of the ``[K, K]`` sum; 0 for steps with optimizer terms."""
        if self.curvature is Curvature.NONE or record.optim or record.preconditioned:
            return 0.0
        rows_of = record.curvature if self.curvature is Curvature.GGN else record.grads
        rates = dict(zip(self.layer_order, record.lrs.tolist()))
        largest = 0.0
        for group in self.groups:
            rows = torch.cat([rows_of[name].to(torch.float64) for name in group], dim=1)
            weights = record.weights.to(rows).unsqueeze(1)
            if not rows.shape[0]:
                continue
            if bool((weights >= 0).all()):  # the symmetric form sqrt(w) R R^T sqrt(w): eigvalsh
                root = rows * weights.sqrt()
                top = float(torch.linalg.eigvalsh(root @ root.T)[-1])
            else:
                top = float(torch.linalg.eigvals(weights * (rows @ rows.T)).real.max())
            largest = max(largest, max(rates[name] for name in group) * top)
        return largest

    def warn(self, total: int) -> None:
        """Warn once about expanding steps and non-finite embeddings, if any, out of ``total`` steps."""
        if self.expanding:
            worst, step = max(self.expanding)
            first = min(s for _, s in self.expanding)
            warnings.warn(
                f"curvature={self.curvature.value!r}: at {len(self.expanding)} of {total} steps (first {first}; "
                f"largest at step {step}, lr * lambda_max = {worst:.3g}) the step factor I - lr H of the recursion "
                f"has an eigenvalue below -1 (lr * lambda_max > {EXPANDING:g}), so the product over later steps "
                "stretches and flips the earlier steps' embeddings: their scores can be orders of magnitude too "
                "large, with arbitrary sign. The curvature overstates the loss's Hessian (the empirical Fisher "
                "does for large gradients against the curvature, e.g. a regression loss with large residuals). "
                "Use curvature='none' for such a loss (curvature='ggn' for a softmax cross-entropy), "
                "emb.exact_influence(...) or embeddings='replay' for exact dynamics, or a smaller learning rate.",
                stacklevel=2)
        if self.non_finite:
            warnings.warn(
                f"the embeddings of {len(self.non_finite)} of {total} steps (first {min(self.non_finite)}) are not "
                "finite (inf or NaN): every score with those occurrences is NaN or inf. The recursion overflowed "
                "(see the warning about expanding steps, if any) or the recorded gradients were already too large "
                "for the storage dtype. Use curvature='none', exact_influence(...), or a float32 store "
                "(storage_dtype='float32').", stacklevel=2)
