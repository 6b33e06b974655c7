"""Per-sample gradient maths of convolutions (``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``), registered by
:mod:`.layers`.

A convolution is a linear layer applied at every output position ``p`` to the patch of input under its kernel, so
its per-sample weight gradient is ``sum_p u_p v_p^T`` with ``v_p`` the patch (method.md §3). The exact block is
``[C_out, C_in/groups * prod(kernel) (+1 bias column)]``, the weight reshaped to two dims, as for ``nn.Linear``.

- Padding: zero padding that is the same on both sides goes to the unfold; any other (``padding_mode`` reflect,
  replicate or circular, ``padding="same"`` with an even effective kernel, whose extra zero goes to the right as
  torch does), and a ``nn.Conv3d``'s, is applied with ``F.pad`` first, as torch's own forward does.
- ``nn.Conv1d`` is unfolded as a convolution over ``[B, C, 1, L]`` with a ``(1, k)`` kernel, ``nn.Conv3d`` by
  strided windows of the padded input (``F.unfold`` takes two spatial dims only).
- Groups: output channel ``o`` of group ``g`` sees only group ``g``'s input channels, so one outer product over
  the positions does not give the block. The block is formed per group in the layer's backward, from the input
  itself (which autograd keeps for the weight's gradient anyway; its patches with the groups apart,
  ``[B, P, groups, k_in]``, would be ``k_in`` times its size, ten times for a depthwise 3x3), and projected on
  the output side last: ``P_out [sum_p u_{p,g}^T (P_in v_{p,g})]_g``, stacked over the groups' output channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerSpec, apply_projection, has_trainable_bias, outer_block, project_input_with_bias

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _pads(module: Conv) -> list[tuple[int, int]]:
    """``(before, after)`` padding of each spatial dim, as torch's forward applies it."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in module.padding]  # type: ignore[union-attr]


def _patches(module: Conv, x: torch.Tensor) -> torch.Tensor:
    """The input under the kernel at each output position, ``[B, C_in * prod(kernel), P]`` (channel-major)."""
    pads = _pads(module)
    unfold_padding = tuple(before for before, _ in pads)
    padded_here = isinstance(module, nn.Conv3d) or module.padding_mode != "zeros"  # Conv3d: no unfold padding
    if padded_here or any(before != after for before, after in pads):
        flat = [side for before_after in reversed(pads) for side in before_after]  # F.pad: last dim first
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x, unfold_padding = F.pad(x, flat, mode=mode), (0,) * len(pads)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv3d):
        return _windows(x, kernel, dilation, stride)
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution over [B, C, 1, L]
        x, kernel, dilation = x.unsqueeze(2), (1, *kernel), (1, *dilation)
        stride, unfold_padding = (1, *stride), (0, *unfold_padding)
    return F.unfold(x, kernel, dilation, unfold_padding, stride)


def _windows(x: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]
             ) -> torch.Tensor:
    """:func:`F.unfold` for any number of spatial dims (``F.unfold`` takes 2): ``x [B, C, *S]`` (padded) to
    ``[B, C * prod(kernel), P]``, the kernel offsets after the channel, as in the weight."""
    spatial = len(kernel)
    for dim, (k, d, s) in enumerate(zip(kernel, dilation, stride)):  # a window dim at the end per spatial dim
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)[..., ::d]
    b, c, outputs = x.shape[0], x.shape[1], x.shape[2:2 + spatial]
    order = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]  # [B, C, *K, *S_out]
    return x.permute(order).reshape(b, c * math.prod(kernel), math.prod(outputs))


def _check_conv(name: str, module: nn.Module) -> None:
    del name, module  # every padding, padding mode, dilation, stride and group count is covered


def _projected_patches(module: Conv, x: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    """``P_in [v_p, 1]`` per position: ``[B, P, k_in]``, or ``[B, P, groups, k_in]`` for a grouped convolution."""
    patches = _patches(module, x).transpose(1, 2)  # [B, P, C_in * K]
    if module.groups > 1:
        patches = patches.unflatten(2, (module.groups, -1))
    return project_input_with_bias(patches, has_trainable_bias(module), proj)


def _conv_input(module: nn.Module, args: tuple[torch.Tensor, ...], proj: torch.Tensor | None) -> torch.Tensor:
    """``[B, P, k_in]`` projected patches; a grouped convolution's input itself (its block needs the groups)."""
    assert isinstance(module, Conv)
    return args[0].detach() if module.groups > 1 else _projected_patches(module, args[0], proj)


def _conv_positions(module: nn.Module, in_side: torch.Tensor) -> int:
    """Positions per sample of a call's input side: of the projected patches ``[B, P, k_in]``, or the output
    positions of a grouped convolution's input ``x`` (torch's output size per dim)."""
    assert isinstance(module, Conv)
    if module.groups == 1:
        return in_side.shape[1]
    x = in_side
    sizes = [(n + before + after - d * (k - 1) - 1) // s + 1 for n, (before, after), d, k, s in
             zip(x.shape[2:], _pads(module), module.dilation, module.kernel_size, module.stride)]
    return math.prod(sizes) if x.dim() == len(sizes) + 2 else -1


def _conv_output(module: nn.Module, grad: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    """``P_out u_p`` per position, ``[B, P, k_out]`` (a grouped convolution projects in :func:`_conv_block`)."""
    u = grad.flatten(2).transpose(1, 2)
    return u if module.groups > 1 else apply_projection(u, proj)  # type: ignore[operator]


def _conv_block(module: nn.Module, grad: torch.Tensor, p_out: torch.Tensor | None, in_side: torch.Tensor,
                p_in: torch.Tensor | None) -> torch.Tensor:
    """Per-sample block ``[B, k_out * k_in]``: ``sum_p (P_out u_p)(P_in v_p)^T``, per group when grouped."""
    assert isinstance(module, Conv)
    if module.groups == 1:
        return outer_block(_conv_output(module, grad, p_out), in_side)
    dtype = torch.promote_types(grad.dtype, torch.float32)
    v = _projected_patches(module, in_side.to(dtype), None if p_in is None else p_in.to(dtype))
    u = _conv_output(module, grad, None).unflatten(2, (module.groups, -1))  # [B, P, groups, C_out / groups]
    block = torch.einsum("bpgc,bpgk->bgck", u.to(dtype), v).flatten(1, 2)  # [B, C_out, k_in]
    if p_out is not None:
        block = torch.matmul(p_out.to(dtype), block)
    return block.flatten(1)


def _conv_dims(module: nn.Module) -> tuple[int, int]:
    assert isinstance(module, Conv)
    d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
    return module.out_channels, d_in + int(has_trainable_bias(module))


def conv_spec(kind: str, spatial_dims: int) -> LayerSpec:
    """The spec of a convolution over ``spatial_dims`` dims (registered by :mod:`.layers`)."""
    return LayerSpec(kind=kind, dims=_conv_dims, project_input=_conv_input, project_output_grad=_conv_output,
                     check=_check_conv, block=_conv_block, positions=_conv_positions, input_rank=spatial_dims + 2)
