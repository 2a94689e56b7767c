"""The on-device data path: torchvision-style data sets as uint8 tensors on the device,
crop-flip augmentation with torchvision's distribution, held-out splits without augmentation."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset, Subset

from advplug.data import DataBundle, hold_out
from advplug.data.device import DeviceBatches, crop_flip, crop_flip_params, device_batches, raw_tensors


class FakeCIFAR(Dataset):
    """What torchvision's CIFAR10 exposes: ``data`` uint8 [N, H, W, C], ``targets``, and an
    augmenting transform in ``__getitem__`` (random here, so a split taken through it would differ)."""

    def __init__(self, n=40):
        g = np.random.default_rng(0)
        self.data = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = list(g.integers(0, 10, n))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = torch.as_tensor(self.data[i]).permute(2, 0, 1).float() / 255
        return x + torch.rand(()) * 0.1, self.targets[i]  # "augmentation"


def test_raw_tensors_of_a_torchvision_layout_and_a_subset():
    ds = FakeCIFAR()
    x, y = raw_tensors(Subset(ds, [3, 1, 7]))
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 32, 32)
    assert torch.equal(x[0], torch.as_tensor(ds.data[3]).permute(2, 0, 1)) and y.tolist() == [
        ds.targets[i] for i in (3, 1, 7)
    ]


def test_crop_flip_equals_torchvision_per_sample():
    x = torch.rand(6, 3, 32, 32)
    dy, dx, flip = (
        torch.tensor([0, 8, 3, 4, 1, 7]),
        torch.tensor([8, 0, 5, 4, 2, 6]),
        torch.tensor([True, False, True, False, True, False]),
    )
    out = crop_flip(x, dy, dx, flip, pad=4)
    for i in range(6):
        ref = TF.crop(TF.pad(x[i], [4]), int(dy[i]), int(dx[i]), 32, 32)  # RandomCrop(32, padding=4) at these offsets
        ref = TF.hflip(ref) if flip[i] else ref
        assert torch.equal(out[i], ref)


def test_crop_flip_distribution_matches_torchvision():
    """Offsets uniform on {0..8} per axis, flips with probability 1/2 (torchvision's RandomCrop
    draws i, j with randint(0, h - th + 1) on the padded image; RandomHorizontalFlip p = 0.5)."""
    g = torch.Generator().manual_seed(0)
    dy, dx, flip = crop_flip_params(90000, 4, g, torch.device("cpu"))
    for t in (dy, dx):
        freq = torch.bincount(t, minlength=9).double() / len(t)
        assert freq.shape == (9,) and torch.allclose(freq, torch.full((9,), 1 / 9, dtype=torch.double), atol=0.006)
    assert abs(flip.double().mean().item() - 0.5) < 0.01


def test_device_batches_are_uint8_on_the_device_and_resumable():
    ds = FakeCIFAR(50)
    b = device_batches(ds, "crop-flip", "auto", 16, torch.device("cpu"), seed=3, rank=0, world_size=1)
    assert isinstance(b, DeviceBatches) and b.x.dtype == torch.uint8
    b.set_epoch(2)
    first = [xb.clone() for xb, _, _ in b]
    b.set_epoch(2)
    again = [xb for xb, _, _ in b]
    assert all(torch.equal(u, v) for u, v in zip(first, again))  # same epoch, same batches
    assert all(0 <= xb.min() and xb.max() <= 1 and xb.dtype == torch.float32 for xb in first)
    assert device_batches(ds, "crop-flip", "loader", 16, torch.device("cpu"), 0, 0, 1) is None
    with pytest.raises(Exception, match="--data-path device"):
        device_batches(list(range(10)), "none", "device", 4, torch.device("cpu"), 0, 0, 1)


def test_held_out_split_of_an_augmented_data_set_is_not_augmented():
    ds = FakeCIFAR(40)
    bundle = hold_out(DataBundle(ds, ds, 10, (3, 32, 32), augment="crop-flip"), 8, seed=1, role="selection")
    sx, sy = bundle.selection
    idx = sorted(set(range(40)) - set(bundle.train.indices))
    want = torch.as_tensor(ds.data[idx]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(sx, want) and sy.tolist() == [ds.targets[i] for i in idx]
