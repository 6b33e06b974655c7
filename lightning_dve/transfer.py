"""Device-to-host copies of the per-sample blocks ``[B, k]`` (method.md §3: they belong on the host, then disk).

On a CUDA device each block goes into page-locked (pinned) host memory with a non-blocking copy, and the host
waits once per device after all copies are queued, instead of once per layer as ``.cpu()`` does, so the copies
run back to back behind the step's queued kernels. CPU tensors are returned as they are (no copy).
"""

from __future__ import annotations

import torch


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """Queue a non-blocking copy of a CUDA tensor into a new pinned host tensor (valid after a stream sync)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def to_host(blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` on the CPU, detached; CUDA tensors through :func:`pinned_copy` and one wait per device.

    Args:
        blocks: tensors on any devices (CPU tensors are passed through without a copy).

    Returns:
        The same keys, every tensor on the CPU and ready to read.
    """
    out: dict[str, torch.Tensor] = {}
    devices: set[torch.device] = set()
    for name, block in blocks.items():
        block = block.detach()
        if block.is_cuda:
            devices.add(block.device)
            out[name] = pinned_copy(block)
        else:
            out[name] = block.cpu()  # other devices copy synchronously; a CPU tensor is returned as is
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return out
