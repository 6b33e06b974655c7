"""Replayed embeddings at train end, on one process or spread over the DDP ranks, written on rank 0.

The layer groups are already spread over the ranks for the recursion (:func:`~lightning_dve.sync.assign_groups`);
the replay of the projection rows (:mod:`~lightning_dve.replay_embeddings`) splits the same way: each rank replays
the run from its own replay checkpoints (the parameters and the recorded global batches are the same on every
rank) and carries back only the rows of its layers, and :func:`~lightning_dve.recursion_ranks.gather_embeddings`
brings them to rank 0 step by step. A failure on any rank leaves the recursion's embeddings on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .distributed import Communicator
from .errors import DVEError
from .records import accumulation_dtype
from .recursion_ranks import gather_embeddings
from .replay import ReplayCost
from .replay_embeddings import step_embeddings, write_replayed
from .store import TrajectoryStore

#: ``layers -> (rows [rows, occurrences], each layer's row range, cost)``: this rank's carried rows
#: (:func:`~lightning_dve.replay_embeddings.carried_rows` with its own store, checkpoints and module).
CarryFn = Callable[[list[str]], tuple[torch.Tensor, dict[str, slice], ReplayCost]]


def replay_on_ranks(comm: Communicator, store: TrajectoryStore, owned: list[list[str]], dims: dict[str, int],
                    carry: CarryFn) -> tuple[ReplayCost | None, str | None]:
    """Collective: replace rank 0's embeddings by the replayed ones, each rank carrying its own layers' rows.

    Args:
        comm: communicator.
        store: this rank's store (rank 0's holds the embeddings).
        owned: layer names owned by each rank.
        dims: projected size of every layer.
        carry: this rank's :data:`CarryFn` (not called without layers); a
            :class:`~lightning_dve.errors.DVEError` it raises is a reason to keep the recursion's embeddings.

    Returns:
        this rank's replay cost (``None`` where it owns no layer or the replay failed), and why the recursion's
        embeddings stay (``None`` when they were replaced): every failed rank's error, or rank 0's failed write
        (its message on rank 0 only).
    """
    scores, ranges, cost, failure = torch.zeros(0, 0), {}, None, ""
    try:
        if owned[comm.rank]:
            scores, ranges, cost = carry(owned[comm.rank])
    except DVEError as err:
        failure = f"rank {comm.rank}: {err}" if comm.world_size > 1 else str(err)
    failures = [text for text in _gather_text(comm, failure) if text]
    if failures:
        return None, "; ".join(failures)
    blocks = _gathered(comm, store, owned, dims, scores, ranges)
    try:
        if comm.rank == 0:
            write_replayed(store, dims, blocks)
    except DVEError as err:
        failure = str(err)
    finally:
        for _ in blocks:  # the other ranks are still sending: finish the collectives
            pass
    comm.any(bool(failure))  # a barrier: once it returns, every rank may read rank 0's store
    return (None, failure) if failure else (cost, None)


def _gathered(comm: Communicator, store: TrajectoryStore, owned: list[list[str]], dims: dict[str, int],
              scores: torch.Tensor, ranges: dict[str, slice]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Collective (run it to its end on every rank): ``(step, {layer: [B, k_l]})`` of every layer, on rank 0."""
    dtype = accumulation_dtype(store.manifest["storage_dtype"])
    for step, rows, mine in step_embeddings(store, scores, ranges):
        received = gather_embeddings(comm, owned, dims, [mine], rows, dtype)
        if comm.rank == 0:
            yield step, {**mine, **received}


def _gather_text(comm: Communicator, text: str) -> list[str]:
    """Collective: every rank's ``text``, indexed by rank."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8).reshape(1, -1)
    return [bytes(part.reshape(-1).tolist()).decode() for part in comm.all_gather_rows(data)]
