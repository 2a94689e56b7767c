"""Data sets: the embedded default (scikit-learn's digits) and torchvision's from a local root.

Every batch is ``(x, y, index)`` with ``x`` in [0, 1] and ``index`` the sample's position in the
training set (per-sample plugin state is keyed by it).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from advplug.errors import DataError

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
    augment: str = "none"  # training augmentation for the on-device path: "none" or "crop-flip" (advplug.data.device)

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
            return DataBundle(train, test, 10 if name == "cifar10" else 100, (3, 32, 32), augment="crop-flip")
        aug = t_test  # SVHN: no flips of digits (Rice et al.)
        train = datasets.SVHN(root, split="train", transform=aug, download=download)
        test = datasets.SVHN(root, split="test", transform=t_test, download=download)
        return DataBundle(train, test, 10, (3, 32, 32))
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f"{name} not found under {root!r} ({e}); pass --download if this machine has a network") from None


def load_dataset(name: str, root: str = "./data", download: bool = False, *, image_size: int | None = None,
                 test_fraction: float = 0.2, allow_import: bool = False) -> DataBundle:
    """A built-in data set by name, or the user's own: ``folder:PATH``, ``npz:PATH`` (data, read
    without executing anything) or ``module:pkg.mod:callable`` (code: imported only with
    ``allow_import=True``, i.e. when the user named it, never because a run directory says so)."""
    if name.startswith("folder:"):
        return load_folder(name[len("folder:"):], image_size=image_size, test_fraction=test_fraction)
    if name.startswith("npz:"):
        return load_npz(name[len("npz:"):], image_size=image_size)
    if name.startswith("module:"):
        return load_module(name[len("module:"):], image_size=image_size, allow_import=allow_import)
    if name == PYTHON:
        raise DataError("this run's data was passed from Python (in memory): pass it again, "
                        "e.g. advplug.tools.api.evaluate(run_dir, test=(x, y))")
    if image_size is not None:
        raise DataError(f"--image-size applies to folder:, npz: and module: data, not to the built-in {name!r}")
    if name == "digits":
        train, test = load_digits_tensors()
        return DataBundle(train, test, 10, (1, 8, 8))
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)}, or {', '.join(SOURCES)})")
    return _torchvision(name, root, download)


# -- your own data --------------------------------------------------------------------------
SOURCES = ("folder:PATH", "npz:PATH", "module:pkg.mod:callable")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FOLDER_SPLIT_SEED = 4321  # folder: without train/ and test/: the test split is fixed by this seed


MAX_CLASSES = 100_000  # as checkpoint.MAX_CLASSES: a label beyond it is taken for an error

PYTHON = "python"  # the data name of a run whose data came from Python (advplug.tools.api.train(data=...))


def is_custom(data: str) -> bool:
    return isinstance(data, str) and (data.startswith(("folder:", "npz:", "module:")) or data == PYTHON)


def normalise_source(data: str) -> str:
    """``folder:``/``npz:`` paths made absolute (a run's config then names the same files from any
    directory); ``module:`` checked for its ``pkg.mod:callable`` form; other names unchanged."""
    for kind in ("folder:", "npz:"):
        if data.startswith(kind):
            path = data[len(kind):]
            if not path:
                raise DataError(f"--data {data}: give a path, e.g. {kind}./my-images")
            return kind + os.path.abspath(os.path.expanduser(path))
    if data.startswith("module:"):
        mod, sep, attr = data[len("module:"):].partition(":")
        if not (mod and sep and attr):
            raise DataError(f"--data {data}: expected module:pkg.mod:callable (a function returning (train, test))")
    return data


def needs_import(data: Any) -> bool:
    return isinstance(data, str) and data.startswith("module:")


def check_data_import(saved: Any, given: str | None) -> None:
    """Refuse a saved ``module:`` data source unless the user named the same one (code is imported
    only when the user names it, as for ``--model module:callable``)."""
    if needs_import(saved) and given != saved:
        raise DataError(f"this run's data {saved!r} is code to import; advplug imports code only when you name it: "
                        f"add --data {saved}" + (f" (you gave {given!r})" if given else ""))
    if given is not None and given != saved and normalise_source(given) != saved:
        raise DataError(f"--data {given}: this run was trained on {saved!r}")


def auto_model(input_shape: tuple[int, ...]) -> str:
    """The default model for your own data, by image size: digits-cnn below 16 px, small-cnn up to
    64 px, preactresnet18 above (its global pooling takes any size)."""
    side = min(input_shape[1:]) if len(input_shape) == 3 else 0
    if len(input_shape) != 3:
        raise DataError(f"images must be [C, H, W]; the data has samples of shape {tuple(input_shape)}")
    return "digits-cnn" if side < 16 else "small-cnn" if max(input_shape[1:]) <= 64 else "preactresnet18"


def _resize(x: Tensor, size: int | None) -> Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    import torch.nn.functional as F

    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def _as_images(x: Any, where: str) -> Tensor:
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


def _as_labels(y: Any, n: int, where: str) -> Tensor:
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


def check_tensors(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], name: str,
                  num_classes: int | None = None, image_size: int | None = None) -> DataBundle:
    """Validate and bundle in-memory train / test data: images ``[N, C, H, W]`` in [0, 1] (uint8 is
    scaled), integer labels 0..K-1; K from the data (max label + 1) unless given. One-line errors
    for: no samples, one class only, labels out of range, mismatched shapes, values outside [0, 1], NaN."""
    xs = []
    for part, (x, y) in (("train", train), ("test", test)):
        x = _resize(_as_images(x, f"{name}: x_{part}"), image_size)
        xs.append((x, _as_labels(y, len(x), f"{name}: y_{part}")))
    (xt, yt), (xe, ye) = xs
    if xt.shape[1:] != xe.shape[1:]:
        raise DataError(f"{name}: train images are {tuple(xt.shape[1:])}, test images {tuple(xe.shape[1:])} "
                        f"(use --image-size to resize both)")
    for part, y in (("y_train", yt), ("y_test", ye)):
        if int(y.min()) < 0:
            raise DataError(f"{name}: {part} has negative labels ({int(y.min())}); labels must be 0..K-1")
    if len(torch.unique(yt)) < 2:
        raise DataError(f"{name}: the training data has one class only ({int(yt[0])}); a classifier needs two or more")
    k = num_classes if num_classes is not None else int(yt.max()) + 1
    if k > MAX_CLASSES:  # the model's output layer has one unit per class: a stray huge label is an error
        raise DataError(f"{name}: y_train has label {int(yt.max())}; labels must be 0..K-1 with K at most {MAX_CLASSES}")
    for part, y in (("y_train", yt), ("y_test", ye)):
        if int(y.max()) >= k:
            raise DataError(f"{name}: {part} has label {int(y.max())}, out of range for {k} classes "
                            + ("(the training labels go up to " + str(int(yt.max())) + ")" if part == "y_test" else ""))
    return DataBundle((xt, yt), (xe, ye), k, tuple(xt.shape[1:]))


def load_npz(path: str, image_size: int | None = None) -> DataBundle:
    """Arrays ``x_train, y_train, x_test, y_test`` (images uint8 or float in [0, 1]), read with
    ``allow_pickle=False``: an npz file is data, never code."""
    import numpy as np

    name = f"npz:{path}"
    if not os.path.isfile(path):
        raise DataError(f"{name}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DataError(f"{name}: missing array(s) {', '.join(missing)} (has {', '.join(f.files) or 'none'})")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except DataError:
        raise
    except ValueError as e:  # object arrays refused by allow_pickle=False, or not an npz file
        why = "it holds pickled objects, which advplug never loads" if "pickle" in str(e).lower() else str(e)
        raise DataError(f"{name}: cannot be read as plain arrays ({why})") from None  # not numpy's "load it unsafely"
    except (OSError, EOFError) as e:
        raise DataError(f"{name}: not a readable .npz file ({e})") from None
    return check_tensors((arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"]), name,
                         image_size=image_size)


def _folder_images(root: str, classes: list[str] | None, name: str) -> tuple[list[str], list[tuple[str, int]]]:
    found = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    elif found != classes:
        raise DataError(f"{name}: {root} has classes {found}, train/ has {classes} (the same class folders are needed)")
    items = []
    for k, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            items += [(os.path.join(dirpath, f), k) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return classes, items


def _read_images(items: list[tuple[str, int]], name: str, image_size: int | None) -> tuple[Tensor, Tensor]:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    modes, sizes = set(), {}
    for p, _ in items:
        try:
            with Image.open(p) as im:
                modes.add(im.mode)
                sizes.setdefault(im.size, p)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:  # bomb: PIL's pixel limit
            raise DataError(f"{name}: {p} is not a readable image ({e})") from None
    if len(sizes) > 1 and image_size is None:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise DataError(f"{name}: images of different sizes ({p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]}); "
                        f"pass --image-size N to resize them all to N x N")
    mode = "L" if modes <= {"L", "1", "I;16", "I", "F"} else "RGB"
    xs = []
    for p, _ in items:
        try:  # opening reads the header only: a truncated file fails here, when its pixels are decoded
            with Image.open(p) as im:
                im = im.convert(mode)
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise DataError(f"{name}: {p} is not a readable image ({e})") from None
        xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(xs)).float().div_(255)
    return x, torch.tensor([k for _, k in items], dtype=torch.long)


def load_folder(path: str, image_size: int | None = None, test_fraction: float = 0.2) -> DataBundle:
    """torchvision's ``ImageFolder`` layout: ``PATH/train/<class>/*.png`` and ``PATH/test/<class>/*.png``,
    or ``PATH/<class>/*.png`` split into train and test by ``test_fraction`` (stratified, fixed seed).
    Class numbers are the class folders in sorted order. Images are read into memory (uint8 -> [0, 1];
    grey if all are grey, else RGB); they are resized only with ``image_size``."""
    name = f"folder:{path}"
    if not os.path.isdir(path):
        raise DataError(f"{name}: no such directory")
    split = os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test"))
    if split:
        classes, tr = _folder_images(os.path.join(path, "train"), None, name)
        _, te = _folder_images(os.path.join(path, "test"), classes, name)
    else:
        classes, tr = _folder_images(path, None, name)
        te = []
    if not tr:
        raise DataError(f"{name}: no images found (expected {path}/<class>/*.png or {path}/train/<class>/... and "
                        f"{path}/test/<class>/...)")
    if len({k for _, k in tr}) < 2:
        raise DataError(f"{name}: one class only ({classes[tr[0][1]]!r}); a classifier needs two or more class folders")
    if split and not te:
        raise DataError(f"{name}: {path}/test has no images")
    x, y = _read_images(tr + te, name, image_size)
    if split:
        n = len(tr)
        train, test = (x[:n], y[:n]), (x[n:], y[n:])
    else:
        g = torch.Generator().manual_seed(FOLDER_SPLIT_SEED)
        test_idx = []
        for k in torch.unique(y).tolist():  # stratified: test_fraction of every class (at least one if it has two)
            idx = (y == k).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=g)]
            m = int(round(test_fraction * len(idx)))
            test_idx.append(idx[:min(max(m, 1 if len(idx) > 1 else 0), len(idx) - 1)])
        te_idx = torch.cat(test_idx).sort().values
        mask = torch.ones(len(y), dtype=torch.bool)
        mask[te_idx] = False
        if len(te_idx) == 0:
            raise DataError(f"{name}: too few images to hold out a test split (give {path}/train and {path}/test)")
        train, test = (x[mask], y[mask]), (x[te_idx], y[te_idx])
    return check_tensors(train, test, name, num_classes=len(classes))


def load_module(spec: str, image_size: int | None = None, allow_import: bool = False) -> DataBundle:
    """``pkg.mod:callable`` called with no arguments, returning ``(train, test)``: each a pair of
    tensors/arrays ``(x, y)`` or a torch ``Dataset`` of ``(image, label)`` items (kept as it is, so its
    transforms, e.g. augmentation, run per epoch); or a ``DataBundle``."""
    from advplug.usercode import import_callable

    name = f"module:{spec}"
    fn = import_callable(spec, "data", name, allow_import, DataError)
    try:
        out = fn()
    except Exception as e:
        raise DataError(f"--data {name}: calling it failed ({type(e).__name__}: {e})") from None
    return as_bundle(out, name, image_size)


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
            raise DataError(f"{name}: --image-size resizes arrays; a Dataset resizes itself (torchvision transforms.Resize)")
        return _check_datasets(train, test, name)
    raise DataError(f"{name}: train and test must both be (x, y) pairs or both torch Datasets, got "
                    f"{type(train).__name__} and {type(test).__name__}")


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
            raise DataError(f"{name}: {part} items must be (image tensor, label) (add transforms.ToTensor()), "
                            f"got {type(item).__name__}")
        _as_images(item[0].unsqueeze(0), f"{name}: {part}[0]")
        shapes.append(tuple(item[0].shape))
    if shapes[0] != shapes[1]:
        raise DataError(f"{name}: train images are {shapes[0]}, test images {shapes[1]}")
    yt, ye = _dataset_labels(train), _dataset_labels(test)
    if int(min(yt.min(), ye.min())) < 0:
        raise DataError(f"{name}: negative labels; labels must be 0..K-1")
    k = int(yt.max()) + 1
    if k > MAX_CLASSES:
        raise DataError(f"{name}: the training labels go up to {k - 1}; labels must be 0..K-1 with K at most {MAX_CLASSES}")
    if int(ye.max()) >= k:
        raise DataError(f"{name}: y_test has label {int(ye.max())}, out of range for {k} classes")
    if len(torch.unique(yt)) < 2:
        raise DataError(f"{name}: the training data has one class only; a classifier needs two or more")
    return DataBundle(train, test, k, shapes[0])


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
        from advplug.data.device import raw_tensors

        raw = raw_tensors(bundle.train)  # held-out images without the training augmentation
        if raw is not None:
            split = (raw[0][val_idx].float() / 255, raw[1][val_idx])
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
