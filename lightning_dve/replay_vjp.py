"""Vector-Jacobian products of many rows at once, the exact replay's reverse step (:mod:`lightning_dve.replay`).

``v^T d outputs / d inputs`` for every row ``v`` (one target's adjoint each) through one double backward: the rows
go through one ``torch.func.vmap`` in groups whose size bounds its temporaries, or one backward per row where
vmap cannot batch an op of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Target rows carried back by one batched vector-Jacobian product (``torch.func.vmap``): bounds its temporaries.
VJP_ROWS = 64
#: Adjoint bytes (parameters and optimizer state) per batched product, summed over its rows: a larger model's rows go
#: in smaller groups, down to one, whose batched double backward runs faster and holds less (``replay_memory.py``).
VJP_BYTES = 16 * 2**20


def vjp_rows(vectors: Sequence[torch.Tensor]) -> int:
    """Rows of ``vectors`` (``[n, *shape]`` each) to carry back per batched product: :data:`VJP_BYTES` over one
    row's bytes, within ``[1, VJP_ROWS]``."""
    row = sum(value[0].numel() * value.element_size() for value in vectors)
    return max(1, min(VJP_ROWS, VJP_BYTES // max(1, row)))


class VectorJacobian:
    """``v^T d outputs / d inputs`` for each row ``v``; remembers whether vmap could batch the model's ops.

    Attributes:
        batched: rows go through ``torch.func.vmap``; ``False`` once an op refused it (one backward per row from then).
    """

    def __init__(self) -> None:
        self.batched = True

    def __call__(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], vectors: list[torch.Tensor]
                 ) -> list[torch.Tensor]:
        """The products for the rows of ``vectors`` (``[n, *shape]`` per output), ``[n, *shape]`` per input (zeros
        where an input does not reach the outputs), in groups of :func:`vjp_rows` rows."""
        rows, group = vectors[0].shape[0], vjp_rows(vectors)
        joined: list[torch.Tensor] = []
        for lo in range(0, rows, group):  # each group written into its rows (no second copy of the results)
            part = self._products(outputs, inputs, [vector[lo:lo + group] for vector in vectors])
            if group >= rows:
                return part
            joined = joined or [value.new_empty((rows, *value.shape[1:])) for value in part]
            for whole, value in zip(joined, part):
                whole[lo:lo + group] = value
        return joined

    def _products(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], vectors: list[torch.Tensor]
                  ) -> list[torch.Tensor]:
        """One group: one ``torch.func.vmap`` over the backward, or one backward per row where vmap cannot run it."""
        def one(*row: torch.Tensor) -> tuple[torch.Tensor, ...]:
            got = torch.autograd.grad(outputs, inputs, row, retain_graph=True, allow_unused=True)
            return tuple(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(got, inputs))
        if self.batched:
            try:
                return [value.detach() for value in torch.func.vmap(one)(*vectors)]
            except RuntimeError:  # an op vmap cannot batch (a custom autograd.Function): per row from now on
                self.batched = False
        per_row = [one(*(vector[i] for vector in vectors)) for i in range(vectors[0].shape[0])]
        return [torch.stack(column).detach() for column in zip(*per_row)]
