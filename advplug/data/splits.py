"""Splits held out of the training set (model selection, plugins' validation), fixed by a seed."""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import Subset

from advplug.data.bundle import DataBundle
from advplug.data.device import raw_tensors
from advplug.errors import DataError


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
        raw = raw_tensors(bundle.train)  # held-out images without the training augmentation
        if raw is not None:
            split = (raw[0][val_idx].float() / 255, raw[1][val_idx])
        else:
            split = (
                torch.stack([bundle.train[int(i)][0] for i in val_idx]),
                torch.tensor([int(bundle.train[int(i)][1]) for i in val_idx]),
            )
        train = Subset(bundle.train, tr_idx.tolist())
    return dataclasses.replace(bundle, train=train, **{role: split})
