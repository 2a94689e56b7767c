"""The injected training sets: known samples flipped, transformed or duplicated in the embedded
digits, written as ``npz:`` data files with their flags, and the flags in a run's own numbering."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advplug.data import DataBundle, load_digits_tensors
from advplug.engine.inputs import training_data
from advplug.run.directory import create_new
from advplug.tools.report import GROUPS

TRANSFORMS = ("rotate", "shift", "thicken")


def atypical_transform(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """``x`` [N, C, H, W] in [0, 1] transformed as documented in the package docstring."""
    import torch.nn.functional as F

    n = len(x)
    if n == 0:
        return x
    if kind == "rotate":
        mag = math.pi / 3 + torch.rand(n, generator=gen) * math.pi / 3  # 60..120 degrees
        ang = mag * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
    if kind == "shift":
        out = torch.zeros_like(x)
        for i in range(n):
            dy, dx = (int(v) * 4 - 2 for v in torch.randint(0, 2, (2,), generator=gen))
            out[i] = torch.roll(x[i], shifts=(dy, dx), dims=(-2, -1))
            if dy > 0:
                out[i, :, :dy] = 0
            else:
                out[i, :, dy:] = 0
            if dx > 0:
                out[i, :, :, :dx] = 0
            else:
                out[i, :, :, dx:] = 0
        return out
    if kind == "thicken":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    raise ValueError(f"unknown atypical transform {kind!r} (choose from {', '.join(TRANSFORMS)})")


def inject(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    flip: float,
    atypical: float,
    duplicate: float,
    seed: int,
    transform: str = "rotate",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """The injected training set and its flags (in its own numbering: the originals, then the copies)."""
    n = len(y)
    gen = torch.Generator().manual_seed(10_000 + seed)
    counts = [int(round(f * n)) for f in (flip, atypical, duplicate)]
    if any(f < 0 for f in (flip, atypical, duplicate)) or sum(counts) > n:
        raise ValueError(f"fractions {flip}, {atypical}, {duplicate} must be >= 0 and leave samples untouched")
    perm = torch.randperm(n, generator=gen)
    a, b = counts[0], counts[0] + counts[1]
    i_flip, i_aty, i_dup = perm[:a], perm[a:b], perm[b : sum(counts)]
    y_orig = y.clone()
    x, y = x.clone(), y.clone()
    y[i_flip] = (y[i_flip] + torch.randint(1, num_classes, (len(i_flip),), generator=gen)) % num_classes
    x[i_aty] = atypical_transform(x[i_aty], transform, gen)
    x, y_new = torch.cat([x, x[i_dup]]), torch.cat([y, y[i_dup]])
    m = n + len(i_dup)
    flags = {g: np.zeros(m, dtype=bool) for g in GROUPS}
    flags["flipped"][i_flip.numpy()] = True
    flags["atypical"][i_aty.numpy()] = True
    flags["duplicate"][i_dup.numpy()] = True
    flags["duplicate"][n:] = True
    source = np.concatenate([np.arange(n), i_dup.numpy()])
    return x, y_new, {**flags, "source": source, "true_label": y_orig.numpy()[source]}


def write_data(
    path: Path, *, flip: float, atypical: float, duplicate: float, seed: int, transform: str, n_train: int | None = None
) -> Path:
    """The injected digits set as an ``npz:`` data file (plus flag arrays), written atomically;
    ``n_train``: only the first samples of the digits training split (tests)."""
    (xt, yt), (xe, ye) = load_digits_tensors()
    xt, yt = xt[:n_train], yt[:n_train]
    x, y, flags = inject(xt, yt, 10, flip=flip, atypical=atypical, duplicate=duplicate, seed=seed, transform=transform)
    save_npz(
        path,
        x_train=x.numpy(),
        y_train=y.numpy(),
        x_test=xe.numpy(),
        y_test=ye.numpy(),
        **{f"flag_{k}": v for k, v in flags.items()},
        injection=np.array(
            json.dumps(dict(flip=flip, atypical=atypical, duplicate=duplicate, seed=seed, transform=transform))
        ),
    )
    return path


def save_npz(path: Path, **arrays: Any) -> None:
    """``np.savez`` to a temp file, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with os.fdopen(create_new(tmp), "wb") as f:  # never through a symlink planted at the temp name
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def flags_for_config(cfg: Any) -> dict[str, np.ndarray]:
    """The flags of a run trained on an injected ``npz:`` file, in the run's numbering: the
    positions ``advplug.engine.inputs.training_data`` keeps after holding out the selection (and any
    validation) split, applied to the file's flags. ``cfg``: a resolved ``TrainConfig``."""
    path = cfg.data[len("npz:") :]
    with np.load(path, allow_pickle=False) as f:
        flags = {k[len("flag_") :]: f[k] for k in f.files if k.startswith("flag_")}
        n = len(f["y_train"])
    if not flags:
        raise ValueError(f"{path}: not an injected data file (no flag_ arrays)")
    pos = torch.arange(n)
    probe = DataBundle((pos.float().view(n, 1), pos), (pos[:1].float().view(1, 1), pos[:1]), 10, (1,))
    kept = training_data(cfg, probe).train[1].numpy()
    out = {k: v[kept] for k, v in flags.items()}
    out["index"], out["injected_index"] = np.arange(len(kept)), kept
    return out
