"""The on-device data path (``--data-path device``): a training set that fits in device memory is
moved there once (as uint8 when its images are), and each batch is sliced, converted and
augmented on the device: no worker processes, no host-to-device copy per step.

Augmentation ``crop-flip`` draws the same distribution as torchvision's
``RandomCrop(size, padding=4)`` followed by ``RandomHorizontalFlip()`` (zero padding, offsets
uniform in [0, 2 * pad] per axis, flip with probability 1/2), from a device generator seeded per
epoch, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from advplug.data.batches import TensorBatches
from advplug.errors import DataError

# Fits-in-memory rule for --data-path auto: the raw training images, as stored, below this size.
AUTO_MAX_BYTES = 4 << 30


def raw_tensors(ds: Dataset) -> tuple[Tensor, Tensor] | None:
    """A torchvision image data set (CIFAR, SVHN, MNIST, ...; also through ``Subset``) as
    ``(uint8 [N, C, H, W], long [N])``, without its transforms; ``None`` for other data sets."""
    idx = None
    while isinstance(ds, Subset):
        idx = list(ds.indices) if idx is None else [ds.indices[i] for i in idx]
        ds = ds.dataset
    data = getattr(ds, "data", None)
    labels = getattr(ds, "targets", getattr(ds, "labels", None))
    if data is None or labels is None:
        return None
    x = torch.as_tensor(np.asarray(data))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if x.dtype != torch.uint8 or x.dim() not in (3, 4) or len(x) != len(y):
        return None
    if x.dim() == 3:  # MNIST: [N, H, W]
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # CIFAR: [N, H, W, C]
        x = x.permute(0, 3, 1, 2)
    if idx is not None:
        x, y = x[idx], y[idx]
    return x.contiguous(), y


def crop_flip_params(n: int, pad: int, gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample vertical and horizontal offsets in [0, 2 pad] and flip flags."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=device)
    flip = torch.rand(n, generator=gen, device=device) < 0.5
    return dy, dx, flip


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """Crop each zero-padded image at its offsets, then flip it horizontally where ``flip``: one
    gather for the whole batch."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceBatches(TensorBatches):
    """``TensorBatches`` over images stored on the device (uint8 or float), converted to [0, 1]
    floats and augmented per batch on the device."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: str = "none",
        pad: int = 4,
    ) -> None:
        super().__init__(x, y, batch_size, shuffle, seed, rank, world_size)
        if augment not in ("none", "crop-flip"):
            raise ValueError(f"unknown augmentation {augment!r}")
        self.augment, self.pad = augment, pad
        self.gen = torch.Generator(device=x.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        self.gen.manual_seed(self.seed * 100003 + self.epoch + 7919)  # per epoch: resumable
        for xb, yb, idx in super().__iter__():
            xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb
            if self.augment == "crop-flip":
                xb = crop_flip(xb, *crop_flip_params(len(xb), self.pad, self.gen, xb.device), pad=self.pad)
            yield xb, yb, idx


def device_batches(
    train: Dataset | tuple[Tensor, Tensor],
    augment: str,
    path: str,
    batch_size: int,
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
) -> DeviceBatches | None:
    """The device path for ``path`` (auto / device / loader), or ``None`` to use a DataLoader."""
    if path == "loader":
        return None
    raw = train if isinstance(train, tuple) else raw_tensors(train)
    if raw is None or (path == "auto" and raw[0].numel() * raw[0].element_size() > AUTO_MAX_BYTES):
        if path == "device":
            raise DataError(
                "--data-path device: this data set cannot be loaded into memory as tensors; use --data-path loader"
            )
        return None
    x, y = raw
    return DeviceBatches(x.to(device), y.to(device), batch_size, True, seed, rank, world_size, augment)
