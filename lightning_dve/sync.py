"""One optimizer step over every micro-batch and rank, and the embeddings back on rank 0 (method.md §2).

One optimizer step is one factor over everything that entered it: the micro-batches of gradient accumulation
and the shards of every data-parallel rank. :class:`StepAssembler` buffers a rank's micro-batches, agrees on
errors with the other ranks (so one failing rank ends the run instead of deadlocking it), and gathers the
global step. Each rank keeps only the layer groups it owns, so the recursion is split across ranks;
:func:`gather_embeddings` brings the owned embeddings back to rank 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import torch
from tqdm.auto import tqdm

from .config import AccumulatorLayout, DVEConfig
from .distributed import Communicator
from .errors import DVEError, SampleIdError
from .recursion import BackwardRecursion, layer_groups, whole_segment_rows
from .store import StepRecord, TrajectoryStore
from .updates import StepTerms


BLOCK_ROWS = 256  # occurrences per recursion block (one product by M, one gather to rank 0 per block)


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """What one rank captured in one micro-batch.

    Attributes:
        sample_ids: ``[b]`` dataset indices.
        weights: ``[b]`` weight ``w`` the optimizer applies to each sample's gradient (loss reduction, divided
            by the number of micro-batches and by the world size).
        grads: ``{layer: [b, k_l]}`` per-sample gradients of the per-sample loss.
        extra: further rows per sample by ``StepRecord`` field (``curvature``, ``preconditioned``,
            ``curvature_preconditioned``), each ``{layer: [b, k_l]}``.
    """

    sample_ids: torch.Tensor
    weights: torch.Tensor
    grads: dict[str, torch.Tensor]
    extra: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


class RemoteRankError(DVEError, RuntimeError):
    """Another rank raised; this rank stops too (see that rank's traceback for the cause)."""


def assign_groups(groups: list[list[str]], dims: dict[str, int], world_size: int) -> list[list[str]]:
    """Split layer groups over ranks, largest recursion cost (``K^2``) first to the least loaded rank.

    Ties go to the highest rank, so rank 0, which also writes every embedding, gets the smaller share.

    Returns:
        The layer names owned by each rank (identical on every rank).
    """
    load = [0] * world_size
    owned: list[list[str]] = [[] for _ in range(world_size)]
    for group in sorted(groups, key=lambda g: -sum(dims[n] for n in g) ** 2):
        rank = min(range(world_size), key=lambda r: (load[r], -r))
        owned[rank].extend(group)
        load[rank] += sum(dims[n] for n in group) ** 2
    return owned


def agree_on_errors(comm: Communicator, error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank had an error (the failing rank raises its own).

    Raises:
        RemoteRankError: on ranks that did not fail themselves.
    """
    failed = comm.any(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RemoteRankError("another rank failed in DataValueEmbedding; this rank stops too. The cause is in "
                              "that rank's traceback.")


class StepAssembler:
    """Buffer a rank's micro-batches and assemble the global step restricted to this rank's layers.

    Args:
        comm: communicator.
        dims: projected size of every tracked layer, in manifest order.
        owned: the layers this rank keeps.
        dtype: storage dtype of the gradients (identical on every rank).
        allow_duplicate_ids: accept an id twice in one step.
        extra_kinds: the further rows the micro-batches carry (:attr:`MicroBatch.extra`), gathered and kept like
            the gradients.
    """

    def __init__(self, comm: Communicator, dims: dict[str, int], owned: list[str], dtype: torch.dtype,
                 allow_duplicate_ids: bool, extra_kinds: tuple[str, ...] = ()) -> None:
        self.comm, self.dims, self.layer_names, self.dtype = comm, dims, list(dims), dtype
        self.owned, self.allow_duplicate_ids = owned, allow_duplicate_ids
        self.kinds = ("grads", *extra_kinds)
        self._buffer: list[MicroBatch] = []

    def add(self, micro: MicroBatch) -> None:
        """Buffer one micro-batch of this rank."""
        self._buffer.append(micro)

    def discard(self) -> None:
        """Drop the buffered micro-batches (a step that was skipped)."""
        self._buffer = []

    def close(self, step: int, terms: StepTerms, epoch: int, last_batch: bool) -> StepRecord | None:
        """Collective: gather every rank's micro-batches into the global step's record.

        Rows are ordered by rank, then micro-batch, then position. Only the layers this rank owns are kept.

        Args:
            step: optimizer step index.
            terms: the step's rates and optimizer terms (the same on every rank).
            epoch: training epoch.
            last_batch: whether this is the epoch's last step (where ``DistributedSampler`` pads).

        Returns:
            The record, or ``None`` if no rank captured anything (every ``training_step`` returned ``None``).

        Raises:
            SampleIdError: on every rank, if an id occurs twice in the step and that is not allowed.
        """
        meta, grads = self._local_rows()
        metas = self.comm.all_gather_rows(meta)
        parts = self.comm.all_gather_rows(grads)
        all_grads = parts[0] if len(parts) == 1 else torch.cat(parts)
        if all_grads.shape[0] == 0:  # every micro-batch of every rank was skipped
            return None
        ranks = torch.cat([torch.full((len(m),), r) for r, m in enumerate(metas)])
        meta = torch.cat(metas)
        sample_ids = (meta[:, 0].to(torch.int64) << 32) | meta[:, 1].to(torch.int64)
        self._check_duplicates(sample_ids, ranks, step, last_batch)
        sizes = [self.dims[n] for n in self.layer_names]
        kinds = dict(zip(self.kinds, all_grads.split(sum(sizes), dim=1)))
        # column views; the store makes them contiguous on write
        owned = {kind: dict(zip(self.layer_names, rows.split(sizes, dim=1))) for kind, rows in kinds.items()}
        owned = {kind: {n: rows[n] for n in self.owned} for kind, rows in owned.items()}
        vectors = {kind: {n: values[n] for n in self.owned} for kind, values in terms.vectors.items()}
        return StepRecord(step, sample_ids, meta[:, 2], terms.lrs, owned["grads"], epoch, terms.optim, vectors=vectors,
                          applied_lrs=terms.applied_lrs, **{kind: owned[kind] for kind in self.kinds[1:]})

    def _local_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's buffered rows: ``[b, 3]`` (id's high and low 32 bits, weight) in float64, exact for every
        int64 id, and ``[b, kinds * sum k_l]`` rows."""
        buffer, self._buffer = self._buffer, []
        meta = [torch.stack([(m.sample_ids >> 32).to(torch.float64), (m.sample_ids & 0xFFFFFFFF).to(torch.float64),
                             m.weights.to(torch.float64)], dim=1) for m in buffer]
        grads = [self._row(m) for m in buffer]
        width = sum(self.dims.values()) * len(self.kinds)
        return (torch.cat([torch.zeros(0, 3, dtype=torch.float64), *meta]),
                torch.cat([torch.zeros(0, width, dtype=self.dtype), *grads]))

    def _row(self, micro: MicroBatch) -> torch.Tensor:
        """A micro-batch's rows of every kind side by side, ``[b, kinds * sum k_l]`` in the storage dtype."""
        rows = {"grads": micro.grads, **micro.extra}
        return torch.cat([rows[kind][n].to(self.dtype) for kind in self.kinds for n in self.layer_names], dim=1)

    def _check_duplicates(self, ids: torch.Tensor, ranks: torch.Tensor, step: int, last_batch: bool) -> None:
        values, counts = torch.unique(ids, return_counts=True)
        duplicated = values[counts > 1]
        if duplicated.numel() == 0 or self.allow_duplicate_ids:
            return
        cross_rank = all(ranks[ids == v].unique().numel() == (ids == v).sum() for v in duplicated)
        if last_batch and self.comm.world_size > 1 and cross_rank:  # DistributedSampler padding: kept, warned once
            return
        raise SampleIdError(f"sample ids {duplicated.tolist()[:10]} occur more than once in step {step}. If your "
                            "sampler draws with replacement, pass allow_duplicate_ids=True (each copy is then its "
                            "own occurrence); otherwise fix the ids your batches carry.")


def gather_embeddings(
    comm: Communicator,
    owned: list[list[str]],
    dims: dict[str, int],
    embeddings: list[dict[str, torch.Tensor]],
    rows: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Collective: the other ranks' embeddings of some consecutive occurrences, on rank 0 (``{}`` elsewhere).

    Every rank knows every rank's size from ``owned``, ``dims`` and ``rows``, so nothing is exchanged or padded:
    each rank sends its layers one after the other, flattened, and rank 0 views each layer of what it receives
    as one contiguous ``[B, k_l]`` block, whose rows of one step are contiguous too (written as they are).

    Args:
        comm: communicator.
        owned: layer names owned by each rank.
        dims: projected size of every layer.
        embeddings: this rank's embeddings of its owned layers in consecutive pieces of rows (one per step, say)
            that add up to ``rows``; not read on rank 0.
        rows: occurrences in the pieces (``B``), the same on every rank.
        dtype: accumulation dtype (identical on every rank).

    Returns:
        On rank 0 ``{layer: [B, k_l]}`` for the layers of every other rank; ``{}`` on the other ranks.
    """
    pieces = [piece[n].to(dtype).reshape(-1) for n in owned[comm.rank] for piece in embeddings] if comm.rank else []
    local = torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype)
    parts = comm.send_to_zero(local, [rows * sum(dims[n] for n in names) for names in owned])
    merged: dict[str, torch.Tensor] = {}
    for names, flat in zip(owned[1:], parts[1:]):
        blocks = flat.split([rows * dims[n] for n in names])
        merged.update((n, block.view(rows, dims[n])) for n, block in zip(names, blocks))
    return merged


def reached_on_any_rank(comm: Communicator, names: list[str], reached: set[str]) -> set[str]:
    """Collective: the layers of ``names`` some rank's hooks reached in this step (``reached``: this rank's ones);
    under DDP every rank's gradient is in ``.grad``."""
    if comm.world_size == 1:
        return set(reached)
    flags = torch.tensor([[float(name in reached) for name in names]])
    union = torch.cat(comm.all_gather_rows(flags)).amax(dim=0)
    return {name for name, flag in zip(names, union.tolist()) if flag > 0}


def embed_trajectory(
    comm: Communicator,
    store: TrajectoryStore,
    layout: AccumulatorLayout,
    owned: list[list[str]],
    dims: dict[str, int],
    dtype: torch.dtype,
    bounds: list[tuple[int, int]] | None = None,
    progress: bool = False,
) -> None:
    """Collective: run the backward recursion on this rank's layer groups; rank 0 writes every embedding.

    With several ``bounds`` the trajectory is split into contiguous segments whose recursions run in parallel
    threads, each from ``M = 0`` (influence checkpointing, method.md §3). The stored embeddings are then
    segment-local, and the segments' factors ``I - M_seg`` are stored for queries to chain.

    Args:
        comm: communicator.
        store: this rank's store (rank 0's is the one users read).
        layout: accumulation-matrix layout.
        owned: layer names owned by each rank.
        dims: projected size of every layer.
        dtype: accumulation dtype, float32 or wider (identical on every rank).
        bounds: ``[lo, hi)`` index ranges of the segments (:func:`~lightning_dve.recursion.segment_bounds`);
            ``None`` is one segment.
        progress: show a progress bar (rank 0).
    """
    bounds = bounds or [(0, len(store.steps))]
    curvature = DVEConfig.from_dict(store.manifest["settings"]).curvature
    errors: list[DVEError] = []  # rank 0's failed writes: the collectives go on, the ranks agree at the end
    bar = tqdm(total=len(store.steps), desc="DVE recursion", disable=not progress or comm.rank != 0, leave=False)
    # the same on every rank (all groups' widths), so the blocks' collectives match
    whole = whole_segment_rows([sum(dims[n] for n in group) for group in layer_groups(store.layer_names, layout)],
                               curvature)

    def run(segment: int, merge: bool) -> dict[str, torch.Tensor]:
        if bounds[segment][0] >= bounds[segment][1]:  # nothing recorded (every step skipped): nothing to embed
            return {}
        recursion = BackwardRecursion(store.layer_names, layout, owned[comm.rank], curvature)
        first = store.steps[bounds[segment][0]]
        with ThreadPoolExecutor(max_workers=1) as writer:  # gathers and writes overlap the next block
            written: list[Future[None]] = []
            for block in _blocks(store.iter_backward(*bounds[segment]), BLOCK_ROWS, whole):
                # M after the segment's first step is needed only for a segment factor (segment 0's never is)
                embeddings = recursion.block(block, update=segment > 0 or block[-1].step != first)
                written.append(writer.submit(_write_pending, comm, store, owned, dims, dtype,
                                             list(zip(block, embeddings)), merge, errors))
                if len(written) > 1:
                    written[-2].result()  # at most one block waits: memory stays bounded; errors surface
                bar.update(len(block))
            for future in written:
                future.result()
        return recursion.factors() if segment > 0 else {}  # segment 0's factor is never needed

    with bar:
        if len(bounds) == 1:  # no factors needed: the single segment's embeddings are final
            run(0, merge=comm.world_size > 1)
            factors: list[dict[str, torch.Tensor]] = [{}]
        else:
            with ThreadPoolExecutor(max_workers=_segment_workers(len(bounds))) as pool:
                factors = list(pool.map(lambda segment: run(segment, merge=False), range(len(bounds))))
            if comm.world_size > 1 and not comm.any(bool(errors)):  # after a failed write, agree below instead
                _merge_embeddings_on_rank_zero(comm, store, owned, dims, dtype, errors)
                factors = [{}] + [_gather_factors(comm, owned, layout, f, dtype) for f in factors[1:]]
    error = errors[0] if errors else None
    if comm.rank == 0 and error is None:
        try:
            store.write_segments(bounds, factors)
            store.manifest["embeddings"] = "complete"
            store.record_disk_use()  # the whole store's bytes_total, now that the embeddings are on disk
        except DVEError as err:
            error = err
    agree_on_errors(comm, error)  # also a barrier: after it every rank may read rank 0's finished store


def _blocks(records: Iterator[StepRecord], rows: int, whole: int) -> Iterator[list[StepRecord]]:
    """Consecutive records grouped into blocks of at least ``rows`` occurrences (the last block may be smaller).

    A segment of plain-SGD steps with at most ``whole`` occurrences in all is one block
    (:func:`~lightning_dve.recursion.whole_segment_rows`); otherwise the records read to find out are blocked too.
    """
    head: list[StepRecord] = []
    count = 0
    for record in records:
        head.append(record)
        count += record.sample_ids.numel()
        if count > whole or record.optim or record.vectors:
            break
    else:  # the whole segment fits in one block
        yield from [head] if head else []
        return
    block: list[StepRecord] = []
    count = 0
    for record in itertools.chain(head, records):
        block.append(record)
        count += record.sample_ids.numel()
        if count >= rows:
            yield block
            block, count = [], 0
    if block:
        yield block


def _segment_workers(segments: int) -> int:
    """Threads for the segments: no more than the cores leave room for, given torch's own threads per matmul."""
    return max(1, min(segments, (os.cpu_count() or 1) // max(1, torch.get_num_threads())))


def _write_pending(
    comm: Communicator,
    store: TrajectoryStore,
    owned: list[list[str]],
    dims: dict[str, int],
    dtype: torch.dtype,
    pending: list[tuple[StepRecord, dict[str, torch.Tensor]]],
    merge: bool,
    errors: list[DVEError],
) -> None:
    """Write computed steps' embeddings; with ``merge``, first send the other ranks' to rank 0 in one collective.

    A failed write is appended to ``errors`` and no later step is written, but the collectives still run, so no
    rank waits for one that has stopped.
    """
    if merge:
        sizes = [record.sample_ids.numel() for record, _ in pending]
        received = gather_embeddings(comm, owned, dims, [e for _, e in pending], sum(sizes), dtype)
        if comm.rank != 0:
            return
        parts = {name: block.split(sizes) for name, block in received.items()}
        pending = [(record, {**{n: e[n].to(dtype) for n in owned[0]}, **{n: parts[n][i] for n in parts}})
                   for i, (record, e) in enumerate(pending)]
    for record, embeddings in pending:
        _attempt(errors, partial(store.write_embeddings, record.step, embeddings, record.sample_ids))


def _attempt(errors: list[DVEError], write: Callable[[], None]) -> None:
    """``write()`` unless a write has failed already; keep its error in ``errors`` instead of raising it here."""
    if errors:
        return
    try:
        write()
    except DVEError as err:
        errors.append(err)


def _merge_embeddings_on_rank_zero(
    comm: Communicator, store: TrajectoryStore, owned: list[list[str]], dims: dict[str, int], dtype: torch.dtype,
    errors: list[DVEError],
) -> None:
    """Collective: replace rank 0's per-step embedding files by the merge of every rank's owned layers (a failed
    write goes to ``errors``, as in :func:`_write_pending`)."""
    for step in store.steps:
        sample_ids, local = store.read_embeddings(step)
        received = gather_embeddings(comm, owned, dims, [local], sample_ids.numel(), dtype)
        if comm.rank == 0:
            merged = {**{n: local[n].to(dtype) for n in owned[0]}, **received}
            _attempt(errors, partial(store.write_embeddings, step, merged, sample_ids))


def _gather_factors(
    comm: Communicator, owned: list[list[str]], layout: AccumulatorLayout, mine: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Collective: every group's segment factor, from the rank that owns the group (``dtype``: the accumulators',
    the same on every rank, so the gathered buffers agree in size)."""
    merged = {}
    for rank, names in enumerate(owned):
        for group in layer_groups(names, layout):
            local = mine.get(group[0], torch.zeros(0, 0, dtype=dtype)) if rank == comm.rank else None
            parts = comm.all_gather_rows(local if local is not None else torch.zeros(0, 0, dtype=dtype))
            merged[group[0]] = parts[rank]
    return merged
