"""The only code that talks to other ranks, behind a small interface with a single-process implementation.

Collectives are made of fixed-shape ``all_gather``/``all_reduce`` calls (gathers of unequal shapes break on
gloo): sizes are exchanged first and tensors padded to the largest. Where every rank already knows every
rank's size, :meth:`Communicator.send_to_zero` skips the exchange and the padding: point-to-point sends to
rank 0, which receives each rank's exact bytes. Every method is a collective: call it on every rank, in the
same order, never from rank-zero-only code.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


class Communicator(Protocol):
    """What the rest of the package may ask of the other ranks."""

    rank: int
    world_size: int

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        ...

    def all_gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (2-D, any number of rows and columns), indexed by rank."""
        ...

    def send_to_zero(self, tensor: torch.Tensor, numels: list[int]) -> list[torch.Tensor]:
        """On rank 0 every rank's 1-D ``tensor`` (rank 0's own as given), indexed by rank; ``[]`` elsewhere.

        ``numels[r]`` is the size of rank ``r``'s tensor, known on every rank: nothing is exchanged (rank 0's
        entry is not used). The dtype is the same on every rank.
        """
        ...


class SingleProcess:
    """The communicator of a run with one process: every collective is the identity."""

    rank = 0
    world_size = 1

    def any(self, flag: bool) -> bool:
        """Return ``flag``."""
        return flag

    def all_gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Return ``[tensor]``."""
        return [tensor]

    def send_to_zero(self, tensor: torch.Tensor, numels: list[int]) -> list[torch.Tensor]:
        """Return ``[tensor]``."""
        return [tensor]


class ProcessGroup:
    """Collectives over the default ``torch.distributed`` process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def any(self, flag: bool) -> bool:
        """All-reduce (max) of one flag."""
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def all_gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Exchange shapes, pad to the largest, ``all_gather``, and trim each rank's part back."""
        sizes, padded = self._padded(tensor)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [part[:r, :c].to(tensor.device) for part, (r, c) in zip(parts, sizes)]

    def send_to_zero(self, tensor: torch.Tensor, numels: list[int]) -> list[torch.Tensor]:
        """Other ranks ``send`` their tensor to rank 0, which receives each into a buffer of its known size.

        Rank 0 posts every receive before waiting, so the ranks' transfers proceed side by side. NCCL (which
        would open a communicator per pair for point-to-point calls) takes one ``gather`` padded to the largest
        known size instead.

        Raises:
            ValueError: on a rank whose tensor does not have the size every rank expects of it (a mismatch would
                otherwise hang or corrupt the transfer).
        """
        if self.rank != 0 and tensor.numel() != numels[self.rank]:
            raise ValueError(f"rank {self.rank} would send {tensor.numel()} values to rank 0, which expects "
                             f"{numels[self.rank]}: the ranks disagree about the layers or rows.")
        if dist.get_backend() == "nccl":
            return self._gather_padded(tensor, numels)
        if self.rank != 0:
            if numels[self.rank]:
                dist.send(tensor.to(self.device), dst=0)
            return []
        parts = [torch.empty(n, dtype=tensor.dtype, device=self.device) for n in numels[1:]]
        works = [dist.irecv(part, src=r) for r, part in enumerate(parts, 1) if part.numel()]
        for work in works:
            work.wait()
        return [tensor] + [part.to(tensor.device) for part in parts]

    def _gather_padded(self, tensor: torch.Tensor, numels: list[int]) -> list[torch.Tensor]:
        """:meth:`send_to_zero` as one ``gather`` of the tensors padded to the largest of ``numels``."""
        padded = torch.zeros(max(numels), dtype=tensor.dtype, device=self.device)
        if self.rank != 0:
            padded[: tensor.numel()] = tensor.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        return [tensor] + [part[:n].to(tensor.device) for part, n in zip(parts[1:], numels[1:])] if parts else []

    def _padded(self, tensor: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """Every rank's ``(rows, cols)`` and ``tensor`` zero-padded to the largest, on the group's device."""
        shape = torch.tensor(list(tensor.shape), device=self.device, dtype=torch.int64)
        shapes = [torch.empty_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape)
        sizes = [(int(s[0]), int(s[1])) for s in shapes]
        rows, cols = max(s[0] for s in sizes), max(s[1] for s in sizes)
        padded = tensor.new_zeros(rows, cols, device=self.device)
        padded[: tensor.shape[0], : tensor.shape[1]] = tensor.to(self.device)
        return sizes, padded


def communicator() -> Communicator:
    """The communicator of this process: :class:`ProcessGroup` when a group of more than one is running."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroup()
    return SingleProcess()
