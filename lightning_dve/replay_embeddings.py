"""Test-agnostic embeddings with the true curvature of every update: the projection's rows, carried back by replay.

The recursion (method.md §2) approximates each step's Hessian by the empirical Fisher (or the GGN) of its
recorded rows. Here the embedding of occurrence ``(t, z)`` is instead, for every row ``p_j`` of the projection
``P`` (as a direction in parameter space),

    e_{t,z}[j] = -w_{t,z} d<p_j, theta_T>/dw_{t,z} = <p_j, Delta theta_T(t, z)>,

the first-order change of the final parameters when the occurrence is removed, through the actual updates
(:mod:`lightning_dve.replay`: every later step's true Hessian, momentum, Adam's preconditioner, clipping). Then
``<P g_test, e_{t,z}> = g_test^T P^T P Delta theta_T(t, z)``, and ``E[P^T P] = I`` (:mod:`lightning_dve.projection`):
the score is :meth:`~lightning_dve.DataValueEmbeddings.exact_influence`'s up to the projection's noise, and
exactly it when the layers are unprojected (``projection_dim=None``). The cost is one vector-Jacobian product per
row and step: ``sum_l k_l`` rows carried back through a replay of the run, for small models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import ConfigError, StoreError
from .layers import split_block
from .projection import LayerProjection
from .records import accumulation_dtype
from .replay import Adjoint, ReplayCost, Replayer, carry_back, final_parameters
from .store import TrajectoryStore

#: Largest carried state ``rows x (parameters and optimizer state) x itemsize`` a replay of embeddings may hold.
MAX_CARRIED_BYTES = 2**30


def _side(projection: LayerProjection, side: str, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The side's ``[k, d]`` matrix in ``like``'s dtype and device (the identity for an unprojected side)."""
    matrix = projection.side_matrix(side, like.dtype, like.device)
    return torch.eye(dim, dtype=like.dtype, device=like.device) if matrix is None else matrix


def projection_rows(module: nn.Module, projections: dict[str, LayerProjection], final: dict[str, torch.Tensor]
                    ) -> tuple[Adjoint, dict[str, slice]]:
    """Every tracked layer's projection rows as parameter-space directions, stacked over the layers.

    Row ``a * k_in + b`` of layer ``l`` is ``split_block(P_out[a] (x) P_in[b])`` (the order of
    :func:`lightning_dve.layers.outer_block`), so ``<row, grad theta_l>`` is the layer's projected gradient
    entry (method.md §3); it is zero outside layer ``l``.

    Returns:
        ``{(parameter, "param"): [n, *shape]}`` with ``n = sum_l k_l``, and each layer's row range.

    Raises:
        ConfigError: if a tracked layer's parameters are not among the replayed ones.
    """
    modules, like = dict(module.named_modules()), next(iter(final.values()))
    ranges, start = {}, 0
    for name, projection in projections.items():
        ranges[name] = slice(start, start + projection.dim)
        start += projection.dim
    adjoint: Adjoint = {}
    for name, projection in projections.items():
        out = _side(projection, "out", projection.output.dim, like)
        inp = _side(projection, "in", projection.input.dim, like)
        blocks = torch.einsum("ai,bj->abij", out, inp).reshape(projection.dim, -1)
        for key, rows in torch.vmap(lambda block, m=modules[name]: split_block(m, block))(blocks).items():
            parameter = f"{name}.{key}" if name else key
            if parameter not in final:
                raise ConfigError(f"parameter {parameter!r} of tracked layer {name!r} is not among the optimizer's "
                                  "recorded parameters, so the replay cannot carry its rows; use influence().")
            column = torch.zeros(start, *rows.shape[1:], dtype=like.dtype, device=like.device)
            column[ranges[name]] = rows
            adjoint[(parameter, "param")] = column
    return adjoint, ranges


def _check_size(store: TrajectoryStore, replayer: Replayer, final: dict[str, torch.Tensor], rows: int) -> None:
    """Refuse a replay whose carried rows would not fit :data:`MAX_CARRIED_BYTES` (three copies of the parameters
    at most: Adam's two moments), and a store whose embeddings are segment-local.

    Raises:
        ConfigError: naming the size and what to do instead.
    """
    if len(store.manifest.get("segments") or []) > 1:
        raise ConfigError("this run was recorded with segments > 1, whose stored embeddings are segment-local; "
                          "replayed embeddings are the final model's. Record it with segments=1 to replay them.")
    numel = sum(final[name].numel() for name in replayer.trainable)
    itemsize = next(iter(final.values())).element_size()
    occurrences = sum(store.manifest["rows"])
    size = rows * (3 * numel + occurrences) * itemsize
    if size > MAX_CARRIED_BYTES:
        raise ConfigError(f"replaying embeddings carries {rows} projection rows over {numel} parameters and "
                          f"{occurrences} occurrences, {size / 2**30:.1f} GiB (limit {MAX_CARRIED_BYTES / 2**30:.0f} "
                          "GiB): it is for small models. Record with a smaller projection_dim, or score fixed test "
                          "points with exact_influence().")


def carried_rows(store: TrajectoryStore, replayer: Replayer, projections: dict[str, LayerProjection]
                 ) -> tuple[torch.Tensor, dict[str, slice], ReplayCost]:
    """The rows of ``projections`` carried back through the replayed run (module docstring).

    Returns:
        ``e[j, (t, z)]`` ``[rows, occurrences]`` (the occurrences by step, then position), each layer's row range,
        and the replay's cost.

    Raises:
        ConfigError: if the run is too large or segmented (:func:`_check_size`).
        UnsupportedError, StoreError: as :func:`lightning_dve.replay.carry_back`.
    """
    final = final_parameters(replayer)
    _check_size(store, replayer, final, sum(projection.dim for projection in projections.values()))
    adjoint, ranges = projection_rows(replayer.module, projections, final)
    _, _, scores, cost = carry_back(replayer, adjoint)
    return scores, ranges, cost


def step_embeddings(store: TrajectoryStore, scores: torch.Tensor, ranges: dict[str, slice]
                    ) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """``(step, occurrences, {layer: [B, k_l]})`` of :func:`carried_rows`' result, step by step."""
    stop = 0
    for step, rows in zip(store.steps, store.manifest["rows"]):
        start, stop = stop, stop + rows
        yield step, rows, {name: scores[layer_rows, start:stop].T for name, layer_rows in ranges.items()}


def write_replayed(store: TrajectoryStore, widths: dict[str, int],
                   steps: Iterable[tuple[int, dict[str, torch.Tensor]]]) -> None:
    """Replace the store's embeddings by ``steps``' ``(step, {layer: [B, k_l]})`` of every layer of ``widths``, in
    the store's step order; if anything fails the earlier embeddings stay.

    Raises:
        StoreError: a failed write.
    """
    ids = begin_replayed(store, widths)
    try:
        for (step, embeddings), step_ids in zip(steps, ids, strict=True):
            store.write_embeddings(step, embeddings, step_ids)
        finish_replayed(store)
    finally:
        store.discard_embeddings()


def begin_replayed(store: TrajectoryStore, widths: dict[str, int], token: int | None = None) -> list[torch.Tensor]:
    """Begin the replayed embeddings of ``widths``' layers (beside the earlier ones, which stay until
    :func:`finish_replayed`; ``token``: other DDP ranks may join them, :meth:`TrajectoryStore.begin_embeddings`).

    Returns:
        each step's sample ids, as the embeddings being replaced hold them (the step files are not read again).
    """
    ids = list(store.embedding_arrays().sample_ids(0, len(store.steps)).split(store.manifest["rows"]))
    store.begin_embeddings(widths, accumulation_dtype(store.manifest["storage_dtype"]), token)
    return ids


def finish_replayed(store: TrajectoryStore, elsewhere: Sequence[str] = ()) -> None:
    """Put the replayed embeddings in place and label them, every row written (``elsewhere``'s by other ranks).

    Raises:
        StoreError: a failed write; the earlier embeddings and their manifest stay.
    """
    # unfinished while the folder is replaced: a process killed there leaves no embeddings under the wrong label
    before = {key: store.manifest.get(key) for key in ("embeddings", "embeddings_source")}
    try:
        store.manifest.update(embeddings=None, embeddings_source="replay")
        store.write_manifest()
        store.finish_embeddings(elsewhere)
    except StoreError:
        store.manifest.update(before)  # the earlier embeddings stay, and so does their manifest
        store.write_manifest()
        raise
    store.manifest["embeddings"] = "complete"
    store.record_disk_use()  # writes the manifest


def replay_embeddings(store: TrajectoryStore, replayer: Replayer, projections: dict[str, LayerProjection]
                      ) -> ReplayCost:
    """Replace the store's embeddings by the replayed ones (module docstring), under the folder's lock.

    Raises:
        ConfigError: if the run is too large or segmented (:func:`_check_size`).
        UnsupportedError, StoreError: as :func:`lightning_dve.replay.carry_back`, or ``StoreError`` if another
            process records into the folder (the embeddings on disk are kept).
    """
    taken = store.lock()  # a fit into the folder is refused while the replay reads it and rewrites the embeddings
    try:
        scores, ranges, cost = carried_rows(store, replayer, projections)
        write_replayed(store, {name: projections[name].dim for name in ranges},
                       ((step, embeddings) for step, _, embeddings in step_embeddings(store, scores, ranges)))
    finally:
        if taken:
            store.unlock()
    return cost
