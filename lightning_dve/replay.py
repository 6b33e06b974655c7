"""Exact replay mode: the first-order influence of every occurrence, by reverse mode through the recorded run.

For a fixed target ``L(theta_T) = l(theta_T, z_test)`` the score of occurrence ``(t, z)`` is the first-order limit
of TSLOO (method.md §1) for the *actual* update, whatever the optimizer:

    score(t, z) = -w_{t,z} dL(theta_T) / dw_{t,z},      theta_{k+1}, s_{k+1} = U_k(theta_k, s_k, sum_z w_{k,z} grad l_z)

where ``U_k`` is the optimizer step (SGD with momentum / Nesterov / weight decay, Adam, AdamW: the functional
copies of :mod:`lightning_dve.replay_optim`) with step ``k``'s recorded hyperparameters and clipping, and ``s`` its
state. The adjoint ``(a_theta, a_s)`` starts at ``(grad L(theta_T), 0)`` and is carried back one step at a time by
a vector-Jacobian product of ``U_k`` (a double backward through the gradient); the same product gives
``dL/dw_{k,z}`` for the step's samples. Parameters and optimizer state come from the checkpoints
(:mod:`lightning_dve.checkpoints`); each segment between two of them is replayed forward from the recorded batches
(``collate_fn([dataset[i] for i in ids])``) and checked against the next checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import AUTOCAST_PRECISION, DOUBLE_PRECISION, SEGMENT_STATES, CheckpointStore
from .config import LossReduction
from .errors import ConfigError, StoreError, UnsupportedError
from .batches import WeightFn, modes, refusing_dropout
from .replay_data import BatchSource, StepSamples, TrainingData, parameters_as, step_losses, target_gradients
from .replay_optim import OptimizerKind, clip_gradients, update
from .store import CHECKPOINTS, TrajectoryStore

Params = dict[str, torch.Tensor]
OptState = dict[str, dict[str, torch.Tensor]]
Adjoint = dict[tuple[str, str], torch.Tensor]
TrainLossFn = Callable[[nn.Module, Any], torch.Tensor]
#: A segment longer than this is replayed twice (keeping every ~sqrt(n)-th state) instead of keeping every state
#: (``checkpoint_interval="auto"`` sizes small models' segments up to it).
MAX_STATES_IN_MEMORY = SEGMENT_STATES
#: Relative deviation ``||theta_replayed - theta_checkpoint|| / ||theta_checkpoint||`` above which replay is refused.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}
#: The same under bf16 autocast (8-bit mantissa): the replay's batches round otherwise than training's micro-batches.
AUTOCAST_TOLERANCE = 1e-2
#: Target rows carried back by one batched vector-Jacobian product (``torch.func.vmap``): bounds its temporaries.
VJP_ROWS = 64
#: Adjoint bytes (parameters and optimizer state) per batched product, summed over its rows: a larger model's rows go
#: in smaller groups, down to one, whose batched double backward runs faster and holds less (``replay_memory.py``).
VJP_BYTES = 16 * 2**20


def vjp_rows(adjoint: Adjoint) -> int:
    """Rows of ``adjoint`` to carry back per batched product: :data:`VJP_BYTES` over one row's bytes, within
    ``[1, VJP_ROWS]``."""
    row = sum(value[0].numel() * value.element_size() for value in adjoint.values())
    return max(1, min(VJP_ROWS, VJP_BYTES // max(1, row)))


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
        self.forward_steps, self.batched = 0, True  # batched: VJPs of many rows under vmap until an op refuses
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

    def _gradient(self, params: Params, step: int, weights: torch.Tensor, create_graph: bool
                  ) -> list[torch.Tensor | None]:
        """Clipped ``grad_theta sum_z w_z l(theta, z)`` of the step, one entry per optimizer parameter, ``None`` for
        a frozen one (called inside ``parameters_as(self.module, params)``)."""
        with torch.autocast(self.source.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            total = self.losses(self.module, weights, self.record(step))
        grads = torch.autograd.grad(total, [params[n] for n in self.trainable], create_graph=create_graph,
                                    allow_unused=True)
        of = dict(zip(self.trainable, clip_gradients(grads, self.clip.get("value"), self.clip.get("algorithm"))))
        return [of.get(name) for name in self.names]  # None for a frozen parameter: its update skips it

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
            detached = [None if g is None else g.detach() for g in grads]
            new_params, new_state = self._update(leaves, state, detached, step)
        return {n: p.detach() for n, p in new_params.items()}, new_state

    def reverse(self, params: Params, state: OptState, step: int, adjoint: Adjoint) -> tuple[Adjoint, torch.Tensor]:
        """Carry the adjoint of ``(theta_{t+1}, s_{t+1})`` back to ``(theta_t, s_t)``.

        Args:
            adjoint: ``{(name, "param") or (name, state key): [n, *shape]}``, one row per target.

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
        """:meth:`reverse` on leaf tensors, inside ``parameters_as(self.module, p_leaves)``."""
        new_params, new_state = self._update(p_leaves, s_leaves, self._gradient(p_leaves, step, weights, True), step)
        keys = list(adjoint)
        outputs = [new_params[n] if k == "param" else new_state[n][k] for n, k in keys]
        in_keys = [(n, "param") for n in self.names] + [(n, k) for n, e in s_leaves.items() for k in e if k != "step"]
        inputs = [p_leaves[n] if k == "param" else s_leaves[n][k] for n, k in in_keys] + [weights]
        rows, group = next(iter(adjoint.values())).shape[0], vjp_rows(adjoint)
        parts = [self._products(outputs, inputs, [adjoint[key][lo:lo + group] for key in keys])
                 for lo in range(0, rows, group)]
        joined = [torch.cat(column) for column in zip(*parts)]
        return dict(zip(in_keys, joined[:-1])), joined[-1]

    def _products(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], vectors: list[torch.Tensor]
                  ) -> list[torch.Tensor]:
        """``v^T d outputs / d inputs`` for each row ``v`` of ``vectors`` (``[n, *shape]`` per output), stacked per
        input: one ``torch.func.vmap`` over the backward, or one backward per row where vmap cannot run it."""
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


# --- segments and the whole run ------------------------------------------------------------------------------


def _deviation(replayed: Params, expected: Params) -> float:
    """``||replayed - expected|| / ||expected||`` over all parameters."""
    diff = sum(float((replayed[n].double() - e.double()).square().sum()) for n, e in expected.items())
    norm = sum(float(e.double().square().sum()) for e in expected.values())
    return (diff / max(norm, 1e-300)) ** 0.5


def _verify(replayed: Params, expected: Params, step: int, autocast: bool) -> None:
    """Refuse a replay that does not land on the checkpoint of ``step``.

    Raises:
        UnsupportedError: with the measured deviation and the likely causes."""
    tolerance = AUTOCAST_TOLERANCE if autocast else TOLERANCE.get(next(iter(expected.values())).dtype, 1e-4)
    deviation = _deviation(replayed, expected)
    if math.isnan(deviation):
        raise UnsupportedError(
            f"replaying the recorded steps gives NaN parameters before step {step}: a replayed loss or gradient is "
            "not finite (a train_loss_fn or training_step that returns NaN or inf on a one-sample batch). Pass a "
            "train_loss_fn(module, batch) -> Tensor[B] of finite per-sample training losses; influence() still works.")
    if not deviation <= tolerance:
        raise UnsupportedError(
            f"replaying the recorded steps does not reproduce the parameters checkpointed before step {step} "
            f"(relative deviation {deviation:.1e} > {tolerance:.0e}): training was not a deterministic function of "
            "the recorded batches and optimizer (randomness in training_step such as functional dropout, or in "
            "items or a collate_fn that the check of a few items missed, a loss whose value or gradient depends on "
            "batch_idx, which the replay passes as 0, or on current_epoch or global_step, which it leaves at their "
            "final values, the optimizer's state cleared or its momentum switched off and on during fit, which "
            "influence() models, a dataset or collate_fn other than training's (after load, batches rebuilt without "
            "the on_*_batch_transfer hooks: pass a collate_fn= that applies them), sample ids that are not dataset "
            "positions without sample_ids= to map them, or that two items of the dataset share (a ConcatDataset of "
            "parts numbered from 0 each), or a train_loss_fn that is not training's loss, a loss_reduction other "
            "than the loss's own (a cross_entropy with ignore_index or class weights left at 'mean': declare "
            "loss_reduction=callable; influence() refuses it only where its check sees it), weights averaged in at "
            "train end by a callback listed before DataValueEmbedding, activation checkpointing with "
            "use_reentrant=True (use use_reentrant=False), or a resume that warned of other weights). Exact replay "
            "is refused.")


def _sweep(replayer: Replayer, start: tuple[Params, OptState], steps: Sequence[int], stride: int
           ) -> tuple[list[tuple[Params, OptState]], tuple[Params, OptState]]:
    """Replay ``steps`` forward from ``start``; keep the state before every ``stride``-th step, return the end."""
    kept, (params, state) = [], start
    for i, step in enumerate(steps):
        if i % stride == 0:
            kept.append((params, state))
        params, state = replayer.forward(params, state, step)
    return kept, (params, state)


def reverse_segment(replayer: Replayer, start: tuple[Params, OptState], steps: list[int], end: Params,
                    adjoint: dict[tuple[str, str], torch.Tensor], columns: dict[int, torch.Tensor]
                    ) -> dict[tuple[str, str], torch.Tensor]:
    """Replay one segment forward (checked against the checkpoint ``end`` after it), then carry ``adjoint`` back
    through it, writing ``dL/dw`` ``[n, B]`` of every step into ``columns``. A segment longer than
    :data:`MAX_STATES_IN_MEMORY` keeps every ``ceil(sqrt(n))``-th state and replays each chunk again."""
    stride = 1 if len(steps) <= MAX_STATES_IN_MEMORY else int(len(steps) ** 0.5 + 0.999999)
    kept, (last, _) = _sweep(replayer, start, steps, stride)
    _verify(last, end, steps[-1] + 1, replayer.autocast)
    for j in reversed(range(len(kept))):
        chunk = steps[j * stride:(j + 1) * stride]
        states = kept[j:j + 1] if stride == 1 else _sweep(replayer, kept[j], chunk, 1)[0]
        for step, (params, state) in zip(reversed(chunk), reversed(states)):
            adjoint, columns[step] = replayer.reverse(params, state, step, adjoint)
    return adjoint


def _check_final(module: nn.Module, final: Params) -> None:
    """Refuse a module whose parameters are not the recorded final ones (the target is ``L(theta_T)``)."""
    own = dict(module.named_parameters())
    missing = [n for n in final if n not in own]
    if missing:
        raise ConfigError(f"{type(module).__name__} has no parameters {missing[:5]}: pass the module that was trained.")
    deviation = _deviation({n: own[n].detach() for n in final}, final)
    if deviation > TOLERANCE.get(next(iter(final.values())).dtype, 1e-4):
        raise ConfigError(f"the module's parameters differ from those recorded at the end of training (relative "
                          f"deviation {deviation:.1e}): exact replay scores the final model of the recorded run. Pass "
                          "the trained module as it was after its last optimizer step, in its training dtype (weight "
                          "averaging such as StochasticWeightAveraging or EMA replaces the weights after it).")


def final_parameters(replayer: Replayer) -> Params:
    """The recorded final parameters, after checking that the module holds them (the target is ``L(theta_T)``)."""
    end_params, _ = replayer.snapshot(replayer.checkpoints.manifest["final_step"])
    _check_final(replayer.module, end_params)
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
    started = time.perf_counter()
    checkpoints, store = replayer.checkpoints, replayer.store
    manifest = checkpoints.manifest
    final_step = manifest["final_step"]
    bounds = [s for s in checkpoints.snapshot_steps if s < final_step] + [final_step]
    steps = store.steps
    if steps and steps[0] < bounds[0]:
        raise StoreError(f"the first replay checkpoint is before step {bounds[0]} but steps from {steps[0]} are "
                         f"recorded; checkpoint files are missing in {checkpoints.root}. Record the run again.")
    end_params, _ = replayer.snapshot(final_step)
    columns: dict[int, torch.Tensor] = {}
    with modes(replayer.module, manifest.get("eval_modules", [])), \
            refusing_dropout(replayer.module, manifest.get("dropout_modules", [])):
        for lo, hi in reversed(list(zip(bounds[:-1], bounds[1:]))):
            segment = [s for s in steps if lo <= s < hi]
            start = replayer.snapshot(lo)
            if segment:
                adjoint = reverse_segment(replayer, start, segment, end_params, adjoint, columns)
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


def open_checkpoints(root: Path, interval: int | str | None) -> CheckpointStore:
    """The replay checkpoints of the store at ``root``, refusing a run that cannot be replayed exactly.

    Raises:
        ConfigError: if checkpoints were turned off (``checkpoint_interval=None``).
        UnsupportedError: for an optimizer the replay does not model.
        StoreError: if the checkpoints are missing or training did not finish.
    """
    if interval is None:
        raise ConfigError("this run was recorded with checkpoint_interval=None (no replay checkpoints), so "
                          "exact_influence cannot replay it. Record it again with checkpoint_interval='auto' (the "
                          "default) or an int number of steps between checkpoints.")
    checkpoints = CheckpointStore.open(root / CHECKPOINTS)
    manifest = checkpoints.manifest
    if manifest.get("refusal"):
        raise UnsupportedError(f"exact replay is refused for this run: {manifest['refusal']}")
    if manifest.get("final_step") is None:
        raise StoreError(f"the replay checkpoints in {checkpoints.root} have no final state: training did not "
                         "finish. Record the run again.")
    return checkpoints


def make_replayer(store: TrajectoryStore, interval: int | str | None, module: nn.Module, data: TrainingData | None,
                  train_loss_fn: TrainLossFn | None, reduction: LossReduction, weight_fn: WeightFn | None) -> Replayer:
    """A :class:`Replayer` of the recorded run, after checking that it can be replayed (arguments as in
    :meth:`lightning_dve.DataValueEmbeddings.exact_influence`)."""
    checkpoints = open_checkpoints(store.root, interval)
    if data is not None and not (data.sample_ids is None or isinstance(data.sample_ids, str)
                                 or callable(data.sample_ids)):
        raise ConfigError(f"sample_ids must be a dict key (str) or a callable batch -> LongTensor[B], as given to the "
                          f"callback; got {data.sample_ids!r}.")
    if data is not None and data.sample_ids is None:  # after load: the recorded sample_ids key, if it was one
        data = dataclasses.replace(data, sample_ids=checkpoints.manifest.get("sample_ids"))
    if data is None or (data.dataset is None and store.steps):  # a fit that trained no step has nothing to rebuild
        raise ConfigError("exact replay needs the training dataset to rebuild the recorded batches: pass "
                          "dataset= (after load, in the parent process of strategy='ddp_spawn', whose fit ran in "
                          "child processes, or where the training dataloader yields whole batches, batch_size=None; "
                          "after fit it defaults to the training dataloader's dataset).")
    precision = checkpoints.manifest.get("precision")  # float64 inputs as training converted them; bf16 autocast
    source = BatchSource(data, next(module.parameters()).device, torch.float64 if precision in DOUBLE_PRECISION
                         else None)
    losses = step_losses(source, reduction, weight_fn, train_loss_fn, precision == AUTOCAST_PRECISION)
    replayer = Replayer(module, store, checkpoints, source, losses, per_sample_forwards=train_loss_fn is None)
    if store.steps:
        source.check(replayer.record(store.steps[0])[0])
    return replayer
