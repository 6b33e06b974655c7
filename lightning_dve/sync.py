"""One optimizer step over every micro-batch and rank (method.md §2).

One optimizer step is one factor over everything that entered it: the micro-batches of gradient accumulation
and the shards of every data-parallel rank. :class:`StepAssembler` buffers a rank's micro-batches, agrees on
errors with the other ranks (so one failing rank ends the run instead of deadlocking it), and gathers the
global step. Each rank keeps only the layer groups it owns, so the recursion is split across ranks
(:mod:`~lightning_dve.recursion_ranks`).
"""

from __future__ import annotations

import dataclasses

import torch

from .clipping import clip_dots
from .distributed import Communicator
from .errors import RemoteRankError, SampleIdError
from .store import StepRecord
from .updates import StepTerms


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


def assign_groups(groups: list[list[str]], dims: dict[str, int], world_size: int) -> list[list[str]]:
    """Split layer groups over ranks, largest recursion cost (``K^2``) first to the least loaded rank.

    Ties go to the highest rank, so rank 0, which also writes the sample ids and finishes the store (and,
    without a shared disk, writes every embedding), gets the smaller share.

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
    """Collective: raise on every rank if any rank had an error (the failing rank raises its own; the others a
    :class:`RemoteRankError` naming each failed rank and its error, one more gather on that path only).

    Raises:
        RemoteRankError: on ranks that did not fail themselves.
    """
    if not comm.any(error is not None):
        return
    failures = rank_failures(comm, "" if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    causes = "; ".join(text if len(text) <= 400 else text[:400] + "..." for text in failures)
    raise RemoteRankError(f"another rank failed in DataValueEmbedding ({causes}); this rank stops too. That rank's "
                          "traceback has the whole error.")


def rank_zero_text(comm: Communicator, text: str) -> str:
    """Collective: rank 0's ``text`` on every rank (e.g. the run id it drew)."""
    return _gather_text(comm, text)[0]


def rank_failures(comm: Communicator, failure: str) -> list[str]:
    """Collective: every rank's non-empty ``failure``, named by its rank under DDP."""
    texts = _gather_text(comm, failure)
    return [text if comm.world_size == 1 else f"rank {rank}: {text}" for rank, text in enumerate(texts) if text]


def _gather_text(comm: Communicator, text: str) -> list[str]:
    """Collective: every rank's ``text``, indexed by rank."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8).reshape(1, -1)
    return [bytes(part.reshape(-1).tolist()).decode(errors="replace") for part in comm.all_gather_rows(data)]


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

    @property
    def pending(self) -> bool:
        """Whether micro-batches are buffered that no step has closed yet."""
        return bool(self._buffer)

    def discard(self) -> None:
        """Drop the buffered micro-batches (a step that was skipped)."""
        self._buffer = []

    def contributes(self) -> bool:
        """Whether a buffered micro-batch adds to the gradient: a sample of non-zero weight with a non-zero row."""
        return any(bool(rows[(part.weights != 0).to(rows.device)].any())
                   for part in self._buffer for rows in part.grads.values())

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
        # each row's micro-batch, numbered in row order over the ranks (the forwards training ran: replay.py)
        micro = ranks * (int(meta[:, 3].max()) + 1) + meta[:, 3].long()
        batches = torch.unique_consecutive(micro, return_inverse=True)[1]
        self._check_duplicates(sample_ids, ranks, step, last_batch)
        sizes = [self.dims[n] for n in self.layer_names]
        kinds = dict(zip(self.kinds, all_grads.split(sum(sizes), dim=1)))
        # column views; the store makes them contiguous on write
        owned = {kind: dict(zip(self.layer_names, rows.split(sizes, dim=1))) for kind, rows in kinds.items()}
        owned = {kind: {n: rows[n] for n in self.owned} for kind, rows in owned.items()}
        vectors = {kind: {n: values[n] for n in self.owned} for kind, values in terms.vectors.items()}
        return StepRecord(step, sample_ids, meta[:, 2], terms.lrs, owned["grads"], epoch, terms.optim, vectors=vectors,
                          applied_lrs=terms.applied_lrs, batches=batches.to(torch.int32), clip_norm=terms.clip_norm,
                          clip_dots=clip_dots(kinds, meta[:, 2], terms.clip_norm),  # over every layer
                          **{kind: owned[kind] for kind in self.kinds[1:]})

    def _local_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's buffered rows: ``[b, 4]`` (id's high and low 32 bits, weight, micro-batch) in float64, exact
        for every int64 id, and ``[b, kinds * sum k_l]`` rows."""
        buffer, self._buffer = self._buffer, []
        meta = [torch.stack([(m.sample_ids >> 32).to(torch.float64), (m.sample_ids & 0xFFFFFFFF).to(torch.float64),
                             m.weights.to(torch.float64), torch.full_like(m.weights, k, dtype=torch.float64)], dim=1)
                for k, m in enumerate(buffer)]
        grads = [self._row(m) for m in buffer]
        width = sum(self.dims.values()) * len(self.kinds)
        return (torch.cat([torch.zeros(0, 4, dtype=torch.float64), *meta]),
                torch.cat([torch.zeros(0, width, dtype=self.dtype), *grads]))

    def _row(self, micro: MicroBatch) -> torch.Tensor:
        """A micro-batch's rows of every kind side by side, ``[b, kinds * sum k_l]`` in the storage dtype."""
        rows = {"grads": micro.grads, **micro.extra}
        return torch.cat([rows[kind][n].to(self.dtype) for kind in self.kinds for n in self.layer_names], dim=1)

    def _check_duplicates(self, ids: torch.Tensor, ranks: torch.Tensor, step: int, last_batch: bool) -> None:
        if self.allow_duplicate_ids or len(set(ids.tolist())) == ids.numel():  # no id twice: nothing to check
            return
        values, counts = torch.unique(ids, return_counts=True)
        duplicated = values[counts > 1]
        cross_rank = all(ranks[ids == v].unique().numel() == (ids == v).sum() for v in duplicated)
        padding = int((counts[counts > 1] - 1).sum()) < self.comm.world_size  # a DistributedSampler pads fewer
        if last_batch and self.comm.world_size > 1 and cross_rank and padding:  # padding: kept, warned once
            return
        raise SampleIdError(f"sample ids {duplicated.tolist()[:10]} occur more than once in step {step}. If your "
                            "sampler draws with replacement, pass allow_duplicate_ids=True (each copy is then its "
                            "own occurrence); under DDP without a DistributedSampler (use_distributed_sampler=False) "
                            "every rank reads the same samples: split them with a DistributedSampler; otherwise fix "
                            "the ids your batches carry.")


def reached_on_any_rank(comm: Communicator, names: list[str], reached: set[str]) -> set[str]:
    """Collective: the layers of ``names`` some rank's hooks reached in this step (``reached``: this rank's ones);
    under DDP every rank's gradient is in ``.grad``."""
    if comm.world_size == 1:
        return set(reached)
    flags = torch.tensor([[float(name in reached) for name in names]])
    union = torch.cat(comm.all_gather_rows(flags)).amax(dim=0)
    return {name for name, flag in zip(names, union.tolist()) if flag > 0}


def mean_over_ranks(comm: Communicator, vector: torch.Tensor) -> torch.Tensor:
    """Collective: the mean over the ranks of each rank's ``vector`` ``[n]`` (what DDP leaves in ``.grad``)."""
    return torch.cat(comm.all_gather_rows(vector.unsqueeze(0))).mean(dim=0)
