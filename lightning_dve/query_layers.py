"""The recorded layers in a query module, and the checks of a query's test loss against them.

A query takes test gradients with respect to the tracked layers' outputs, whatever the module's ``requires_grad``
flags: frozen weights (``LightningModule.freeze()``) are made trainable for the query's duration only, with each
bias set to the layout the recording used (its ``in_dim`` has a bias column or not).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import layers as layer_specs
from .batch_trees import batch_rows, count_samples
from .batches import WeightFn, muted_logging, reduction_weights, training_loss
from .capture import GradientCapture, TrackedLayer
from .config import LossReduction
from .errors import ConfigError, DVEError, LayerMismatchError, LossReductionError
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
        with _grads_put_aside(module):
            loss.backward()
    else:
        torch.autograd.grad(loss, capture.outputs, allow_unused=True)
    if not capture.captured:
        raise problem


@contextlib.contextmanager
def _grads_put_aside(module: nn.Module) -> Iterator[None]:
    """Clear every parameter's ``.grad`` for the block and restore it afterwards."""
    saved = [(param, param.grad) for param in module.parameters()]
    for param, _ in saved:
        param.grad = None
    try:
        yield
    finally:
        for param, grad in saved:
            param.grad = grad


def check_loss_count(losses: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Unit weights ``[B]`` of ``loss_fn``'s per-sample losses, once their count is checked against the batch.

    Raises:
        ConfigError: if ``losses`` does not hold one loss per sample of the batch the tracked layers saw.
    """
    if losses.shape[0] != batch_size:
        raise ConfigError(f"loss_fn returned {losses.shape[0]} losses for a batch of {batch_size} samples (the "
                          f"batch size the tracked layers saw): it must return one loss per sample of the batch, "
                          f"a Tensor[B] with B = {batch_size} (e.g. reduction='none'), not a mean or a "
                          "concatenation.")
    return torch.ones(batch_size, dtype=torch.float64)


def losses_of_a_pair(loss_fn: Any, module: nn.Module, batch: Any) -> torch.Tensor | None:
    """``loss_fn``'s losses of the batch's first two samples as a batch of their own (without gradients), for
    :func:`check_uncoupled`; ``None`` where that cannot be asked (fewer than three samples, a batch the rows cannot
    be taken from, or a ``loss_fn`` that fails on two samples): the check is then skipped, not the query."""
    try:
        n = count_samples(batch)
        if n < 3:
            return None
        with torch.no_grad():
            losses = loss_fn(module, batch_rows(batch, slice(0, 2), n))
    except Exception:  # noqa: BLE001 -- the query itself runs loss_fn on the whole batch and reports its errors
        return None
    return losses.detach() if isinstance(losses, torch.Tensor) and losses.shape == (2,) else None


def check_uncoupled(pair: torch.Tensor | None, losses: torch.Tensor) -> None:
    """Refuse a ``loss_fn`` whose per-sample losses depend on the batch's other samples: ``pair``
    (:func:`losses_of_a_pair`) must equal the first two of the whole batch's ``losses`` (within 1 % of the largest
    loss). The query takes a sample's test gradient from its own forward alone, so a coupled loss (contrastive,
    centred on the batch mean) would give each sample the gradient of every sample's terms through its forward.

    Raises:
        ConfigError: with both pairs of values and the fix.
    """
    if pair is None:
        return
    found, alone = losses[:2].detach().double().cpu(), pair.double().cpu()
    scale = float(losses.detach().abs().max())
    # 1 % of the largest loss: reduced-precision matmuls (TF32, set_float32_matmul_precision("medium")) round the
    # pair's and the batch's forwards apart by ~1e-3; a coupling changes a loss by far more
    if not torch.allclose(alone, found, rtol=0.0, atol=1e-2 * scale):  # False for NaN: refused as coupled
        raise ConfigError(
            f"loss_fn's per-sample losses depend on the other samples of the batch: the first two samples' losses are "
            f"{found.tolist()} in the whole batch and {alone.tolist()} as a batch of their own (a contrastive loss, a "
            "loss centred on the batch mean, batch statistics in the forward, or a random loss_fn). A test point's "
            "influence needs its own loss: return losses each of which depends on its sample alone (for a pairwise "
            "loss, one row per pair in the batch), or use exact_influence, which differentiates each loss itself.")


def check_deterministic(first: torch.Tensor | None, second: torch.Tensor | None) -> None:
    """Refuse a ``training_step`` whose loss on one batch differs between two calls (augmentation drawn with
    ``torch.rand``, noise or functional dropout outside eval-mode modules, an in-place edit of the batch's tensors):
    its test loss is random and its reduction uncheckable. Tolerance: relative 1e-4 (nondeterministic kernels).

    Args:
        first, second: the loss of two calls on the same batch (``None``: no loss returned, not checked).

    Raises:
        ConfigError: with both values and the fix (``loss_fn=``).
    """
    if first is None or second is None:
        return
    a, b = float(first.detach()), float(second.detach())
    if abs(a - b) > 1e-4 * max(abs(a), abs(b)) + 1e-12:  # False for NaN: unchecked
        raise ConfigError(
            f"training_step returned {a:.6g} and then {b:.6g} on the same two test samples, in eval mode: it is "
            "random (e.g. a data augmentation drawn with torch.rand, noise, or F.dropout(..., training=True) in "
            "training_step) or edits the batch's tensors in place (batch['x'].mul_(0.5): assign a new tensor "
            "instead), so a test loss taken through it is random too. Pass loss_fn(module, batch) -> "
            "Tensor[B], the deterministic per-sample test loss, e.g. loss_fn=lambda module, batch: "
            "F.cross_entropy(module(batch['x']), batch['y'], reduction='none') (the train-end report takes its "
            "reference loss from training_step: set report=None or make the augmentation depend on "
            "self.training, which queries turn off).")


def _single_sample_loss(module: nn.Module, batch: Any) -> tuple[torch.Tensor | None, Any]:
    """``training_step`` on a batch of one sample, for :func:`check_reduction` (:func:`training_loss`).

    Raises:
        ConfigError: if it fails there (often a ``.squeeze()`` that also drops the batch dimension), naming the
            check and the fixes.
    """
    try:
        return training_loss(module, batch)
    except DVEError:
        raise
    except Exception as err:
        raise ConfigError(
            f"training_step failed on a batch of one sample ({type(err).__name__}: {err}). Queries run it on two "
            "samples of the batch alone, to check that its loss is the per-sample sum loss_reduction declares "
            "(method.md §2). Make training_step work on a one-sample batch (e.g. .squeeze(-1) instead of .squeeze(), "
            "which also drops the batch dimension), or pass loss_fn(module, batch) -> Tensor[B] of per-sample "
            "losses to the query (the train-end report has no loss_fn: it is skipped)."
        ) from err


def check_reduction(module: nn.Module, batch: Any, reduction: LossReduction, weight_fn: WeightFn | None,
                    params: Sequence[torch.Tensor] = ()) -> None:
    """Refuse a ``training_step`` loss that is not ``L = sum_i w_i l_i`` with the recorded reduction's weights
    (method.md §2), tested on the batch's first two samples ``a, b``: with ``l_i = L({i}) / w_i({i})``, ``L({a, b})``
    must be ``w_a l_a + w_b l_b`` under the weights of ``{a, b}`` (within 5 %), and so must its gradient in
    ``params`` (the tracked weights). A sum declared as a mean, or the reverse, is off by a factor of two here; in
    the recording it scaled every curvature term and test gradient by the batch size. A step that drops either
    sample (it filters its batch) leaves the check undone. The gradients tell apart
    weights that the loss values cannot, where ``l_a`` and ``l_b`` are alike (a token mean over a padded batch
    declared as a mean: early in training every sequence's loss is near ``log(vocabulary)``). Samples of weight 0,
    batches of one sample and steps returning no loss are not checked.

    A second call on ``{a, b}`` must give the same loss (:func:`check_deterministic`).

    Raises:
        LossReductionError: naming the declared reduction, the losses and the factor (or the gradients' deviation).
        ConfigError: if ``training_step`` is random.
    """
    n = count_samples(batch)
    if n < 2:
        return
    pair, singles = batch_rows(batch, slice(0, 2), n), [batch_rows(batch, slice(i, i + 1), n) for i in range(2)]
    params = [p for p in params if p.requires_grad]
    with torch.set_grad_enabled(bool(params)), muted_logging(module):
        total, pair_used = training_loss(module, pair)
        alone, singles_used = zip(*(_single_sample_loss(module, single) for single in singles))
        with torch.no_grad():
            again, _ = training_loss(module, pair)
    check_deterministic(total, again)
    if count_samples(pair_used) != 2 or any(count_samples(used) != 1 for used in singles_used):
        return  # the step filters its batch (training reads the ids it keeps): these two do not test the reduction
    single_w = [float(reduction_weights(reduction, s, 1, weight_fn)[0]) for s in singles_used]
    if total is None or None in alone or not all(w == w and w != 0 for w in single_w):  # NaN: a 0/0 weight
        return
    scales = [float(w) / sw for w, sw in zip(reduction_weights(reduction, pair_used, 2, weight_fn), single_w)]
    value, values = float(total.detach()), [float(loss.detach()) for loss in alone]
    terms = [scale * loss for scale, loss in zip(scales, values)]
    if abs(value - sum(terms)) > 0.05 * sum(map(abs, terms)) + 1e-12:  # False for a NaN loss: unchecked
        raise LossReductionError(
            f"training_step's loss is not the sum of per-sample losses weighted as loss_reduction="
            f"{reduction.value!r} declares: on the batch's first two samples it gives {value:.6g} together "
            f"and {values[0]:.6g}, {values[1]:.6g} alone, where the declared weights predict "
            f"{sum(terms):.6g}. {_REDUCTION_FIX}"
        )
    deviation = _gradient_deviation(module, [total, *alone], scales, params)
    if deviation > 0.05:  # False for NaN: unchecked
        raise LossReductionError(
            f"training_step's loss is not the sum of per-sample losses weighted as loss_reduction="
            f"{reduction.value!r} declares: on the batch's first two samples the gradient of their joint loss differs "
            f"by {deviation:.0%} from the declared weights ({scales[0]:.4g}, {scales[1]:.4g} times each one's loss "
            f"alone) applied to their gradients alone (their loss values happen to agree). {_REDUCTION_FIX}"
        )


_REDUCTION_FIX = ("The recording used the same weights, so its curvature and test gradients are off by that factor "
                  "and its scores are meaningless. Record again with the reduction your loss uses ('sum' for "
                  "reduction='sum', 'mean' for a mean over the batch, a callable for other weights: a token-level "
                  "mean over a padded batch, cross_entropy with ignore_index, weighs sequence i by its token count, "
                  "n_i / sum_j n_j, so declare loss_reduction=lambda batch: n / n.sum() with n the batch's token "
                  "counts); a loss that couples the samples (contrastive, batch statistics) has no per-sample data "
                  "value; a random training_step (an augmentation drawn in it) fails this check too: pass loss_fn= to "
                  "the query.")


def _gradient_deviation(module: nn.Module, losses: list[torch.Tensor], scales: list[float],
                        params: list[torch.Tensor]) -> float:
    """``|grad L({a,b}) - sum_i s_i grad L({i})| / sum_i |s_i grad L({i})|`` over ``params`` (0 when nothing to
    differentiate), for ``losses = [L({a,b}), L({a}), L({b})]`` and ``scales = s``. A full backward with every
    ``.grad`` put aside, so a reentrant activation checkpoint is recomputed as in training."""
    if not params or not all(loss.requires_grad for loss in losses):
        return 0.0
    flat = []
    for loss in losses:
        with _grads_put_aside(module):
            loss.backward()
            flat.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten().double()
                                   for p in params]))
    parts = [scale * grad for scale, grad in zip(scales, flat[1:])]
    size = float(sum(part.norm() for part in parts))
    return 0.0 if size == 0 else float((flat[0] - sum(parts)).norm()) / size


def uncompiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile(module)`` wrapped, whose names are the recorded layers' (else ``module``)."""
    inner = module._modules.get("_orig_mod")
    return inner if type(module).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else module


def warn_if_not_final(module: nn.Module, final: dict[str, list[float]] | None) -> None:
    """Warn when ``module``'s tracked weights are not those the recorded run ended with: ``final``, the sampled
    coordinates the manifest keeps (``guards.sampled_entries``), compared within 4 ulp of ``module``'s dtype.

    The estimate is defined with the test gradient at the final weights (method.md §2); another module (a
    best-epoch checkpoint, weight averaging, a model trained again) gives test gradients that do not match it.
    """
    modules, other = dict(module.named_modules()), []
    for name, values in (final or {}).items():  # weights under the layer's name, trained biases as layer.bias
        owner = name if name in modules else name.removesuffix(".bias")
        weight = getattr(modules.get(owner), "weight" if owner == name else "bias", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            continue  # recorded_layers refuses a missing or reshaped layer
        found, expected = sampled_entries(weight).cpu().double(), torch.tensor(values, dtype=torch.float64)
        if not torch.allclose(found, expected, rtol=4 * torch.finfo(weight.dtype).eps, atol=0):
            other.append(name)
    if other:
        more = f" and {len(other) - 5} more" if len(other) > 5 else ""
        warnings.warn(f"the weights of tracked layers {other[:5]}{more} are not the final weights of the recorded run "
                      "(e.g. a best-epoch checkpoint loaded by trainer.test(ckpt_path='best'), weight averaging, or "
                      "another model): the scores use test gradients at these weights, while the embeddings "
                      "estimate influence on the final model. Query the module as fit left it (or its last "
                      "checkpoint); influence_at(boundary, ...) takes the weights of an earlier boundary.",
                      UserWarning, stacklevel=3)


def refuse_empty(batch: Any) -> None:
    """Refuse a test batch of no sample (its first batched tensor has length 0; a batch without one is left to
    the loss).

    Raises:
        ConfigError: saying so.
    """
    try:
        empty = batch is not None and count_samples(batch) == 0
    except ConfigError:
        return
    if empty:
        raise ConfigError("the test batch holds no sample (its first batched tensor has length 0): pass a batch of at "
                          "least one test sample.")


def check_test_gradients(test_gradients: Any, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """``test_gradients``, detached, if it is ``{layer: [n, k_l]}`` for every recorded layer (``widths``: ``k_l``).

    Raises:
        ConfigError: naming the expected and the given shapes, and how to build the input.
    """
    given = test_gradients if isinstance(test_gradients, dict) else {}
    shapes = {name: tuple(getattr(given.get(name), "shape", ())) for name in widths}
    if len({s[0] for s in shapes.values() if len(s) == 2}) != 1 or any(
            len(shapes[name]) != 2 or shapes[name][1] != width for name, width in widths.items()):
        found = {n: tuple(getattr(v, "shape", ())) for n, v in given.items()} if given else type(test_gradients)
        raise ConfigError(f"test_gradients must map every recorded layer to a Tensor[n, k_l] with the same n: "
                          f"widths k_l {widths}; got {found}. Build it with test_gradients(module, batch).")
    return warn_non_finite_rows({name: given[name].detach() for name in widths})
