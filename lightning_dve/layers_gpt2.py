"""transformers' GPT-2 ``Conv1D``: a linear layer that stores its weight transposed, ``y = x @ weight + bias``
with ``weight [d_in, d_out]`` (``nf = d_out``). Its per-sample block is ``nn.Linear``'s, ``[weight^T | bias]``
(method.md §3); transformers is not a dependency, so the type is matched by its class name and this form.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .errors import UnsupportedError
from .layers import LINEAR, has_trainable_bias


def _check(name: str, module: nn.Module) -> None:
    """Refuse a module named ``Conv1D`` that is not GPT-2's: a 2-D weight ``[d_in, nf]`` and a bias of ``nf``."""
    weight, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    bias = getattr(module, "bias", None)
    if weight is None or weight.dim() != 2 or weight.shape[1] != nf or (bias is not None and bias.shape != (nf,)):
        raise UnsupportedError(f"layer {name!r} is a Conv1D that is not transformers' GPT-2 Conv1D (a weight "
                               f"[d_in, nf] applied as x @ weight + bias): its maths is not known. Add {name!r} to "
                               "`exclude=` to train it without measuring its data value.")


def _dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in + bias)`` of the block, as ``nn.Linear``'s."""
    return module.weight.shape[1], module.weight.shape[0] + int(has_trainable_bias(module))


CONV1D_GPT2 = dataclasses.replace(LINEAR, kind="conv1d_gpt2", dims=_dims, check=_check, transposed=True)
