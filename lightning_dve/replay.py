"""Exact replay mode: the first-order influence of every occurrence, by reverse mode through the recorded run.

For a fixed target ``L(theta_T) = l(theta_T, z_test)`` the score of occurrence ``(t, z)`` is the first-order limit
of TSLOO (method.md §1) for the *actual* update, whatever the optimizer:

    score(t, z) = -w_{t,z} dL(theta_T) / dw_{t,z},      theta_{k+1}, s_{k+1} = U_k(theta_k, s_k, sum_z w_{k,z} grad l_z)

where ``U_k`` is the optimizer step (SGD with momentum / Nesterov / weight decay, Adam, AdamW: the functional
copies of :mod:`lightning_dve.replay_optim`) with step ``k``'s recorded hyperparameters and clipping, and ``s`` its
state. The adjoint ``(a_theta, a_s)`` starts at ``(grad L(theta_T), 0)`` and is carried back one step at a time by
a vector-Jacobian product of ``U_k`` (a double backward through the gradient); the same product gives
``dL/dw_{k,z}`` for the step's samples. Where one ``training_step`` per sample would hold more gradient graphs
than :data:`SAMPLE_GRAPH_BYTES`, the product goes through the step's gradient ``g`` as a leaf and then the samples
a chunk at a time (the chain rule through ``g(theta, w)``), so its memory does not grow with the batch.
Parameters and optimizer state come from the checkpoints (:mod:`lightning_dve.checkpoints`); each segment between
two of them is replayed forward from the recorded batches (``collate_fn([dataset[i] for i in ids])``) and checked
against the next checkpoint (:mod:`lightning_dve.replay_checks`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .batches import modes, refusing_dropout
from .checkpoints import AUTOCAST_PRECISION, SEGMENT_STATES, CheckpointStore
from .device_memory import available_bytes
from .errors import StoreError
from .replay_checks import Params, check_final, verify_landing
from .replay_data import BatchSource, StepSamples, parameters_as, target_gradients
from .replay_optim import OptimizerKind, clip_gradients, update
from .replay_vjp import VectorJacobian
from .store import TrajectoryStore

OptState = dict[str, dict[str, torch.Tensor]]
Adjoint = dict[tuple[str, str], torch.Tensor]
TrainLossFn = Callable[[nn.Module, Any], torch.Tensor]
#: States (parameters, optimizer state) a replayed segment keeps at once, at most, per level of replaying again: a
#: longer segment keeps every few and replays each stretch between them again (``checkpoint_interval="auto"`` sizes
#: small models' segments up to it).
MAX_STATES_IN_MEMORY = SEGMENT_STATES
#: Share of the module's device's available memory that a segment's kept states may take.
STATES_SHARE = 0.5
#: Bytes of per-sample gradient graphs held at once by the double backward of a ``training_step`` replay (about
#: twice the trainable weights per sample): a larger model's step is carried back in chunks of fewer samples.
SAMPLE_GRAPH_BYTES = 64 * 2**20


def samples_per_chunk(weights: int, samples: int) -> int:
    """Samples whose ``training_step`` gradient graphs a reverse step holds at once: :data:`SAMPLE_GRAPH_BYTES` over
    about twice the trainable ``weights``' bytes per sample, within ``[1, samples]``."""
    return max(1, min(samples, SAMPLE_GRAPH_BYTES // max(1, 2 * weights)))


@dataclasses.dataclass(frozen=True)
class ReplayCost:
    """What an exact replay cost, against the training it replays.

    Attributes:
        seconds: wall time of the replay.
        training_seconds: wall time of the recorded training loop (``on_train_start`` to ``on_train_end``).
        steps: optimizer steps replayed backwards.
        forward_steps: steps replayed forwards (more than ``steps`` when long segments are replayed twice).
        per_sample_forwards: losses came from one ``training_step`` per sample (no ``train_loss_fn``).
    """

    seconds: float
    training_seconds: float
    steps: int
    forward_steps: int
    per_sample_forwards: bool

    @property
    def relative(self) -> float:
        """``seconds / training_seconds``."""
        return self.seconds / self.training_seconds if self.training_seconds > 0 else float("nan")


# --- the replayed run ----------------------------------------------------------------------------------------


class Replayer:
    """Forward steps (from the recorded batches, weights and hyperparameters) and their vector-Jacobian products.

    Args:
        module: the trained module (its structure and loss; its parameters are swapped, never changed).
        store: the gradient store (sample ids and weights of every step).
        checkpoints: snapshots and per-step hyperparameters.
        source: rebuilds batches.
        losses: ``(module, weights, record(step)) -> sum_z w_z l(theta, z)`` of a recorded step.
        per_sample_forwards: whether ``losses`` runs one forward per sample (reported in the cost).
    """

    def __init__(self, module: nn.Module, store: TrajectoryStore, checkpoints: CheckpointStore, source: BatchSource,
                 losses: Callable[..., torch.Tensor], per_sample_forwards: bool = True) -> None:
        self.module, self.store, self.checkpoints, self.source, self.losses = module, store, checkpoints, source, losses
        self.per_sample_forwards = per_sample_forwards
        self.stage = source.data.stage  # the Trainer's stage as in training (after fit)
        manifest = checkpoints.manifest
        self.kind = OptimizerKind(manifest["kind"])
        self.groups: list[list[str]] = manifest["groups"]
        self.names = [name for group in self.groups for name in group]
        # parameters the optimizer holds, frozen for the whole fit (guards.py): no gradient, skipped here too
        frozen = set(manifest.get("frozen", ()))
        self.trainable = [name for name in self.names if name not in frozen]
        self.clip = manifest.get("clip") or {}
        self.autocast = manifest.get("precision") == AUTOCAST_PRECISION  # bf16-mixed: replayed under autocast
        self.forward_steps, self.products = 0, VectorJacobian()
        self._records: dict[int, StepSamples] = {}

    def record(self, step: int) -> StepSamples:
        """``(sample_ids [B], weights [B], micro-batch of each [B] or None)`` of a recorded step (``StepRecord``;
        weights on the module's device)."""
        if step not in self._records:  # the step file's raw tensors: its rows are not needed, so not decoded
            tensors = self.store.step_files.read(step)
            self._records[step] = (tensors["sample_ids"], tensors["weights"].to(self.source.device),
                                   tensors.get("batches"))
        return self._records[step]

    def snapshot(self, step: int) -> tuple[Params, OptState]:
        """Parameters and optimizer state checkpointed before ``step``, on the module's device."""
        params, state = self.checkpoints.read_snapshot(step)
        device = self.source.device
        return ({n: p.to(device) for n, p in params.items()},
                {n: {k: v if k == "step" else v.to(device) for k, v in e.items()} for n, e in state.items()})

    def _gradient(self, params: Params, step: int, weights: torch.Tensor, create_graph: bool,
                  rows: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """``grad_theta sum_z w_z l(theta, z)`` over the step's samples (those at positions ``rows``, with ``weights``
        theirs), one entry per trainable parameter, ``None`` where the loss does not reach it (called inside
        ``parameters_as(self.module, params)``)."""
        ids, recorded, batches = self.record(step)
        record = (ids, recorded, batches) if rows is None else (ids[rows], recorded[rows],
                                                                 None if batches is None else batches[rows])
        with torch.autocast(self.source.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            total = self.losses(self.module, weights, record)
        return list(torch.autograd.grad(total, [params[n] for n in self.trainable], create_graph=create_graph,
                                        allow_unused=True))

    def _clipped(self, grads: dict[str, torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The update's gradients, clipped as training clipped them, one per optimizer parameter (``None`` for a
        frozen or unreached one: its update skips it)."""
        clipped = clip_gradients(list(grads.values()), self.clip.get("value"), self.clip.get("algorithm"))
        of = dict(zip(grads, clipped))
        return [of.get(name) for name in self.names]

    def _update(
        self, params: Params, state: OptState, grads: list[torch.Tensor | None], step: int
    ) -> tuple[Params, OptState]:
        hyper = self.checkpoints.read_hyper(step)["groups"]
        new_params, new_state, grad_of = {}, {}, dict(zip(self.names, grads))
        for names, h in zip(self.groups, hyper):
            for name in names:
                new_params[name], entries = update(self.kind, params[name], grad_of[name], state.get(name, {}), h)
                if entries:
                    new_state[name] = entries
        return new_params, new_state

    def forward(self, params: Params, state: OptState, step: int) -> tuple[Params, OptState]:
        """``(theta_{t+1}, s_{t+1})`` from ``(theta_t, s_t)``."""
        self.forward_steps += 1
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with self.stage(), parameters_as(self.module, leaves):  # training's stage: checkpointing recomputes too
            grads = self._gradient(leaves, step, self.record(step)[1], create_graph=False)
        with torch.no_grad():
            detached = {n: None if g is None else g.detach() for n, g in zip(self.trainable, grads)}
            new_params, new_state = self._update(leaves, state, self._clipped(detached), step)
        return {n: p.detach() for n, p in new_params.items()}, new_state

    def reverse(self, params: Params, state: OptState, step: int, adjoint: Adjoint) -> tuple[Adjoint, torch.Tensor]:
        """Carry the adjoint of ``(theta_{t+1}, s_{t+1})`` back to ``(theta_t, s_t)``.

        Args:
            adjoint: ``{(name, "param") or (name, state key): [n, *shape]}``, one row per target; emptied once
                carried, so that its rows are freed before the step's per-sample products.

        Returns:
            the adjoint at step ``t`` (same form) and ``dL/dw_{t,z}`` ``[n, B]``.
        """
        p_leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        s_leaves = {n: {k: v.detach().requires_grad_(k != "step") for k, v in e.items()} for n, e in state.items()}
        weights = self.record(step)[1].to(next(iter(params.values())).dtype).clone().requires_grad_(True)
        with self.stage(), parameters_as(self.module, p_leaves):  # the double backward may recompute activations
            return self._carry(p_leaves, s_leaves, weights, step, adjoint)

    def _carry(self, p_leaves: Params, s_leaves: OptState, weights: torch.Tensor, step: int, adjoint: Adjoint
               ) -> tuple[Adjoint, torch.Tensor]:
        """:meth:`reverse` on leaf tensors, inside ``parameters_as(self.module, p_leaves)``: one double backward
        through the step's losses and update, or :meth:`_carry_in_chunks` where the samples' graphs would not fit."""
        chunks = self._chunks(step, p_leaves)
        if len(chunks) > 1:
            return self._carry_in_chunks(p_leaves, s_leaves, weights, step, adjoint, chunks)
        grads = dict(zip(self.trainable, self._gradient(p_leaves, step, weights, True)))
        new_params, new_state = self._update(p_leaves, s_leaves, self._clipped(grads), step)
        in_keys, carried = self._through_update(adjoint, (new_params, new_state), (p_leaves, s_leaves), [weights])
        return dict(zip(in_keys, carried[:-1])), carried[-1]

    def _chunks(self, step: int, params: Params) -> list[torch.Tensor]:
        """Positions of the step's samples, in chunks of at most :data:`SAMPLE_GRAPH_BYTES` of gradient graphs (one
        chunk for a batched ``train_loss_fn`` or a bf16 replay, whose losses come from whole micro-batches)."""
        samples = len(self.record(step)[0])
        size = sum(params[n].numel() * params[n].element_size() for n in self.trainable)
        per_chunk = samples_per_chunk(size, samples) if self.per_sample_forwards and not self.autocast else samples
        return list(torch.arange(samples).split(max(1, per_chunk)))

    def _carry_in_chunks(self, p_leaves: Params, s_leaves: OptState, weights: torch.Tensor, step: int,
                         adjoint: Adjoint, chunks: list[torch.Tensor]) -> tuple[Adjoint, torch.Tensor]:
        """:meth:`_carry` by the chain rule through ``g = sum_z w_z grad l_z(theta)``: ``u = (dU/dg)^T a`` from the
        update alone, with ``g`` a leaf; then chunk by chunk ``a_theta += sum_z w_z H_z u`` and
        ``dL/dw_z = grad l_z . u``, one chunk's graphs at a time (memory: the model times the chunk, not the batch).
        """
        weights = weights.detach()
        total = self._summed_gradient(p_leaves, step, weights, chunks)
        reached = [(i, n) for i, n in enumerate(self.trainable) if total[i] is not None]
        g = {n: total[i].detach().requires_grad_(True) for i, n in reached}
        new_params, new_state = self._update(p_leaves, s_leaves, self._clipped(g), step)
        in_keys, carried = self._through_update(adjoint, (new_params, new_state), (p_leaves, s_leaves),
                                                list(g.values()))
        out, u = dict(zip(in_keys, carried[:len(in_keys)])), carried[len(in_keys):]
        columns = []
        for rows in chunks:
            w = weights[rows].requires_grad_(True)
            grads = self._gradient(p_leaves, step, w, True, rows)
            pairs = [(grads[i], vector) for (i, _), vector in zip(reached, u) if grads[i] is not None]
            if not pairs:  # its losses reach no parameter (a sample outside the step, NaN on its own): 0
                columns.append(weights.new_zeros(len(next(iter(out.values()))), len(rows)))
                continue
            products = self.products([grad for grad, _ in pairs], [p_leaves[n] for n in self.trainable] + [w],
                                     [vector for _, vector in pairs])
            for name, product in zip(self.trainable, products):
                out[(name, "param")] += product
            columns.append(products[-1])
        return out, torch.cat(columns, dim=1)

    def _summed_gradient(self, params: Params, step: int, weights: torch.Tensor, chunks: list[torch.Tensor]
                         ) -> list[torch.Tensor | None]:
        """:meth:`_gradient` of the whole step without a graph, summed as the chunks come."""
        total: list[torch.Tensor | None] = [None] * len(self.trainable)
        for rows in chunks:
            for i, part in enumerate(self._gradient(params, step, weights[rows], False, rows)):
                if part is not None:
                    total[i] = part if total[i] is None else total[i] + part
        return total

    def _through_update(self, adjoint: Adjoint, after: tuple[Params, OptState], before: tuple[Params, OptState],
                        extra: list[torch.Tensor]) -> tuple[list[tuple[str, str]], list[torch.Tensor]]:
        """``a^T d(theta_{t+1}, s_{t+1}) / d(theta_t, s_t, *extra)``: the keys of ``(theta_t, s_t)`` and the
        products, one ``[n, *shape]`` per key, then one per tensor of ``extra``."""
        (new_params, new_state), (params, state) = after, before
        in_keys = [(n, "param") for n in self.names] + [(n, k) for n, e in state.items() for k in e if k != "step"]
        outputs = [new_params[n] if k == "param" else new_state[n][k] for n, k in adjoint]
        inputs = [params[n] if k == "param" else state[n][k] for n, k in in_keys] + extra
        carried = self.products(outputs, inputs, list(adjoint.values()))
        adjoint.clear()  # carried (carry_back passes its own copy)
        return in_keys, carried


# --- segments and the whole run ------------------------------------------------------------------------------


def _sweep(replayer: Replayer, start: tuple[Params, OptState], steps: Sequence[int], stride: int, to_end: bool
           ) -> tuple[list[tuple[Params, OptState]], tuple[Params, OptState]]:
    """Replay ``steps`` forward from ``start``; keep the state before every ``stride``-th step and return the end
    state (``to_end``), or stop at the last state kept."""
    kept, (params, state) = [], start
    last = len(steps) if to_end else (len(steps) - 1) // stride * stride
    for i, step in enumerate(steps[:last]):
        if i % stride == 0:
            kept.append((params, state))
        params, state = replayer.forward(params, state, step)
    if not to_end:
        kept.append((params, state))
    return kept, (params, state)


def state_bytes(state: tuple[Params, OptState]) -> int:
    """Bytes of one replayed state: its parameters and optimizer state."""
    tensors = [*state[0].values(), *(v for e in state[1].values() for k, v in e.items() if k != "step")]
    return sum(t.numel() * t.element_size() for t in tensors)


def states_per_level(size: int, steps: int, device: torch.device) -> int:
    """States of ``size`` bytes to keep per level: the most, within :data:`MAX_STATES_IN_MEMORY`, such that the
    levels ``d`` that a segment of ``steps`` needs (``keep ** d >= steps``) hold them all in :data:`STATES_SHARE` of
    the memory available on ``device`` (at least 2: a larger model is replayed more often, never refused)."""
    have = available_bytes(device)
    if have is None:
        return MAX_STATES_IN_MEMORY
    fit = int(STATES_SHARE * have) // max(1, size)
    for depth in range(1, steps + 1):
        keep = min(MAX_STATES_IN_MEMORY, fit // depth)
        if keep < 2 or keep ** depth >= steps:
            return max(2, keep)
    return 2


def reverse_segment(replayer: Replayer, start: tuple[Params, OptState], steps: list[int], end: Params,
                    adjoint: dict[tuple[str, str], torch.Tensor], columns: dict[int, torch.Tensor], size: int
                    ) -> dict[tuple[str, str], torch.Tensor]:
    """Replay one segment forward (checked against the checkpoint ``end`` after it), then carry ``adjoint`` back
    through it, writing ``dL/dw`` ``[n, B]`` of every step into ``columns``. A segment longer than
    :func:`states_per_level` of states of ``size`` bytes keeps every few states and replays each stretch between
    them again."""
    keep = states_per_level(size, len(steps), next(iter(end.values())).device)
    stride = -(-len(steps) // keep)
    kept, (last, _) = _sweep(replayer, start, steps, stride, to_end=True)
    verify_landing(last, end, steps[-1] + 1, replayer.autocast)
    return _reverse_kept(replayer, kept, steps, stride, keep, adjoint, columns)


def _reverse_kept(replayer: Replayer, kept: list[tuple[Params, OptState]], steps: list[int], stride: int, keep: int,
                  adjoint: Adjoint, columns: dict[int, torch.Tensor]) -> Adjoint:
    """Carry ``adjoint`` back through ``steps`` from the states kept before every ``stride``-th of them: each
    stretch from its state, replayed again (at most ``keep`` states per level) unless it is one step."""
    for j in reversed(range(len(kept))):
        state, stretch = kept.pop(), steps[j * stride:(j + 1) * stride]
        if len(stretch) == 1:
            adjoint, columns[stretch[0]] = replayer.reverse(*state, stretch[0], adjoint)
            continue
        inner = -(-len(stretch) // keep)
        adjoint = _reverse_kept(replayer, _sweep(replayer, state, stretch, inner, to_end=False)[0], stretch, inner,
                                keep, adjoint, columns)
    return adjoint


def final_parameters(replayer: Replayer) -> Params:
    """The recorded final parameters, after checking that the module holds them (the target is ``L(theta_T)``)."""
    end_params, _ = replayer.snapshot(replayer.checkpoints.manifest["final_step"])
    check_final(replayer.module, end_params)
    return end_params


def replay_scores(replayer: Replayer, target: Callable[[nn.Module], torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ReplayCost]:
    """:func:`carry_back` of the targets' gradients at the final parameters, ``scores [n, m]`` (module docstring)."""
    return carry_back(replayer, target_gradients(replayer.module, final_parameters(replayer), target))


def carry_back(replayer: Replayer, adjoint: Adjoint) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ReplayCost]:
    """``(sample_ids [m], steps [m], scores [n, m], cost)`` of every recorded occurrence, by step then position.

    ``scores[i, (t, z)] = -w_{t,z} dL_i(theta_T)/dw_{t,z}`` (the first-order TSLOO, module docstring) for the
    targets whose gradients ``dL_i/dtheta_T`` are the rows of ``adjoint`` (``{(name, "param"): [n, *shape]}``).

    Raises:
        UnsupportedError: a module ran dropout in train mode (:func:`~lightning_dve.batches.refusing_dropout`), or
            the replay does not land on a checkpoint.
    """
    started, adjoint = time.perf_counter(), dict(adjoint)  # each step's carry empties the adjoint it was given
    checkpoints, store = replayer.checkpoints, replayer.store
    manifest = checkpoints.manifest
    final_step = manifest["final_step"]
    bounds = [s for s in checkpoints.snapshot_steps if s < final_step] + [final_step]
    steps = store.steps
    if steps and steps[0] < bounds[0]:
        raise StoreError(f"the first replay checkpoint is before step {bounds[0]} but steps from {steps[0]} are "
                         f"recorded; checkpoint files are missing in {checkpoints.root}. Record the run again.")
    end_params, end_state = replayer.snapshot(final_step)
    size, columns = state_bytes((end_params, end_state)), {}  # the optimizer's state in full (empty at step 0)
    with modes(replayer.module, manifest.get("eval_modules", [])), \
            refusing_dropout(replayer.module, manifest.get("dropout_modules", [])):
        for lo, hi in reversed(list(zip(bounds[:-1], bounds[1:]))):
            segment = [s for s in steps if lo <= s < hi]
            start = replayer.snapshot(lo)
            if segment:
                adjoint = reverse_segment(replayer, start, segment, end_params, adjoint, columns, size)
            end_params = start[0]
    cost = ReplayCost(time.perf_counter() - started, float(manifest.get("training_seconds", 0.0)), len(steps),
                      replayer.forward_steps, replayer.per_sample_forwards)
    if not steps:  # nothing recorded (every training_step returned None): no occurrence to score
        empty, rows = torch.zeros(0, dtype=torch.int64), next(iter(adjoint.values()))
        return empty, empty, rows.new_zeros(rows.shape[0], 0).cpu(), cost
    ids = [replayer.record(s)[0] for s in steps]
    scores = [(-replayer.record(s)[1].to(columns[s].dtype) * columns[s]).cpu() for s in steps]
    return (torch.cat(ids), torch.cat([torch.full_like(i, s) for i, s in zip(ids, steps)]),
            torch.cat(scores, dim=1), cost)
