"""What a run's training costs: the model's forward and backward passes (attack iterations included), counted by hooks
on the model as plain Python numbers (no host sync, nothing added to the computation), peak memory and the device;
per process, saved in every checkpoint and restored on ``--resume``, so that a resumed run counts what a straight run
counts."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

COUNTS = (
    "forward_passes",
    "forward_samples",
    "backward_passes",
    "backward_samples",
    "eval_forward_passes",
    "eval_forward_samples",
)


class CostMeter:
    """Counts the calls of ``modules`` (the trained model, its EMA copy, and any ``torch.compile`` wrapper of the
    model: only the outermost of nested calls counts, and none while Dynamo traces) and the backward passes through
    their outputs (``output.register_hook``: fires for ``backward()`` and ``autograd.grad`` alike). A call with input
    ``[B, ...]`` is one pass of B samples. Inside ``evaluating()`` (the per-epoch held-out evaluation) forward passes go
    to ``eval_forward_*`` instead. ``close()`` removes the hooks."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.device = device
        self.counts = dict.fromkeys(COUNTS, 0)
        self.peak = 0  # peak memory of earlier processes of this run (--resume)
        self.counted_from = 1  # the first epoch counted (later: resumed from a checkpoint without counts)
        self.eval = False
        self.depth = 0
        self.handles: list[Any] = []
        for m in {id(m): m for m in modules}.values():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._exit, always_call=True))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not torch.compiler.is_compiling():
            self.depth += 1

    def _exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth -= 1
        if self.depth:
            return  # inside an outer counted call (a compiled wrapper's own model)
        n = args[0].shape[0] if args and isinstance(args[0], Tensor) and args[0].dim() else 1
        kind = "eval_forward" if self.eval else "forward"
        self.counts[f"{kind}_passes"] += 1
        self.counts[f"{kind}_samples"] += n
        if not self.eval and isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self._backward(n))

    def _backward(self, n: int) -> None:
        self.counts["backward_passes"] += 1
        self.counts["backward_samples"] += n

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Forward passes inside count as held-out evaluation (``eval_forward_*``), backward passes not at all."""
        self.eval = True
        try:
            yield
        finally:
            self.eval = False

    def peak_memory(self) -> int:
        """Bytes: the most memory allocated on the CUDA device, else the process's peak RSS (earlier processes' too)."""
        if self.device.type == "cuda":
            now = torch.cuda.max_memory_allocated(self.device)
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            now = rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes; Linux: KiB
        return max(self.peak, now)

    def state(self) -> dict[str, int]:
        """This process's counts and peak memory so far (a checkpoint's ``cost``, one per process)."""
        return {**self.counts, "peak_memory_bytes": self.peak_memory(), "counted_from_epoch": self.counted_from}

    def restore(self, states: list[dict[str, Any]], rank: int, start_epoch: int) -> None:
        """Continue from a checkpoint's counts (``states``: one per process; this is process ``rank``), written after
        ``start_epoch`` epochs; a checkpoint without them: counted from the next epoch on, and said so."""
        if rank >= len(states):
            self.counted_from = start_epoch + 1
            return
        state = states[rank]
        self.counts = {k: int(state.get(k, 0)) for k in COUNTS}
        self.peak = int(state.get("peak_memory_bytes", 0))
        self.counted_from = int(state.get("counted_from_epoch", 1))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def counted_modules(model: nn.Module, runtime: Any) -> list[nn.Module]:
    """What a ``CostMeter`` watches: the model, its EMA / averaged copy, and the ``torch.compile`` wrappers the step
    and the attacks call (DDP calls the model itself)."""
    ema = [runtime.ema.model] if runtime.ema is not None else []
    compiled = [m for m in (runtime.net, runtime.attack_model) if hasattr(m, "_orig_mod")]
    return [model, *ema, *compiled]


def device_name(device: torch.device) -> str:
    """``cpu``, ``cuda:0 NVIDIA H200`` ..."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


def run_cost(states: list[dict[str, Any]], seconds: float, device: torch.device) -> dict[str, Any]:
    """``results.json``'s ``cost`` from every process's ``CostMeter.state()``: counts summed over the processes, the
    peak memory the highest of one process, ``seconds`` the training's wall time (its epochs, summed over resumes)."""
    cost: dict[str, Any] = {"train_seconds": seconds}
    cost.update({k: sum(int(s.get(k, 0)) for s in states) for k in COUNTS})
    cost["peak_memory_bytes"] = max(int(s.get("peak_memory_bytes", 0)) for s in states)
    cost["peak_memory_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS"
    cost["device"] = device_name(device)
    cost["processes"] = len(states)
    first = max(int(s.get("counted_from_epoch", 1)) for s in states)
    return cost | ({"counted_from_epoch": first} if first > 1 else {})
