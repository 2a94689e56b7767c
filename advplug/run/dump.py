"""Per-sample dumps for weight analyses: plugins collect (index, signal, weight) on the device
during an epoch and write ``RUN_DIR/dumps/<plugin>-epoch<NNN>.npz`` at its end; read back as
checked plain arrays (``advplug report``)."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from advplug.errors import DataError


class SampleDump:
    """One plugin's per-sample columns, collected on the device during an epoch and written at its end."""

    def __init__(self, out_dir: str | Path, plugin: str) -> None:
        self.dir = Path(out_dir) / "dumps"
        self.plugin = plugin
        self.parts: dict[str, list[Tensor]] = {}

    def add(self, **columns: Tensor) -> None:
        """Columns of equal length ``[B]`` (kept on the device, detached)."""
        for k, v in columns.items():
            self.parts.setdefault(k, []).append(v.detach())

    def write(self, epoch: int) -> Path | None:
        """Concatenate the epoch's columns and save them (one host transfer per epoch)."""
        if not self.parts:
            return None
        import io

        from advplug.run.directory import subdir, write_bytes

        path = subdir(self.dir.parent, self.dir.name) / f"{self.plugin}-epoch{epoch + 1:03d}.npz"
        buf = io.BytesIO()
        np.savez(buf, **{k: torch.cat(v).cpu().numpy() for k, v in self.parts.items()})
        write_bytes(path, buf.getvalue())  # atomic, and never through a symlink planted in dumps/
        self.parts = {}
        return path


def burn_in_default(milestones: tuple[int, ...], epochs: int) -> int:
    """The first learning-rate drop (epoch index), as GAIRAT and MAIL start reweighting."""
    return milestones[0] if milestones else epochs // 2


def read_dumps(run_dir: str | Path, name: str) -> dict[int, dict[str, np.ndarray]]:
    """``{epoch: columns}`` of ``RUN_DIR/dumps/<name>-epochNNN.npz``, read as plain arrays (never
    pickles) and checked: a damaged dump is one ``DataError``, not a traceback or a wrong plot."""
    out = {}
    for p in sorted((Path(run_dir) / "dumps").glob(f"{name}-epoch*.npz")):
        m = re.search(r"epoch(\d+)\.npz$", p.name)
        if m is None:
            continue
        try:
            with np.load(p, allow_pickle=False) as d:
                cols = {k: d[k] for k in d.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            # numpy's own wording ("load it unsafely") is not for advplug's users
            why = (
                "pickled objects, which advplug never loads"
                if "pickle" in str(e).lower()
                else str(e).splitlines()[0][:200]
                if str(e)
                else type(e).__name__
            )
            raise DataError(f"{str(p)!r} is not a readable dump ({why})") from None
        bad = _bad_dump(cols, name)
        if bad:
            raise DataError(f"{str(p)!r} is damaged: {bad}")
        out[int(m.group(1))] = cols
    return out


def _bad_dump(cols: dict[str, np.ndarray], name: str) -> str | None:
    """What is wrong with one dump's columns (None: nothing): equal-length 1-D numeric columns,
    finite weights and margins, a non-negative integer ``index``; a ``weights`` dump also has
    ``margin`` and a weight."""
    if not cols or "index" not in cols:
        return "it has no 'index' column"
    n = len(cols["index"]) if cols["index"].ndim == 1 else -1
    for k, v in cols.items():
        if v.ndim != 1 or len(v) != n or v.dtype.kind not in "biuf":
            return f"column {k!r} is not a numeric column of the length of 'index' ({v.dtype}, shape {v.shape})"
        if (k == "margin" or k.startswith("weight")) and v.dtype.kind == "f" and not np.isfinite(v).all():
            return f"column {k!r} holds NaN or Inf"  # checked finite in training; a plugin's signal may be inf
    if cols["index"].dtype.kind not in "iu" or (n and cols["index"].min() < 0):
        return "'index' is not a column of training-set positions"
    if name == "weights" and ("margin" not in cols or not any(k == "weight" or k.startswith("weight_") for k in cols)):
        return "it lacks the 'margin' or weight column"
    return None


def weight_column(cols: dict[str, np.ndarray]) -> np.ndarray:
    """The weight of the first variant (``weight_<variant>``), or ``weight``."""
    keys = sorted(k for k in cols if k.startswith("weight_") and k != "weight_natural")
    return cols[keys[0]] if keys else cols["weight"]
