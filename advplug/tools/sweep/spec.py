"""The sweep file: its schema, its expansion into points (each a ``TrainConfig``'s settings, checked
by ``advplug.config.build_config``), and the points' stable names.

The sweep file (TOML, or JSON with the same structure)::

    out = "sweeps/cifar10-main"     # the sweep directory (default: sweeps/<file stem>)
    retries = 2                     # extra attempts per point and invocation after a failure
    jobs = 4                        # local launcher: runs at once (--jobs overrides)

    [base]                          # settings every point shares: the names of a --config file
    data = "cifar10"
    epochs = 120
    final_attacks = ["natural", "pgd20", "cw20"]
    env = { OMP_NUM_THREADS = "4" } # environment of each run (not part of its name)
    resources = { cpus = 4, gpus = 1 }  # Ray: each run's request (--cpus/--gpus override)

    [grid]                          # every combination of these values
    seed = [0, 1, 2]
    data = ["cifar10", "cifar100"]

    [[method]]                      # one entry per row of the table (or none: one plain run)
    plugins = ["mail"]
    objective = "trades"
    "mail-gamma" = 10               # plugin options: "plugin-option", [method.mail] or [method.plugin_options]

    [[method]]
    name = "at"                     # optional: the point names' prefix

    [[reported]]                    # the papers' numbers, beside ours in the report (advplug.tools.reported)
    method = "at"                   # a method's name: its name, else <plugins>-<objective>
    attack = "pgd20"
    checkpoint = "best"
    value = 52.8
    paper = "..."
    table = "Table 1, row AT"

Points are ``method x grid``, seed 0 of every method first. A setting's value is the grid's,
else the method's, else ``[base]``'s, else ``advplug train``'s default.

**Point names** (stable: they depend only on the point's own settings, so adding a method or a
seed never renames a point): ``<plugins>-<objective>`` (or the method's ``name``), then the data
set unless it is ``digits``, then, when the method (unnamed) or a grid axis sets anything else,
a 6-hex-digit hash of those settings and their values, then ``seed<S>``: ``mail-trades-seed0``,
``mail-trades-cifar100-seed1``, ``mail-at-3f9a0c-seed0``. ``--dry-run`` prints each name with its
settings; two points with one name are an error.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advplug.config import NUMBERS_FREE, build_config, merge_settings, read_settings_file, table_entries
from advplug.errors import AdvplugError, OptionError
from advplug.tools.reported import DEFAULTS, SECTION, Reported, is_reported_only, read_file
from advplug.tools.reported import parse as parse_reported

REPORTED_KEYS = (SECTION, DEFAULTS)  # the papers' numbers (advplug.tools.reported)
# Set by the sweep itself, not by the sweep file.
RESERVED = ("out", "progress")
# Settings that do not change a run's numbers: left out of point names and of the check that a
# run directory holds this point's run.
NAME_FREE = NUMBERS_FREE
TOP_KEYS = ("out", "retries", "jobs", "base", "grid", "method", "resources", "env", "slurm", *REPORTED_KEYS)


@dataclass
class Point:
    name: str
    settings: dict[str, Any]  # TrainConfig keyword arguments (plugin options under plugin_options)
    axes: dict[str, Any] = field(default_factory=dict)  # the point's non-seed grid values (one table each)
    env: dict[str, str] = field(default_factory=dict)
    cpus: float = 1.0
    gpus: float = 0.0
    # the method's name (what [[reported]] names): its ``name``, else ``<plugins>-<objective>``, with ``#<number of
    # its [[method]]>`` when several unnamed methods share that
    method: str = ""


@dataclass
class Sweep:
    path: Path
    out: Path
    points: list[Point]
    retries: int = 2
    jobs: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)  # submitit parameters (slurm_partition, timeout_min ...)
    reported: list[Reported] = field(default_factory=list)  # the papers' numbers ([[reported]])

    def dir(self, p: Point) -> Path:
        return self.out / p.name


def _read(path: Path) -> dict[str, Any]:
    raw = read_settings_file(path, "sweep", default="toml")
    if not isinstance(raw, dict):
        raise OptionError(f"sweep file {str(path)!r}: expected a table of settings, got {type(raw).__name__}")
    return raw


@dataclass
class _Layer:
    """One table of the sweep file: settings, plugin options, environment, resources, name."""

    settings: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)
    name: str | None = None

    def as_settings(self) -> dict[str, Any]:
        """This layer as ``merge_settings`` takes it."""
        return {**self.settings, "plugin_options": self.options}


def _layer(table: dict[str, Any], where: str, allow_name: bool = False) -> _Layer:
    """Split one table into settings, plugin options (``advplug.config.table_entries``), env,
    resources and name."""
    if not isinstance(table, dict):
        raise OptionError(f"sweep file: {where} must be a table, got {table!r}")
    layer = _Layer()
    own = (*RESERVED, "resume", "env", "resources", *(("name",) if allow_name else ()))
    for kind, key, v in table_entries(table, own, flat_options=True):
        if kind == "own" and key in (*RESERVED, "resume"):
            raise OptionError(
                f"sweep file: {where} sets {key!r}; the sweep sets it (one run directory per point "
                "under the sweep's out)"
            )
        if kind == "own" and key == "env":
            if not isinstance(v, dict):
                raise OptionError(f'sweep file: {where}.env must be a table of NAME = "value"')
            layer.env.update({str(a): str(b) for a, b in v.items()})
        elif kind == "own" and key == "resources":
            if (
                not isinstance(v, dict)
                or set(v) - {"cpus", "gpus"}
                or not all(isinstance(x, (int, float)) for x in v.values())
            ):
                raise OptionError(f"sweep file: {where}.resources must be {{ cpus = N, gpus = N }}, got {v!r}")
            layer.resources.update({a: float(b) for a, b in v.items()})
        elif kind == "own":  # name
            if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", v):
                raise OptionError(
                    f"sweep file: {where}.name must be a plain name (letters, digits, . _ + -), got {v!r}"
                )
            layer.name = v
        elif kind == "setting":
            layer.settings[key] = v
        elif kind == "plugin_options":
            if not isinstance(v, dict):
                raise OptionError(f"sweep file: {where}.plugin_options must be a table")
            layer.options.update(v)
        elif kind == "option":
            layer.options[key] = v
        else:
            raise OptionError(
                f"sweep file: unknown setting {key!r} in {where} (the names of `advplug train --config`, "
                'plugin options as "plugin-option")'
            )
    return layer


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-")[:40] or "data"


def _hash(values: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:6]


def point_name(settings: dict[str, Any], varied: dict[str, Any], label: str | None = None) -> str:
    """``<plugins>-<objective>[-<data>][-<hash of varied>]-seed<S>`` (see the module docstring)."""
    plugins = list(settings.get("plugins") or [])
    parts = [label] if label else [*plugins, settings.get("objective", "at")]
    data = settings.get("data", "digits")
    if data != "digits":
        parts.append(_slug(str(data)))
    rest = {k: v for k, v in varied.items() if k not in ("plugins", "objective", "seed", "data") and k not in NAME_FREE}
    if rest:
        parts.append(_hash(rest))
    parts.append(f"seed{settings.get('seed', 0)}")
    return "-".join(str(p) for p in parts)


def _flat(layer: _Layer) -> dict[str, Any]:
    return {**layer.settings, **{f"plugin:{k}": v for k, v in layer.options.items()}}


def expand(raw: dict[str, Any], where: str = "sweep file") -> list[Point]:
    """The points of a parsed sweep file, validated (settings, plugins and their options)."""
    unknown = set(raw) - set(TOP_KEYS)
    if unknown:
        raise OptionError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected {', '.join(TOP_KEYS)})")
    base = _layer(
        {
            **raw.get("base", {}),
            **({"env": raw["env"]} if "env" in raw else {}),
            **({"resources": raw["resources"]} if "resources" in raw else {}),
        },
        "[base]",
    )
    methods = raw.get("method", [{}])
    if isinstance(methods, dict):
        methods = [methods]
    if not isinstance(methods, list) or not methods:
        raise OptionError(f"{where}: [[method]] must be a list of tables")
    grid = raw.get("grid", {})
    if not isinstance(grid, dict):
        raise OptionError(f"{where}: [grid] must be a table of setting = [values]")
    axes: list[tuple[str, bool, list[Any]]] = []  # (key, is_plugin_option, values)
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise OptionError(f"{where}: [grid] {k} must be a non-empty list of values, got {vals!r}")
        first = _layer({k: vals[0]}, "[grid]")
        if not first.settings and not first.options:
            raise OptionError(f"{where}: [grid] {k} is not a setting")
        axes.append((next(iter(first.settings)) if first.settings else k, bool(first.options), vals))
    axes.sort(key=lambda a: a[0] != "seed")  # seed outermost: every method's seed 0 runs first
    points: list[Point] = []
    owner: list[int] = []  # each point's [[method]] index
    for combo in itertools.product(*[a[2] for a in axes]) if axes else [()]:
        g = _Layer(
            {k: v for (k, is_p, _), v in zip(axes, combo) if not is_p},
            {k: v for (k, is_p, _), v in zip(axes, combo) if is_p},
        )
        for i, spec in enumerate(methods):
            m = _layer(spec, f"[[method]] #{i + 1}", allow_name=True)
            settings = merge_settings(base.as_settings(), m.as_settings(), g.as_settings())
            varied = {**({} if m.name else _flat(m)), **_flat(g)}
            res = {"cpus": 1.0, "gpus": 0.0, **base.resources, **m.resources}
            table_axes = {
                k: v
                for k, v in _flat(g).items()
                if k not in ("seed", "plugins", "objective") and not k.startswith("plugin:")
            }
            points.append(
                Point(
                    point_name(settings, varied, m.name),
                    settings,
                    table_axes,
                    {**base.env, **m.env},
                    res["cpus"],
                    res["gpus"],
                    m.name or "-".join([*(settings.get("plugins") or []), settings.get("objective", "at")]),
                )
            )
            owner.append(i)
    owners: dict[str, set[int]] = {}
    for p, i in zip(points, owner):
        owners.setdefault(p.method, set()).add(i)
    for p, i in zip(points, owner):  # unnamed methods sharing <plugins>-<objective>: told apart by their number
        if len(owners[p.method]) > 1:
            p.method += f"#{i + 1}"
    seen: dict[str, Point] = {}
    for p in points:
        if p.name in seen:
            raise OptionError(
                f"{where}: two points are both named {p.name!r} ({_describe(seen[p.name])} and "
                f"{_describe(p)}): give the methods different settings or names"
            )
        seen[p.name] = p
    _validate(points)
    return points


def _validate(points: list[Point]) -> None:
    from advplug.plugins import enable

    checked: set[str] = set()
    for p in points:
        try:
            cfg = build_config(p.settings).resolved()
        except OptionError as e:
            raise OptionError(f"point {p.name}: {e}") from None
        key = json.dumps([cfg.plugins, cfg.objective, cfg.plugin_options], sort_keys=True, default=str)
        if key not in checked:
            checked.add(key)
            try:
                enable(list(cfg.plugins), cfg.objective, dict(cfg.plugin_options))
            except AdvplugError as e:
                raise OptionError(f"point {p.name}: {e}") from None


def _describe(p: Point) -> str:
    return json.dumps(p.settings, sort_keys=True, default=str)


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    path = Path(path)
    raw = _read(path)
    points = expand(raw, f"sweep file {str(path)!r}")
    retries, jobs = raw.get("retries", 2), raw.get("jobs", 1)
    for k, v in (("retries", retries), ("jobs", jobs)):
        least = 0 if k == "retries" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise OptionError(f"sweep file {str(path)!r}: {k} must be a whole number >= {least}, got {v!r}")
    slurm = raw.get("slurm", {})
    if not isinstance(slurm, dict):
        raise OptionError(f"sweep file {str(path)!r}: [slurm] must be a table of submitit parameters")
    if not isinstance(raw.get("out", ""), str):
        raise OptionError(f"sweep file {str(path)!r}: out must be a directory path (a string), got {raw['out']!r}")
    out = Path(out or raw.get("out") or Path("sweeps") / path.stem)
    if out.exists() and not out.is_dir():  # found now, --dry-run too, not by the first mkdir
        raise OptionError(f"sweep directory {str(out)!r} is a file, not a directory: choose another out (or --out)")
    reported = parse_reported(raw, {p.method for p in points}, f"sweep file {str(path)!r}")
    return Sweep(path, out.absolute(), points, retries, jobs, dict(slurm), reported)


def method_labels(sweep: Sweep) -> dict[str, set[str]]:
    """Each method's name with the labels ``compare`` gives its runs (plugins, objective, options)."""
    from advplug.tools.compare import method_label

    out: dict[str, set[str]] = {}
    for p in sweep.points:
        out.setdefault(p.method, set()).add(method_label(build_config(p.settings).resolved().to_json()))
    return out


def load_reported(path: str | Path) -> tuple[list[Reported], dict[str, set[str]] | None]:
    """``compare --reported FILE``: the entries of a file of reported numbers (its methods are compare's labels:
    ``None``), or of a sweep file with each method's labels."""
    if is_reported_only(read_settings_file(path, "reported", default="toml")):
        return read_file(path), None
    sweep = load_sweep(path)
    if not sweep.reported:
        raise OptionError(f"sweep file {str(path)!r} has no [[reported]] entries")
    return sweep.reported, method_labels(sweep)
