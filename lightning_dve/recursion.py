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

    Args:
        layer_order: every tracked layer in manifest order (the order of ``StepRecord.lrs``).
        layout: accumulation-matrix layout, which groups the layers.
        owned: run only the groups of these layers (a rank's share); ``None`` runs every group.
    """

    def __init__(self, layer_order: list[str], layout: AccumulatorLayout, owned: list[str] | None = None) -> None:
        self.layer_order = list(layer_order)
        self.groups = [g for g in layer_groups(self.layer_order, layout) if owned is None or g[0] in owned]
        self.accumulators: list[torch.Tensor | None] = [None] * len(self.groups)  # M per group

    def step(self, record: StepRecord) -> dict[str, torch.Tensor]:
        """Embed one step's occurrences and fold the step into ``M`` (the loop body above).

        Args:
            record: the step; ``record.lrs[l]`` is the learning rate of layer ``l`` (per-group rates give a
                diagonal ``lr``: ``s = Lambda w g``).

        Returns:
            ``{layer: e [B, k_l]}`` for the layers of :attr:`groups`, in the accumulation dtype.
        """
        lr_of = dict(zip(self.layer_order, record.lrs.tolist()))
        out: dict[str, torch.Tensor] = {}
        for index, group in enumerate(self.groups):
            dtype = torch.promote_types(record.grads[group[0]].dtype, torch.float32)
            grads = torch.cat([record.grads[name].to(dtype) for name in group], dim=1)  # g: [B, K]
            scaled = torch.cat(
                [record.grads[name].to(dtype) * lr_of[name] for name in group], dim=1
            ) * record.weights.to(dtype).unsqueeze(1)  # s = lr w g: [B, K]
            accumulator = self.accumulators[index]
            if accumulator is None:
                accumulator = self.accumulators[index] = grads.new_zeros(grads.shape[1], grads.shape[1])
            embedding = torch.addmm(scaled, scaled, accumulator.T, alpha=-1)  # e = s - M s
            accumulator.addmm_(embedding.T, grads)  # M += sum_z e g^T (in place)
            out.update(zip(group, embedding.split([record.grads[n].shape[1] for n in group], dim=1)))
        return out

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
