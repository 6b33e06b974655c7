"""Checks on each call of a tracked layer in a recorded step (the capture's forward hook, :mod:`capture`).

Per-sample blocks are formed per call and summed over a step's calls of a layer (method.md §3), which is right
only when every call takes the batch as its first dimension. Each check here refuses, or warns about, a call
whose first dimension is not the step's samples, naming the layer and the fix.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from . import layers as layer_specs
from .errors import DVEError, UnsupportedError

if TYPE_CHECKING:
    from .capture import TrackedLayer

#: Micro-batches at the fit's start whose tracked layers' inputs are compared (:meth:`CallChecks.input_of`).
PROBED = 3

Print = tuple[float, ...] | None  # :func:`fingerprint`


class CallChecks:
    """The checks of one capture's calls, micro-batch by micro-batch: the state they keep between calls.

    A refused call is kept (:meth:`raise_refused` raises it at the step's end, where DDP ranks agree on errors;
    one rank's batch may be routed otherwise than another's), and its layer's call is not captured.
    """

    def __init__(self, tables: dict[int, weakref.ref] | None = None) -> None:
        self.tables = tables or {}  # the model's tables (model_tables)
        self.sizes: dict[str, int] = {}  # each layer's samples per call in this micro-batch
        self.refused: UnsupportedError | None = None
        self.batch: Any = None  # the micro-batch, whose own ids are not a position table
        self.counts: dict[str, int] = {}  # each layer's calls in this micro-batch, the last one's last (curvature.py)
        self._aranges: tuple[set[str], set[str]] = (set(), set())  # embeddings on arange(n): last, this micro-batch
        # the first micro-batches' inputs of each layer's calls and ("") of the micro-batch itself: last, this one
        self._prints: tuple[dict[str, list[Print]], ...] = ({}, {})
        self._probed = 0

    def reset(self, begin: bool = False) -> None:
        """Forget the micro-batch's calls; ``begin``: a new micro-batch starts."""
        self.sizes, self.refused, self.batch, self.counts = {}, None, None, {}
        self._aranges = (self._aranges[1], set()) if begin else self._aranges
        if begin and self._probed <= PROBED:
            warn_tables(*self._prints)
            self._prints, self._probed = (self._prints[1], {}), self._probed + 1
            if self._probed > PROBED:
                _probe.cache_clear()

    def input_of(self, layer: TrackedLayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        """The call's positional input once its checks pass, else ``None`` (the refusal is kept)."""
        try:
            check_layout(layer)
            args = call_input(layer, args, kwargs)
            check_call(layer, args[0], self.sizes, self.tables)
        except UnsupportedError as err:
            self.refused = self.refused or err
            return None
        self.sizes[layer.name] = args[0].shape[0]
        self.counts[layer.name] = self.counts.pop(layer.name, 0) + 1  # (popped: the last called is the last key)
        if layer.spec.kind == "embedding" and layer_specs.position_lookup(args) and not of_batch(args[0], self.batch):
            if layer.name in self._aranges[0]:
                warn_position_lookup(layer, args[0].numel())
            self._aranges[1].add(layer.name)
        if 0 < self._probed <= PROBED and layer.spec.kind != "embedding" and args[0].stride(0):  # (expanded: its own)
            if "" not in self._prints[1]:  # the micro-batch's own, once
                self._prints[1][""] = [fingerprint(tree_leaves(self.batch))]
            self._prints[1].setdefault(layer.name, []).append(fingerprint([args[0]], rows_alike=True))
        return args

    def raise_refused(self) -> None:
        """Raise the micro-batch's first refused call.

        Raises:
            UnsupportedError: naming the layer, the call and the fix.
        """
        if self.refused is not None:
            raise self.refused


def check_layout(layer: TrackedLayer) -> None:
    """Refuse a call of a layer whose trainable parameters are no longer those of the recorded layout (a frozen
    weight, or a bias frozen or unfrozen, which changes its projection's sides) since this micro-batch's start
    check: by the LightningModule's own ``on_train_batch_start``, which runs after the callbacks'.

    Raises:
        UnsupportedError: naming the layer and where to freeze instead.
    """
    weight = getattr(layer.module, "weight", None)
    if (layer.spec.dims(layer.module) != (layer.projection.output.dim, layer.projection.input.dim)
            or (isinstance(weight, torch.Tensor) and not weight.requires_grad)):
        raise UnsupportedError(
            f"layer {layer.name!r}: its parameters were frozen or unfrozen during fit, after the callback checked "
            "them at this batch's start (in the LightningModule's on_train_batch_start, which runs after the "
            "callbacks', or in training_step). The tracked layers and their bias columns are fixed when fit "
            "starts: freeze in __init__ or setup(), or exclude the layer.")


def model_tables(model: nn.Module) -> dict[int, weakref.ref]:
    """Weak references to each parameter and buffer of ``model`` (of at least one element and dimension), keyed by
    the address of its storage, for :func:`check_call`'s ``tables``: one freed or moved since cannot be matched by
    another tensor at its old address (the check compares the address again), and nothing is kept alive."""
    tensors = [*model.parameters(), *model.buffers()]
    return {_address(t): weakref.ref(t) for t in tensors if t.dim() > 0 and t.numel() > 0}


def call_input(layer: TrackedLayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The call's positional input, also when it was passed by keyword (``lin(input=x)``).

    Raises:
        UnsupportedError: if the call has no input tensor.
    """
    if not args and isinstance(kwargs.get("input"), torch.Tensor):
        return (kwargs["input"],)
    if not args or not isinstance(args[0], torch.Tensor):
        raise UnsupportedError(
            f"layer {layer.name!r} ({type(layer.module).__name__}) was called without an input tensor as its first "
            f"argument (arguments {sorted(kwargs)}): call it as layer(x), or pass exclude=({layer.name!r},).")
    return args


def check_call(layer: TrackedLayer, x: torch.Tensor, sizes: dict[str, int], tables: dict[int, weakref.ref]) -> None:
    """Refuse a call whose first dimension cannot be the step's samples.

    Args:
        layer: the tracked layer.
        x: the call's input.
        sizes: the number of samples of each tracked layer's earlier calls in this step.
        tables: :func:`model_tables` of the model (empty: not checked).

    Raises:
        UnsupportedError: for an unbatched input, a call on no samples or on another number of samples than the
            layer's earlier calls (a subset of the batch: routing, mixture of experts), or an input that is a
            whole parameter or buffer of the model (a table shared by every sample) in a batch of several samples.
    """
    earlier = sizes.get(layer.name)
    rank = layer.spec.input_rank
    least = 1 if layer.spec.least_rank is None else layer.spec.least_rank(layer.module)
    if x.dim() < least or (rank is not None and x.dim() != rank):
        kind, fix = _named(layer)
        raise UnsupportedError(
            f"layer {layer.name!r} ({kind}) was called on an unbatched input of shape {tuple(x.shape)}: capture "
            f"needs the batch as the input's first dimension (an input of shape [B, ...]; a DataLoader with "
            f"batch_size=None over single samples hands them over unbatched), or {fix}.")
    if x.shape[0] == 0 and not any(sizes.values()):  # no layer has seen a sample: the batch itself is empty
        raise UnsupportedError(
            f"layer {layer.name!r} was called on a batch of 0 samples: training_step left none of this batch (it "
            "filters its batch, and kept no sample), whose loss and gradients are then empty (a mean is NaN). Return "
            "None from training_step for such a batch (one process), or, under DDP, where every rank must take the "
            "step, skip the forward and return 0 * sum of the parameters (a zero loss that still reaches every "
            "parameter), or filter the samples in the Dataset or sampler instead.")
    if x.shape[0] == 0 or (earlier is not None and x.shape[0] != earlier):
        after = "" if earlier is None else f" after a call on {earlier} in the same step"
        kind, fix = _named(layer)
        raise UnsupportedError(
            f"layer {layer.name!r} ({kind}) was called on {x.shape[0]} samples{after}: a layer applied to part of "
            f"the batch (routing, a mixture of experts, a second pass over some samples) or to a tensor that is not "
            f"the batch cannot have its per-sample gradients formed. Every call of a tracked layer must take the "
            f"whole batch as its first dimension; {fix} to train it without measuring it.")
    if not tables or not x.stride(0):  # an expanded input is each sample's own
        return
    reference = tables.get(_address(x))
    table = None if reference is None else reference()
    if table is not None and _address(table) == _address(x) and table.shape[0] == x.shape[0] \
            and (x.shape[0] > 1 or any(size > 1 for size in sizes.values())):  # one sample: its table is its own
        expand = "table.expand(b, -1)" if x.shape[0] == 1 else "table.expand(b, *table.shape)"
        kind, fix = _named(layer)
        raise UnsupportedError(
            f"layer {layer.name!r} ({kind}) was called on a parameter or buffer of the model (shape "
            f"{tuple(x.shape)}), a table shared by every sample whose output is broadcast across the batch: its "
            f"first dimension is not the samples, so its rows would be filed under the wrong samples. Expand the "
            f"table over the batch first, e.g. layer({expand}), or {fix}.")


def _named(layer: TrackedLayer) -> tuple[str, str]:
    """The layer's type and the ``exclude=`` fix, for a refusal's message (made only when one is raised)."""
    return type(layer.module).__name__, f"pass exclude=({layer.name!r},)"


def _address(x: torch.Tensor) -> int:
    """The address of ``x``'s storage, without making a storage object (the forward hook runs at every call)."""
    return x.data_ptr() - x.storage_offset() * x.element_size()


def of_batch(x: torch.Tensor, batch: Any) -> bool:
    """Whether ``x`` shares its storage with a tensor of ``batch`` (dicts, lists and tuples are searched)."""
    address = _address(x)
    return any(isinstance(leaf, torch.Tensor) and _address(leaf) == address
               for leaf in tree_leaves(batch))


def fingerprint(tensors: list[Any], rows_alike: bool = False) -> Print:
    """Every tensor's rows (its first dimension) projected on a fixed pseudo-random vector, to tell equal inputs apart
    from others: rows in another order, or one-hot rows of other labels, project elsewhere (``None`` for an input
    whose samples are all alike, each sample's own copy, with ``rows_alike``). One matrix-vector product in the
    tensor's float dtype (float32 at least), not the three float64 sums of a copy that took 0.13 s per step of
    the benchmark LM before session 42."""
    tensors = [t.detach() for t in tensors if isinstance(t, torch.Tensor) and t.numel()]
    if rows_alike and all(t.shape[0] < 2 or bool((t == t[:1]).all()) for t in tensors):
        return None
    rows = [t.reshape(len(t), -1) if t.dim() else t.reshape(1, 1) for t in tensors]
    rows = [r if r.dtype in (torch.float32, torch.float64) else r.to(torch.float32) for r in rows]
    return tuple(float(v) for r in rows for v in (r @ _probe(r.shape[1], r.dtype, r.device)).tolist())


@functools.lru_cache(maxsize=16)
def _probe(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The fixed pseudo-random vector of :func:`fingerprint` for rows of ``length`` (dropped after the probed
    micro-batches, :meth:`CallChecks.reset`)."""
    return torch.randn(length, generator=torch.Generator().manual_seed(length), dtype=torch.float64).to(device, dtype)


def warn_tables(last: dict[str, list[Print]], this: dict[str, list[Print]]) -> None:
    """Warn about tracked layers whose input to a call was the same in two micro-batches of different samples: a
    table shared by every sample (a coordinate grid or positions computed in the forward from a buffer) whose
    output is broadcast across the batch, so its rows would be filed under samples (a parameter or buffer passed
    as it is is refused by :func:`check_call`)."""
    if "" not in last or last.get("") == this.get(""):  # the same micro-batch again (full-batch training)
        return
    for name, prints in this.items():
        if name and any(value is not None and value == other for value, other in zip(prints, last.get(name, []))):
            warnings.warn(f"DataValueEmbedding: layer {name!r} got the same input in two micro-batches of different "
                          "samples: a table shared by every sample (a grid or positions computed in the forward), "
                          "whose output is broadcast across the batch? Its per-sample rows would be filed under the "
                          "table's rows, not the samples. Apply it per sample (expand the table over the batch "
                          f"first: table.expand(b, *table.shape)), or pass exclude=({name!r},).", stacklevel=2)


def warn_position_lookup(layer: TrackedLayer, n: int) -> None:
    """Warn about an embedding looked up on ``arange(n)`` alone in consecutive steps: a position table broadcast
    across the batch (nanoGPT's ``pos(torch.arange(t))``), whose rows capture files under ``n`` samples."""
    warnings.warn(f"DataValueEmbedding: layer {layer.name!r} (Embedding) was called on the ids arange({n}) alone "
                  "in consecutive steps, a position table broadcast across the batch: its rows are filed under "
                  "positions, not samples. Look positions up per sample, e.g. pos(torch.arange(t).expand(b, t)), or "
                  f"pass exclude=({layer.name!r},).", stacklevel=2)


def projected_input(layer: TrackedLayer, args: tuple[Any, ...], proj: torch.Tensor | None) -> torch.Tensor:
    """The layer's input side (:attr:`LayerSpec.project_input`) of a call, for :func:`checked_positions`.

    Raises:
        UnsupportedError: where the layer type's maths cannot read the input (a subclass that overrides ``forward``,
            e.g. timm's ``LayerNorm2d``, which normalises a channels-first input after permuting it); a device out of
            memory is raised as it is.
    """
    try:
        return layer.spec.project_input(layer.module, args, proj)
    except DVEError:  # a refusal of its own (a BatchNorm switched to batch statistics): as it is
        raise
    except RuntimeError as err:
        if isinstance(err, torch.cuda.OutOfMemoryError) or "allocate" in str(err):  # out of memory: as it is
            raise
        raise UnsupportedError(f"{_not_its_maths(layer)} (its input of shape {tuple(args[0].shape)}: {err})") from err


def _not_its_maths(layer: TrackedLayer) -> str:
    """The refusal of a module whose forward does not apply its type's maths to its input."""
    kind = type(layer.module).__name__
    return (f"layer {layer.name!r} ({kind}): its forward does not apply the layer to its input as {kind}'s settings "
            f"describe (a subclass overriding forward, e.g. padding the input inside it like timm's Conv2dSame, or "
            f"permuting it like timm's LayerNorm2d), so its per-sample gradients cannot be formed. Use the plain "
            f"layer type (for 'same' padding: nn.Conv2d(padding='same') at stride 1, or an nn.ZeroPad2d before it; "
            f"for a channels-first LayerNorm: nn.GroupNorm(1, C) normalises over every channel and position, or "
            f"permute around an nn.LayerNorm), or pass exclude=({layer.name!r},)")


def checked_positions(layer: TrackedLayer, output: torch.Tensor, in_side: torch.Tensor) -> torch.Tensor:
    """``in_side`` ``[B, P, k_in]``, once its batch size and positions ``P`` are checked against the output's (the
    output gradient's positions are laid out like the output, method.md §3).

    Raises:
        UnsupportedError: naming the layer, when the module's forward does not apply its type's maths to its input
            (a subclass that overrides ``forward``, e.g. padding inside it like timm's ``Conv2dSame``).
    """
    out_side = layer.spec.project_output_grad(layer.module, output.detach(), None)  # a view: no projection
    positions = layer.spec.input_positions(layer.module, in_side)
    if out_side.shape[:2] != (in_side.shape[0], positions):
        raise UnsupportedError(
            f"{_not_its_maths(layer)} (its input gives {positions} positions per sample for {in_side.shape[0]} samples "
            f"as a {layer.spec.kind} with its own settings would compute them, its output {out_side.shape[1]} for "
            f"{out_side.shape[0]}).")
    return in_side
