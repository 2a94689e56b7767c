"""Validation of data the user hands over (arrays, tensors, torch ``Dataset``s): images
``[N, C, H, W]`` in [0, 1], integer labels 0..K-1, with one-line errors for anything else."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from advplug.data.bundle import DataBundle
from advplug.errors import DataError

MAX_CLASSES = 100_000  # as checkpoint.MAX_CLASSES: a label beyond it is taken for an error


def _resize(x: Tensor, size: int | None) -> Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    import torch.nn.functional as F

    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def as_images(x: Any, where: str) -> Tensor:
    """``[N, C, H, W]`` float32 in [0, 1] from uint8 (/255) or float data; ``[N, H, W]`` gets a channel,
    ``[N, H, W, C]`` (C 1, 3 or 4, channels last) is transposed. One-line errors for anything else."""
    import numpy as np

    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise DataError(f"{where}: an object array (save plain numeric arrays)")
        if x.dtype.kind not in "biuf":  # strings, bytes, dates: torch cannot hold them
            raise DataError(f"{where}: images must be uint8 (0..255) or float in [0, 1], got {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise DataError(f"{where}: expected an array or tensor of images, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise DataError(f"{where}: images must be [N, C, H, W], [N, H, W, C] or [N, H, W]; got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    if len(x) == 0:
        raise DataError(f"{where}: no samples")
    if x.numel() == 0:
        raise DataError(f"{where}: images of shape {tuple(x.shape[1:])} hold no pixels")
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if x.dtype == torch.bool or not (x.dtype.is_floating_point or x.dtype in (torch.int16, torch.int32, torch.int64)):
        raise DataError(f"{where}: images must be uint8 (0..255) or float in [0, 1], got {x.dtype}")
    x = x.float()
    if torch.isnan(x).any():
        raise DataError(f"{where}: contains NaN")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{where}: values must be in [0, 1] (uint8 0..255 is scaled), got [{lo:.4g}, {hi:.4g}]")
    return x.contiguous()


def as_labels(y: Any, n: int, where: str) -> Tensor:
    import numpy as np

    if isinstance(y, np.ndarray):
        if y.dtype == object:
            raise DataError(f"{where}: an object array (save integer labels)")
        if y.dtype.kind not in "biuf":  # strings, bytes, dates: torch cannot hold them
            raise DataError(f"{where}: labels must be integers 0..K-1, got {y.dtype}")
        y = torch.from_numpy(np.ascontiguousarray(y))
    if isinstance(y, (list, tuple)):
        y = torch.as_tensor(y)
    if not isinstance(y, Tensor):
        raise DataError(f"{where}: expected an array of labels, got {type(y).__name__}")
    y = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y
    if y.dim() != 1:
        raise DataError(f"{where}: labels must be one integer class per sample, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point:
        if torch.isnan(y).any() or (y != y.round()).any():
            raise DataError(f"{where}: labels must be whole class numbers 0..K-1")
    elif y.dtype == torch.bool or y.dtype.is_complex:
        raise DataError(f"{where}: labels must be integers 0..K-1, got {y.dtype}")
    if len(y) != n:
        raise DataError(f"{where}: {len(y)} labels for {n} images")
    return y.long()


def _numbers(ks: list[int], most: int = 10) -> str:
    shown = ", ".join(map(str, ks[:most]))
    return shown + (f" ... ({len(ks)} in all)" if len(ks) > most else "")


def check_classes(y_train: Tensor, k: int, name: str, class_names: list[str] | None = None) -> None:
    """Every class 0..k-1 has a training sample. A gap is a stray label (12 in a 10-class set makes
    K = 13 with classes 10 and 11 empty) or a class left out: the model would get output units that
    never see a sample, silently. Called on the whole training set, before any split is held out."""
    counts = torch.bincount(y_train.long(), minlength=k)
    missing = (counts[:k] == 0).nonzero().flatten().tolist()
    if not missing:
        return
    if class_names is not None:
        what = ", ".join(f"{m} ({class_names[m]!r})" for m in missing[:10])
        why = f"{k} class folders; an empty one is a class the model cannot learn"
    else:
        what = _numbers(missing)
        top = int(counts[k - 1])
        why = f"labels must be 0..K-1; label {k - 1} appears {top} time{'s' if top != 1 else ''}"
    has = "has" if len(missing) == 1 else "have"
    raise DataError(f"{name}: class{'es' if len(missing) > 1 else ''} {what} {has} no training sample ({why})")


def check_tensors(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    name: str,
    num_classes: int | None = None,
    image_size: int | None = None,
    class_names: list[str] | None = None,
) -> DataBundle:
    """Validate and bundle in-memory train / test data: images ``[N, C, H, W]`` in [0, 1] (uint8 is
    scaled), integer labels 0..K-1; K from the data (max label + 1) unless given (``class_names``: the
    classes' names, for messages). One-line errors for: no samples, one class only, a class without
    training samples, labels out of range, mismatched shapes, values outside [0, 1], NaN."""
    xs = []
    for part, (x, y) in (("train", train), ("test", test)):
        x = _resize(as_images(x, f"{name}: x_{part}"), image_size)
        xs.append((x, as_labels(y, len(x), f"{name}: y_{part}")))
    (xt, yt), (xe, ye) = xs
    if xt.shape[1:] != xe.shape[1:]:
        raise DataError(
            f"{name}: train images are {tuple(xt.shape[1:])}, test images {tuple(xe.shape[1:])} "
            f"(use --image-size to resize both)"
        )
    for part, y in (("y_train", yt), ("y_test", ye)):
        if int(y.min()) < 0:
            raise DataError(f"{name}: {part} has negative labels ({int(y.min())}); labels must be 0..K-1")
    if len(torch.unique(yt)) < 2:
        raise DataError(f"{name}: the training data has one class only ({int(yt[0])}); a classifier needs two or more")
    k = num_classes if num_classes is not None else int(yt.max()) + 1
    if k > MAX_CLASSES:  # the model's output layer has one unit per class: a stray huge label is an error
        raise DataError(
            f"{name}: y_train has label {int(yt.max())}; labels must be 0..K-1 with K at most {MAX_CLASSES}"
        )
    for part, y in (("y_train", yt), ("y_test", ye)):
        if int(y.max()) >= k:
            raise DataError(
                f"{name}: {part} has label {int(y.max())}, out of range for {k} classes "
                + ("(the training labels go up to " + str(int(yt.max())) + ")" if part == "y_test" else "")
            )
    check_classes(yt, k, name, class_names)
    return DataBundle((xt, yt), (xe, ye), k, tuple(xt.shape[1:]))


def as_bundle(out: Any, name: str = "data", image_size: int | None = None) -> DataBundle:
    """A ``DataBundle`` from what a user hands over: a bundle, or ``(train, test)`` where each is an
    ``(x, y)`` pair of tensors/arrays or a ``Dataset`` of ``(image, label)`` items. Validated."""
    if isinstance(out, DataBundle):
        return out
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise DataError(f"{name}: expected (train, test), got {type(out).__name__}")
    train, test = out
    pair = lambda d: isinstance(d, (tuple, list)) and len(d) == 2  # noqa: E731
    if pair(train) and pair(test):
        return check_tensors(tuple(train), tuple(test), name, image_size=image_size)
    if isinstance(train, Dataset) and isinstance(test, Dataset):
        if image_size is not None:
            raise DataError(
                f"{name}: --image-size resizes arrays; a Dataset resizes itself (torchvision transforms.Resize)"
            )
        return _check_datasets(train, test, name)
    raise DataError(
        f"{name}: train and test must both be (x, y) pairs or both torch Datasets, got "
        f"{type(train).__name__} and {type(test).__name__}"
    )


def _dataset_labels(ds: Dataset) -> Tensor:
    t = getattr(ds, "targets", None)
    if t is None:
        t = [ds[i][1] for i in range(len(ds))]
    return torch.as_tensor(t if not isinstance(t, Tensor) else t.clone()).reshape(-1)


def _check_datasets(train: Dataset, test: Dataset, name: str) -> DataBundle:
    for part, ds in (("train", train), ("test", test)):
        if len(ds) == 0:
            raise DataError(f"{name}: the {part} set is empty")
    shapes = []
    for part, ds in (("train", train), ("test", test)):
        item = ds[0]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor)):
            raise DataError(
                f"{name}: {part} items must be (image tensor, label) (add transforms.ToTensor()), "
                f"got {type(item).__name__}"
            )
        as_images(item[0].unsqueeze(0), f"{name}: {part}[0]")
        shapes.append(tuple(item[0].shape))
    if shapes[0] != shapes[1]:
        raise DataError(f"{name}: train images are {shapes[0]}, test images {shapes[1]}")
    yt, ye = _dataset_labels(train), _dataset_labels(test)
    if int(min(yt.min(), ye.min())) < 0:
        raise DataError(f"{name}: negative labels; labels must be 0..K-1")
    k = int(yt.max()) + 1
    if k > MAX_CLASSES:
        raise DataError(
            f"{name}: the training labels go up to {k - 1}; labels must be 0..K-1 with K at most {MAX_CLASSES}"
        )
    if int(ye.max()) >= k:
        raise DataError(f"{name}: y_test has label {int(ye.max())}, out of range for {k} classes")
    if len(torch.unique(yt)) < 2:
        raise DataError(f"{name}: the training data has one class only; a classifier needs two or more")
    check_classes(yt, k, name)
    return DataBundle(train, test, k, shapes[0])
