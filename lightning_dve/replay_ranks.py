"""Replayed embeddings at train end, on one process or spread over the DDP ranks, put in place by rank 0.

The layer groups are already spread over the ranks for the recursion (:func:`~lightning_dve.sync.assign_groups`);
the replay of the projection rows (:mod:`~lightning_dve.replay_embeddings`) splits the same way: each rank replays
the run from its own replay checkpoints (the parameters and the recorded global batches are the same on every
rank) and carries back only the rows of its layers. As the recursion's (:mod:`~lightning_dve.recursion_ranks`),
each rank writes them into rank 0's arrays where it sees them; elsewhere
:func:`~lightning_dve.recursion_ranks.gather_embeddings` brings them to rank 0 step by step. A failure on any
rank leaves the recursion's embeddings on every rank.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator
from functools import partial

import torch

from .distributed import Communicator
from .errors import DVEError
from .records import accumulation_dtype
from .recursion_ranks import attempt, gather_embeddings, join_rank_zero
from .replay import ReplayCost
from .replay_embeddings import begin_replayed, finish_replayed, step_embeddings
from .store import TrajectoryStore
from .sync import rank_failures

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
        embeddings stay (``None`` when they were replaced): every failed rank's error.
    """
    scores, ranges, cost, failure = torch.zeros(0, 0), {}, None, ""
    try:
        if owned[comm.rank]:
            scores, ranges, cost = carry(owned[comm.rank])
    except DVEError as err:
        failure = str(err)
    failures = rank_failures(comm, failure)
    if not failures:
        failures = _write(comm, store, owned, dims, scores, ranges)
    return (None, "; ".join(failures)) if failures else (cost, None)


def _write(comm: Communicator, store: TrajectoryStore, owned: list[list[str]], dims: dict[str, int],
           scores: torch.Tensor, ranges: dict[str, slice]) -> list[str]:
    """Collective: the carried rows written as every layer's embeddings in rank 0's arrays, and put in place there.

    Returns:
        every failed rank's error (then the earlier embeddings stay); ``[]`` once they are in place.
    """
    errors: list[DVEError] = []
    ids: list[torch.Tensor] = []
    token = secrets.randbelow(2**62) + 1 if comm.world_size > 1 else None  # rank 0's, for the ranks that see it
    if comm.rank == 0:
        attempt(errors, lambda: ids.extend(begin_replayed(store, dims, token)))
    dtype = accumulation_dtype(store.manifest["storage_dtype"])
    shared = token is not None and join_rank_zero(comm, store, owned[comm.rank], dims, dtype, token, errors)
    steps = (((step, mine) for step, _, mine in step_embeddings(store, scores, ranges)) if shared
             else _gathered(comm, store, owned, dims, scores, ranges))
    for (step, embeddings), step_ids in zip(steps, ids or itertools.repeat(None)):  # runs every gather to its end
        attempt(errors, partial(store.write_embeddings, step, embeddings, step_ids))
    if shared and comm.rank > 0:
        attempt(errors, store.finish_embeddings)  # closed, every row written
    failures = rank_failures(comm, str(errors[0]) if errors else "")
    if comm.rank == 0 and not failures:
        try:
            finish_replayed(store, [name for names in owned[1:] for name in names] if shared else [])
        except DVEError as err:
            failures = [str(err)]
    if comm.any(bool(failures)):  # also a barrier: once it returns, every rank may read rank 0's store
        store.discard_embeddings()
        failures = failures or ["rank 0 could not put the replayed embeddings in place"]
    return failures


def _gathered(comm: Communicator, store: TrajectoryStore, owned: list[list[str]], dims: dict[str, int],
              scores: torch.Tensor, ranges: dict[str, slice]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Collective (run it to its end on every rank): ``(step, {layer: [B, k_l]})`` of every layer, on rank 0."""
    dtype = accumulation_dtype(store.manifest["storage_dtype"])
    for step, rows, mine in step_embeddings(store, scores, ranges):
        received = gather_embeddings(comm, owned, dims, [mine], rows, dtype)
        if comm.rank == 0:
            yield step, {**mine, **received}

