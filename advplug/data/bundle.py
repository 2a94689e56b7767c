"""A loaded data set: train / test (and held-out) data with its shape facts, and the indexed view
that makes every item ``(x, y, index)``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.utils.data import Dataset


@dataclass
class DataBundle:
    """Train / test (and optional validation) data plus their shape facts."""

    train: Dataset | tuple[Tensor, Tensor]
    test: Dataset | tuple[Tensor, Tensor]
    num_classes: int
    input_shape: tuple[int, ...]
    validation: tuple[Tensor, Tensor] | None = None  # plugins' own split (BiLAW's meta-objective)
    selection: tuple[Tensor, Tensor] | None = None  # model selection ("best"), disjoint from the above
    augment: str = "none"  # training augmentation for the on-device path: "none" or "crop-flip" (advplug.data.device)

    @property
    def num_train(self) -> int:
        return len(self.train[0]) if isinstance(self.train, tuple) else len(self.train)


class Indexed(Dataset):
    """Wraps a ``(x, y)`` data set so that items are ``(x, y, index)``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        x, y = self.base[i]
        return x, int(y), i
