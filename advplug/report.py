"""Metrics output: one JSON object per epoch (metrics.jsonl), the same flattened as CSV, and
optional TensorBoard scalars and weight histograms; plus the plain-text results table."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from torch import Tensor


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


class MetricsWriter:
    """Appends epoch records to ``metrics.jsonl``, rewrites ``metrics.csv``, logs to TensorBoard."""

    def __init__(self, out: str | Path, tensorboard: bool = False) -> None:
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records = read_metrics(self.dir)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop records of epochs after the checkpoint's (they were never saved)."""
        self.records = [r for r in self.records if r["epoch"] <= epoch]
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.dir / "metrics.jsonl", "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        rows = [flatten(r) for r in self.records]
        cols: list[str] = []
        for r in rows:
            cols += [c for c in r if c not in cols]
        with open(self.dir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)

    def write(self, record: dict[str, Any], weights: Tensor | None = None) -> None:
        self.records.append(record)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv()
        if self.tb is not None:
            step = record["epoch"]
            for k, v in flatten(record).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self.tb.add_scalar(k.replace(".", "/"), v, step)
            if weights is not None:
                self.tb.add_histogram("weights", weights.detach().float().cpu(), step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def results_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """``{"last": {"Natural": 0.97, ...}, "best": {...}}`` as an aligned text table (accuracy %)."""
    rows = list(results)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in results[r] if c not in cols]
    head = ["checkpoint", *cols]
    body = [[r, *(f"{100 * results[r][c]:.2f}" if c in results[r] else "-" for c in cols)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [title] if title else []
    out += [line(head), line(["-" * w for w in widths]), *(line(b) for b in body)]
    return "\n".join(out)
