"""Batches ``(x, y, index)`` on the device, seeded per epoch (a resumed run sees the same order):
in-memory tensors sliced directly, other data sets through a torch ``DataLoader``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from advplug.data.bundle import Indexed


class TensorBatches:
    """Batches of an in-memory ``(x, y)`` pair already on the device: no loader overhead.

    Shuffling uses a generator seeded per epoch, so a resumed run sees the same order. Under DDP,
    each rank takes its strided share of the permutation.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> Tensor:
        n = len(self.y)
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            perm = torch.arange(n)
        return perm[self.rank :: self.world_size].to(self.x.device)

    def __len__(self) -> int:
        n = len(range(self.rank, len(self.y), self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self._order()
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.x[idx], self.y[idx], idx


class LoaderBatches:
    """A torch DataLoader over an indexed data set, moving batches to the device."""

    def __init__(
        self,
        ds: Dataset,
        batch_size: int,
        shuffle: bool,
        device: torch.device,
        seed: int = 0,
        workers: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        from torch.utils.data.distributed import DistributedSampler

        self.sampler = (
            DistributedSampler(Indexed(ds), world_size, rank, shuffle=shuffle, seed=seed) if world_size > 1 else None
        )
        self.seed, self.shuffle = seed, shuffle
        self.loader = DataLoader(
            Indexed(ds),
            batch_size=batch_size,
            shuffle=False if self.sampler else shuffle,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        self.device = device

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        else:
            self.loader.generator.manual_seed(self.seed * 100003 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for x, y, i in self.loader:
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
                i.to(self.device, non_blocking=True),
            )


def batches(
    data: Dataset | tuple[Tensor, Tensor],
    batch_size: int,
    shuffle: bool,
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 4,
) -> TensorBatches | LoaderBatches:
    if isinstance(data, tuple):
        x, y = data
        return TensorBatches(x.to(device), y.to(device), batch_size, shuffle, seed, rank, world_size)
    return LoaderBatches(data, batch_size, shuffle, device, seed, workers, rank, world_size)
