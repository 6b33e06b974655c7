"""Per-sample gradient maths of normalisation layers with an elementwise affine (``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.GroupNorm``, and BatchNorm in eval mode), registered by :mod:`.layers`.

Such a layer normalises each sample on its own, ``x_hat = norm(x)``, then scales and shifts every feature:
``y = gamma * x_hat + beta``. The gradient of one sample is therefore ``sum_p delta_p * x_hat_p`` for ``gamma``
and ``sum_p delta_p`` for ``beta`` over the positions ``p`` of that sample (tokens, pixels), with ``delta`` the
gradient of the loss with respect to ``y`` (method.md §3). It is not one outer product, so the spec forms the
exact block ``[d, 2]`` (``[gamma | beta]``, the weight as one column and the bias column, as ``nn.Linear``'s
block puts its bias last; ``[d, 1]`` without a trained bias) and projects it on both sides,
``P_out [gamma_grad | beta_grad] P_in^T``. ``d`` is the number of affine features: ``prod(normalized_shape)`` for
LayerNorm and RMSNorm, the channels for GroupNorm and BatchNorm. The forward hook keeps ``x_hat`` (recomputed from
the input with the layer's own settings, the size of its input) until the layer's backward.

A BatchNorm is per-sample only with its running statistics, in eval mode (a fine-tuned backbone's);
``model_checks`` refuses one that normalises with the batch's statistics at each batch's start, and the forward
hook refuses a call in that state all the same (put in train mode inside ``training_step``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedError
from .layers import LayerSpec, apply_projection, has_trainable_bias

_RMS_NORM: tuple[type[nn.Module], ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()  # torch >= 2.4
_BATCH_NORM = nn.modules.batchnorm._BatchNorm
_CHANNELS_FIRST = (nn.GroupNorm, _BATCH_NORM)


def _features_last(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[B, P, d]``: the affine features last, every other position of a sample in ``P``."""
    if isinstance(module, _CHANNELS_FIRST):  # [B, C, *S]: channels are dim 1
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
    return x.reshape(x.shape[0], -1, module.weight.numel())


def _normalized(module: nn.Module, args: tuple[torch.Tensor, ...], proj: torch.Tensor | None) -> torch.Tensor:
    """``x_hat`` ``[B, P, d]``, normalised as the layer does before its affine (``proj`` is applied in the block)."""
    del proj
    x = args[0]
    if isinstance(module, nn.GroupNorm):
        x_hat = F.group_norm(x, module.num_groups, None, None, module.eps)
    elif isinstance(module, _BATCH_NORM):
        _refuse_batch_statistics(module)
        x_hat = F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    elif isinstance(module, _RMS_NORM):
        x_hat = F.rms_norm(x, module.normalized_shape, None, module.eps)
    else:
        x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _features_last(module, x_hat)


def _refuse_batch_statistics(module: nn.Module) -> None:
    """Refuse a BatchNorm call that normalises with the batch's statistics, which mix its samples.

    Raises:
        UnsupportedError: naming the mode and the fix.
    """
    if module.training or module.running_mean is None:
        raise UnsupportedError(
            f"a tracked {type(module).__name__} was called with the statistics of its batch (in train mode, or with "
            "track_running_stats=False), which mix the samples of a batch: a sample's gradient then depends on the "
            "others. Keep it in eval mode with running statistics during training (it was, at the batch's start: "
            "training_step or a module's forward switched it), or use GroupNorm/LayerNorm.")


def _output(module: nn.Module, grad: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    """The output gradient ``[B, P, d]`` laid out as :func:`_normalized`, projected on its features."""
    return apply_projection(_features_last(module, grad), proj)


def norm_block(module: nn.Module, grad: torch.Tensor, p_out: torch.Tensor | None, x_hat: torch.Tensor,
               p_in: torch.Tensor | None) -> torch.Tensor:
    """Per-sample ``P_out [sum_p delta_p * x_hat_p | sum_p delta_p] P_in^T`` as ``[B, k_out * k_in]`` (module
    docstring; float32 or wider, as :func:`~.layers.outer_block`)."""
    delta = _features_last(module, grad)
    dtype = torch.promote_types(torch.promote_types(delta.dtype, x_hat.dtype), torch.float32)
    delta = delta.to(dtype)
    columns = [(delta * x_hat.to(dtype)).sum(dim=1)] + ([delta.sum(dim=1)] if has_trainable_bias(module) else [])
    block = torch.stack(columns, dim=2)  # [B, d, 1 or 2]
    if p_out is not None:
        block = p_out.to(dtype) @ block
    if p_in is not None:
        block = block @ p_in.to(dtype).T
    return block.flatten(1)


def _dims(module: nn.Module) -> tuple[int, int]:
    """``(d, 1 + bias)``: the affine features, and the weight's column with the bias column."""
    return module.weight.numel(), 1 + int(has_trainable_bias(module))


def _least_rank(module: nn.Module) -> int:
    """The dims of a batched input: the batch before the normalised dims (GroupNorm: before the channels)."""
    return 2 if isinstance(module, _CHANNELS_FIRST) else len(module.normalized_shape) + 1


def _check_norm(name: str, module: nn.Module) -> None:
    del name, module  # every eps, shape and group count is covered


def _spec(kind: str) -> LayerSpec:
    return LayerSpec(kind=kind, dims=_dims, project_input=_normalized, project_output_grad=_output,
                     check=_check_norm, block=norm_block, least_rank=_least_rank)


#: The normalisation layer types and their specs' kinds.
NORM_SPECS: dict[type[nn.Module], LayerSpec] = {
    nn.LayerNorm: _spec("layer_norm"), nn.GroupNorm: _spec("group_norm"),
    **{norm: _spec("batch_norm") for norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)},
    **{norm: _spec("rms_norm") for norm in _RMS_NORM}}
