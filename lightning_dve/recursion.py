"""The backward recursion that turns recorded gradients into data value embeddings (method.md §2, Thm. 2).

With the step Hessian replaced by the empirical Fisher ``H_k = sum_z w_{k,z} g_{k,z} g_{k,z}^T``::

    M = 0
    for t = T-1 down to 0:
        s_{t,z} = lr_t w_{t,z} g_{t,z}
        e_{t,z} = s_{t,z} - M s_{t,z}            # every z in B_t uses the same M
        M       = M + sum_z e_{t,z} g_{t,z}^T

so that ``I - M_t = prod_{k=T-1..t+1} (I - lr_k H_k)`` and ``e_{t,z}`` is the embedding of occurrence (t, z).
``M`` is not symmetric; the product is ``M s``. Layers are grouped: one ``M`` per layer (block-diagonal) or
one for all layers (:class:`~lightning_dve.config.AccumulatorLayout`). ``M`` is held in float32 or wider.
"""

from __future__ import annotations

import torch

from .config import AccumulatorLayout
from .store import StepRecord


def layer_groups(layer_names: list[str], layout: AccumulatorLayout) -> list[list[str]]:
    """Groups of layers that share one accumulation matrix."""
    if AccumulatorLayout.parse(layout) is AccumulatorLayout.FULL:
        return [list(layer_names)]
    return [[name] for name in layer_names]


class BackwardRecursion:
    """State of the recursion (the accumulation matrices ``M``), advanced one step at a time backwards.

    Plain SGD is the loop above. SGD with momentum ``mu``, dampening ``tau`` and weight decay ``lambda``
    (``torch.optim.SGD``, not Nesterov) carries the velocity as state: with ``A_t = I - M_t`` the map of a
    parameter change after step ``t`` to the final parameters and ``S_t`` the map of a velocity change at step
    ``t``, going backwards from ``A = I``, ``S = 0``::

        S_t     = A_t Lambda_t + S_{t+1} diag(mu_{t+1})          # a velocity change is applied at later rates
        e_{t,z} = S_t (c_t w_{t,z} g_{t,z})                        # c_t = 1 - tau (1 on the buffer's first step)
        M_{t-1} = M_t + S_t diag(c_t lambda) + sum_z e_{t,z} g_{t,z}^T

    which reduces to the SGD loop when ``mu = lambda = 0``. Terms come from ``record.optim`` (per layer).

    Args:
        layer_order: every tracked layer in manifest order (the order of ``StepRecord.lrs``).
        layout: accumulation-matrix layout, which groups the layers.
        owned: run only the groups of these layers (a rank's share); ``None`` runs every group.
    """

    def __init__(self, layer_order: list[str], layout: AccumulatorLayout, owned: list[str] | None = None) -> None:
        self.layer_order = list(layer_order)
        self.groups = [g for g in layer_groups(self.layer_order, layout) if owned is None or g[0] in owned]
        self.accumulators: list[torch.Tensor | None] = [None] * len(self.groups)  # M per group
        self.velocity_maps: list[torch.Tensor | None] = [None] * len(self.groups)  # S_{t+1} per group
        self.next_momentum: list[torch.Tensor | None] = [None] * len(self.groups)  # mu_{t+1} per column

    def _columns(self, record: StepRecord, group: list[str], values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-layer values ``[L]`` spread over the group's columns ``[K]``."""
        of = dict(zip(self.layer_order, values.tolist()))
        return torch.cat([torch.full((record.grads[n].shape[1],), of[n], dtype=dtype) for n in group])

    def step(self, record: StepRecord) -> dict[str, torch.Tensor]:
        """Embed one step's occurrences and fold the step into the state (the loops above).

        Args:
            record: the step; ``record.lrs[l]`` is the learning rate of layer ``l`` (per-group rates give a
                diagonal ``Lambda``), ``record.optim`` the optimizer terms.

        Returns:
            ``{layer: e [B, k_l]}`` for the layers of :attr:`groups`, in the accumulation dtype.
        """
        out: dict[str, torch.Tensor] = {}
        for index, group in enumerate(self.groups):
            dtype = torch.promote_types(record.grads[group[0]].dtype, torch.float32)
            grads = torch.cat([record.grads[name].to(dtype) for name in group], dim=1)  # g: [B, K]
            lr = self._columns(record, group, record.lrs, dtype)
            if self.accumulators[index] is None:
                self.accumulators[index] = grads.new_zeros(grads.shape[1], grads.shape[1])
            if record.optim:
                embedding = self._momentum_step(index, record, group, grads, lr)
            else:
                embedding = self._sgd_step(index, grads * lr * record.weights.to(dtype).unsqueeze(1), grads)
            out.update(zip(group, embedding.split([record.grads[n].shape[1] for n in group], dim=1)))
        return out

    def _sgd_step(self, index: int, scaled: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """``e = s - M s`` with ``s = lr w g``, then ``M += sum_z e g^T`` (in place)."""
        accumulator = self.accumulators[index]
        assert accumulator is not None
        embedding = torch.addmm(scaled, scaled, accumulator.T, alpha=-1)
        accumulator.addmm_(embedding.T, grads)
        return embedding

    def _momentum_step(
        self, index: int, record: StepRecord, group: list[str], grads: torch.Tensor, lr: torch.Tensor
    ) -> torch.Tensor:
        """One step of the momentum form (class docstring)."""
        accumulator = self.accumulators[index]
        assert accumulator is not None
        columns = {k: self._columns(record, group, v, grads.dtype) for k, v in record.optim.items()}
        velocity = (torch.eye(len(lr), dtype=grads.dtype) - accumulator) * lr  # A_t Lambda_t
        if self.velocity_maps[index] is not None:
            velocity += self.velocity_maps[index] * self.next_momentum[index]  # + S_{t+1} diag(mu_{t+1})
        gain = columns["gain"]  # c_t
        embedding = (grads * gain * record.weights.to(grads.dtype).unsqueeze(1)) @ velocity.T  # e = S (c w g)
        accumulator += velocity * (gain * columns["weight_decay"])
        accumulator.addmm_(embedding.T, grads)
        self.velocity_maps[index], self.next_momentum[index] = velocity, columns["momentum"]
        return embedding

    def factors(self) -> dict[str, torch.Tensor]:
        """``I - M`` of every group run so far, keyed by the group's first layer (method.md §3, checkpointing).

        After a segment's steps, ``I - M = prod_{k in segment} (I - lr_k H_k)``: the segment's factor.
        """
        out = {}
        for group, accumulator in zip(self.groups, self.accumulators):
            if accumulator is not None:
                out[group[0]] = torch.eye(accumulator.shape[0], dtype=accumulator.dtype) - accumulator
        return out


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
