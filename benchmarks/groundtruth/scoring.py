"""Scores of one ground-truth run: per dumped epoch, how well a low weight singles out each injected
group (AUROC) and each group's mean weight relative to the epoch's mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from advplug.run.dump import read_dumps
from advplug.tools.report import GROUPS, auroc_low, epoch_weights, read_injection

NO_WEIGHTS = "no weights"


def score_values(flags: dict[str, np.ndarray], value: np.ndarray) -> dict[str, Any]:
    """AUROC of "low value means injected" and relative mean value, per group."""
    clean = ~np.any([flags[g] for g in GROUPS], axis=0)
    mean = np.nanmean(value)
    out: dict[str, Any] = {"auroc": {g: auroc_low(flags[g], clean, value) for g in GROUPS}}
    out["rel_mean"] = {
        g: float(np.nanmean(value[m]) / mean) if m.any() else float("nan")
        for g, m in (("clean", clean), *((g, flags[g]) for g in GROUPS))
    }
    return out


def score_run(run_dir: str | Path) -> dict[str, Any]:
    """Per dumped epoch: AUROC per group and relative mean weight per group (or "no weights"),
    plus the same for the run's final true-class confidence."""
    run = Path(run_dir)
    flags = read_injection(run)
    if flags is None:
        raise FileNotFoundError(f"{run}: no injection.npz (not a ground-truth run)")
    n = len(flags["index"])
    per_epoch: dict[int, Any] = {}
    for ep, cols in read_dumps(run, "weights").items():
        w = epoch_weights(cols, n)
        per_epoch[ep] = NO_WEIGHTS if w is None else score_values(flags, w)
    out: dict[str, Any] = {"epochs": per_epoch}
    conf = run / "confidence.npz"
    if conf.is_file():
        with np.load(conf) as f:
            c = np.full(n, np.nan)
            c[f["index"]] = f["confidence"]
        out["confidence"] = score_values(flags, c)
    return out


def weights_by_group(run_dir: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """``{epoch: {group: weights}}`` of one run (relative to the epoch's mean), for the plots."""
    run = Path(run_dir)
    flags = read_injection(run)
    n = len(flags["index"])
    clean = ~np.any([flags[g] for g in GROUPS], axis=0)
    out = {}
    for ep, cols in read_dumps(run, "weights").items():
        w = epoch_weights(cols, n)
        if w is None:
            continue
        w = w / np.nanmean(w)
        out[ep] = {g: w[m & np.isfinite(w)] for g, m in (("clean", clean), *((g, flags[g]) for g in GROUPS))}
    return out
