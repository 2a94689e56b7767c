"""Data sets: the embedded default (scikit-learn's digits) and torchvision's from a local root.

Every batch is ``(x, y, index)`` with ``x`` in [0, 1] and ``index`` the sample's position in the
training set (per-sample plugin state is keyed by it).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import DataError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")


@dataclass
class DataBundle:
    """Train / test (and optional validation) data plus their shape facts."""

    train: Dataset | tuple[Tensor, Tensor]
    test: Dataset | tuple[Tensor, Tensor]
    num_classes: int
    input_shape: tuple[int, ...]
    validation: tuple[Tensor, Tensor] | None = None  # plugins' own split (BiLAW's meta-objective)
    selection: tuple[Tensor, Tensor] | None = None  # model selection ("best"), disjoint from the above

    @property
    def num_train(self) -> int:
        return len(self.train[0]) if isinstance(self.train, tuple) else len(self.train)


def load_digits_tensors(test_fraction: float = 0.2, split_seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """scikit-learn's 1797 8x8 digits scaled to [0, 1], split stratified and fixed by ``split_seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=split_seed, stratify=d.target)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return (x[tr], y[tr]), (x[te], y[te])


class Indexed(Dataset):
    """Wraps a ``(x, y)`` data set so that items are ``(x, y, index)``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        x, y = self.base[i]
        return x, int(y), i


def _torchvision(name: str, root: str, download: bool) -> DataBundle:
    from torchvision import datasets, transforms

    t_test = transforms.ToTensor()
    if not download and not os.path.isdir(root):
        raise DataError(f"data root {root!r} does not exist: put {name} there, or pass --download (needs a network)")
    small = name in ("mnist", "fashion-mnist")
    aug = t_test if small else transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    try:
        if name in ("mnist", "fashion-mnist"):
            cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
            train = cls(root, train=True, transform=aug, download=download)
            test = cls(root, train=False, transform=t_test, download=download)
            return DataBundle(train, test, 10, (1, 28, 28))
        if name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            train = cls(root, train=True, transform=aug, download=download)
            test = cls(root, train=False, transform=t_test, download=download)
            return DataBundle(train, test, 10 if name == "cifar10" else 100, (3, 32, 32))
        aug = t_test  # SVHN: no flips of digits (Rice et al.)
        train = datasets.SVHN(root, split="train", transform=aug, download=download)
        test = datasets.SVHN(root, split="test", transform=t_test, download=download)
        return DataBundle(train, test, 10, (3, 32, 32))
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f"{name} not found under {root!r} ({e}); pass --download if this machine has a network") from None


def load_dataset(name: str, root: str = "./data", download: bool = False) -> DataBundle:
    if name == "digits":
        train, test = load_digits_tensors()
        return DataBundle(train, test, 10, (1, 8, 8))
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)})")
    return _torchvision(name, root, download)


def split_size(size: int | float | None, n: int) -> int:
    """A split's size: ``size`` as a count, or a fraction if < 1; default min(1000, 10 % of n)."""
    if size is None:
        return min(1000, round(0.1 * n))
    return int(round(size * n)) if size < 1 else int(size)


def hold_out(bundle: DataBundle, size: int | float | None, seed: int, role: str = "validation") -> DataBundle:
    """Move a split out of the training set into ``bundle.<role>`` (``validation`` or ``selection``).

    ``size``: count, fraction if < 1, or ``None`` for min(1000, 10 %). Training indices are
    renumbered 0..n-1 over what remains; the split is fixed by ``seed``.
    """
    n = bundle.num_train
    k = split_size(size, n)
    if not 0 < k < n:
        raise DataError(f"{role} split of size {size} leaves no training data (training set has {n} samples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, tr_idx = perm[:k].sort().values, perm[k:].sort().values
    if isinstance(bundle.train, tuple):
        x, y = bundle.train
        train, split = (x[tr_idx], y[tr_idx]), (x[val_idx], y[val_idx])
    else:
        split = (torch.stack([bundle.train[int(i)][0] for i in val_idx]),
                 torch.tensor([int(bundle.train[int(i)][1]) for i in val_idx]))
        train = Subset(bundle.train, tr_idx.tolist())
    return dataclasses.replace(bundle, train=train, **{role: split})


class TensorBatches:
    """Batches of an in-memory ``(x, y)`` pair already on the device: no loader overhead.

    Shuffling uses a generator seeded per epoch, so a resumed run sees the same order. Under DDP,
    each rank takes its strided share of the permutation.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
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
        return perm[self.rank::self.world_size].to(self.x.device)

    def __len__(self) -> int:
        n = len(range(self.rank, len(self.y), self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self._order()
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[idx], self.y[idx], idx


class LoaderBatches:
    """A torch DataLoader over an indexed data set, moving batches to the device."""

    def __init__(self, ds: Dataset, batch_size: int, shuffle: bool, device: torch.device, seed: int = 0,
                 workers: int = 4, rank: int = 0, world_size: int = 1) -> None:
        from torch.utils.data.distributed import DistributedSampler

        self.sampler = DistributedSampler(Indexed(ds), world_size, rank, shuffle=shuffle, seed=seed) if world_size > 1 else None
        self.seed, self.shuffle = seed, shuffle
        self.loader = DataLoader(Indexed(ds), batch_size=batch_size, shuffle=False if self.sampler else shuffle,
                                 sampler=self.sampler, num_workers=workers, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
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
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                   i.to(self.device, non_blocking=True))


def batches(data: Dataset | tuple[Tensor, Tensor], batch_size: int, shuffle: bool, device: torch.device,
            seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 4) -> TensorBatches | LoaderBatches:
    if isinstance(data, tuple):
        x, y = data
        return TensorBatches(x.to(device), y.to(device), batch_size, shuffle, seed, rank, world_size)
    return LoaderBatches(data, batch_size, shuffle, device, seed, workers, rank, world_size)
