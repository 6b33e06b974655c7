"""The train-end backward recursion over segments and ranks, and every embedding in rank 0's arrays (method.md §2-3).

Each rank runs the recursion for the layer groups it owns (:func:`~lightning_dve.sync.assign_groups`), streaming
its store backwards in blocks, and writes their embeddings into rank 0's arrays
(:mod:`~lightning_dve.embedding_arrays`) where it sees them (:func:`join_rank_zero`); elsewhere
:func:`gather_embeddings` brings them to rank 0, which writes them. Segments (influence checkpointing) run in
parallel threads, each from ``M = 0``, and their factors ``I - M_seg`` are stored for queries to chain.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import torch
from tqdm.auto import tqdm

from .config import AccumulatorLayout, Curvature, DVEConfig
from .distributed import Communicator
from .errors import DVEError, StoreError
from .recursion import BackwardRecursion, layer_groups
from .stability import ExpansionWatch
from .store import StepRecord, TrajectoryStore
from .sync import agree_on_errors

BLOCK_ROWS = 256  # occurrences per recursion block (one product by M, one gather to rank 0 per block)


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


def embed_trajectory(
    comm: Communicator,
    store: TrajectoryStore,
    layout: AccumulatorLayout,
    owned: list[list[str]],
    dims: dict[str, int],
    dtype: torch.dtype,
    bounds: list[tuple[int, int]] | None = None,
    progress: bool = False,
    device: torch.device | None = None,
) -> ExpansionWatch:
    """Collective: run the backward recursion on this rank's layer groups; every embedding ends in rank 0's store.

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
        device: where the recursion computes (``None``: the CPU): the records go there as they are read, and
            the embeddings come back to the CPU, where they are written.

    Returns:
        what the steps said about the product's stability, every rank's (:mod:`lightning_dve.stability`).
    """
    bounds = bounds or [(0, len(store.steps))]
    curvature = DVEConfig.from_dict(store.manifest["settings"]).curvature
    errors: list[DVEError] = []  # this rank's failed writes: the collectives go on, the ranks agree at the end
    bar = tqdm(total=len(store.steps), desc="DVE recursion", disable=not progress or comm.rank != 0, leave=False)
    # the same on every rank (all groups' widths), so the blocks' collectives match
    whole = whole_segment_rows([sum(dims[n] for n in group) for group in layer_groups(store.layer_names, layout)],
                               curvature)
    watch = ExpansionWatch([g for g in layer_groups(store.layer_names, layout) if g[0] in owned[comm.rank]],
                           store.layer_names, curvature)

    stopped = threading.Event()  # a rank could not read a step: every rank stops at its next block

    def write(pending: list[tuple[StepRecord, dict[str, torch.Tensor]]] | None, merge: bool) -> None:
        """In the writer thread, in block order: with ``merge`` the ranks first agree whether one has stopped (one
        flag per block, before its gather), so none waits in a gather for a rank that could not read its block."""
        if stopped.is_set():
            return
        if comm.any(pending is None) if merge else pending is None:  # (merged: the same collective on every rank)
            stopped.set()
            return
        assert pending is not None
        _write_pending(comm, store, owned, dims, dtype, pending, merge, errors)

    def run(segment: int, merge: bool) -> dict[str, torch.Tensor]:
        if bounds[segment][0] >= bounds[segment][1]:  # nothing recorded (every step skipped): nothing to embed
            return {}
        recursion = BackwardRecursion(store.layer_names, layout, owned[comm.rank], curvature)
        first = store.steps[bounds[segment][0]]
        with ThreadPoolExecutor(max_workers=1) as writer:  # gathers and writes overlap the next block
            written: list[Future[None]] = []
            records = store.iter_backward(*bounds[segment])
            if device is not None:
                records = (record.to(device) for record in records)
            try:
                for block in _blocks(records, BLOCK_ROWS, whole):
                    if stopped.is_set():
                        break
                    # M after the segment's first step is needed only for a segment factor (segment 0's never is)
                    embeddings = recursion.block(block, update=segment > 0 or block[-1].step != first)
                    watch.observe(block, embeddings)
                    written.append(writer.submit(write, list(zip(block, embeddings)), merge))
                    if len(written) > 1:
                        written[-2].result()  # at most one block waits: memory stays bounded; errors surface
                    bar.update(len(block))
            except DVEError as err:  # a step file that cannot be read (damaged): kept, agreed in _finish
                errors.append(err)
                written.append(writer.submit(write, None, merge))
            for future in written:
                future.result()
        return recursion.factors() if segment > 0 and not stopped.is_set() else {}  # segment 0's is never needed

    token = secrets.randbelow(2**62) + 1 if comm.world_size > 1 else None  # rank 0's, for the ranks that see it
    if comm.rank == 0:
        attempt(errors, partial(store.begin_embeddings, {n: dims[n] for n in store.layer_names}, dtype, token))
    shared = token is not None and join_rank_zero(comm, store, owned[comm.rank], dims, dtype, token, errors)
    merge_after = len(bounds) > 1 and comm.world_size > 1 and not shared  # each rank writes its layers, then merges
    if merge_after and comm.rank > 0:
        attempt(errors, partial(store.begin_embeddings, {name: dims[name] for name in owned[comm.rank]}, dtype))
    with bar:
        if len(bounds) == 1:  # no factors needed: the single segment's embeddings are final
            run(0, merge=comm.world_size > 1 and not shared)
            factors: list[dict[str, torch.Tensor]] = [{}]
        else:
            with ThreadPoolExecutor(max_workers=_segment_workers(len(bounds))) as pool:
                factors = list(pool.map(lambda segment: run(segment, merge=False), range(len(bounds))))
            if comm.world_size > 1 and not comm.any(bool(errors)):  # after a failed write, agree below instead
                if merge_after:
                    _merge_embeddings_on_rank_zero(comm, store, owned, dims, dtype, errors)
                factors = [{}] + [_gather_factors(comm, owned, layout, f, dtype) for f in factors[1:]]
    if shared and comm.rank > 0:
        attempt(errors, store.finish_embeddings)  # closed, every row written
    elsewhere = [name for names in owned[1:] for name in names] if shared else []
    _finish(comm, store, bounds, factors, errors[0] if errors else None, elsewhere)
    return _merged(comm, watch)


def join_rank_zero(comm: Communicator, store: TrajectoryStore, names: list[str], dims: dict[str, int],
                   dtype: torch.dtype, token: int, errors: list[DVEError]) -> bool:
    """Collective: whether every rank writes its own layers' embeddings (``names``) straight into rank 0's arrays.

    They can where every rank sees rank 0's folder (one machine, or a shared file system), found by the random
    ``token`` rank 0 left in it. That saves sending every other rank's embeddings to rank 0 and rank 0's writes of
    them (``python benchmarks/ddp_recursion.py``). Elsewhere (each machine its own disk) they are gathered to rank 0.
    """
    token = token if comm.rank == 0 and not errors else 0
    token = int(comm.all_gather_rows(torch.tensor([[token]], dtype=torch.int64))[0][0, 0])
    joined = comm.rank == 0 or token != 0
    if comm.rank > 0 and joined:
        try:
            store.begin_embeddings({name: dims[name] for name in names}, dtype, token)
        except StoreError:
            joined = False  # another machine's disk
    if comm.any(not joined):
        if comm.rank > 0:
            store.discard_embeddings()  # closes this rank's files of rank 0's arrays, if it opened them
        return False
    return True


def _merged(comm: Communicator, watch: ExpansionWatch) -> ExpansionWatch:
    """Collective: every rank's expanding steps (the largest ratio of each) and non-finite steps in one watch (each
    rank's rows start with a step -1, so that no rank sends an empty tensor)."""
    expanding = torch.tensor([(-1.0, 0.0), *watch.expanding.items()], dtype=torch.float64)
    non_finite = torch.tensor([-1.0, *watch.non_finite], dtype=torch.float64).unsqueeze(1)
    merged = ExpansionWatch(watch.groups, watch.layer_order, watch.curvature)
    for rows in comm.all_gather_rows(expanding):
        for step, ratio in rows[1:].tolist():
            merged.expanding[int(step)] = max(ratio, merged.expanding.get(int(step), 0.0))
    gathered = comm.all_gather_rows(non_finite)
    merged.non_finite = sorted({int(step) for rows in gathered for (step,) in rows[1:].tolist()})
    return merged


def _finish(comm: Communicator, store: TrajectoryStore, bounds: list[tuple[int, int]],
            factors: list[dict[str, torch.Tensor]], error: DVEError | None, elsewhere: list[str]) -> None:
    """Collective: rank 0 completes the store only when every rank wrote its part (``elsewhere``: the layers the
    other ranks wrote into its arrays themselves); else every rank discards its embeddings and raises the first
    error (also a barrier: after it every rank may read rank 0's store)."""
    failed = comm.any(error is not None)
    if comm.rank == 0 and not failed:
        try:
            store.finish_embeddings(elsewhere)
            store.write_segments(bounds, factors)
            store.manifest.update(embeddings="complete", embeddings_source="recursion")
            store.record_disk_use()  # the whole store's bytes_total, now that the embeddings are on disk
        except DVEError as err:
            error = err
    if failed or error is not None:
        store.discard_embeddings()  # closed and deleted: their reserved space is free again
    agree_on_errors(comm, error)


def device_bytes(layer_names: list[str], layout: AccumulatorLayout, owned: list[str], dims: dict[str, int],
                 dtype: torch.dtype, segments: int) -> int:
    """Memory the recursion of the groups of ``owned`` may hold at once on a device: about eight ``[m, m]``
    matrices per group, ``m = max(K, BLOCK_ROWS)`` (``M`` and the momentum form's maps are ``[K, K]``, a block's
    products ``[n, n]`` and ``[n, K]`` with ``n`` rows, at most ``K`` in one block of a whole segment, else about
    ``BLOCK_ROWS``), for each segment that runs at the same time."""
    widths = [sum(dims[n] for n in group) for group in layer_groups(layer_names, layout) if group[0] in owned]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 8 * sum(max(k, BLOCK_ROWS) ** 2 for k in widths) * itemsize * _segment_workers(segments)


def _blocks(records: Iterator[StepRecord], rows: int, whole: int) -> Iterator[list[StepRecord]]:
    """Consecutive records grouped into blocks of at least ``rows`` occurrences (the last block may be smaller).

    A segment of plain-SGD steps with at most ``whole`` occurrences in all is one block
    (:func:`whole_segment_rows`); otherwise the records read to find out are blocked too.
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
        attempt(errors, partial(store.write_embeddings, record.step, embeddings, record.sample_ids))


def attempt(errors: list[DVEError], write: Callable[[], None]) -> None:
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
    """Collective: write every other rank's owned layers into rank 0's embeddings, step by step (a failed write
    goes to ``errors``, as in :func:`_write_pending`)."""
    if comm.rank != 0:
        attempt(errors, store.finish_embeddings)  # its own layers, then read back to send them
    for step, rows in zip(store.steps, store.manifest["rows"]):
        local = _own_rows(store, step, rows, owned[comm.rank], dims, dtype, errors) if comm.rank != 0 else {}
        received = gather_embeddings(comm, owned, dims, [local], rows, dtype)
        if comm.rank == 0:
            attempt(errors, partial(store.write_embeddings, step, received, None))
    if comm.rank != 0:
        store.delete_embeddings()  # sent: rank 0 holds every embedding, a copy here would only take disk space


def _own_rows(store: TrajectoryStore, step: int, rows: int, names: list[str], dims: dict[str, int],
              dtype: torch.dtype, errors: list[DVEError]) -> dict[str, torch.Tensor]:
    """This rank's embeddings of ``step`` for the merge; zeros once a read or write has failed here (the
    collectives still run, and the error is raised when the ranks agree)."""
    if not errors:
        try:
            return store.embedding_arrays().step(step)[1]
        except DVEError as err:
            errors.append(err)
    return {name: torch.zeros(rows, dims[name], dtype=dtype) for name in names}


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


def whole_segment_rows(widths: list[int], curvature: Curvature) -> int:
    """Most occurrences a segment of plain-SGD steps may have to be embedded as one block.

    One block over the whole segment never multiplies by ``M``: for ``N`` rows of a group of width ``K`` it costs
    half a Gram matrix (``N^2 K`` flops) and a unit-triangular solve (``N^2 K``, at about two thirds of a matrix
    product's rate) in :func:`~lightning_dve.recursion_blocks.block_sgd`; with separate curvature rows two half
    Gram matrices, the solve and one ``[N, N]`` product. Blocks of a few hundred rows cost ``4 N K^2`` (``6 N K^2``)
    instead. One block breaks even near ``N = 1.6 K`` (``1.1 K``), measured ``1.4 K`` on the dattri benchmark's
    larger MLP, so it is taken up to ``N = K`` (``K / 2``), with ``K`` the groups' cost-weighted width
    ``sum K^2 / sum K``. Its ``[N, N]`` and ``[N, sum K]`` matrices are then no larger than the accumulators, so
    memory stays bounded in the number of steps.

    Args:
        widths: the width ``K`` of every layer group.
        curvature: the recursion's curvature.
    """
    if not widths or sum(widths) == 0:
        return 0
    width = sum(k * k for k in widths) // sum(widths)
    return width // 2 if curvature is Curvature.GGN else width
