"""``advplug compare RUN_DIR...``: the papers' table from several runs.

Runs are grouped by method: plugins (order-free) + objective + the plugin options the user set.
Each group is one row; the columns are the attacks, for the best and the last checkpoint, as
mean +- std over the group's runs (seeds).

A run's results are its training run's ``results.json`` and ``advplug eval``'s ``RUN_DIR/eval.json``
merged per evaluation (checkpoint and epoch, attack, precision, backend, eps, step, test samples):
an ``eval.json`` entry replaces the ``results.json`` entry of the same evaluation (the newer
measurement); every other entry is kept. Of several entries for one cell (say PGD-20 on the whole
test set and on 1000 samples), the run's own eps wins, then the most test samples, then the newest
(``results.select``); only a checkpoint's latest epoch counts.

A cell that averages fewer runs than its row holds (an attack evaluated on some seeds only) says
so, ``(n=1/2)``, and a note under the table names the runs without it; the CSV and JSON outputs
give each cell's ``n`` and the runs it is missing in. Such a cell is never shown as the method's
value over all its runs.

A run whose settings differ from the others' (data set, model, training budget, epochs, the
evaluation's eps, step, backend or test-sample counts) is flagged with its differences, in the
table and on stderr: it is never averaged silently with the others.

Beside each mean stands the worst-class accuracy, as robust-fairness papers report it: the mean over
the runs of each run's lowest per-class accuracy (the entries' ``per_class``), and the class that
was the worst in most runs (a tie: the one of them with the lowest mean accuracy over the runs, then
the lowest index). ``cost=True`` (``--cost``) adds what training cost per method, means over runs:
wall time, forward and backward passes, peak memory, and the device.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advplug.config import read_run_config
from advplug.errors import DataError
from advplug.evaluate import worst_class
from advplug.run import results
from advplug.run.results import CHECKPOINTS

TRAIN_KEYS = (
    "data",
    "model",
    "eps",
    "alpha",
    "steps",
    "epochs",
    "batch_size",
    "lr",
    "milestones",
    "attack_bn",
    "selection",
)


@dataclass
class Run:
    path: str
    method: str
    seed: int
    results: dict[str, dict[str, float]]  # {"best"|"last"|...: {attack column: accuracy in [0, 1]}}
    settings: dict[str, Any]
    flags: list[str] = field(default_factory=list)
    column_eps: dict[tuple[str, str], float] = field(default_factory=dict)  # {(checkpoint, column): eps}
    per_class: dict[tuple[str, str], list[float | None]] = field(default_factory=dict)  # {(checkpoint, column): [K]}
    cost: dict[str, Any] | None = None  # results.json's cost (results.read_cost)


def method_label(cfg: dict[str, Any]) -> str:
    """A run's method as tables and plots name it: plugins (order-free) + objective + the plugin options set."""
    plugins = sorted(cfg.get("plugins") or [])
    label = "+".join(plugins) if plugins else "AT"
    obj = cfg.get("objective", "at")
    if obj != "at":
        label = f"{label} ({obj.upper()})" if plugins else obj.upper()
    opts = {k: v for k, v in (cfg.get("plugin_options") or {}).items() if not k.endswith("-dump")}
    if opts:
        label += " " + " ".join(f"{k}={v}" for k, v in sorted(opts.items()))
    return label


def _whiches(runs: list[Run]) -> list[str]:
    return [w for w in CHECKPOINTS if any(w in r.results for r in runs)]


def load_run(path: str | Path) -> Run:
    run = Path(path)
    cfg = read_run_config(run, DataError)
    settings = {k: cfg.get(k) for k in TRAIN_KEYS}
    settings["selection"] = cfg.get("selection", "test")  # runs from before held-out selection chose on test
    entries = results.read_run(run, cfg)
    if not entries:
        raise DataError(f"{str(run)!r} has no results yet (no eval.json or results.json)")
    accuracies, ev_settings = results.select(entries, cfg.get("eps"))
    column_eps = ev_settings.pop("column eps")
    settings.update(ev_settings)
    chosen = results.chosen_entries(entries, cfg.get("eps"))  # the entries of the accuracies shown
    per_class = {k: e["per_class"] for k, e in chosen.items() if "per_class" in e}
    return Run(
        str(run),
        method_label(cfg),
        int(cfg.get("seed", 0)),
        accuracies,
        settings,
        column_eps=column_eps,
        per_class=per_class,
        cost=results.read_cost(run),
    )


def worst_over_runs(per_run: list[list[float | None]]) -> tuple[float, int, int] | None:
    """(the mean over runs of each run's worst-class accuracy in %, the class worst in most runs (a tie: the lowest
    mean accuracy over the runs, then the lowest index), the runs that have a worst class); ``None`` if none has."""
    worst = [w for w in map(worst_class, per_run) if w is not None]
    if not worst:
        return None
    times = Counter(k for k, _ in worst)

    def mean_acc(k: int) -> float:
        return statistics.fmean(pc[k] for pc in per_run if k < len(pc) and pc[k] is not None)

    most = max(times.values())
    k = min((c for c in times if times[c] == most), key=lambda c: (mean_acc(c), c))
    return 100 * statistics.fmean(acc for _, acc in worst), k, len(worst)


COST_COLUMNS = {  # compare --cost: key -> (markdown header, scale)
    "train_seconds": ("train time (s)", 1.0),
    "forward_passes": ("forward passes (M)", 1e-6),
    "backward_passes": ("backward passes (M)", 1e-6),
    "peak_memory_mib": ("peak memory (MiB)", 1.0),
}


def mean_cost(rs: list[Run]) -> dict[str, Any] | None:
    """The mean over the runs that record one of every number in their ``cost`` (``peak_memory_mib`` from the
    bytes), their devices joined, and ``n``: how many runs; ``None`` when no run records a cost."""
    costs = [{**r.cost, "peak_memory_mib": r.cost["peak_memory_bytes"] / 2**20} for r in rs if r.cost]
    if not costs:
        return None
    shared = [k for k, v in costs[0].items() if isinstance(v, (int, float)) and all(k in c for c in costs)]
    out: dict[str, Any] = {k: statistics.fmean(c[k] for c in costs) for k in shared}
    return out | {"device": "; ".join(sorted({str(c["device"]) for c in costs})), "n": len(costs)}


def flag_mismatches(runs: list[Run]) -> None:
    """Mark every run whose setting differs from the most common value among the runs."""
    for r in runs:
        r.flags = []
    for key in runs[0].settings:
        values = Counter(_fmt(r.settings.get(key)) for r in runs)
        if len(values) < 2:
            continue
        common = values.most_common(1)[0][0]
        for r in runs:
            mine = _fmt(r.settings.get(key))
            if mine != common:
                r.flags.append(f"{key} {mine} (others: {common})")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    return str(v)


def _attack_order(runs: list[Run]) -> list[str]:
    cols: list[str] = []
    for r in runs:
        for which in _whiches(runs):
            cols += [a for a in r.results.get(which, {}) if a not in cols]
    return cols


def table(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per method: ``{"method", "n", "seeds", "selection", "flagged", "cells", "missing"}``; ``cells``:
    ``{(attack, which): (mean, std, n)}`` over the runs that have the result, ``missing``: ``{(attack, which):
    [paths of the row's runs without it]}`` for the cells that not every run has, ``worst``: ``{(attack, which):
    (worst-class accuracy, class, runs)}`` (``worst_over_runs``), ``cost``: ``mean_cost``."""
    flag_mismatches(runs)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.method, []).append(r)
    attacks = _attack_order(runs)
    rows = []
    for method, rs in groups.items():
        cells, missing, mixed, worst = {}, {}, {}, {}
        for a in attacks:
            for which in _whiches(runs):
                vals = [100 * r.results[which][a] for r in rs if a in r.results.get(which, {})]
                if vals:
                    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    cells[(a, which)] = (statistics.fmean(vals), std, len(vals))
                    if len(vals) < len(rs):
                        missing[(a, which)] = [r.path for r in rs if a not in r.results.get(which, {})]
                    budgets = sorted({r.column_eps[(which, a)] for r in rs if (which, a) in r.column_eps})
                    if len(budgets) > 1:
                        mixed[(a, which)] = budgets
                    w = worst_over_runs([r.per_class[(which, a)] for r in rs if (which, a) in r.per_class])
                    if w is not None:
                        worst[(a, which)] = w
        rows.append(
            {
                "method": method,
                "n": len(rs),
                "seeds": sorted(r.seed for r in rs),
                "selection": "/".join(sorted({str(r.settings.get("selection")) for r in rs})),
                "flagged": {r.path: r.flags for r in rs if r.flags},
                "cells": cells,
                "missing": missing,
                "mixed_eps": mixed,
                "worst": worst,
                "cost": mean_cost(rs),
            }
        )
    return rows


def _cell(c: tuple[float, float, int] | None, runs: int, mixed: list[float] | None = None) -> str:
    """``mean ± std``, with ``(n=k/N)`` when only k of the row's N runs have the result and ``(eps mixed: ...)``
    when its runs were attacked at different budgets."""
    if c is None:
        return "-"
    text = f"{c[0]:.2f}" if c[2] == 1 else f"{c[0]:.2f} ± {c[1]:.2f}"
    text += f" (n={c[2]}/{runs})" if c[2] < runs else ""
    return text + (f" (eps mixed: {', '.join(f'{e:g}' for e in mixed)})" if mixed else "")


def _missing_notes(row: dict[str, Any]) -> list[str]:
    """One line per set of runs lacking some of the row's cells: the cells and the runs."""
    by_runs: dict[tuple[str, ...], list[str]] = {}
    for (a, which), paths in row["missing"].items():
        by_runs.setdefault(tuple(paths), []).append(f"{a} {which}")
    return [f"{row['method']}: {', '.join(cols)}: none in {', '.join(paths)}" for paths, cols in by_runs.items()]


def _worst_text(w: tuple[float, int, int] | None, runs: int) -> str:
    """`` (worst: class 3, 20.00)``, with ``, n=k/N`` when only k of the cell's N runs record per-class numbers."""
    if w is None:
        return ""
    return f" (worst: class {w[1]}, {w[0]:.2f}{f', n={w[2]}/{runs}' if w[2] < runs else ''})"


def _worst_fields(w: tuple[float, int, int] | None) -> dict[str, Any]:
    return {} if w is None else {"worst_class_acc": w[0], "worst_class": w[1]}


CSV_COST = ("train_seconds", "forward_passes", "backward_passes", "peak_memory_mib", "device")


def _worst_csv(w: tuple[float, int, int] | None) -> list[str]:
    return ["", ""] if w is None else [f"{w[0]:.4f}", str(w[1])]


def _cost_csv(cost: dict[str, Any] | None) -> list[str]:
    if cost is None:
        return [""] * len(CSV_COST)
    return [f"{cost[k]:.10g}" if isinstance(cost[k], float) else str(cost[k]) for k in CSV_COST]


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _cost_cells(cost: dict[str, Any] | None, runs: int) -> list[str]:
    """The row's ``--cost`` cells: ``COST_COLUMNS`` scaled, and the device; ``(n=k/N)`` when k of its N runs have
    a cost."""
    if cost is None:
        return ["-"] * (len(COST_COLUMNS) + 1)
    n = f" (n={cost['n']}/{runs})" if cost["n"] < runs else ""
    return [_num(cost[k] * scale) + n for k, (_, scale) in COST_COLUMNS.items()] + [cost["device"] + n]


def render(rows: list[dict[str, Any]], fmt: str = "markdown", cost: bool = False) -> str:
    attacks: list[str] = []
    for row in rows:
        for a, _ in row["cells"]:
            if a not in attacks:
                attacks.append(a)
    whiches = [w for w in CHECKPOINTS if any(w == c[1] for row in rows for c in row["cells"])]
    cols = [(a, w) for a in attacks for w in whiches]
    if fmt == "json":
        return json.dumps(
            [
                {
                    "method": r["method"],
                    "n": r["n"],
                    "seeds": r["seeds"],
                    "flagged": r["flagged"],
                    "best_chosen_on": r["selection"],
                    "results": {
                        f"{a} ({w})": (
                            {"mean": c[0], "std": c[1], "n": c[2]} if c[2] > 1 else {"mean": c[0], "n": c[2]}
                        )  # one run: no std
                        | ({"missing_in": r["missing"][(a, w)]} if (a, w) in r["missing"] else {})
                        | ({"eps_mixed": r["mixed_eps"][(a, w)]} if (a, w) in r["mixed_eps"] else {})
                        | _worst_fields(r["worst"].get((a, w)))
                        for (a, w), c in r["cells"].items()
                    },
                }
                | ({"cost": r["cost"]} if cost else {})
                for r in rows
            ],
            indent=2,
        )
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        head = [
            *("method", "runs", "best chosen on", "attack", "checkpoint", "mean", "std", "n", "flagged"),
            *("missing in", "eps mixed", "worst_class_acc", "worst_class"),
            *(CSV_COST if cost else ()),
        ]
        w.writerow(head)
        for r in rows:
            for (a, which), c in r["cells"].items():
                w.writerow(
                    [
                        r["method"],
                        r["n"],
                        r["selection"],
                        a,
                        which,
                        f"{c[0]:.4f}",
                        f"{c[1]:.4f}" if c[2] > 1 else "",
                        c[2],
                        "yes" if r["flagged"] else "",
                        "; ".join(r["missing"].get((a, which), [])),
                        "; ".join(f"{e:g}" for e in r["mixed_eps"].get((a, which), [])),
                        *_worst_csv(r["worst"].get((a, which))),
                        *(_cost_csv(r["cost"]) if cost else ()),
                    ]
                )
        return buf.getvalue()
    head = ["method", "runs", "best chosen on", *[f"{a} {w}" for a, w in cols]]
    head += [h for h, _ in COST_COLUMNS.values()] + ["device"] if cost else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    notes, partial = [], []
    for r in rows:
        name = r["method"] + (" ⚠" if r["flagged"] else "")
        cells = [
            name,
            str(r["n"]),
            r["selection"],
            *[
                _cell(r["cells"].get(c), r["n"], r["mixed_eps"].get(c))
                + _worst_text(r["worst"].get(c), r["cells"][c][2] if c in r["cells"] else 0)
                for c in cols
            ],
            *(_cost_cells(r["cost"], r["n"]) if cost else ()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        for path, flags in r["flagged"].items():
            notes.append(f"⚠ {path}: " + "; ".join(flags))
        partial += _missing_notes(r)
    text = "\n".join(lines) + (
        '\n\nTest accuracy (%), mean ± std over runs (seeds). "best" is the checkpoint '
        'chosen by PGD accuracy on the split named under "best chosen on" (validation: held '
        "out from training; test: chosen on the test set itself, optimistic)."
    )
    if partial:
        text += (
            "\n(n=k/N): the mean of only k of the row's N runs, not the method's value over all of them. "
            "Runs without the result (evaluate them too: advplug eval RUN --attack ...):\n" + "\n".join(partial)
        )
    if any(r["mixed_eps"] for r in rows):
        text += "\n(eps mixed: ...): the runs of this cell were attacked at different budgets; the mean mixes them."
    if any(r["worst"] for r in rows):
        text += (
            "\n(worst: class k, a): the worst-class accuracy, the mean over runs of each run's lowest per-class "
            "accuracy, and k, the class lowest in most runs (a tie: the lowest mean accuracy)."
        )
    if cost:
        text += (
            "\nCost: means over runs of the training's wall time, forward and backward passes of the model "
            "(attack iterations included, held-out evaluation not), peak memory (GPU: allocated; CPU: RSS)."
        )
    if notes:
        text += "\nSettings differ, not comparable as they stand:\n" + "\n".join(notes)
    return text


def compare(paths: list[str], fmt: str = "markdown", cost: bool = False) -> tuple[str, list[str]]:
    """The rendered table and the warnings (one per flagged run); ``cost``: with the training's cost per method."""
    if not paths:
        raise DataError("compare needs at least one run directory")
    seen: dict[Path, str] = {}
    for p in paths:  # the same run twice would be averaged as two seeds
        real = Path(p).resolve()
        if real in seen:
            raise DataError(f"{p!r} is the same run directory as {seen[real]!r}: give each run once")
        seen[real] = p
    runs = [load_run(p) for p in paths]
    rows = table(runs)
    warnings = [f"{p}: " + "; ".join(f) for r in rows for p, f in r["flagged"].items()]
    return render(rows, fmt, cost), warnings


__all__ = ["compare", "load_run", "table", "render", "method_label"]
