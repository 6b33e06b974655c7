"""Per-layer-type maths of per-sample gradients, with a registry (one small spec per layer type).

Every supported layer's weight gradient for one sample has the form ``G = sum_p u_p v_p^T`` over positions
``p`` (tokens, pixels), with ``u_p`` the gradient of the loss with respect to the layer output at ``p``
(``delta``) and ``v_p`` the layer input at ``p`` (method.md §3). A spec turns the module's input into
``v: [B, P, d_in]`` and its output gradient into ``u: [B, P, d_out]``, each already multiplied by its side's
projection, so that the block ``sum_p (P_out u_p)(P_in v_p)^T`` is one batched matrix product.

Exact layouts (projection = identity), which :func:`split_block` maps back to parameter gradients:

- ``nn.Linear``: ``[d_out, d_in (+1 bias column)]``, i.e. ``[weight | bias]``.
- ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: ``[C_out, C_in/groups * prod(kernel) (+1 bias column)]``
  (:mod:`.layers_conv`).
- ``nn.Embedding``: ``[embedding_dim, num_embeddings]``, the transpose of ``weight``.
- ``Conv1D`` of transformers' GPT-2 (``x @ weight + bias``, weight ``[d_in, d_out]``): as ``nn.Linear``, so
  ``[weight^T | bias]`` (:mod:`.layers_gpt2`).
- ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, BatchNorm (eval mode): ``[d, 1 (+1 bias column)]``, i.e.
  ``[weight | bias]`` with the weight flattened to one column (:mod:`.layers_norm`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .errors import ConfigError, UnsupportedError

InputFn = Callable[[nn.Module, tuple[torch.Tensor, ...], "torch.Tensor | None"], torch.Tensor]
OutputFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
BlockFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", torch.Tensor, "torch.Tensor | None"],
                   torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How one layer type exposes its per-sample gradient factors.

    Attributes:
        kind: short name written to the manifest.
        dims: ``module -> (d_out, d_in)`` of the exact block.
        project_input: ``(module, forward args, P_in [k_in, d_in] or None) -> [B, P, k_in]``.
        project_output_grad: ``(module, grad of output, P_out [k_out, d_out] or None) -> [B, P, k_out]``.
        check: raises :class:`UnsupportedError` for configurations the maths does not cover.
        block: ``(module, grad of output, P_out or None, input side, P_in or None) -> [B, k_out * k_in]`` where
            the block is not one outer product over the positions (grouped convolutions), whose input side is
            then the input itself; ``None``: :func:`outer_block` of the two projected sides.
        positions: ``(module, input side) -> P``, the positions per sample, where the input side is not
            ``[B, P, k_in]``; ``None``: its second dim.
        input_rank: the number of dims of a batched input, where the type fixes it (a convolution's).
        least_rank: ``module -> the least number of dims of a batched input``, where its settings fix it (a
            LayerNorm's: one more than its normalised dims).
        transposed: the weight is stored ``[d_in, d_out]``, the transpose of the block's weight part.
    """

    kind: str
    dims: Callable[[nn.Module], tuple[int, int]]
    project_input: InputFn
    project_output_grad: OutputFn
    check: Callable[[str, nn.Module], None]
    block: BlockFn | None = None
    positions: Callable[[nn.Module, torch.Tensor], int] | None = None
    input_rank: int | None = None
    least_rank: Callable[[nn.Module], int] | None = None
    transposed: bool = False

    def sample_blocks(self, module: nn.Module, grad: torch.Tensor, p_out: torch.Tensor | None,
                      in_side: torch.Tensor, p_in: torch.Tensor | None) -> torch.Tensor:
        """Per-sample blocks ``sum_p (P_out u_p)(P_in v_p)^T`` as ``[B, k_out * k_in]`` (method.md §3).

        Args:
            module: the layer.
            grad: the gradient of the loss with respect to the layer's output.
            p_out: the output side's projection ``[k_out, d_out]`` (``None``: identity).
            in_side: what :attr:`project_input` returned for the same call.
            p_in: the input side's projection ``[k_in, d_in]`` that call was given (already applied to
                ``in_side`` unless the spec has its own :attr:`block`).
        """
        if self.block is not None:
            return self.block(module, grad, p_out, in_side, p_in)
        return outer_block(self.project_output_grad(module, grad, p_out), in_side)

    def input_positions(self, module: nn.Module, in_side: torch.Tensor) -> int:
        """The positions per sample of a call's input side (checked against its output's)."""
        return in_side.shape[1] if self.positions is None else self.positions(module, in_side)


_REGISTRY: dict[type[nn.Module] | str, LayerSpec] = {}


def register(module_type: type[nn.Module] | str, spec: LayerSpec) -> None:
    """Register the spec of ``module_type`` (subclasses are matched through their MRO), or of types of that class
    name (a library that is not a dependency: transformers' ``Conv1D``; the spec's ``check`` confirms the form)."""
    _REGISTRY[module_type] = spec


def spec_for(module: nn.Module) -> LayerSpec | None:
    """Return the registered spec for ``module``'s type, or ``None`` if unsupported."""
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    return _REGISTRY.get(type(module).__name__)


def supported_types() -> list[str]:
    """Names of the supported layer types, for error messages."""
    return sorted(f"{t} (transformers)" if isinstance(t, str) else t.__name__ for t in _REGISTRY)


def apply_projection(x: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    """Multiply the last dim of ``x: [..., d]`` by ``proj: [k, d]`` (identity when ``None``)."""
    return x if proj is None else x @ proj.to(x.dtype).T


def project_input_with_bias(x: torch.Tensor, has_bias: bool, proj: torch.Tensor | None) -> torch.Tensor:
    """``P_in [x, 1]`` for ``x: [B, ..., d]``: the input with a ones column for the bias, projected.

    With a projection the ones column is never materialised: ``P [x, 1] = P[:, :d] x + P[:, d]``.
    """
    if not has_bias:
        return apply_projection(x, proj)
    if proj is None:
        return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    proj = proj.to(x.dtype)
    return torch.addmm(proj[:, -1], x.reshape(-1, x.shape[-1]), proj[:, :-1].T).reshape(*x.shape[:-1], -1)


def has_trainable_bias(module: nn.Module) -> bool:
    """Whether ``module.bias`` exists and is trained."""
    bias = getattr(module, "bias", None)
    return isinstance(bias, torch.Tensor) and bias.requires_grad


def _as_positions(x: torch.Tensor) -> torch.Tensor:
    """Reshape ``[B, ..., d]`` to ``[B, P, d]`` (positions are summed over, e.g. tokens)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


# --- nn.Linear -------------------------------------------------------------------------------------------


def _check_linear(name: str, module: nn.Module) -> None:
    del name, module


def _linear_input(module: nn.Module, args: tuple[torch.Tensor, ...], proj: torch.Tensor | None) -> torch.Tensor:
    return project_input_with_bias(_as_positions(args[0]), has_trainable_bias(module), proj)


def _linear_output(module: nn.Module, grad: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    del module
    return apply_projection(_as_positions(grad), proj)


LINEAR = LayerSpec(kind="linear", dims=lambda m: (m.out_features, m.in_features + int(has_trainable_bias(m))),
                   project_input=_linear_input, project_output_grad=_linear_output, check=_check_linear,
                   least_rank=lambda m: 2)
register(nn.Linear, LINEAR)


# --- nn.Embedding ----------------------------------------------------------------------------------------


def _check_embedding(name: str, module: nn.Module) -> None:
    assert isinstance(module, nn.Embedding)
    if module.max_norm is not None:
        raise UnsupportedError(
            f"layer {name!r} (Embedding) uses max_norm={module.max_norm}, which rescales rows in place during "
            f"forward; per-sample capture does not support it. Add {name!r} to `exclude=` or drop max_norm."
        )
    if module.sparse:
        raise UnsupportedError(
            f"layer {name!r} (Embedding) uses sparse=True: its weight gets a sparse gradient, which the capture's "
            f"checks and the optimizer terms read as a dense block. Add {name!r} to `exclude=` or set sparse=False."
        )
    if module.scale_grad_by_freq:
        raise UnsupportedError(
            f"layer {name!r} (Embedding) uses scale_grad_by_freq=True, which divides each row's gradient by its "
            f"frequency in the whole batch, so one sample's gradient depends on the others. Add {name!r} to "
            "`exclude=` or set scale_grad_by_freq=False."
        )


def _embedding_input(module: nn.Module, args: tuple[torch.Tensor, ...], proj: torch.Tensor | None) -> torch.Tensor:
    """Input side of an embedding: the one-hot row ``e_idx``, i.e. column ``idx`` of ``P_in`` ([B, P, k_in])."""
    assert isinstance(module, nn.Embedding)
    idx = args[0].reshape(args[0].shape[0], -1).long()  # nn.Embedding also takes int32 ids; one_hot needs int64
    weight = module.weight
    if proj is None:
        rows = F.one_hot(idx, module.num_embeddings).to(weight.dtype)
    else:
        rows = proj.to(weight.dtype).T[idx]
    if module.padding_idx is not None:
        rows = rows * (idx != module.padding_idx).unsqueeze(-1).to(rows.dtype)
    return rows


def position_lookup(args: tuple[Any, ...]) -> bool:
    """Whether an embedding's ids are ``arange(n)`` in one dimension: a position table looked up once and
    broadcast across the batch (nanoGPT's ``pos(torch.arange(t))``), whose rows capture files under ``n`` samples."""
    ids = args[0] if args else None
    return (isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.numel() > 1
            and torch.equal(ids, torch.arange(ids.numel(), device=ids.device, dtype=ids.dtype)))


register(
    nn.Embedding,
    LayerSpec(
        kind="embedding",
        dims=lambda m: (m.embedding_dim, m.num_embeddings),
        project_input=_embedding_input,
        project_output_grad=_linear_output,
        check=_check_embedding,
        transposed=True,
    ),
)


def outer_block(out_side: torch.Tensor, in_side: torch.Tensor) -> torch.Tensor:
    """Per-sample block ``sum_p u_p v_p^T`` as ``[B, k_out * k_in]`` (method.md §3, Kronecker projection).

    Args:
        out_side: projected output gradients ``[B, P, k_out]``.
        in_side: projected inputs ``[B, P, k_in]``.
    """
    dtype = torch.promote_types(out_side.dtype, torch.float32)
    block = torch.bmm(out_side.transpose(1, 2).to(dtype), in_side.to(dtype))
    return block.flatten(1)


def split_block(module: nn.Module, block: torch.Tensor) -> dict[str, torch.Tensor]:
    """Map one sample's exact block ``[k]`` back to parameter-shaped gradients (for tests and tooling)."""
    spec = spec_for(module)
    assert spec is not None
    d_out, d_in = spec.dims(module)
    matrix = block.reshape(d_out, d_in)
    out = {}
    bias = has_trainable_bias(module)
    weight = matrix[:, :-1] if bias else matrix
    out["weight"] = weight.T if spec.transposed else weight.reshape(module.weight.shape)
    if bias:
        out["bias"] = matrix[:, -1].reshape(module.bias.shape)
    return out


def gradient_block(module: nn.Module) -> torch.Tensor | None:
    """The module's accumulated ``.grad`` in the exact block layout ``[d_out, d_in]`` (inverse of
    :func:`split_block`), or ``None`` if the weight has no gradient."""
    if module.weight.grad is None:
        return None
    bias = module.bias.grad if has_trainable_bias(module) else None
    return parameter_block(module, module.weight.grad, bias)


def parameter_block(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Parameter-shaped values (a gradient, an optimizer's second moment) in the block layout ``[d_out, d_in]``.

    Args:
        weight: shaped like ``module.weight``.
        bias: shaped like ``module.bias`` (zeros if ``None`` while the bias is trained).
    """
    spec = spec_for(module)
    assert spec is not None
    matrix = weight.T if spec.transposed else weight.reshape(spec.dims(module)[0], -1)
    if has_trainable_bias(module):
        bias = bias if bias is not None else torch.zeros_like(module.bias)
        matrix = torch.cat([matrix, bias.reshape(matrix.shape[0], 1)], dim=1)  # a LayerNorm's over several dims
    return matrix


def own_trainable(module: nn.Module) -> list[str]:
    """Names of the trainable parameters ``module`` holds itself (not its children's)."""
    return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def refusal_notes(modules: dict[str, nn.Module]) -> str:
    """What excluding refused modules does not settle: a module holding supported layers as well as parameters of
    its own (a block with a LayerScale ``gamma``) leaves those layers out too, so name the other fix; for
    ``nn.MultiheadAttention``, whose parameters cannot move, building attention from ``nn.Linear`` modules."""
    attention = [name for name, module in modules.items() if isinstance(module, nn.MultiheadAttention)]
    holders = {name: own_trainable(module) for name, module in modules.items() if name not in attention
               and own_trainable(module) and any(spec_for(child) for child in module.modules() if child is not module)}
    return (f" Excluding {sorted(holders)} leaves their supported child layers untracked as well; to keep those, "
            f"move the parameters they hold themselves ({holders}) into a submodule of their own and exclude that."
            if holders else "") + (" nn.MultiheadAttention also uses its out_proj weight without calling that "
                                   "module, so out_proj cannot be tracked alone: to measure attention, build it from "
                                   "nn.Linear modules." if attention else "")


def excluded(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``name`` or one of its parent modules matches an exclude pattern."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def exclude_patterns(names: list[str], keep: list[str]) -> tuple[str, ...]:
    """``exclude=`` patterns covering every module of ``names`` and none of ``keep``: ``*.<last part>`` (one pattern
    for that module in every block of a stack), or the exact name where that would leave out a module of ``keep``."""
    patterns = []
    for name in names:
        head, _, last = name.rpartition(".")
        pattern = f"*.{last}" if head and not any(excluded(other, (f"*.{last}",)) for other in keep) else name
        if not excluded(name, tuple(patterns)):
            patterns.append(pattern)
    return tuple(patterns)


def refuse_unsupported_types(modules: dict[str, nn.Module]) -> None:
    """Refuse, in one message, every module of ``modules`` (the layers to track, by name) whose type has no spec,
    with ``exclude=`` patterns that leave out all of them and nothing else: a transformer stack has an attention
    and two LayerNorms in every block, and naming one module per refusal would take a fit per module. A single
    one is left to :func:`check_trackable`'s message.

    Raises:
        UnsupportedError: listing the modules and their types, with the ``exclude=`` to pass.
    """
    bad = {name: type(module).__name__ for name, module in modules.items() if spec_for(module) is None}
    if len(bad) < 2:
        return
    keep = [name for name in modules if not excluded(name, tuple(bad))]  # a bad module's children go with it
    listed = ", ".join(f"{name!r} ({kind})" for name, kind in list(bad.items())[:8])
    more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    raise UnsupportedError(
        f"layers {listed}{more} are not of a supported layer type; supported types are "
        f"{', '.join(supported_types())}. Pass exclude={exclude_patterns(list(bad), keep)!r} to train all "
        f"{len(bad)} without measuring their data value (fnmatch patterns, children included)."
        f"{refusal_notes({name: modules[name] for name in bad})}"
    )


def refuse_containers(modules: dict[str, nn.Module], names: list[str]) -> None:
    """Refuse a ``layers=`` name that is a container of supported layers (an attention block), naming them.

    Raises:
        ConfigError: with the ``layers=`` that tracks its supported layers.
    """
    for name in names:
        inner = [f"{name}.{child}" for child, m in modules[name].named_modules() if child and spec_for(m) is not None]
        if spec_for(modules[name]) is None and not own_trainable(modules[name]) and inner:
            raise ConfigError(f"layers= names the layers to track themselves, and {name!r} "
                              f"({type(modules[name]).__name__}) is a container of supported layers: pass "
                              f"layers={tuple(inner)!r} to track them (or leave layers=None to track every one).")


def check_trackable(name: str, module: nn.Module) -> LayerSpec:
    """Return the spec of a module to track, or raise naming the problem and the fix."""
    spec = spec_for(module)
    fix = f"Add {name!r} to `exclude=` to train it without measuring its data value."
    if spec is None:
        raise UnsupportedError(
            f"layer {name!r} ({type(module).__name__}) is not a supported layer type; supported types are "
            f"{', '.join(supported_types())}. {fix}{refusal_notes({name: module})}"
        )
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)):
        raise UnsupportedError(
            f"layer {name!r} ({type(module).__name__}) is a lazy module whose parameters are not initialised yet "
            "when fit starts, so its shape is unknown. Run the model once on a batch before trainer.fit (that "
            f"initialises them), or use a layer with explicit sizes. {fix}"
        )
    if not parametrize.is_parametrized(module) and next(module.parameters(recurse=False), None) is None:
        raise UnsupportedError(f"layer {name!r} ({type(module).__name__}) has no parameters of its own (e.g. a "
                               "LayerNorm with elementwise_affine=False): nothing to track. Leave it out of layers=.")
    if parametrize.is_parametrized(module) or not isinstance(getattr(module, "weight", None), nn.Parameter):
        raise UnsupportedError(
            f"layer {name!r} ({type(module).__name__}) has a parametrised weight or bias (weight_norm, "
            f"spectral_norm, torch.nn.utils.prune's mask or another parametrization): it is computed from other "
            f"parameters, so the captured gradient would not be the gradient of what the optimizer updates. {fix}"
        )
    extra = set(trained := own_trainable(module)) - {"weight", "bias"}
    if not trained:
        raise UnsupportedError(f"layer {name!r} ({type(module).__name__}) is frozen (no parameter of it trains): it "
                               "has no data value to measure. Leave it out of layers=.")
    if extra or not module.weight.requires_grad:
        raise UnsupportedError(
            f"layer {name!r} ({type(module).__name__}) trains parameters {sorted(trained)} but "
            f"capture needs a trainable 'weight' and at most a 'bias'"
            f"{'' if extra else ' (a frozen weight with a trained bias: bias-only fine-tuning, BitFit)'}. "
            f"{fix}"
        )
    spec.check(name, module)
    return spec


from .layers_conv import conv_spec  # noqa: E402  (it builds on this module's helpers)
from .layers_gpt2 import CONV1D_GPT2  # noqa: E402
from .layers_norm import NORM_SPECS  # noqa: E402

register(nn.Conv1d, conv_spec("conv1d", spatial_dims=1))
register(nn.Conv2d, conv_spec("conv2d", spatial_dims=2))
register(nn.Conv3d, conv_spec("conv3d", spatial_dims=3))
register("Conv1D", CONV1D_GPT2)
for _norm, _norm_spec in NORM_SPECS.items():
    register(_norm, _norm_spec)
