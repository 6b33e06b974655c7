"""Blocked forms of the backward recursion: several steps per pass over each ``M`` (recursion.py).

The step-by-step recursion reads and writes every ``[K, K]`` matrix at least once per step (three times for
plain SGD; about eight dense passes for the momentum form). Over a block of consecutive steps both forms below
touch the big matrices a fixed number of times per *block* and do the per-step work in ``[K, n]`` and
``[n, n]`` matrices (``n`` = rows in the block), with identical results up to round-off.
"""

from __future__ import annotations

import dataclasses

import torch

from .records import StepRecord


def block_sgd(
    accumulator: torch.Tensor | None,
    grads: torch.Tensor,
    scale: torch.Tensor,
    rows: torch.Tensor | None,
    sizes: list[int],
    update: bool,
    left: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-SGD recursion over a block of ``s`` steps with one product by ``M`` (module docstring).

    With ``M_0`` the accumulator before the block, steps ``j = 0..s-1`` from the latest, ``S_j = lr w g_j`` and
    ``R_j = lr w h_j`` (scaled curvature rows), the per-step updates ``M_j = M_{j-1} + U_j^T H_j`` unroll to::

        U_j + sum_{i<j} (R_j H_i^T) U_i = R_j - R_j M_0^T        # U_j = R_j - R_j M_{j-1}^T
        E_j = S_j - S_j M_0^T - sum_{i<j} (S_j H_i^T) U_i          # e = s - M_{j-1} s
        M_s = M_0 + U^T H

    a unit block-lower-triangular solve in the small Gram matrices (``n = sum B_j`` rows), so ``M`` is read
    twice per block instead of three times per step. For the empirical Fisher ``R = S`` and ``U = E`` (``H = G``,
    or the raw gradients where a clipped step's sources are projected: ``clipping.py``).

    Args:
        accumulator: ``M_0 [K, K]``, updated in place to ``M_s`` when ``update``; ``None`` is ``M_0 = 0``.
        grads: ``g [n, K]``, the steps' rows stacked from the latest step.
        scale: ``lr w`` per row, ``[n, 1]``, or per row and column, ``[n, K]``.
        rows: curvature rows ``h [n, K]`` (``grads`` itself for the empirical Fisher), ``None`` for no curvature.
        sizes: rows of each step, ``B_j``.
        update: fold the block into ``accumulator``.
        left: the curvature's left factor before scaling where it is not ``rows`` (clipped steps' projected rows;
            ``grads`` itself for the empirical Fisher then).

    Returns:
        The embeddings ``E [n, K]`` and the accumulator (``M_s``, or ``M_0`` when not ``update``).
    """
    scaled = grads * scale
    if rows is None:  # no curvature: M stays 0 and e = s
        zeros = grads.new_zeros(grads.shape[1], grads.shape[1]) if update and accumulator is None else None
        return scaled, accumulator if zeros is None else zeros
    step_of = torch.repeat_interleave(torch.arange(len(sizes), device=grads.device),
                                      torch.tensor(sizes, device=grads.device))
    earlier = step_of.unsqueeze(1) > step_of.unsqueeze(0)  # i < j: [n, n]
    embedding = scaled if accumulator is None else torch.addmm(scaled, scaled, accumulator.T, alpha=-1)
    left = rows if left is None else left
    if left is grads:
        lower = _earlier_products(scaled, rows, earlier)
        lower.diagonal().add_(1)
        updates = embedding = torch.linalg.solve_triangular(lower, embedding, upper=False, unitriangular=True)
    else:
        scaled_rows = left * scale
        lower = _earlier_products(scaled_rows, rows, earlier)
        lower.diagonal().add_(1)
        updates = scaled_rows if accumulator is None else torch.addmm(scaled_rows, scaled_rows, accumulator.T,
                                                                      alpha=-1)
        updates = torch.linalg.solve_triangular(lower, updates, upper=False, unitriangular=True)
        embedding = embedding - _earlier_products(scaled, rows, earlier) @ updates
    if update:
        accumulator = updates.T @ rows if accumulator is None else accumulator.addmm_(updates.T, rows)
    return embedding, accumulator


def _earlier_products(left: torch.Tensor, right: torch.Tensor, earlier: torch.Tensor, chunk: int = 256
                      ) -> torch.Tensor:
    """``(left @ right.T) * earlier`` ``[n, n]`` for a block-lower-triangular ``earlier`` (rows stacked from the
    latest step): each chunk of rows is multiplied only by the rows above its end, about half the products."""
    out = left.new_zeros(len(left), len(right))
    for lo in range(0, len(left), chunk):
        hi = min(lo + chunk, len(left))
        torch.mm(left[lo:hi], right[:hi].T, out=out[lo:hi, :hi])
    return out.mul_(earlier)


@dataclasses.dataclass(frozen=True)
class StepScalars:
    """One step's optimizer terms for one layer group, all scalars (recursion.py, ``BackwardRecursion``).

    Attributes:
        lr: learning rate ``lr_t``.
        momentum: ``mu_t``.
        gain: ``c_t``.
        weight_decay: ``lambda_t``.
        lead: Nesterov's ``l_t`` (1 for heavy ball).
        direct: Nesterov's ``d_t`` (0 for heavy ball).
        shrink: AdamW's decoupled decay ``lr lambda`` (0 otherwise).
    """

    lr: float
    momentum: float
    gain: float
    weight_decay: float
    lead: float = 1.0
    direct: float = 0.0
    shrink: float = 0.0


@dataclasses.dataclass
class Affine:
    """A ``[K, K]`` matrix ``a I + b M_0 + c S_0 + L R[:n]`` over a block (:func:`block_momentum`).

    Attributes:
        identity: ``a``, the coefficient of the identity.
        accumulator: ``b``, the coefficient of ``M_0``, the accumulator before the block.
        velocity: ``c``, the coefficient of ``S_0``, the velocity map before the block.
        factor: ``L [K, n]``, paired with the first ``n`` curvature rows ``R`` of the block (the rows of the
            steps processed so far).
    """

    identity: float
    accumulator: float
    velocity: float
    factor: torch.Tensor

    def combine(self, a: float, other: Affine, b: float, cols: int) -> Affine:
        """``a self + b other``, its low-rank factor over the first ``cols`` rows."""
        factor = torch.add(_prefix(self.factor, cols) * a, _prefix(other.factor, cols), alpha=b)
        return Affine(a * self.identity + b * other.identity, a * self.accumulator + b * other.accumulator,
                      a * self.velocity + b * other.velocity, factor)

    def shift(self, value: float) -> Affine:
        """``self + value I`` (in place)."""
        self.identity += value
        return self

    def dense(self, start: torch.Tensor | None, velocity: torch.Tensor | None, right: torch.Tensor | None
              ) -> torch.Tensor:
        """The matrix itself, ``[K, K]``, given ``M_0``, ``S_0`` (``None``: zero) and the curvature rows."""
        size, width = len(self.factor), self.factor.shape[1]
        out = self.factor @ right[:width] if right is not None and width else self.factor.new_zeros(size, size)
        if start is not None:
            out.add_(start, alpha=self.accumulator)
        if velocity is not None:
            out.add_(velocity, alpha=self.velocity)
        out.diagonal().add_(self.identity)
        return out


@dataclasses.dataclass(frozen=True)
class _Rows:
    """A block's rows ``X [n, K]`` and their products with ``M_0``, ``S_0`` and the curvature rows ``R``, each
    formed once per block (``None`` where that matrix is zero or absent)."""

    rows: torch.Tensor
    by_start: torch.Tensor | None
    by_velocity: torch.Tensor | None
    by_curvature: torch.Tensor | None

    @classmethod
    def of(cls, rows: torch.Tensor, start: torch.Tensor | None, velocity: torch.Tensor | None,
           right: torch.Tensor | None) -> _Rows:
        """``X`` with ``X M_0^T [n, K]``, ``X S_0^T [n, K]`` and ``X R^T [n, n]``."""
        return cls(rows, None if start is None else rows @ start.T, None if velocity is None else rows @ velocity.T,
                   None if right is None else rows @ right.T)

    def times(self, matrix: Affine, lo: int, hi: int) -> torch.Tensor:
        """``X[lo:hi] matrix^T``, where ``matrix``'s factor covers the first ``lo`` rows."""
        out = matrix.identity * self.rows[lo:hi]
        if self.by_start is not None:
            out = out + matrix.accumulator * self.by_start[lo:hi]
        if self.by_velocity is not None:
            out = out + matrix.velocity * self.by_velocity[lo:hi]
        if lo and self.by_curvature is not None:
            out = out + self.by_curvature[lo:hi, :lo] @ matrix.factor.T
        return out


def _prefix(factor: torch.Tensor, cols: int) -> torch.Tensor:
    """The first ``cols`` columns of ``factor``, zero-padded if it has fewer."""
    return factor[:, :cols] if factor.shape[1] >= cols else torch.nn.functional.pad(factor, (0, cols - factor.shape[1]))


def block_momentum(
    accumulator: torch.Tensor | None,
    velocity: torch.Tensor | None,
    next_momentum: float,
    sources: torch.Tensor,
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    terms: list[StepScalars],
    sizes: list[int],
    update: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The momentum form of ``BackwardRecursion`` (heavy ball, Nesterov, Adam/AdamW rows) over a block of steps.

    With scalar terms per step, every matrix of the recursion inside a block stays of the form
    ``a I + b M_0 + c S_0 + L R`` (:class:`Affine`): ``M_0`` and ``S_0`` are the accumulator and velocity map before
    the block and ``R`` the block's curvature rows. Each step then updates the three scalars and the ``[K, n]``
    factor ``L``; ``M_0`` and ``S_0`` are read once for the products ``X M_0^T``, ``X S_0^T`` of the block's rows,
    and ``M``, ``S`` are formed once at the end::

        A_t = I - M_t
        S_t = lr_t l_t A_t + mu_{t+1} S_{t+1}
        D_t = c_t S_t + lr_t d_t A_t
        e_{t,z} = D_t u_{t,z}                                   # u = w P g, the rows of ``sources``
        M_{t-1} = M_t + lambda_t D_t + shrink_t A_t + sum_z D_t q_{t,z} h_{t,z}^T

    Args:
        accumulator: ``M_0 [K, K]`` (``None``: zero).
        velocity: ``S_0 [K, K]``, the velocity map of the step after the block (``None``: zero).
        next_momentum: ``mu`` of the step after the block (any value when ``velocity`` is ``None``).
        sources: ``u [n, K]``: weighted (preconditioned) gradients, the steps stacked from the latest.
        left: ``q [n, K]``, weighted (preconditioned) curvature rows; ``sources`` itself for the empirical Fisher
            (``None`` without curvature).
        right: ``h [n, K]``, the curvature rows (``None`` without curvature).
        terms: each step's scalars, from the latest.
        sizes: rows of each step.
        update: return the new ``M`` and velocity map (``False``: no earlier step follows; both ``None``).

    Returns:
        ``(E [n, K], M, S)``: the embeddings, then ``M`` and the velocity map after the block's earliest step.
    """
    empty = sources.new_zeros(sources.shape[1], 0)
    u = _Rows.of(sources, accumulator, velocity, right)
    q = u if left is sources else None if left is None else _Rows.of(left, accumulator, velocity, right)
    mat = Affine(0.0, 1.0, 0.0, empty)  # M_t
    vel = Affine(0.0, 0.0, 1.0 if velocity is not None else 0.0, empty)  # S_{t+1}
    mu_next, lo, out = (next_momentum if velocity is not None else 0.0), 0, []
    for step, size in zip(terms, sizes):
        hi = lo + size
        rate, nesterov = step.lr * step.lead, step.lr * step.direct  # with A_t = I - M_t:
        vel = mat.combine(-rate, vel, mu_next, lo).shift(rate)  # S_t = rate A_t + mu S_{t+1}
        direct = vel.combine(step.gain, mat, -nesterov, lo).shift(nesterov)  # D_t = c S_t + lr d A_t
        out.append(u.times(direct, lo, hi))
        mat = mat.combine(1.0 - step.shrink, direct, step.weight_decay, lo).shift(step.shrink)  # + lambda D + s A
        if q is not None:  # + D_t q h^T: the step's own columns of L
            mat.factor = torch.cat([mat.factor, q.times(direct, lo, hi).T], dim=1)
        mu_next, lo = step.momentum, hi
    if not update:
        return torch.cat(out), None, None
    return torch.cat(out), mat.dense(accumulator, velocity, right), vel.dense(accumulator, velocity, right)


#: The optimizer terms a block of the momentum form takes as scalars (:class:`StepScalars`' fields).
SCALAR_TERMS = {field.name for field in dataclasses.fields(StepScalars)}


def group_scalars(layer_order: list[str], record: StepRecord, group: list[str]) -> StepScalars | None:
    """A record's rate and optimizer terms for ``group`` as scalars, or ``None`` if a term differs between its layers
    or is not one of :class:`~lightning_dve.recursion_blocks.StepScalars` (the second-moment channel's)."""
    values = {}
    for key, tensor in (("lr", record.lrs), *record.optim.items()):
        of = dict(zip(layer_order, tensor.tolist()))
        found = {of[name] for name in group}
        if len(found) != 1 or key not in SCALAR_TERMS:
            return None
        values[key] = found.pop()
    return StepScalars(**values) if {"momentum", "gain", "weight_decay"} <= set(values) else None
