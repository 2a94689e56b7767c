"""The user's own data from files: ``npz:`` arrays (read as data, never code) and ``folder:`` images
in torchvision's ``ImageFolder`` layout."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from advplug.data.bundle import DataBundle
from advplug.data.checks import check_tensors
from advplug.errors import DataError

SPLIT_NAMES = ("train", "test", "val", "valid", "validation")  # folders that hold a split, not a class
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FOLDER_SPLIT_SEED = 4321  # folder: without train/ and test/: the test split is fixed by this seed


def _not_an_npz(path: str) -> str | None:
    """Why the file is not an npz (zip) archive, from its first bytes; ``None`` if it starts like one."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip archive (an empty one: PK\x05\x06)
        return None
    if not head:
        return "not a valid npz/zip file (it is empty)"
    if head.startswith(b"\x93NUMPY"):
        return "one .npy array, not an .npz archive of x_train, y_train, x_test, y_test (write it with numpy.savez)"
    if head[:1] == b"\x80":  # a pickle's protocol opcode
        return "not a valid npz/zip file (it looks like a Python pickle, which advplug never loads)"
    return "not a valid npz/zip file (write it with numpy.savez)"


def load_npz(path: str, image_size: int | None = None) -> DataBundle:
    """Arrays ``x_train, y_train, x_test, y_test`` (images uint8 or float in [0, 1]), read with
    ``allow_pickle=False``: an npz file is data, never code."""
    import numpy as np

    name = f"npz:{path}"
    if not os.path.isfile(path):
        raise DataError(f"{name}: no such file")
    why = _not_an_npz(path)  # else numpy reads any other bytes as a pickle, and says so
    if why is not None:
        raise DataError(f"{name}: {why}")
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
    return check_tensors(
        (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"]), name, image_size=image_size
    )


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
        raise DataError(
            f"{name}: images of different sizes ({p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]}); "
            f"pass --image-size N to resize them all to N x N"
        )
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


def _refuse_half_a_split(path: str, name: str) -> None:
    """A folder whose only subfolders are split names (``train/`` alone, ``train/`` and ``val/``) is a split layout
    missing a part, not classes named "train" and "val"."""
    subs = sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))
    if not subs or any(s.lower() not in SPLIT_NAMES for s in subs):
        return
    has = ", ".join(f"{s}/" for s in subs)
    lacks = " and ".join(f"{p}/" for p in ("train", "test") if p not in subs)
    raise DataError(
        f"{name}: has {has} but no {lacks}: a split folder needs {path}/train/<class>/ and {path}/test/<class>/ "
        f"(or the class folders directly in {path}, split by --test-fraction)"
    )


def load_folder(path: str, image_size: int | None = None, test_fraction: float = 0.2) -> DataBundle:
    """torchvision's ``ImageFolder`` layout: ``PATH/train/<class>/*.png`` and ``PATH/test/<class>/*.png``,
    or ``PATH/<class>/*.png`` split into train and test by ``test_fraction`` (stratified, fixed seed).
    Class numbers are the class folders in sorted order. Images are read into memory (uint8 -> [0, 1];
    grey if all are grey, else RGB); they are resized only with ``image_size``."""
    name = f"folder:{path}"
    if not os.path.isdir(path):
        raise DataError(f"{name}: no such directory")
    split = os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test"))
    if not split:
        _refuse_half_a_split(path, name)
    if split:
        classes, tr = _folder_images(os.path.join(path, "train"), None, name)
        _, te = _folder_images(os.path.join(path, "test"), classes, name)
    else:
        classes, tr = _folder_images(path, None, name)
        te = []
    if not tr:
        raise DataError(
            f"{name}: no images found (expected {path}/<class>/*.png or {path}/train/<class>/... and "
            f"{path}/test/<class>/...)"
        )
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
            test_idx.append(idx[: min(max(m, 1 if len(idx) > 1 else 0), len(idx) - 1)])
        te_idx = torch.cat(test_idx).sort().values
        mask = torch.ones(len(y), dtype=torch.bool)
        mask[te_idx] = False
        if len(te_idx) == 0:
            raise DataError(f"{name}: too few images to hold out a test split (give {path}/train and {path}/test)")
        train, test = (x[mask], y[mask]), (x[te_idx], y[te_idx])
    return check_tensors(train, test, name, num_classes=len(classes), class_names=classes)
