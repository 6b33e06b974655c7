"""Checks of the recursion's product of step factors: where it expands, the embeddings are not influences.

The embedding of occurrence ``(t, z)`` is ``(prod_{k>t} F_k) lr_t w g`` (method.md §2, Thm. 2), ``F_k = I - lr_k H_k``
for plain SGD with the step curvature ``H_k = sum_z w_z h_z h_z^T`` (the empirical Fisher or the Gauss-Newton rows,
positive semi-definite). ``F_k`` has eigenvalues ``1 - lr_k lambda``: it shrinks or keeps every direction unless
``a_k = lr_k lambda_max(H_k) > 2``, where it flips and stretches one by ``a_k - 1``. Training on the true Hessian
is itself unstable beyond that bound, so a curvature that crosses it often overstates the Hessian: the empirical
Fisher does where the gradients are large against the loss's curvature (a regression with large residuals:
``g g^T`` grows with the squared residual, the Hessian does not), and the product then grows geometrically, by
``1e24`` in a short MSE run (``tests/test_stability.py``). With heavy-ball momentum ``mu`` the linear dynamics are
stable up to ``a = 2 (1 + mu)``, with Nesterov's up to ``2 (1 + mu) / (1 + 2 mu)``; weight decay adds to
``lambda``, dampening and norm clipping scale the rate, and a clipped step's curvature is the recursion's
projected one. Adam's steps count as heavy ball with ``beta1`` at the bias-corrected rate on the preconditioned
curvature ``P^1/2 H P^1/2`` (its ``v`` held, its L2 decay left out).

:class:`ExpansionWatch` takes ``r_k = a_k / bound_k`` of every step, per group of layers that shares one ``M``,
from the ``[B, B]`` Gram matrix of the step's rows (or the ``[K, K]`` one where ``K < B``; no eigenvalues where its
trace or Frobenius norm already stays below the bound), and names steps whose embeddings are not finite. It warns
where the factors after a run's first step can stretch an embedding more than :data:`GROWTH_LIMIT` times in all,
``prod (2 r_k - 1)`` over the steps with ``r_k > 1`` (for plain SGD exactly the product of their largest stretches
``a_k - 1``): one step just above the bound is no reason to distrust the run.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field

import torch

from . import clipping
from .config import Curvature
from .store import StepRecord

#: The largest stretch of an embedding by the factors after the first step that the watch lets pass silently.
GROWTH_LIMIT = 10.0
_ADVICE = {
    Curvature.EMPIRICAL_FISHER: "The empirical Fisher overstates the loss's Hessian where the gradients are large "
    "against its curvature (a regression with large residuals): use curvature='none' for such a loss "
    "(curvature='ggn' for a softmax cross-entropy)",
    Curvature.GGN: "The steps are large against the loss's own (Gauss-Newton) curvature, beyond where a first-order "
    "product of step factors holds",
}


@dataclass
class ExpansionWatch:
    """What the recursion's steps say about its product's stability (module docstring).

    Attributes:
        groups: the layer groups whose ``M`` this rank runs.
        layer_order: every tracked layer in manifest order (the order of ``StepRecord.lrs``).
        curvature: the recursion's curvature (``NONE``: the product is the identity, nothing to check).
        expanding: ``{step: r}`` of each step whose factor expands (``r > 1``).
        non_finite: the steps with a non-finite embedding.
    """

    groups: list[list[str]]
    layer_order: list[str]
    curvature: Curvature
    expanding: dict[int, float] = field(default_factory=dict)
    non_finite: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)  # segments: threads

    def observe(self, records: list[StepRecord], embeddings: list[dict[str, torch.Tensor]]) -> None:
        """Note each of ``records``' ratio ``r`` (module docstring) where it exceeds 1, and the steps whose
        ``embeddings`` (``{layer: [B, k_l]}`` of each record) are not finite."""
        ratios = [self.ratio(record) for record in records]
        # one pass, no copy: a float64 sum is finite exactly where every value is (float32 rows cannot overflow it;
        # float64 rows only where their sum passes 1e308)
        sums = [rows.sum(dtype=torch.float64) for e in embeddings for rows in e.values()]
        finite = torch.stack(sums).isfinite().cpu().split([len(e) for e in embeddings]) if sums else ()
        steps = [record.step for record, ok in zip(records, finite) if not bool(ok.all())]
        with self._lock:
            for record, ratio in zip(records, ratios):
                if ratio > 1.0:
                    self.expanding[record.step] = max(ratio, self.expanding.get(record.step, 0.0))
            self.non_finite.extend(steps)

    def ratio(self, record: StepRecord) -> float:
        """``max over groups of a / bound`` of one step (module docstring); 0 where it is not judged."""
        if self.curvature is Curvature.NONE:
            return 0.0
        left_of, right_of = self._rows(clipping.projected(record), record)
        terms = {key: dict(zip(self.layer_order, values.tolist())) for key, values in record.optim.items()}
        rates = dict(zip(self.layer_order, record.lrs.tolist()))
        worst = 0.0
        for group in self.groups:
            scale, decay, bound = zip(*(_layer_terms(terms, rates, name) for name in group))
            # the factor is I - S H, S the layers' rates on their columns: lambda(S H) = lambda(S^1/2 H S^1/2)
            roots = torch.cat([torch.full((right_of[name].shape[1],), rate**0.5, dtype=torch.float64)
                               for name, rate in zip(group, scale)]).to(right_of[group[0]].device)
            right = torch.cat([right_of[name].to(torch.float64) for name in group], dim=1) * roots
            left = right if left_of is right_of else torch.cat([left_of[n].to(right) for n in group], dim=1) * roots
            shift = max(rate * d for rate, d in zip(scale, decay))
            top = _largest_eigenvalue(left, right, record.weights.to(right), min(bound) - shift)
            worst = max(worst, (top + shift) / min(bound))
        return worst

    def _rows(self, projected: StepRecord, record: StepRecord
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The curvature's left and right rows as the recursion takes them: the right ones the raw rows, the left
        ones a clipped step's projected rows and Adam's preconditioned ``P h`` (exact mode: ``h`` times ``P``)."""
        ggn = self.curvature is Curvature.GGN
        right = record.curvature if ggn else record.grads
        left = (projected.curvature_preconditioned if ggn else projected.preconditioned) or right
        precond = record.vectors.get("precond")
        if precond:  # exact-mode Adam: a per-coordinate rate
            left = {name: rows * precond[name].to(rows) for name, rows in left.items()}
        return left, right

    def growth(self, first_step: int) -> float:
        """``prod (2 r - 1)`` over the expanding steps after ``first_step`` (whose factor multiplies nothing)."""
        return math.prod(2.0 * r - 1.0 for step, r in self.expanding.items() if step != first_step)

    def warn(self, steps: list[int]) -> None:
        """Warn once if the factors can stretch an embedding beyond :data:`GROWTH_LIMIT`, and about non-finite
        embeddings, out of the recorded ``steps``."""
        growth = self.growth(steps[0]) if steps else 1.0
        if growth > GROWTH_LIMIT:
            step, worst = max(self.expanding.items(), key=lambda item: item[1])
            warnings.warn(
                f"curvature={self.curvature.value!r}: at {len(self.expanding)} of {len(steps)} steps (first "
                f"{min(self.expanding)}; largest at step {step}, {worst:.3g} times the bound) the recursion's step "
                "factor expands (lr * lambda_max beyond 2, or the momentum form's stability bound), and together "
                f"they can stretch earlier steps' embeddings {growth:.3g}-fold: their scores can be orders of "
                f"magnitude too large, with arbitrary sign. {_ADVICE[self.curvature]}; exact_influence(...) or "
                "embeddings='replay' follow the exact dynamics, or train with a smaller learning rate.",
                stacklevel=2)
        if self.non_finite:
            warnings.warn(
                f"the embeddings of {len(self.non_finite)} of {len(steps)} steps (first {min(self.non_finite)}) are "
                "not finite (inf or NaN): every score with those occurrences is NaN or inf. The recursion overflowed "
                "(see the warning about expanding steps, if any; the stored rows keep their range in every storage "
                "dtype). Use curvature='none', exact_influence(...) or embeddings='replay'.", stacklevel=2)


def _layer_terms(terms: dict[str, dict[str, float]], rates: dict[str, float], name: str
                 ) -> tuple[float, float, float]:
    """``(rate, weight decay, bound)`` of one layer's step: the rate on the curvature, the decay added to its
    eigenvalues and the largest stable ``rate * lambda`` (plain SGD, heavy ball, Nesterov; optim.py's terms; Adam
    as heavy ball with ``beta1`` on its preconditioned curvature, adam.py's terms, its decay left out)."""
    if not terms:
        return rates[name], 0.0, 2.0
    gain, direct = terms["gain"][name], terms.get("direct", {}).get(name, 0.0)
    if not gain:  # a layer with no velocity term: the gradient applied directly (or no step)
        return rates[name] * abs(direct), 0.0, 2.0
    momentum = terms["momentum"][name]
    decay = 0.0 if "shrink" in terms else abs(terms["weight_decay"][name])  # Adam's L2 decay is preconditioned
    if direct:  # Nesterov: the gradient at rate lr * clip, the velocity on top
        return rates[name] * abs(direct), decay, 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return rates[name] * abs(gain), decay, 2.0 * (1.0 + momentum)


def _largest_eigenvalue(left: torch.Tensor, right: torch.Tensor, weights: torch.Tensor, enough: float) -> float:
    """``lambda_max(sum_z w_z l_z r_z^T)``: where the sides are one, from the smaller of its ``[B, B]`` and
    ``[K, K]`` forms; where they differ (Adam's ``P h`` against ``h``), from the ``[B, B]`` form ``R P R^T``,
    symmetric for a per-coordinate ``P`` (its symmetric part for the rank-1 ``P`` of projected rows; the
    ``[K, K]`` form ``P H`` is not). 0 when its trace or Frobenius norm is at most ``enough`` (then so is it)."""
    if not right.numel():
        return 0.0
    weights = weights.unsqueeze(1)
    if bool((weights < 0).any()):
        return float(torch.linalg.eigvals(weights * (right @ left.T)).real.max())
    if float((weights * left * right).sum()) <= enough:
        return 0.0
    root_left, root_right = left * weights.sqrt(), right * weights.sqrt()
    if left is right and right.shape[0] > right.shape[1]:
        gram = root_left.T @ root_right
    else:
        gram = root_right @ root_left.T
        gram = gram if left is right else (gram + gram.T) / 2
    if float(torch.linalg.matrix_norm(gram)) <= enough:  # the Frobenius norm bounds it too, closer
        return 0.0
    return float(torch.linalg.eigvalsh(gram)[-1])
