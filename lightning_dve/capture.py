"""Capture of projected per-sample gradients from the training backward itself (method.md §3).

A forward hook on each tracked layer projects its input (``P_in v``, the only activation kept); a tensor hook
on the layer's output projects the output gradient (``P_out delta``) when the backward reaches it and forms
the per-sample block at once. No second forward or backward pass is made. The loss reduction's local scale is
undone at the end of the step, so what leaves this module is the gradient of the per-sample loss itself
(method.md §2, scale conventions).
"""

from __future__ import annotations

import dataclasses
import weakref
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from . import call_checks
from . import layers as layer_specs
from .config import DVEConfig
from .errors import ConfigError, UnsupportedError
from .layers import excluded
from .projection import LayerProjection
from .transfer import to_host

#: Kinds of per-sample rows a step yields: gradients, curvature rows, and their preconditioned versions.
GRADS, CURVATURE, GRADS_Q, CURVATURE_Q = "grads", "curvature", "preconditioned", "curvature_preconditioned"
ROW_KINDS = (GRADS, CURVATURE, GRADS_Q, CURVATURE_Q)


def extra_row_kinds(curvature_rows: bool, preconditioned: bool) -> tuple[str, ...]:
    """The rows a step records besides the gradients: curvature rows (GGN) and, under projected Adam, the
    gradients (and curvature rows) through its preconditioner."""
    kinds = (CURVATURE,) if curvature_rows else ()
    if preconditioned:
        kinds += (GRADS_Q, CURVATURE_Q) if curvature_rows else (GRADS_Q,)
    return kinds


@dataclasses.dataclass(frozen=True)
class TrackedLayer:
    """A module whose per-sample gradients are captured, with its spec and projection."""

    name: str
    module: nn.Module
    spec: layer_specs.LayerSpec
    projection: LayerProjection

    def describe(self) -> dict[str, Any]:
        """Manifest entry: kind, exact shape and projection."""
        d_out, d_in = self.spec.dims(self.module)
        return {"name": self.name, "kind": self.spec.kind, "out_dim": d_out, "in_dim": d_in,
                "projection": self.projection.to_dict()}


def resolve_layers(model: nn.Module, config: DVEConfig) -> dict[str, TrackedLayer]:
    """Pick the layers to track (``config.layers`` or every supported trainable module, minus excludes).

    Raises:
        ConfigError: if a named layer does not exist or nothing is left to track.
        UnsupportedError: if a tracked layer is unsupported, or (default selection) a module with trainable
            parameters would silently go untracked.
    """
    modules = dict(model.named_modules())
    unmatched = [p for p in config.exclude if not any(excluded(name, (p,)) for name in modules if name)]
    if unmatched:
        warnings.warn(f"DataValueEmbedding: exclude patterns {unmatched} match no module of {type(model).__name__} "
                      f"(a typo?); its modules are named like {[n for n in modules if n][:6]}.", stacklevel=2)
    if config.layers is not None:
        missing = [n for n in config.layers if n not in modules]
        if missing:
            candidates = [n for n, m in modules.items() if layer_specs.spec_for(m) is not None]
            raise ConfigError(f"layers {missing} are not modules of {type(model).__name__}; "
                              f"supported modules it has: {candidates}.")
        names = [n for n in config.layers if not excluded(n, config.exclude)]
        layer_specs.refuse_containers(modules, names)
    else:
        own = layer_specs.own_trainable
        if own(model):
            raise UnsupportedError(
                f"{type(model).__name__} itself owns trainable parameters {own(model)}; capture tracks "
                "submodules only. Move them into a supported submodule (e.g. nn.Linear), or into a submodule of "
                "their own passed in exclude= (they then train without a data value, e.g. a per-channel scale), or "
                "freeze them."
            )
        owners = [n.split(".parametrizations.")[0] for n, m in modules.items() if n and own(m)]
        names = [n for n in dict.fromkeys(owners) if not excluded(n, config.exclude)]
    layer_specs.refuse_unsupported_types({name: modules[name] for name in names})
    tracked = {}
    for name in names:
        module = modules[name]
        spec = layer_specs.check_trackable(name, module)
        d_out, d_in = spec.dims(module)
        projection = LayerProjection.create(name, d_out, d_in, config.projection_dim, config.seed)
        tracked[name] = TrackedLayer(name, module, spec, projection)
    if not tracked:
        known = [n for n, m in modules.items() if n and layer_specs.spec_for(m) is not None]
        frozen = [n for n in known if not any(p.requires_grad for p in modules[n].parameters(recurse=False))]
        raise ConfigError(f"no layer to track in {type(model).__name__} (layers={config.layers}, exclude="
                          f"{config.exclude}; frozen supported layers: {frozen or 'none'}): the callback values the "
                          "training of supported layers that train. Unfreeze one, or change layers=/exclude=; "
                          f"supported types are {layer_specs.supported_types()}.")
    return tracked


def _input_dtype(module: nn.Module, args: tuple[Any, ...]) -> torch.dtype:
    """The dtype the input projection runs in: the activation's (bf16 under autocast, so the projection is not
    converted at every call), or the weight's for integer inputs (embedding ids)."""
    x = args[0] if args else None
    return x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else module.weight.dtype


@dataclasses.dataclass
class CurvaturePass:
    """The capture whose curvature pass runs (``None``: none), shared by the captures of one Trainer's callbacks: the
    others ignore that backward, and the forwards it recomputes (activation checkpointing)."""

    owner: GradientCapture | object | None = None  # (object: a backward no capture takes, curvature.py)


class GradientCapture:
    """Hooks that collect one step's per-sample blocks ``{layer: [B, k_l]}`` for the tracked layers.

    Use :meth:`attach` once, then for each step :meth:`begin`, run the forward/backward, and :meth:`finish`.
    Hooks do nothing outside ``begin``/``finish``, so validation and prediction are untouched.
    """

    def __init__(self, layers: dict[str, TrackedLayer], tables: dict[int, weakref.ref] | None = None,
                 shared: CurvaturePass | None = None) -> None:
        self.layers = layers
        self.shared = shared or CurvaturePass()  # with the Trainer's other captures
        self.calls = call_checks.CallChecks(tables)  # each call takes the batch (refusals kept for the step's end)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False
        self._inputs: dict[str, list[torch.Tensor | None]] = {}
        self._inputs_q: dict[str, list[torch.Tensor | None]] = {}
        self._rows: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in ROW_KINDS}
        self._preconditioner: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._curvature_pass = False
        self._backward = False  # the training backward has started: a forward now is a recomputation
        self._without_autograd: set[str] = set()  # layers called with autograd off in this step
        self._keep_outputs = False
        self._generation = 0
        self.outputs: list[torch.Tensor] = []
        self._output_hooks: list[torch.utils.hooks.RemovableHandle] = []  # on this step's tracked outputs
        self.logits: tuple[torch.Tensor, torch.Tensor | None] | None = None  # last output and its training grad

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if not self._handles:
            self._handles = [t.module.register_forward_hook(partial(self._on_forward, t), with_kwargs=True)
                             for t in self.layers.values()]

    def detach(self) -> None:
        """Remove every hook and drop pending state."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.calls.tables = [], {}
        self._reset(active=False)

    def _reset(self, active: bool, keep_outputs: bool = False) -> None:
        self._generation += 1  # output hooks of an earlier step become no-ops
        self._active = active
        self._keep_outputs = keep_outputs
        self._backward, self._without_autograd = False, set()
        self.calls.reset(begin=active)
        self._inputs = {name: [] for name in self.layers}
        self._inputs_q = {name: [] for name in self.layers}
        self._rows = {kind: {} for kind in ROW_KINDS}
        self.outputs, self._output_hooks = [], []
        self.logits = None

    def begin(self, keep_outputs: bool = False, batch: Any = None) -> None:
        """Start collecting a step.

        Args:
            keep_outputs: also keep the tracked layers' outputs in :attr:`outputs`, for a caller that runs
                its own ``torch.autograd.grad`` with respect to them (queries, which must not touch ``.grad``),
                and the last one with its gradient in the training backward in :attr:`logits`.
            batch: the micro-batch, if known: embedding ids taken from it are per sample, never a position table.
        """
        self._reset(active=True, keep_outputs=keep_outputs)
        self.calls.batch = batch

    def abort(self) -> None:
        """Stop collecting and drop whatever the step collected."""
        self._reset(active=False)

    def pause(self) -> None:
        """Stop collecting until :meth:`begin`, keeping the rows (an optimizer re-evaluating its closure: LBFGS)."""
        self._generation, self._active = self._generation + 1, False

    def set_preconditioner(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Also capture preconditioned rows ``P_out (r * delta) (P_in (c * a))^T`` (``None``: stop).

        The rank-1 preconditioner ``r c^T`` of a layer's block (Adam's ``1 / (sqrt(v) + eps)``, adam.py) scales
        the projection matrices' columns, so the preconditioned rows cost two more thin matmuls per layer.

        Args:
            factors: ``{layer: (r [d_out], c [d_in])}`` for every tracked layer.
        """
        self._preconditioner = {}
        for name, (r, c) in (factors or {}).items():
            layer = self.layers[name]
            d_out, d_in = layer.spec.dims(layer.module)
            sides = []
            for side, scale, dim in (("out", r, d_out), ("in", c, d_in)):
                matrix = layer.projection.side_matrix(side, scale.dtype, scale.device)
                sides.append((torch.eye(dim, dtype=scale.dtype, device=scale.device) if matrix is None else matrix)
                             * scale.unsqueeze(0))
            self._preconditioner[name] = (sides[0], sides[1])

    @property
    def _blocks(self) -> dict[str, torch.Tensor]:
        """The step's gradient rows so far, ``{layer: [B, k_l]}`` (loss weights not yet divided out)."""
        return self._rows[GRADS]

    @property
    def captured(self) -> bool:
        """Whether the backward of the current step reached at least one tracked layer."""
        return bool(self._blocks)

    def start_backward(self) -> None:
        """Mark the backward's start: later forwards recompute (checkpointing), kept out of ``outputs``/``logits``."""
        self._backward = True
        self._hooks_last()

    def _hooks_last(self) -> None:
        """Move each output hook after the hooks the model put on that output since (``h.register_hook(lambda g:
        g * s)``, gradient scaling or reversal), so that it reads the gradient they hand on, as ``.grad`` does."""
        for handle in self._output_hooks:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and len(hooks) > 1 and handle.id in hooks:
                hooks[handle.id] = hooks.pop(handle.id)  # autograd calls them in the dict's order

    def without_autograd(self) -> set[str]:
        """Tracked layers that the step called only with autograd off (``torch.no_grad``, or the first forward of
        activation checkpointing with ``use_reentrant=True``, which autograd reaches only by recomputing it)."""
        return {name for name in self._without_autograd if not self._inputs[name]}

    @torch.no_grad()  # the projected inputs need no graph: autograd records nothing for them
    def _on_forward(self, layer: TrackedLayer, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output: Any) -> None:
        owner = self.shared.owner  # another capture's curvature pass recomputes it (checkpointing)
        if not self._active or not isinstance(output, torch.Tensor) or owner not in (None, self):
            return
        if not output.requires_grad:
            self._without_autograd.add(layer.name)
            return
        recomputed = self._backward or self._curvature_pass
        args = self.calls.input_of(layer, args, kwargs)
        if args is None:  # refused: raised at the step's end
            return
        p_in = layer.projection.side_matrix("in", _input_dtype(module, args), module.weight.device)
        pending = self._inputs[layer.name]
        pending.append(call_checks.checked_positions(layer, output, call_checks.projected_input(layer, args, p_in)))
        if self._preconditioner:
            p_in_q = self._preconditioner[layer.name][1]
            self._inputs_q[layer.name].append(layer.spec.project_input(module, args, p_in_q))
        if self._keep_outputs and not recomputed:
            self.outputs.append(output)
            self.logits = (output.detach(), None)  # the last output so far; its hook adds the training gradient
        hook = partial(self._on_output_grad, layer, self._generation, len(pending) - 1,
                       None if recomputed else self.logits)
        if self._backward and output.grad_fn is not None:  # recomputed in the backward (reentrant checkpointing):
            at = output.output_nr  # its node's pre-hook sees the gradient after the tensor's hooks, added later
            output.grad_fn.register_prehook(lambda grads: None if grads[at] is None else hook(grads[at]))
        else:
            self._output_hooks.append(output.register_hook(hook))

    def _on_output_grad(self, layer: TrackedLayer, generation: int, call: int,
                        logits: tuple[torch.Tensor, None] | None, grad: torch.Tensor) -> None:
        owner = self.shared.owner
        if not self._active or generation != self._generation or owner not in (None, self):
            return
        if logits is not None and logits is self.logits and not self._curvature_pass:  # still the last output
            self.logits = (logits[0], grad.detach())
        in_side = self._inputs[layer.name][call]
        if in_side is None:
            return
        in_q = self._inputs_q[layer.name][call] if self._preconditioner else None
        if not self._curvature_pass:  # the training backward comes last: release the projected activations
            self._inputs[layer.name][call] = None
            if in_q is not None:
                self._inputs_q[layer.name][call] = None
        kind, kind_q = (CURVATURE, CURVATURE_Q) if self._curvature_pass else (GRADS, GRADS_Q)
        p_out = layer.projection.side_matrix("out", grad.dtype, grad.device)
        p_in = layer.projection.side_matrix("in", in_side.dtype, in_side.device)
        self._add(kind, layer, grad, (p_out, p_in), in_side)
        if in_q is not None:
            self._add(kind_q, layer, grad, self._preconditioner[layer.name], in_q)

    def _add(self, kind: str, layer: TrackedLayer, grad: torch.Tensor,
             sides: tuple[torch.Tensor | None, torch.Tensor | None], in_side: torch.Tensor) -> None:
        """Add ``(P_out delta)(P_in a)^T`` per sample to the step's rows of ``kind`` (method.md §3), with
        ``sides = (P_out, P_in)`` (``P_in`` is already in ``in_side`` unless the layer forms its own block)."""
        block = layer.spec.sample_blocks(layer.module, grad.detach(), sides[0], in_side.detach(), sides[1])
        previous = self._rows[kind].get(layer.name)
        self._rows[kind][layer.name] = block if previous is None else previous + block

    def curvature_backward(self, output_grad: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Capture curvature rows: backpropagate ``output_grad(logits)`` from the last tracked output (method.md §2).

        Runs before the training backward (graph retained) and computes gradients of activations only: the
        tracked layers' hooks form the per-sample blocks ``J_z^T v_z`` of the vectors ``v = output_grad(logits)
        [B, C]`` given at the last tracked layer's output, kept apart from the gradients. Needs
        ``begin(keep_outputs=True)``.
        """
        logits = self.outputs[-1]
        self._hooks_last()
        self._curvature_pass, self.shared.owner = True, self
        try:
            torch.autograd.grad(logits, self.outputs, output_grad(logits.detach()), retain_graph=True,
                                allow_unused=True)
        finally:
            self._curvature_pass, self.shared.owner = False, None
            self.outputs = []

    def take(self, kind: str, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The step's rows of ``kind`` (one of :data:`ROW_KINDS`) ``{layer: [B, k_l]}`` on the CPU.

        Rows of the training backward hold ``w_i * grad l_i``: pass the loss weights ``w`` ``[B]`` to divide them
        out (method.md §2); samples with ``w_i = 0`` get zeros. Curvature rows are per sample as they are.
        Layers not reached get zeros.
        """
        batch = self.batch_size()
        reference = next(iter(self._blocks.values()))
        dims = {name: layer.projection.dim for name, layer in self.layers.items()}
        captured = self._rows[kind]
        blocks = {name: captured[name] if name in captured else reference.new_zeros(batch, dim)
                  for name, dim in dims.items()}
        if len({block.device for block in blocks.values()}) > 1:  # a model spread over devices: layer by layer
            return {name: self._scaled(block, weights) for name, block in to_host(blocks).items()}
        rows = to_host({kind: self._scaled(torch.cat(list(blocks.values()), dim=1), weights)})[kind]
        return dict(zip(blocks, rows.split(list(dims.values()), dim=1)))  # one multiply and one copy per step

    @staticmethod
    def _scaled(rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """``rows [B, k]`` with row ``i`` divided by ``weights[i]`` (zero where the weight is zero)."""
        if weights is None:
            return rows
        inverse = torch.where(weights != 0, 1.0 / weights.to(torch.float64), 0.0)
        return rows * inverse.to(rows.device, rows.dtype).unsqueeze(1)

    def modules(self) -> dict[str, nn.Module]:
        """The tracked modules, in layer order."""
        return {name: layer.module for name, layer in self.layers.items()}

    def weights(self) -> dict[str, nn.Parameter]:
        """The tracked layers' weight parameters, in layer order."""
        return {name: layer.module.weight for name, layer in self.layers.items()}

    def reached(self) -> set[str]:
        """The tracked layers whose blocks the current micro-batch captured."""
        return set(self._blocks)

    def block_sums(self, names: list[str]) -> dict[str, torch.Tensor | None]:
        """The captured blocks of tracked layers ``names`` summed over the samples (``None``: not reached)."""
        return {name: self._blocks[name].sum(dim=0) if name in self._blocks else None for name in names}

    def block_mass(self, name: str) -> float:
        """``sum_z |block_z|`` of a reached layer's captured blocks: what rounding of their sum scales with."""
        return float(self._blocks[name].norm(dim=1).sum())

    def batch_size(self) -> int:
        """Number of samples in the captured step (first dim of the captured blocks).

        Raises:
            UnsupportedError: for a refused call (:meth:`CallChecks.raise_refused`), or if the tracked layers saw
                different batch sizes.
        """
        self.calls.raise_refused()
        sizes = {name: block.shape[0] for name, block in self._blocks.items()}
        if len(set(sizes.values())) != 1:
            raise UnsupportedError(
                f"tracked layers saw different batch sizes {sizes}: a tracked layer must see the batch as its "
                "first dimension. Exclude layers that run on reshaped inputs or on part of the batch (routing, "
                "a mixture of experts, some samples under torch.no_grad); a position embedding looked up as "
                "pos(torch.arange(t)) and broadcast across the batch can instead be looked up per sample, "
                "pos(torch.arange(t).expand(b, t))."
            )
        return next(iter(sizes.values()))

    def finish(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Close the step: undo the loss reduction and return ``{layer: g [B, k_l]}`` on the CPU.

        The hooked block of sample ``i`` is ``w_i * grad l_i``; dividing by ``w_i`` gives the gradient of the
        per-sample loss (method.md §2). Samples with ``w_i = 0`` get a zero gradient (they do not enter the
        step). Layers the backward never reached get zeros.

        Args:
            weights: per-sample loss weights ``w`` ``[B]`` applied inside the loss (``1/B`` for a mean).
        """
        grads = self.take(GRADS, weights)
        self._reset(active=False)
        return grads
