"""Checks of the model itself during ``fit``: what it is made of must stay what the callback set up at fit start.

Ways a run would break silently, each refused with what to change:

- BatchNorm in train mode, or without running statistics (``track_running_stats=False``, batch statistics
  in eval mode too), whose batch statistics mix the samples (no per-sample gradient exists);
- a backward through the tracked layers inside ``training_step`` (an input-gradient penalty), which the hooks
  would capture as the step's;
- a tracked layer replaced by another module during ``fit`` (a new head assigned in a hook): the hooks stay on
  the old module, and the new one would be trained untracked;
- a tracked layer's weight used functionally, never through the module's call (``nn.MultiheadAttention``'s
  ``out_proj``), which the hooks cannot see.

The parameters whose ``requires_grad`` must not change (:func:`watched_parameters`) are compared at each step
by ``guards.StepGuard.check_trainable``.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .capture import GradientCapture, excluded
from .config import DVEConfig
from .errors import UnsupportedError


def watched_parameters(model: nn.Module, config: DVEConfig, tracked: list[str]) -> dict[str, nn.Parameter]:
    """The parameters whose ``requires_grad`` must not change during ``fit``: the tracked layers', and with the
    default layer selection every parameter outside the excluded modules (one unfrozen later would be
    trained untracked)."""
    if config.layers is not None:
        return {f"{m}.{n}": p for m in tracked for n, p in model.get_submodule(m).named_parameters(recurse=False)}
    return {n: p for n, p in model.named_parameters() if not excluded(n.rpartition(".")[0], config.exclude)}


def batchnorm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's BatchNorm modules by name (found once per fit; the per-step check reads their mode and stats)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _BatchNorm)}


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm normalises with the statistics of the batch it is given: in train mode, and in eval
    mode too when it keeps no running statistics (``track_running_stats=False``), as ``_BatchNorm.forward`` does."""
    return module.training or (getattr(module, "running_mean", None) is None
                               and getattr(module, "running_var", None) is None)


def check_no_inner_backward(ran: bool, step: int) -> None:
    """Refuse a micro-batch whose ``training_step`` ran a backward through the tracked layers before the training
    backward (``torch.autograd.grad`` of the loss: an input-gradient penalty, a saliency map): the hooks capture
    that backward, and a penalty's gradient through it is no per-sample outer product.

    Raises:
        UnsupportedError: if ``ran``, naming the cause and what to do instead.
    """
    if ran:
        raise UnsupportedError(
            f"step {step}: training_step, or the LightningModule's on_train_batch_start (which runs after this "
            "callback's, once the step's capture has begun) or a callback listed after DataValueEmbedding, ran a "
            "backward through the tracked layers before the training backward (torch.autograd.grad of a loss, e.g. "
            "an input-gradient penalty, adversarial examples or a saliency map): the per-sample gradients the "
            "callback records would be that backward's, and a gradient penalty's own gradient is not a per-sample "
            "block the hooks can form. Make adversarial examples in on_after_batch_transfer, before the step "
            "begins, and take other such gradients after it (a saliency map in on_train_batch_end or "
            "validation_step); a gradient penalty in the training loss is not supported.")


def check_no_batchnorm_training(batchnorms: dict[str, nn.Module]) -> None:
    """Refuse BatchNorm (of :func:`batchnorm_modules`) that uses batch statistics (train mode, or no running
    statistics in any mode): they mix the samples, so per-sample gradients do not exist.

    Raises:
        UnsupportedError: naming the first such module.
    """
    for name, module in batchnorms.items():
        if not uses_batch_statistics(module):
            continue
        if module.training:
            raise UnsupportedError(
                f"module {name!r} ({type(module).__name__}) is in train mode: batch normalisation mixes the "
                "samples of a batch, so a sample's gradient depends on the others and its data value is not "
                "defined. Use GroupNorm/LayerNorm (per-sample, and tracked), or keep BatchNorm in eval mode "
                "(e.g. call `.eval()` on it in `on_train_epoch_start`)."
            )
        raise UnsupportedError(
            f"module {name!r} ({type(module).__name__}) has track_running_stats=False, so it normalises with the "
            "statistics of the batch even in eval mode: it mixes the samples of a batch, so a sample's gradient "
            "depends on the others and its data value is not defined. Use GroupNorm/LayerNorm (per-sample, and "
            "tracked), or track_running_stats=True with the module kept in eval mode."
        )


def check_layers_held(model: nn.Module, layers: dict[str, nn.Module], step: int) -> None:
    """Refuse a tracked layer that ``model`` no longer holds under its name (replaced during ``fit``).

    Raises:
        UnsupportedError: naming the layer and the fix.
    """
    for name, module in layers.items():
        try:
            held = model.get_submodule(name)
        except AttributeError:
            held = None
        if held is not module:
            now = "removed" if held is None else f"the model now holds another {type(held).__name__} there"
            raise UnsupportedError(
                f"step {step}: tracked layer {name!r} was replaced during fit ({now}): the callback's hooks stay on "
                "the module fit started with, so the new one would be trained untracked and the recorded trajectory "
                "would not be the trained one. Change the model's layers between fits (one fit per stage), or "
                f"exclude this module: exclude=({name!r},).")


def check_all_reached(capture: GradientCapture, reached: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse a tracked layer whose weight got a gradient although its forward hook never captured it, in this
    micro-batch or in ``reached`` (the step's other micro-batches and ranks).

    This happens when a model uses a layer's weight functionally (e.g. ``nn.MultiheadAttention`` calls
    ``out_proj.weight`` without calling ``out_proj``).

    Raises:
        UnsupportedError: naming the layer and how to exclude it.
    """
    seen = capture.reached() | reached
    for name, weight in capture.weights().items():
        if name not in seen and weight.grad is not None and bool(weight.grad.ne(0).any()):
            raise UnsupportedError(
                f"layer {name!r} received a gradient but its forward was never called: the model uses its "
                f"weight directly (functionally), which capture cannot see. Pass exclude=({name!r},) and track "
                "the layers that are called as modules."
            )
