"""The backward recursion that turns recorded gradients into data value embeddings (method.md §2, Thm. 2).

With the step Hessian written as ``H_k = sum_z w_{k,z} h_{k,z} h_{k,z}^T``::

    M = 0
    for t = T-1 down to 0:
        s_{t,z} = lr_t w_{t,z} g_{t,z}
        e_{t,z} = s_{t,z} - M s_{t,z}            # every z in B_t uses the same M
        M       = M + sum_z lr_t w_{t,z} (h_{t,z} - M h_{t,z}) h_{t,z}^T

where the curvature rows ``h`` are the gradients themselves for the empirical Fisher (the paper's choice; the
update is then ``M += sum_z e_{t,z} g_{t,z}^T``), pseudo-gradients for the Gauss-Newton matrix, and absent for
``Curvature.NONE`` (``M`` stays 0)
so that ``I - M_t = prod_{k=T-1..t+1} (I - lr_k H_k)`` and ``e_{t,z}`` is the embedding of occurrence (t, z).
``M`` is not symmetric; the product is ``M s``. Layers are grouped: one ``M`` per layer (block-diagonal) or
one for all layers (:class:`~lightning_dve.config.AccumulatorLayout`). ``M`` is held in float32 or wider.
"""

from __future__ import annotations

import torch

from . import clipping
from .config import AccumulatorLayout, Curvature
from .recursion_blocks import StepScalars, block_momentum, block_sgd, group_scalars
from .store import StepRecord


def layer_groups(layer_names: list[str], layout: AccumulatorLayout) -> list[list[str]]:
    """Groups of layers that share one accumulation matrix (``layout`` resolved, not ``AUTO``)."""
    layout = AccumulatorLayout.parse(layout)
    assert layout is not AccumulatorLayout.AUTO, "resolve layout 'auto' (DVEConfig.resolved) before grouping"
    if layout is AccumulatorLayout.FULL:
        return [list(layer_names)] if layer_names else []  # a DDP rank may own no layer
    return [[name] for name in layer_names]


class BackwardRecursion:
    """State of the recursion (the accumulation matrices ``M``), advanced one step at a time backwards.

    Plain SGD is the loop above. SGD with momentum ``mu``, dampening ``tau`` and weight decay ``lambda``
    (``torch.optim.SGD``) carries the velocity as state: with ``A_t = I - M_t`` the map of a parameter change
    after step ``t`` to the final parameters and ``S_t`` the map of a velocity change at step ``t``, going
    backwards from ``A = I``, ``S = 0``::

        S_t     = A_t Lambda_t diag(l_t) + S_{t+1} diag(mu_{t+1})  # a velocity change is applied at later rates
        D_t     = S_t diag(c_t) + A_t Lambda_t diag(d_t)           # the map of a gradient change at step t
        e_{t,z} = D_t (w_{t,z} g_{t,z})
        M_{t-1} = M_t + D_t diag(lambda) + sum_z D_t (w_{t,z} h_{t,z}) h_{t,z}^T

    with ``c_t = clip_t (1 - tau)`` (no dampening on the buffer's first step), ``l_t = 1`` and ``d_t = 0`` for
    heavy-ball momentum, ``l_t = mu_t`` and ``d_t = clip_t`` for Nesterov (its update ``g' + mu v`` uses the
    gradient directly and the velocity scaled by ``mu``); ``lambda`` is stored divided by ``clip_t`` (torch
    clips the gradient, not the decay). It reduces to the SGD loop when ``mu = lambda = 0``. Terms come from
    ``record.optim`` (per layer; ``gain`` is ``c``, ``lead`` is ``l``, ``direct`` is ``d``).

    Adam and AdamW (adam.py) are this form with the preconditioner ``P``: in exact mode as a per-coordinate rate
    (``Lambda_t = diag(lr_t P_t)``, ``record.vectors["precond"]``); in projected mode on preconditioned rows (the
    source and the left factor of the curvature become ``P g`` and ``P h``: ``record.preconditioned``,
    ``record.curvature_preconditioned``). AdamW's decoupled decay adds ``M_{t-1} += A_t diag(shrink_t)``
    (``shrink = lr lambda``). The second-moment channel (``record.vectors["kappa"]``) adds a third map ``V``
    (:meth:`_second_moment_map`): ``e -= V (w v_gain g' * g)`` and ``M_{t-1} -= sum_z V (w v_gain g' * h) h^T``.

    It computes where the records' rows are (:meth:`StepRecord.to`: the training device at train end) and
    returns embeddings and factors on the CPU, where they are written.

    Args:
        layer_order: every tracked layer in manifest order (the order of ``StepRecord.lrs``).
        layout: accumulation-matrix layout, which groups the layers.
        owned: run only the groups of these layers (a rank's share); ``None`` runs every group.
        curvature: the step Hessian: the gradients, the records' pseudo-gradients (``StepRecord.curvature``), or
            none.
    """

    def __init__(
        self,
        layer_order: list[str],
        layout: AccumulatorLayout,
        owned: list[str] | None = None,
        curvature: Curvature = Curvature.EMPIRICAL_FISHER,
    ) -> None:
        self.layer_order = list(layer_order)
        self.curvature = Curvature.parse(curvature)
        self.groups = [g for g in layer_groups(self.layer_order, layout) if owned is None or g[0] in owned]
        self.accumulators: list[torch.Tensor | None] = [None] * len(self.groups)  # M per group
        self.velocity_maps: list[torch.Tensor | None] = [None] * len(self.groups)  # S_{t+1} per group
        self.next_momentum: list[torch.Tensor | None] = [None] * len(self.groups)  # mu_{t+1} per column
        self.second_moment_maps: list[torch.Tensor | None] = [None] * len(self.groups)  # V_{t+1} per group (Adam)
        self.next_decay: list[torch.Tensor | None] = [None] * len(self.groups)  # beta2_{t+1} per column
        self._spare: list[list[torch.Tensor]] = [[] for _ in self.groups]  # [K, K] to reuse (_work)

    def _columns(self, record: StepRecord, group: list[str], values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-layer values ``[L]`` spread over the group's columns ``[K]``."""
        of = dict(zip(self.layer_order, values.tolist()))
        device = record.grads[group[0]].device
        return torch.cat([torch.full((record.grads[n].shape[1],), of[n], dtype=dtype, device=device) for n in group])

    def _row_scale(self, record: StepRecord, rates: dict[str, float], group: list[str], dtype: torch.dtype
                   ) -> torch.Tensor:
        """``lr w`` of a record's rows (``rates``: its rate per layer): ``[B, 1]`` when the group's layers share
        one rate, else ``[B, K]``."""
        weights = record.weights.to(dtype).unsqueeze(1)
        shared = {rates[name] for name in group}
        if len(shared) == 1:
            return weights * shared.pop()
        return self._columns(record, group, record.lrs, dtype) * weights

    def step(self, record: StepRecord) -> dict[str, torch.Tensor]:
        """Embed one step's occurrences and fold the step into the state (the loops above).

        Args:
            record: the step; ``record.lrs[l]`` is the learning rate of layer ``l`` (per-group rates give a
                diagonal ``Lambda``), ``record.optim`` the optimizer terms.

        Returns:
            ``{layer: e [B, k_l]}`` for the layers of :attr:`groups`, in the accumulation dtype.
        """
        out: dict[str, torch.Tensor] = {}
        record = clipping.projected(record)  # a clipped step's rows off its gradient direction (clipping.py)
        for index, group in enumerate(self.groups):
            dtype = torch.promote_types(record.grads[group[0]].dtype, torch.float32)
            grads = _cat(record.grads, group, dtype)  # g: [B, K]
            lr = self._columns(record, group, record.lrs, dtype)
            if self.accumulators[index] is None:
                self.accumulators[index] = grads.new_zeros(grads.shape[1], grads.shape[1])
            rows = self._curvature_rows(record, group, grads)
            if record.optim:
                embedding = self._momentum_step(index, record, group, grads, rows, lr)
            else:  # plain SGD: preconditioned rows only as a clipped step's projected ones (clipping.py)
                sources, left = _sources_and_left([record], group, grads, rows)
                embedding = self._sgd_step(index, lr * record.weights.to(dtype).unsqueeze(1), sources, rows, left)
            out.update(zip(group, embedding.cpu().split([record.grads[n].shape[1] for n in group], dim=1)))
        return out

    def _curvature_rows(self, record: StepRecord, group: list[str], grads: torch.Tensor) -> torch.Tensor | None:
        """The rows ``h [B, K]`` of the step Hessian (module docstring); ``grads`` itself for the empirical Fisher."""
        if self.curvature is Curvature.NONE:
            return None
        if self.curvature is Curvature.EMPIRICAL_FISHER:
            return grads
        return _cat(record.curvature, group, grads.dtype)

    def _sgd_step(
        self, index: int, scale: torch.Tensor, grads: torch.Tensor, rows: torch.Tensor | None,
        left: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``e = s - M s`` with ``s = lr w g``, then ``M += sum_z lr w (q - M q) h^T`` (in place), ``q = h`` unless
        ``left`` gives it (a clipped step's projected rows: ``clipping.py``).

        Args:
            scale: ``lr w`` per row and column, ``[B, K]`` (or broadcastable).
            grads: the sources ``g``; ``rows``: the curvature's ``h`` (``None``: none); ``left``: its ``q``.
        """
        accumulator = self.accumulators[index]
        assert accumulator is not None
        scaled = grads * scale
        embedding = torch.addmm(scaled, scaled, accumulator.T, alpha=-1)
        left = rows if left is None else left
        if left is grads:
            accumulator.addmm_(embedding.T, rows)
        elif rows is not None:
            scaled = left * scale
            accumulator.addmm_(torch.addmm(scaled, scaled, accumulator.T, alpha=-1).T, rows)
        return embedding

    def _momentum_step(
        self,
        index: int,
        record: StepRecord,
        group: list[str],
        grads: torch.Tensor,
        rows: torch.Tensor | None,
        lr: torch.Tensor,
    ) -> torch.Tensor:
        """One step of the momentum form (class docstring)."""
        accumulator = self.accumulators[index]
        assert accumulator is not None
        columns = {k: self._columns(record, group, v, grads.dtype) for k, v in record.optim.items()}
        if "precond" in record.vectors:  # exact-mode Adam: the rate of each coordinate is lr P
            lr = lr * _cat_vector(record.vectors["precond"], group, grads.dtype)
        # [K, K] maps, each made once and then updated in place (K = 2410 in float64 for exact-mode Adam on the
        # fidelity MLP: every extra temporary is another pass over 46 MB), into matrices earlier steps left
        # (:meth:`_work`)
        transfer = torch.neg(accumulator, out=self._work(index, accumulator))
        transfer.diagonal().add_(1)  # A_t = I - M
        step_map = torch.mul(transfer, lr, out=self._work(index, accumulator))  # A_t Lambda_t
        # without Nesterov's lead, S_t starts as A_t Lambda_t itself (its direct term, which reads it, comes with lead)
        velocity = (torch.mul(step_map, columns["lead"], out=self._work(index, accumulator)) if "lead" in columns
                    else step_map)
        following = self.velocity_maps[index]
        if following is not None:
            velocity.addcmul_(following, self.next_momentum[index])  # + S_{t+1} diag(mu_{t+1})
        # D_t = S_t diag(c_t) (+ A_t Lambda_t diag(clip_t), Nesterov)
        direct = torch.mul(velocity, columns["gain"], out=self._work(index, accumulator))
        if "direct" in columns:
            direct.addcmul_(step_map, columns["direct"])
        weights = record.weights.to(grads.dtype).unsqueeze(1)
        second = self._second_moment_map(index, record, group, transfer, columns)

        def to_final(plain: torch.Tensor, preconditioned: torch.Tensor) -> torch.Tensor:
            """``D (w P x) - V (w v_gain g' * x)`` per row: a gradient-like change's effect on the final weights."""
            out = (preconditioned * weights) @ direct.T
            return out if second is None else out - (plain * second[1] * weights) @ second[0].T

        sources = _cat(record.preconditioned, group, grads.dtype) if record.preconditioned else grads  # P g (Adam)
        # e = D (w P g) (- V (w v_gain g' * g)); the second-moment channel is exact mode's, where the sources are the
        # gradients themselves, projected on a clipped step (clipping.py) as the change of g' entering v is
        embedding = to_final(sources, sources)
        accumulator.addcmul_(direct, columns["weight_decay"])
        if second is not None:  # Adam's L2 decay also moves v: - V diag(v_gain g' lambda)
            accumulator.addcmul_(second[0], second[1] * columns["weight_decay"], value=-1)
        if "shrink" in columns:  # decoupled decay: A_{t-1} = A_t diag(1 - lr lambda) - ...
            accumulator.addcmul_(transfer, columns["shrink"])
        if rows is grads:
            accumulator.addmm_(embedding.T, grads)
        elif rows is not None:
            rows_q = _cat(record.curvature_preconditioned, group, grads.dtype) if record.preconditioned else rows
            accumulator.addmm_(to_final(rows_q, rows_q).T, rows)
        self.velocity_maps[index], self.next_momentum[index] = velocity, columns["momentum"]
        done = (transfer, direct, following, step_map)  # S_{t+1} is read for the last time above
        self._spare[index] += [m for m in done if m is not None and m is not velocity]
        return embedding

    def _work(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """A matrix of ``like``'s shape for group ``index``: one an earlier step of the momentum form left, else new
        (a new ``[K, K]`` of 46 MB is faulted into memory page by page, ~10 ms on the CPU: more than a pass over
        it)."""
        spare = self._spare[index]
        return spare.pop() if spare else torch.empty_like(like)

    def block(self, records: list[StepRecord], update: bool = True) -> list[dict[str, torch.Tensor]]:
        """Embed several consecutive steps at once; equal to :meth:`step` on each, latest first (round-off).

        Plain-SGD steps go through :func:`~lightning_dve.recursion_blocks.block_sgd` (one pass over each ``M`` per
        block instead of three per step), steps with momentum, decay or Adam rows whose terms are one scalar per
        group through :func:`~lightning_dve.recursion_blocks.block_momentum`; per-coordinate terms (exact-mode
        Adam, the second-moment channel) or terms that differ between the layers of a group run step by step.

        Args:
            records: consecutive steps from the latest to the earliest (the order :meth:`step` takes them).
            update: fold the block into ``M``; ``False`` when no earlier step follows and no factor is needed.

        Returns:
            The embeddings of each record, ``{layer: e [B, k_l]}``, in the order of ``records``.
        """
        records = [clipping.projected(record) for record in records]
        if any(record.optim for record in records):
            scalars = self._block_scalars(records)
            if scalars is None:
                return [self.step(record) for record in records]
            return self._block_momentum(records, scalars, update)
        out: list[dict[str, torch.Tensor]] = [{} for _ in records]
        sizes = [record.sample_ids.numel() for record in records]
        rates = [dict(zip(self.layer_order, r.lrs.tolist())) for r in records]
        for index, group in enumerate(self.groups):
            dtype = torch.promote_types(records[0].grads[group[0]].dtype, torch.float32)
            grads = _stack([r.grads for r in records], group, dtype)
            scales = [self._row_scale(r, of, group, dtype) for r, of in zip(records, rates)]
            width = max(s.shape[1] for s in scales)
            scale = torch.cat([s.expand(-1, width) for s in scales])  # lr w: [n, 1] or [n, K]
            rows = None
            if self.curvature is Curvature.GGN:
                rows = _stack([r.curvature for r in records], group, dtype)
            elif self.curvature is Curvature.EMPIRICAL_FISHER:
                rows = grads
            sources, left = _sources_and_left(records, group, grads, rows)
            embedding, self.accumulators[index] = block_sgd(self.accumulators[index], sources, scale, rows, sizes,
                                                            update, left)
            widths = [records[0].grads[n].shape[1] for n in group]
            for i, part in enumerate(embedding.cpu().split(sizes)):
                out[i].update(zip(group, part.split(widths, dim=1)))
        return out

    def _block_scalars(self, records: list[StepRecord]) -> list[list[StepScalars]] | None:
        """Every group's scalar terms of every record, or ``None`` if some term is not one scalar per group."""
        if any(not record.optim or record.vectors for record in records):
            return None
        out = []
        for index, group in enumerate(self.groups):
            following = self.next_momentum[index]
            if following is not None and bool((following != following[0]).any()):
                return None
            terms = [group_scalars(self.layer_order, record, group) for record in records]
            scalars = [t for t in terms if t is not None]
            if len(scalars) < len(terms):
                return None
            out.append(scalars)
        return out

    def _block_momentum(
        self, records: list[StepRecord], scalars: list[list[StepScalars]], update: bool
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`block` for the momentum form, through :func:`~lightning_dve.recursion_blocks.block_momentum`."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in records]
        sizes = [record.sample_ids.numel() for record in records]
        for index, (group, terms) in enumerate(zip(self.groups, scalars)):
            dtype = torch.promote_types(records[0].grads[group[0]].dtype, torch.float32)
            weights = torch.cat([r.weights for r in records]).to(dtype).unsqueeze(1)
            sources = torch.cat([_cat(r.preconditioned or r.grads, group, dtype) for r in records]) * weights
            left = right = None
            if self.curvature is Curvature.EMPIRICAL_FISHER:
                left, right = sources, torch.cat([_cat(r.grads, group, dtype) for r in records])
            elif self.curvature is Curvature.GGN:
                right = torch.cat([_cat(r.curvature, group, dtype) for r in records])
                left = torch.cat([_cat(r.curvature_preconditioned if r.preconditioned else r.curvature, group, dtype)
                                  for r in records]) * weights
            following = self.next_momentum[index]
            embedding, accumulator, velocity = block_momentum(
                self.accumulators[index], self.velocity_maps[index], 0.0 if following is None else float(following[0]),
                sources, left, right, terms, sizes, update)
            if update:
                self.accumulators[index], self.velocity_maps[index] = accumulator, velocity
                self.next_momentum[index] = torch.full((sources.shape[1],), terms[-1].momentum, dtype=dtype,
                                                       device=sources.device)
            widths = [records[0].grads[n].shape[1] for n in group]
            for i, part in enumerate(embedding.cpu().split(sizes)):
                out[i].update(zip(group, part.split(widths, dim=1)))
        return out

    def _second_moment_map(
        self, index: int, record: StepRecord, group: list[str], transfer: torch.Tensor, columns: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Adam's second-moment channel (``adam_second_moment``): ``V_t = A_t diag(kappa_t) + V_{t+1}
        diag(beta2_{t+1})``, the map of a change of ``v_t`` to the final parameters, and ``v_gain g'_t`` [K]."""
        if "kappa" not in record.vectors:
            return None
        kappa = _cat_vector(record.vectors["kappa"], group, transfer.dtype)
        second = torch.mul(transfer, kappa, out=self._work(index, transfer))
        if (following := self.second_moment_maps[index]) is not None:
            second.addcmul_(following, self.next_decay[index])
            self._spare[index].append(following)
        self.second_moment_maps[index], self.next_decay[index] = second, columns["v_decay"]
        batch_grad = _cat_vector(record.vectors["batch_grad"], group, transfer.dtype)
        return second, batch_grad * columns["v_gain"]

    def factors(self) -> dict[str, torch.Tensor]:
        """``I - M`` of every group run so far, keyed by the group's first layer (method.md §3, checkpointing).

        After a segment's steps, ``I - M = prod_{k in segment} (I - lr_k H_k)``: the segment's factor.
        """
        out = {}
        for group, accumulator in zip(self.groups, self.accumulators):
            if accumulator is not None:
                out[group[0]] = (torch.eye(accumulator.shape[0], dtype=accumulator.dtype, device=accumulator.device)
                                 - accumulator).cpu()
        return out


def _sources_and_left(records: list[StepRecord], group: list[str], grads: torch.Tensor, rows: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-SGD records' sources and the curvature's left factor (``None``: ``rows`` itself), stacked: their
    gradients ``grads``, or clipped steps' projected rows (``clipping.projected``; the left factor is then the
    sources for the empirical Fisher, the projected curvature rows for the Gauss-Newton option)."""
    if not any(record.preconditioned for record in records):
        return grads, None
    sources = _stack([record.preconditioned or record.grads for record in records], group, grads.dtype)
    if rows is None or rows is grads:
        return sources, None if rows is None else sources
    return sources, _stack([r.curvature_preconditioned or r.curvature for r in records], group, grads.dtype)


def _cat(rows: dict[str, torch.Tensor], group: list[str], dtype: torch.dtype) -> torch.Tensor:
    """A group's rows side by side, ``[B, K]``."""
    return torch.cat([rows[name].to(dtype) for name in group], dim=1)


def _stack(rows: list[dict[str, torch.Tensor]], group: list[str], dtype: torch.dtype) -> torch.Tensor:
    """Several records' rows of a group stacked, ``[n, K]``: one copy of each tensor (``_cat`` of each, then a
    ``torch.cat``, would copy everything twice)."""
    widths = [rows[0][name].shape[1] for name in group]
    out = torch.empty(sum(r[group[0]].shape[0] for r in rows), sum(widths), dtype=dtype,
                      device=rows[0][group[0]].device)
    top = 0
    for record in rows:
        left, height = 0, record[group[0]].shape[0]
        for name, width in zip(group, widths):
            out[top:top + height, left:left + width] = record[name]
            left += width
        top += height
    return out


def _cat_vector(values: dict[str, torch.Tensor], group: list[str], dtype: torch.dtype) -> torch.Tensor:
    """A group's per-coordinate values end to end, ``[K]``."""
    return torch.cat([values[name].to(dtype) for name in group])


def bounds_after(steps: list[int], boundary_steps: list[int]) -> list[tuple[int, int]]:
    """``[lo, hi)`` index ranges of ``steps`` cut right after each of ``boundary_steps`` that was recorded."""
    cuts = [i + 1 for i, step in enumerate(steps) if step in set(boundary_steps) and i + 1 < len(steps)]
    edges = [0, *cuts, len(steps)]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:])]


def segment_bounds(num_steps: int, segments: int) -> list[tuple[int, int]]:
    """Split ``num_steps`` recorded steps into at most ``segments`` contiguous ``[lo, hi)`` index ranges."""
    segments = max(1, min(segments, num_steps))
    edges = [round(i * num_steps / segments) for i in range(segments + 1)]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:])]
