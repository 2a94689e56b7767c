"""The device a run computes on: ``--device`` checked against this machine, or the local rank's GPU, else the CPU."""

from __future__ import annotations

import torch

from advplug.errors import OptionError


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``...) if this machine has it; ``None``: ``cuda:<local_rank>``, else
    the CPU."""
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise OptionError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise OptionError(f"--device {name}: this machine has no usable CUDA GPU (use --device cpu)")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
