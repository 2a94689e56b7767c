"""Data sets by name: the embedded default (scikit-learn's digits), torchvision's from a local root,
and the user's own (``folder:``, ``npz:``, ``module:``)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from advplug.data.bundle import DataBundle
from advplug.data.checks import as_bundle
from advplug.data.files import load_folder, load_npz
from advplug.errors import DataError
from advplug.source_names import DATASETS, PYTHON, SOURCES
from advplug.usercode import import_callable


def load_digits_tensors(
    test_fraction: float = 0.2, split_seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
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


def _torchvision(name: str, root: str, download: bool) -> DataBundle:
    from torchvision import datasets, transforms

    t_test = transforms.ToTensor()
    if not download and not os.path.isdir(root):
        raise DataError(f"data root {root!r} does not exist: put {name} there, or pass --download (needs a network)")
    small = name in ("mnist", "fashion-mnist")
    aug = (
        t_test
        if small
        else transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        )
    )
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
            return DataBundle(train, test, 10 if name == "cifar10" else 100, (3, 32, 32), augment="crop-flip")
        aug = t_test  # SVHN: no flips of digits (Rice et al.)
        train = datasets.SVHN(root, split="train", transform=aug, download=download)
        test = datasets.SVHN(root, split="test", transform=t_test, download=download)
        return DataBundle(train, test, 10, (3, 32, 32))
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(
            f"{name} not found under {root!r} ({e}); pass --download if this machine has a network"
        ) from None


def load_dataset(
    name: str,
    root: str = "./data",
    download: bool = False,
    *,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    allow_import: bool = False,
) -> DataBundle:
    """A built-in data set by name, or the user's own: ``folder:PATH``, ``npz:PATH`` (data, read
    without executing anything) or ``module:pkg.mod:callable`` (code: imported only with
    ``allow_import=True``, i.e. when the user named it, never because a run directory says so)."""
    if name.startswith("folder:"):
        return load_folder(name[len("folder:") :], image_size=image_size, test_fraction=test_fraction)
    if name.startswith("npz:"):
        return load_npz(name[len("npz:") :], image_size=image_size)
    if name.startswith("module:"):
        return load_module(name[len("module:") :], image_size=image_size, allow_import=allow_import)
    if name == PYTHON:
        raise DataError(
            "this run's data was passed from Python (in memory): pass it again, "
            "e.g. advplug.tools.api.evaluate(run_dir, test=(x, y))"
        )
    if image_size is not None:
        raise DataError(f"--image-size applies to folder:, npz: and module: data, not to the built-in {name!r}")
    if name == "digits":
        train, test = load_digits_tensors()
        return DataBundle(train, test, 10, (1, 8, 8))
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)}, or {', '.join(SOURCES)})")
    return _torchvision(name, root, download)


def load_module(spec: str, image_size: int | None = None, allow_import: bool = False) -> DataBundle:
    """``pkg.mod:callable`` called with no arguments, returning ``(train, test)``: each a pair of
    tensors/arrays ``(x, y)`` or a torch ``Dataset`` of ``(image, label)`` items (kept as it is, so its
    transforms, e.g. augmentation, run per epoch); or a ``DataBundle``."""
    name = f"module:{spec}"
    fn = import_callable(spec, "data", name, allow_import, DataError)
    try:
        out = fn()
    except Exception as e:
        raise DataError(f"--data {name}: calling it failed ({type(e).__name__}: {e})") from None
    return as_bundle(out, name, image_size)
