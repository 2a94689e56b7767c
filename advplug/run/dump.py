"""Per-sample dumps for weight analyses: plugins collect (index, signal, weight) on the device
during an epoch and write ``RUN_DIR/dumps/<plugin>-epoch<NNN>.npz`` at its end."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


class SampleDump:
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

        import numpy as np

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
