"""Memory facts for refusing work that cannot fit: the error, how much is free, how to say a size."""

from __future__ import annotations

import os

import torch

__all__ = ["MemoryBudgetError", "available_bytes", "format_bytes"]


class MemoryBudgetError(ValueError):
    """One input row needs more memory than the budget (or the machine) allows."""


def format_bytes(n: float) -> str:
    """``n`` bytes for a message, e.g. ``'94.4 GB'`` (1024-based, as :func:`~voxplain.engine.parse_memory`)."""
    for unit, size in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a pass on ``device`` right now (None when unknown)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None
    return None
