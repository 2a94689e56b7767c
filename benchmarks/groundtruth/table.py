"""The benchmark's table: one row per method (and the AT-confidence baseline) over seeds, as
Markdown, CSV and JSON, written with the plots under ``OUT/``."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from advplug.run.directory import write_text
from advplug.tools.compare import load_run, table
from advplug.tools.report import GROUPS
from benchmarks.groundtruth.plots import plot_groups
from benchmarks.groundtruth.runner import OBJECTIVES, Settings, default_score_epochs
from benchmarks.groundtruth.scoring import NO_WEIGHTS, score_run


def _ms(vals: Iterable[float]) -> tuple[float, float, int] | None:
    v = [x for x in vals if isinstance(x, float) and not math.isnan(x)]
    if not v:
        return None
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)


def summarise(runs: dict[str, list[Path]], score_epochs: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per method (and the baseline): AUROC per group at each scored epoch, relative mean
    weight per group at the last scored epoch, test accuracies (mean, std, n over seeds)."""
    rows = []
    last = max(score_epochs)
    for method, dirs in runs.items():
        scores = [score_run(d) for d in dirs]
        row: dict[str, Any] = {
            "method": method.upper() if method in OBJECTIVES else method,
            "runs": [str(d) for d in dirs],
            "auroc": {},
            "rel_mean": {},
        }
        weighted = any(isinstance(sc["epochs"].get(e), dict) for sc in scores for e in score_epochs)
        for e in score_epochs:
            for g in GROUPS:
                row["auroc"][f"{g} e{e}"] = _ms(
                    sc["epochs"][e]["auroc"][g] for sc in scores if isinstance(sc["epochs"].get(e), dict)
                )
        for g in ("clean", *GROUPS):
            row["rel_mean"][g] = _ms(
                sc["epochs"][last]["rel_mean"][g] for sc in scores if isinstance(sc["epochs"].get(last), dict)
            )
        row["weighted"] = weighted
        acc = table([load_run(d) for d in dirs])[0]["cells"]
        row["accuracy"] = {f"{a} {w}": c for (a, w), c in acc.items()}
        rows.append(row)
        if method == "at":
            base = {
                "method": "baseline: AT true-class confidence",
                "runs": row["runs"],
                "weighted": True,
                "auroc": {},
                "rel_mean": {},
                "accuracy": {},
            }
            for e in score_epochs:
                for g in GROUPS:
                    base["auroc"][f"{g} e{e}"] = (
                        _ms(sc["confidence"]["auroc"][g] for sc in scores if "confidence" in sc) if e == last else None
                    )
            for g in ("clean", *GROUPS):
                base["rel_mean"][g] = _ms(sc["confidence"]["rel_mean"][g] for sc in scores if "confidence" in sc)
            rows.append(base)
    return rows


def _cell(c: tuple[float, float, int] | None, scale: float = 1.0, digits: int = 2) -> str:
    if c is None:
        return "-"
    return f"{c[0] * scale:.{digits}f}" if c[2] == 1 else f"{c[0] * scale:.{digits}f} ± {c[1] * scale:.{digits}f}"


def render(rows: list[dict[str, Any]], fmt: str = "markdown", settings: Settings | None = None) -> str:
    if fmt == "json":

        def cells(d):
            return {k: (None if c is None else {"mean": c[0], "std": c[1], "n": c[2]}) for k, c in d.items()}

        return json.dumps(
            {
                "settings": dataclasses.asdict(settings) if settings else None,
                "rows": [
                    {
                        "method": r["method"],
                        "runs": r["runs"],
                        "gives_weights": r["weighted"],
                        "auroc_low_weight_means_injected": cells(r["auroc"]),
                        "relative_mean_weight": cells(r["rel_mean"]),
                        "test_accuracy_percent": cells(r["accuracy"]),
                    }
                    for r in rows
                ],
            },
            indent=2,
        )
    au = list(dict.fromkeys(k for r in rows for k in r["auroc"]))
    acc = list(dict.fromkeys(k for r in rows for k in r["accuracy"] if k.endswith(" last") or k.endswith(" best")))
    grp = ["clean", *GROUPS]
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "quantity", "column", "mean", "std", "n"])
        for r in rows:
            quantities = (
                ("auroc", r["auroc"]),
                ("relative mean weight", r["rel_mean"]),
                ("test accuracy %", r["accuracy"]),
            )
            for q, d in quantities:
                for k, c in d.items():
                    if c is not None:
                        w.writerow([r["method"], q, k, f"{c[0]:.4f}", f"{c[1]:.4f}", c[2]])
        return buf.getvalue()
    head = ["method", "runs", *[f"AUROC {k}" for k in au], *[f"w {g}" for g in grp], *acc]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        if r["weighted"]:
            cells = [_cell(r["auroc"].get(k)) for k in au] + [_cell(r["rel_mean"].get(g)) for g in grp]
        else:
            cells = [NO_WEIGHTS] * len(au) + ["1"] * len(grp)
        accuracies = [_cell(r["accuracy"].get(k)) for k in acc]
        lines.append("| " + " | ".join([r["method"], str(len(r["runs"])), *cells, *accuracies]) + " |")
    text = "\n".join(lines)
    text += (
        "\n\nAUROC <group> e<E>: how well a LOW weight at epoch E singles out the injected group against the "
        "unflagged samples (1: every injected sample weighs less, 0.5: no separation, 0: every one weighs more); "
        "the baseline row is the AT model's final true-class confidence (low = injected). w <group>: the group's "
        "mean weight over the epoch's mean weight at the last scored epoch. Accuracies: test %, "
        "natural / PGD-20 / CW-20, last and best (best chosen on the held-out selection split). "
        "Mean ± std over seeds."
    )
    return text


def write_outputs(runs: dict[str, list[Path]], s: Settings) -> dict[str, Path]:
    """``OUT/groundtruth.{md,csv,json}`` and ``OUT/plots/<method>.png``."""
    out = Path(s.out)
    rows = summarise(runs, s.score_epochs or default_score_epochs(s.epochs))
    files = {}
    for fmt, ext in (("markdown", "md"), ("csv", "csv"), ("json", "json")):
        files[ext] = out / f"groundtruth.{ext}"
        write_text(files[ext], render(rows, fmt, s) + "\n")
    for m, dirs in runs.items():
        p = plot_groups(dirs, f"{m}: weight per group (seeds {len(dirs)}, {s.transform})", out / "plots" / f"{m}.png")
        if p is not None:
            files[f"plot {m}"] = p
    return files
