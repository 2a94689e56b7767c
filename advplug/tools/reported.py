"""The papers' numbers beside ours: ``[[reported]]`` entries and the table that puts each beside the measured
mean ± std of its method's runs (``advplug compare RUN... --reported FILE``, ``advplug sweep FILE --report``).

An entry (a TOML file of its own, or the same section in a sweep file)::

    [reported_defaults]               # optional: keys every entry shares (an entry's own keys win)
    paper = "MAIL (Wang et al., NeurIPS 2021)"
    data = "cifar10"
    model = "resnet18"

    [[reported]]
    method = "mail-at"                # the sweep's method name (a file of its own: compare's row label, "AT")
    attack = "pgd100"                 # the spec results use: natural, pgd20, cw20, apgd-ce, aa ...
    checkpoint = "best"               # best | last
    value = 55.25                     # percent, as the paper prints it
    std = 0.23                        # optional: the paper's ± over its runs
    table = "Table 2, row MAIL-AT"
    note = "..."                      # optional: a number not read with certainty, or another caveat
    epochs = 100                      # the paper's setting: data, model, epochs, eps (0.031 or "8/255"),
    selection = "test"                # n_test (default: the data set's whole test set), selection

Per entry the table shows the reported number, ours (mean ± std over the method's runs, n), ours - reported, and
whether the reported number is outside our spread: more than 2 std from our mean, or more than 1 point when there
is one run (no std). Under it, per method, the settings in which our runs differ from the paper's, computed from each
run's ``config.json`` and the results entry of the cell (its eps and test samples), never typed by hand.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from advplug.attack_names import canonical_spec, display_name
from advplug.config import SELECTIONS, read_run_config, read_settings_file
from advplug.errors import DataError, OptionError
from advplug.run import results
from advplug.run.results import CHECKPOINTS
from advplug.tools.compare import compare, method_label

SECTION, DEFAULTS = "reported", "reported_defaults"
# The whole test set of the data sets papers report on: the default of an entry's n_test.
FULL_TEST = {"cifar10": 10000, "cifar100": 10000, "svhn": 26032, "mnist": 10000, "fashion-mnist": 10000}
SELECTION_CHOICES = (*SELECTIONS, "last")  # how the paper picked "best": validation (held out), test, the last epoch
COLUMNS = (
    *("method", "attack", "checkpoint", "reported", "reported std", "paper", "table", "status", "mean", "std", "n"),
    *("diff", "outside", "settings differ", "note"),
)


@dataclass(frozen=True)
class Reported:
    """One number a paper reports, with the paper's setting where it is known."""

    method: str
    attack: str
    checkpoint: str
    value: float
    paper: str
    table: str
    std: float | None = None
    note: str | None = None
    data: str | None = None
    model: str | None = None
    epochs: int | None = None
    eps: float | None = None
    n_test: int | None = None
    selection: str | None = None

    @property
    def test_samples(self) -> int | None:
        """The paper's evaluation size: its ``n_test``, else its data set's whole test set."""
        return self.n_test or FULL_TEST.get(self.data or "")


KEYS = tuple(f.name for f in fields(Reported))
REQUIRED = ("method", "attack", "checkpoint", "value", "paper", "table")


# -- parsing -----------------------------------------------------------------------------------------
def _eps(v: Any) -> float:
    """``0.031`` or ``"8/255"``."""
    if isinstance(v, str) and v.count("/") == 1:
        num, den = v.split("/")
        try:
            v = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            v = None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise ValueError
    return float(v)


def _checked(key: str, v: Any) -> Any:
    """``v`` as the field ``key`` holds it; ``ValueError`` with the reason."""
    if key in ("value", "std"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{key} {v!r} is not a number")
        if not (0 <= v <= 100 if key == "value" else 0 <= v < math.inf):
            raise ValueError(f"{key} {v!r} is not a percentage in [0, 100]" if key == "value" else f"std {v!r} < 0")
        return float(v)
    if key in ("epochs", "n_test"):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} {v!r} is not a whole number >= 1")
        return v
    if key == "eps":
        try:
            return _eps(v)
        except ValueError:
            raise ValueError(f"eps {v!r} is not a positive number or a fraction such as '8/255'") from None
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{key} {v!r} is not a non-empty string")
    if key == "attack":
        try:
            return canonical_spec(v)
        except OptionError as e:
            raise ValueError(str(e)) from None
    if key == "checkpoint" and v not in CHECKPOINTS:
        raise ValueError(f"checkpoint {v!r} is not one of {', '.join(CHECKPOINTS)}")
    if key == "selection" and v not in SELECTION_CHOICES:
        raise ValueError(f"selection {v!r} is not one of {', '.join(SELECTION_CHOICES)} (how the paper chose best)")
    return v


def _entry(table: Any, defaults: dict[str, Any]) -> Reported:
    if not isinstance(table, dict):
        raise ValueError(f"is a {type(table).__name__}, not a table of key = value")
    merged = {**defaults, **table}
    unknown = [k for k in merged if k not in KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (keys: {', '.join(KEYS)})")
    missing = [k for k in REQUIRED if k not in merged]
    if missing:
        raise ValueError(f"has no {missing[0]!r}")
    out = Reported(**{k: _checked(k, v) for k, v in merged.items()})
    if out.selection == "last" and out.checkpoint != "last":
        raise ValueError("selection 'last' is the last epoch: write checkpoint = 'last'")
    return out


def parse(raw: dict[str, Any], methods: Collection[str] | None, where: str) -> list[Reported]:
    """The ``[[reported]]`` entries of a parsed file, checked; ``methods``: the names they may use (a sweep's
    methods), ``None`` for any. Errors are one line naming the entry."""
    defaults = raw.get(DEFAULTS, {})
    if not isinstance(defaults, dict):
        raise OptionError(f"{where}: [{DEFAULTS}] must be a table of key = value")
    entries = raw.get(SECTION, [])
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        raise OptionError(f"{where}: [[{SECTION}]] must be a list of tables")
    out: list[Reported] = []
    seen: dict[tuple, int] = {}
    for i, table in enumerate(entries, 1):
        t = table if isinstance(table, dict) else {}
        name = f"[[{SECTION}]] #{i} ({' '.join(str({**defaults, **t}.get(k, '?')) for k in REQUIRED[:3])})"
        try:
            r = _entry(table, defaults)
        except ValueError as e:
            raise OptionError(f"{where}: {name}: {e}") from None
        if methods is not None and r.method not in methods:
            raise OptionError(
                f"{where}: {name}: method {r.method!r} is not a method of the sweep "
                f"(its methods: {', '.join(sorted(methods))})"
            )
        key = (r.method, r.attack, r.checkpoint, r.paper, r.table)
        if key in seen:
            raise OptionError(f"{where}: {name} repeats #{seen[key]} (the same method, attack, checkpoint and table)")
        seen[key] = i
        out.append(r)
    return out


def read_file(path: str | Path) -> list[Reported]:
    """A file of ``[[reported]]`` entries only (its methods: compare's row labels)."""
    where = f"reported file {str(path)!r}"
    raw = read_settings_file(path, "reported", default="toml")
    if not isinstance(raw, dict):
        raise OptionError(f"{where}: expected a table with [[{SECTION}]] entries")
    out = parse(raw, None, where)
    if not out:
        raise OptionError(f"{where} has no [[{SECTION}]] entries")
    return out


def is_reported_only(raw: Any) -> bool:
    """Whether a parsed file holds reported entries only (else it is read as a sweep file)."""
    return isinstance(raw, dict) and set(raw) <= {SECTION, DEFAULTS}


# -- measuring -------------------------------------------------------------------------------------
@dataclass
class _Run:
    path: str
    config: dict[str, Any]
    cells: dict[tuple[str, str], dict[str, Any]]  # {(checkpoint, column): the results entry compare shows}


def _load(path: str) -> _Run:
    cfg = read_run_config(path, DataError)
    return _Run(path, cfg, results.chosen_entries(results.read_run(path, cfg), cfg.get("eps")))


def _fmt(v: Any) -> str:
    """A setting as the lines show it: an eps such as 0.0313725 as ``8/255``, 0.2 as ``0.2``."""
    if isinstance(v, float):
        k, short = v * 255, f"{v:.6g}"
        return f"{round(k)}/255" if len(short) > 6 and round(k) > 0 and abs(k - round(k)) < 1e-4 else short
    return str(v)


def _ours(values: list[Any]) -> str:
    return ", ".join(sorted({_fmt(v) for v in values}, key=lambda s: (len(s), s)))


def _differences(r: Reported, runs: list[_Run], cells: list[dict[str, Any]]) -> list[str]:
    """The settings in which the runs (their config and the cell's entries) differ from the paper's."""
    out = []
    for key in ("data", "model", "epochs"):
        paper, ours = getattr(r, key), [run.config.get(key) for run in runs]
        if paper is not None and any(v != paper for v in ours):
            out.append(f"{key} {_ours(ours)} (paper {_fmt(paper)})")
    eps = [run.config.get("eps") for run in runs] + [c["eps"] for c in cells]
    if r.eps is not None and any(abs(v - r.eps) > 1e-6 * r.eps for v in eps if v is not None):
        out.append(f"eps {_ours(eps)} (paper {_fmt(r.eps)})")
    n = r.test_samples
    if n is not None and any(c["n_test"] != n for c in cells):
        out.append(f"test samples {_ours([c['n_test'] for c in cells])} (paper {n})")
    if r.checkpoint.startswith("best") and r.selection != "last":
        ours = {str(run.config.get("selection", "test")) for run in runs}  # runs before held-out selection: test
        if r.selection is None or ours != {r.selection}:
            out.append(f"best chosen on {_ours(list(ours))} (paper: {r.selection or 'not stated'})")
    return out


def _row(r: Reported, runs: list[_Run]) -> dict[str, Any]:
    column = display_name(r.attack)
    cells = [run.cells[(r.checkpoint, column)] for run in runs if (r.checkpoint, column) in run.cells]
    vals = [100 * c["accuracy"] for c in cells]
    mean = statistics.fmean(vals) if vals else None
    std = statistics.stdev(vals) if len(vals) > 1 else None
    diff = None if mean is None else mean - r.value
    outside = None if diff is None else abs(diff) > (2 * std if std is not None else 1.0)
    status = "measured" if vals else "not evaluated" if runs else "not run"
    measured = [run for run in runs if (r.checkpoint, column) in run.cells]
    return {
        "method": r.method,
        "attack": r.attack,
        "checkpoint": r.checkpoint,
        "reported": r.value,
        "reported_std": r.std,
        "paper": r.paper,
        "table": r.table,
        "note": r.note,
        "status": status,
        "mean": mean,
        "std": std,
        "n": len(vals),
        "diff": diff,
        "outside": outside,
        "settings_differ": _differences(r, measured, cells) if vals else [],
    }


def rows(reported: list[Reported], paths: list[str], method_of: Callable[[str, dict[str, Any]], str | None]) -> list:
    """One row per reported entry, measured over the runs in ``paths`` that ``method_of(path, config)`` names
    as its method."""
    loaded = [_load(p) for p in paths]
    by_method: dict[str, list[_Run]] = {}
    for run in loaded:
        m = method_of(run.path, run.config)
        if m is not None:
            by_method.setdefault(m, []).append(run)
    return [_row(r, by_method.get(r.method, [])) for r in reported]


def by_label(labels: dict[str, set[str]] | None, reported: list[Reported]) -> Callable[[str, dict[str, Any]], Any]:
    """``method_of`` for ``compare``: a run is the method whose compare label (plugins, objective, options) it
    has; ``labels``: a sweep's method names with their labels, ``None`` when the names are the labels. Two
    reported methods sharing a label are an error (their runs cannot be told apart)."""
    if labels is None:
        return lambda path, cfg: method_label(cfg)
    names: dict[str, str] = {}
    used = {r.method for r in reported}
    for name, labs in labels.items():
        for lab in labs:
            if lab in names and {name, names[lab]} & used:
                raise OptionError(
                    f"methods {names[lab]!r} and {name!r} of the sweep are one method to compare ({lab}): their "
                    "runs cannot be told apart; compare the runs of one, or use advplug sweep --report"
                )
            names[lab] = name
    return lambda path, cfg: names.get(method_label(cfg))


# -- rendering -------------------------------------------------------------------------------------
def _num(v: float | None, digits: int = 4) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _markdown(rows: list[dict[str, Any]], methods_seen: list[str] | None) -> str:
    head = ["method", "attack", "checkpoint", "reported", "ours: mean ± std (runs)", "ours − reported", "outside"]
    lines = ["| " + " | ".join([*head, "source"]) + " |", "|" + "|".join(["---"] * (len(head) + 1)) + "|"]
    notes: dict[str, int] = {}  # note text -> its number (one number for a note several entries share)
    for r in rows:
        rep = f"{r['reported']:.2f}" + (f" ± {r['reported_std']:.2f}" if r["reported_std"] is not None else "")
        if r["status"] == "measured":
            ours = f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "") + f" (n={r['n']})"
            cells = [ours, f"{r['diff']:+.2f}", "yes" if r["outside"] else "no"]
        else:
            cells = [r["status"], "", ""]
        source = f"{r['paper']}, {r['table']}"
        if r["note"]:
            source += f" (note {notes.setdefault(r['note'], len(notes) + 1)})"
        method = r["method"] + (" ⚠" if r["settings_differ"] else "")
        lines.append("| " + " | ".join([method, r["attack"], r["checkpoint"], rep, *cells, source]) + " |")
    text = "\n".join(lines) + (
        "\n\nreported: the paper's number (± its std where it gives one); ours: mean ± std over our runs (seeds); "
        "outside: the reported number is more than 2 std from our mean (more than 1 point with one run); "
        "⚠: our runs' settings differ from the paper's (below), so the difference is not a reproduction's."
    )
    if notes:
        text += "\nNotes:\n" + "\n".join(f"({i}) {note}" for note, i in notes.items())
    differ = _differ_lines(rows)
    if differ:
        text += "\nSettings that differ from the paper's (ours, then the paper's):\n" + "\n".join(differ)
    if methods_seen is not None and any(r["status"] == "not run" for r in rows):
        text += "\nnot run: no run of the method among those compared (methods of these runs: "
        text += ", ".join(methods_seen) + ")."
    return text


def _differ_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per method, its rows grouped by their differences: one line per group, naming the rows when the group is
    not all of the method's measured rows."""
    out = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        measured = [r for r in rows if r["method"] == m and r["status"] == "measured"]
        groups: dict[tuple[str, ...], list[str]] = {}
        for r in measured:
            if r["settings_differ"]:
                groups.setdefault(tuple(r["settings_differ"]), []).append(f"{r['attack']} {r['checkpoint']}")
        for diffs, which in groups.items():
            name = m if len(which) == len(measured) else f"{m} ({', '.join(which)})"
            out.append(f"{name}: " + "; ".join(diffs))
    return out


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(
            [
                *(r["method"], r["attack"], r["checkpoint"], f"{r['reported']:.2f}", _num(r["reported_std"], 2)),
                *(r["paper"], r["table"], r["status"], _num(r["mean"]), _num(r["std"]), r["n"], _num(r["diff"])),
                "" if r["outside"] is None else "yes" if r["outside"] else "no",
                "; ".join(r["settings_differ"]),
                r["note"] or "",
            ]
        )
    return buf.getvalue()


def render(rows: list[dict[str, Any]], fmt: str = "markdown", methods_seen: list[str] | None = None) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        return _csv(rows)
    return _markdown(rows, methods_seen)


def beside(
    paths: list[str],
    fmt: str,
    reported: list[Reported],
    method_of: Callable[[str, dict[str, Any]], str | None],
    methods_seen: bool = False,
) -> tuple[str, list[str]]:
    """``compare``'s table with the reported numbers: markdown, compare's table then this one; JSON,
    ``{"table": compare's rows, "reported": these rows}``; CSV, these rows (each with its measured mean, std and n).
    ``methods_seen``: list the runs' methods under rows that are not run (names that are compare's labels)."""
    text, warnings = compare(paths, "markdown" if fmt == "csv" else fmt)
    got = rows(reported, paths, method_of)
    seen = sorted({method_label(read_run_config(p, DataError)) for p in paths}) if methods_seen else None
    if fmt == "json":
        return json.dumps({"table": json.loads(text), "reported": got}, indent=2), warnings
    if fmt == "csv":
        return render(got, "csv"), warnings
    return text + "\n\n### Papers' numbers beside ours\n\n" + render(got, fmt, seen), warnings


__all__ = ["Reported", "beside", "by_label", "is_reported_only", "parse", "read_file", "render", "rows"]
