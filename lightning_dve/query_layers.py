"""The recorded layers in a query module, and the test gradients taken through them (the checks of the test loss
itself: :mod:`.loss_checks`).

A query takes test gradients with respect to the tracked layers' outputs, whatever the module's ``requires_grad``
flags: frozen weights (``LightningModule.freeze()``) are made trainable for the query's duration only, with each
bias set to the layout the recording used (its ``in_dim`` has a bias column or not).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import layers as layer_specs
from .batch_trees import count_samples, map_tensors
from .capture import GradientCapture, TrackedLayer
from .errors import ConfigError, LayerMismatchError
from .guards import sampled_entries
from .projection import LayerProjection
from .results import warn_non_finite_rows


def _set_flag(tensor: Any, flag: bool, saved: list[tuple[torch.Tensor, bool]]) -> None:
    """Set ``tensor.requires_grad`` to ``flag`` (a leaf tensor only), remembering the old flag in ``saved``."""
    if isinstance(tensor, torch.Tensor) and tensor.is_leaf and tensor.requires_grad != flag:
        saved.append((tensor, tensor.requires_grad))
        tensor.requires_grad_(flag)


def _as_recorded(module: nn.Module, spec: layer_specs.LayerSpec, in_dim: int,
                 saved: list[tuple[torch.Tensor, bool]]) -> None:
    """Make ``module``'s weight require grad, and its bias exactly when the recorded block has a bias column.

    The bias is dropped only when that makes the block's input width the recorded ``in_dim`` (the bias was
    frozen in training); otherwise it stays trainable, so a mismatch is reported with the module's full shape.
    """
    _set_flag(getattr(module, "weight", None), True, saved)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        _set_flag(bias, True, saved)
        if spec.dims(module)[1] - 1 == in_dim:
            _set_flag(bias, False, saved)


@contextlib.contextmanager
def recorded_layers(
    module: nn.Module, entries: list[dict[str, Any]], projections: dict[str, LayerProjection]
) -> Iterator[dict[str, TrackedLayer]]:
    """Match the recorded layers in ``module`` by name, type and shape, trainable as recorded while open.

    Each tracked layer's weight requires grad inside the context (and its bias when the recorded block has a
    bias column); every flag is restored on exit.

    Args:
        module: the query module.
        entries: the manifest's layer entries (``name``, ``kind``, ``out_dim``, ``in_dim``).
        projections: each layer's recorded projection.

    Raises:
        LayerMismatchError: listing every missing or reshaped layer.
    """
    modules, saved = dict(module.named_modules()), []
    try:
        problems, tracked = [], {}
        for entry in entries:
            name, found = entry["name"], modules.get(entry["name"])
            spec = None if found is None else layer_specs.spec_for(found)
            if spec is not None and found is not None:
                _as_recorded(found, spec, entry["in_dim"], saved)
            shape = None if spec is None or found is None else spec.dims(found)
            expected = (entry["out_dim"], entry["in_dim"])
            if spec is None or spec.kind != entry["kind"] or shape != expected:
                what = "missing" if found is None else f"{type(found).__name__} with exact block {shape}"
                problems.append(f"{name!r}: recorded {entry['kind']} {expected}, found {what}")
            else:
                tracked[name] = TrackedLayer(name, found, spec, projections[name])
        if problems:
            raise LayerMismatchError(f"{type(module).__name__} does not hold the recorded layers: "
                                     f"{'; '.join(problems)}. Pass the model that was trained (or one with the same "
                                     "layer names and shapes).")
        yield tracked
    finally:
        for tensor, flag in reversed(saved):
            tensor.requires_grad_(flag)


def require_autograd() -> None:
    """Refuse a query under ``torch.inference_mode()``, where no gradient can be taken.

    Raises:
        ConfigError: saying to call the query outside ``inference_mode``.
    """
    if torch.is_inference_mode_enabled():
        raise ConfigError("influence queries and exact replay need autograd, which torch.inference_mode() turns off: "
                          "call the query outside the inference_mode block (torch.no_grad() is fine), or, in a hook "
                          "of trainer.test/validate/predict, pass Trainer(inference_mode=False).")


def backward_to_layers(loss: torch.Tensor, capture: GradientCapture, module: nn.Module) -> None:
    """``torch.autograd.grad`` of ``loss`` with respect to the tracked layers' outputs (the capture's hooks collect
    the per-sample blocks; ``.grad`` is untouched).

    A tracked layer that the forward called only with autograd off (activation checkpointing with
    ``use_reentrant=True``) is reached only by a full backward, which recomputes it: then ``loss.backward()`` runs
    with every parameter's ``.grad`` put aside and restored.

    Raises:
        ConfigError: if ``loss`` does not depend on any tracked layer's output (detached, or computed without
            calling those layers).
    """
    names = ", ".join(repr(name) for name in capture.layers)
    problem = ConfigError(f"the test loss does not depend on the tracked layers ({names}): it is detached "
                          "(.detach(), torch.no_grad(), .item()) or computed without calling them. Compute it from "
                          "the module's forward on the batch, e.g. loss_fn = lambda module, batch: "
                          "F.cross_entropy(module(batch['x']), batch['y'], reduction='none').")
    if not loss.requires_grad or not capture.outputs:
        raise problem
    capture.start_backward()
    if capture.without_autograd():
        with grads_put_aside(module):
            loss.backward()
    else:
        torch.autograd.grad(loss, capture.outputs, allow_unused=True)
    if not capture.captured:
        raise problem


@contextlib.contextmanager
def grads_put_aside(module: nn.Module) -> Iterator[None]:
    """Clear every parameter's ``.grad`` for the block and restore it afterwards."""
    saved = [(param, param.grad) for param in module.parameters()]
    for param, _ in saved:
        param.grad = None
    try:
        yield
    finally:
        for param, grad in saved:
            param.grad = grad


def uncompiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile(module)`` wrapped, whose names are the recorded layers' (else ``module``)."""
    inner = module._modules.get("_orig_mod")
    return inner if type(module).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else module


def changed_weights(module: nn.Module, expected: dict[str, list[float]]) -> list[str]:
    """The tracked tensors of ``module`` whose sampled coordinates (``guards.sampled_entries``) differ from
    ``expected`` by more than 4 ulp of their dtype (weights under the layer's name, trained biases as layer.bias)."""
    modules, other = dict(module.named_modules()), []
    for name, values in expected.items():
        owner = name if name in modules else name.removesuffix(".bias")
        weight = getattr(modules.get(owner), "weight" if owner == name else "bias", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            continue  # recorded_layers refuses a missing or reshaped layer
        found, expected_values = sampled_entries(weight).cpu().double(), torch.tensor(values, dtype=torch.float64)
        if not torch.allclose(found, expected_values, rtol=4 * torch.finfo(weight.dtype).eps, atol=0):
            other.append(name)
    return other


def warn_if_moved(module: nn.Module, manifest: dict[str, Any], boundary: int | None = None) -> None:
    """Warn when ``module``'s tracked weights are not those the recorded run had at segment ``boundary`` (its index;
    ``None`` or the last: the final weights), as the manifest keeps them (``final_weights``, ``boundary_weights``).

    The estimate is defined with the test gradient at the final weights (method.md §2), the dynamics at their
    boundary's weights (§3); another module (a best-epoch checkpoint, weight averaging, a model trained again, the
    final model given for an earlier boundary) gives test gradients that do not match them.
    """
    lasts, saved = [last for _, last in manifest.get("segments", [])], manifest.get("boundary_weights") or {}
    if boundary is not None and boundary < len(lasts) - 1:
        if other := changed_weights(module, saved.get(str(lasts[boundary])) or {}):
            warnings.warn(_boundary_message(other, boundary, lasts[boundary]), UserWarning, stacklevel=3)
    elif other := changed_weights(module, manifest.get("final_weights") or {}):
        kept = {b: saved[str(last)] for b, last in enumerate(lasts[:-1]) if str(last) in saved}
        at = next((b for b, weights in kept.items() if not changed_weights(module, weights)), None)
        warnings.warn(_final_message(other, at), UserWarning, stacklevel=3)


def _named(layers: list[str]) -> str:
    return f"the weights of tracked layers {layers[:5]}{f' and {len(layers) - 5} more' if len(layers) > 5 else ''}"


def _final_message(other: list[str], boundary: int | None) -> str:
    """The warning for a query module that is not at the final weights (at those of ``boundary`` if not ``None``)."""
    fix = ("influence_at(boundary, ...) takes the weights of an earlier boundary" if boundary is None else
           f"these are the weights at segment boundary {boundary}, which influence_at({boundary}, ...) scores")
    return (f"{_named(other)} are not the final weights of the recorded run (e.g. a best-epoch checkpoint loaded by "
            "trainer.test(ckpt_path='best'), weight averaging, or another model): the scores use test gradients at "
            "these weights, while the embeddings estimate influence on the final model. Query the module as fit "
            f"left it (or its last checkpoint); {fix}.")


def _boundary_message(other: list[str], boundary: int, step: int) -> str:
    """The warning for an ``influence_at(boundary, ...)`` module that is not at the boundary's weights."""
    return (f"{_named(other)} are not those of the recorded run at segment boundary {boundary} (after step {step}): "
            f"influence_at({boundary}, ...) scores the occurrences up to that step against test gradients at these "
            "weights, while the dynamics are defined at the boundary's weights. Pass the model as it was after step "
            f"{step}: a checkpoint saved at global_step == {step + 1} (ModelCheckpoint(every_n_train_steps=...)).")


def refuse_empty(batch: Any) -> None:
    """Refuse a test batch of no sample (its first batched tensor has length 0; a batch without one is left to
    the loss), or a ``DataLoader`` given as one.

    Raises:
        ConfigError: saying so.
    """
    try:
        empty = batch is not None and count_samples(batch) == 0
    except ConfigError:
        if isinstance(batch, torch.utils.data.DataLoader):
            raise
        return
    if empty:
        raise ConfigError("the test batch holds no sample (its first batched tensor has length 0): pass a batch of at "
                          "least one test sample.")


def refuse_uncaptured(capture: GradientCapture) -> None:
    """Refuse a test batch whose forward called a tracked layer in a way capture refuses: above all a single
    dataset item ``dataset[i]`` without its batch dimension, which would otherwise be refused as a loss that
    does not depend on the tracked layers, or as a ``loss_fn`` of the wrong shape.

    Raises:
        ConfigError: with the capture's refusal, and how to pass a batch.
    """
    if capture.calls.refused is not None:
        raise ConfigError(f"the test batch cannot be scored: {capture.calls.refused} Pass a batch of samples as the "
                          "training loader yields them: one dataset item as default_collate([dataset[i]]), or with "
                          "its inputs' batch dimension added (x[None]).") from capture.calls.refused


_TORCH_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}


def dtype_refusal(err: RuntimeError, module: nn.Module, batch: Any) -> ConfigError | None:
    """The refusal of a test batch whose floating tensors are not in the module's dtype, where the forward failed
    with torch's dtype error (``err``) on it; ``None`` for any other failure.

    A float64 module trained on float64 batches (``model.double()`` without ``precision="64-true"``) and queried
    with a float32 batch fails in its first layer with "mat1 and mat2 must have the same dtype", which names
    neither the batch nor the fix.
    """
    parameter = next((p for p in module.parameters() if p.is_floating_point()), None)
    if parameter is None or not any(word in str(err) for word in ("dtype", "scalar type")):
        return None
    found: set[torch.dtype] = set()
    map_tensors(batch, lambda t: found.add(t.dtype) or t)
    named = [d for d in found if d.is_floating_point and d != parameter.dtype and _TORCH_NAMES.get(d, "?") in str(err)]
    if not named or _TORCH_NAMES.get(parameter.dtype, "?") not in str(err):  # the error is about other dtypes
        return None
    other = sorted(str(d).removeprefix("torch.") for d in named)
    wanted = str(parameter.dtype).removeprefix("torch.")
    return ConfigError(f"the test batch holds {' and '.join(other)} tensors while the module's weights are {wanted}, "
                       f"and its forward failed on them ({err}). Pass the test batch in the dtype training used "
                       f"(e.g. x.to(torch.{wanted}) for each floating input), as the training loader made it.")


def check_test_gradients(test_gradients: Any, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """``test_gradients``, detached, if it is ``{layer: [n, k_l]}`` for every recorded layer (``widths``: ``k_l``)
    and no other (another store's layer names: a mix-up that would score silently without them).

    Raises:
        ConfigError: naming the expected and the given shapes, and how to build the input.
    """
    given = test_gradients if isinstance(test_gradients, dict) else {}
    shapes = {name: tuple(getattr(given.get(name), "shape", ())) for name in widths}
    if len({s[0] for s in shapes.values() if len(s) == 2}) != 1 or set(given) - set(widths) or any(
            len(shapes[name]) != 2 or shapes[name][1] != width or not isinstance(given[name], torch.Tensor)
            for name, width in widths.items()):
        found = {n: (type(v).__name__, tuple(getattr(v, "shape", ()))) for n, v in given.items()} if given \
            else type(test_gradients)
        raise ConfigError(f"test_gradients must map every recorded layer, and no other key, to a Tensor[n, k_l] with "
                          f"the same n: widths k_l {widths}; got {found}. Build it with test_gradients(module, batch).")
    return warn_non_finite_rows({name: given[name].detach() for name in widths})


def eager() -> contextlib.AbstractContextManager[Any]:
    """Run ``torch.compile``d code eagerly inside (``torch.compiler.set_stance``, torch 2.6 on; else nothing): a
    compiled graph is differentiated once only (no double backward), and leaves hooks out of its guards. The stance
    is set by the call: use it in a ``with`` statement at once."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return contextlib.nullcontext() if set_stance is None else set_stance("force_eager")
