"""Metrics of a run: one JSON object per epoch (``metrics.jsonl``, also carried by each checkpoint),
the same flattened as CSV, and optional TensorBoard scalars and weight histograms."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from advplug.errors import DataError
from advplug.run.directory import json_safe, subdir, write_text


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def to_jsonl(records: list[dict[str, Any]]) -> str:
    """Epoch records as ``metrics.jsonl`` holds them (and checkpoints carry them): one strict JSON object a line."""
    return "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records)


def from_jsonl(text: str) -> list[dict[str, Any]]:
    """The records of ``to_jsonl``'s text (as a checkpoint carries them)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """``RUN_DIR/metrics.jsonl`` as records (``[]`` without the file). A damaged file is one
    ``DataError``: a line that is not a JSON object, an ``epoch`` that is not a whole number >= 0,
    an accuracy (``*_acc``) that is not a number in [0, 1], or ``weights`` without numbers."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    try:
        lines = p.read_text().splitlines()
    except (OSError, ValueError) as e:
        raise DataError(f"{str(p)!r} is not readable: {e}") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise DataError(f"{str(p)!r} is corrupt: line {i} is not JSON ({e})") from None
        if not isinstance(r, dict):
            raise DataError(f"{str(p)!r} is corrupt: line {i} is not a JSON object")
        bad = _bad_field(r)
        if bad:
            raise DataError(f"{str(p)!r} is corrupt: line {i}: {bad}")
        records.append(r)
    return records


def _bad_field(r: dict[str, Any]) -> str | None:
    """What is wrong with one epoch record (None: nothing) in the fields ``report`` and ``api`` read."""
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    e = r.get("epoch")
    if not (num(e) and isinstance(e, int) and e >= 0):
        return f"epoch {e!r} is not a whole number >= 0"
    for k, v in r.items():
        if k.endswith("_acc") and not (num(v) and 0 <= v <= 1):
            return f"{k} {v!r} is not an accuracy in [0, 1]"
    w = r.get("weights")
    if w is not None and not (isinstance(w, dict) and all(num(w.get(k)) for k in ("min", "mean", "max"))):
        return f"weights {w!r} has no numbers min, mean and max"
    return None


class MetricsWriter:
    """Writes ``metrics.jsonl`` and ``metrics.csv`` (each replaced atomically, every epoch: a kill
    never leaves half a line or a truncated history) and logs to TensorBoard.

    ``records``: the epochs so far, as the checkpoint carries them (on resume the files are
    rebuilt from them, so an epoch whose checkpoint was written before a kill is never lost).
    """

    def __init__(self, out: str | Path, tensorboard: bool = False, records: list[dict[str, Any]] | None = None) -> None:
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records = list(records or [])
        self._rewrite()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # only when asked for: slow to import

            self.tb = SummaryWriter(str(subdir(self.dir, "tensorboard")))

    def _rewrite(self) -> None:
        write_text(self.dir / "metrics.jsonl", to_jsonl(self.records))
        rows = [flatten(r) for r in self.records]
        cols: list[str] = []
        for r in rows:
            cols += [c for c in r if c not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        write_text(self.dir / "metrics.csv", buf.getvalue())

    def write(self, record: dict[str, Any], weights: Tensor | None = None) -> None:
        self.records.append(record)
        self._rewrite()
        if self.tb is not None:
            step = record["epoch"]
            for k, v in flatten(record).items():  # plugins' own numbers too (mail/reweighting, meow/temperature ...)
                if isinstance(v, (int, float)) and k != "epoch":  # a bool (a switch) as 0 / 1
                    self.tb.add_scalar(k.replace(".", "/"), float(v), step)
            if weights is not None:
                self.tb.add_histogram("weights", weights.detach().float().cpu(), step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
