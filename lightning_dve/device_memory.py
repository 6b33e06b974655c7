"""Memory available to this process on a device: the budgets of the train-end recursion's placement and of the
exact replay (its warning and the states it keeps)."""

from __future__ import annotations

from pathlib import Path

import torch


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on ``device``: ``MemAvailable`` of ``/proc/meminfo`` on the CPU; on a CUDA
    device its free memory and what torch caches unused; ``None`` where it cannot be read."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
