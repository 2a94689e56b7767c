"""Multi-GPU through torchrun / DistributedDataParallel; a no-op in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def init() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; initialises the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        _die_with_parent()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _die_with_parent() -> None:
    """Under torchrun, ask Linux to end this worker when its agent dies (``kill -9`` of torchrun
    would otherwise leave the workers training and writing the run directory)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to do
        return
    if os.getppid() == 1:  # the agent died before we asked
        os._exit(1)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_row_mean(t: Tensor) -> Tensor:
    """Mean over the last dimension across all ranks (sum and count all-reduced)."""
    if not active():
        return t.mean(dim=-1, keepdim=True)
    s = torch.cat([t.sum(dim=-1, keepdim=True), torch.full_like(t[..., :1], t.shape[-1])], dim=-1)
    dist.all_reduce(s)
    return s[..., :1] / s[..., 1:]


def all_sum(t: Tensor) -> Tensor:
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (as is, in a single process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """End of a multi-process run: wait for every rank (rank 0 evaluates last), then tear the
    group down explicitly (a rank exiting with a live gloo group can abort at interpreter exit)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
