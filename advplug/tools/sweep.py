"""``advplug sweep SWEEP.toml``: a grid of training runs (methods x seeds x settings), one run
directory per point, run by a launcher (``local`` subprocesses or a Ray cluster), resumable, and
summarised as the ``compare`` table.

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

Points are ``method x grid``, seed 0 of every method first. A setting's value is the grid's,
else the method's, else ``[base]``'s, else ``advplug train``'s default.

**Point names** (stable: they depend only on the point's own settings, so adding a method or a
seed never renames a point): ``<plugins>-<objective>`` (or the method's ``name``), then the data
set unless it is ``digits``, then, when the method (unnamed) or a grid axis sets anything else,
a 6-hex-digit hash of those settings and their values, then ``seed<S>``: ``mail-trades-seed0``,
``mail-trades-cifar100-seed1``, ``mail-at-3f9a0c-seed0``. ``--dry-run`` prints each name with its
settings; two points with one name are an error.

**Point states** (from the run directory, the truth; ``SWEEP_DIR/sweep.json`` records them):
finished iff ``results.json`` exists and ``config.json`` holds the point's settings (skipped;
a finished run under other settings is a conflict and is left out of the table); locked by another process (reported as busy,
never duplicated); interrupted iff ``last.pt`` exists (``advplug train --resume``); a run that
stopped before its first checkpoint (``--overwrite``); no run yet (a new run). A run directory
whose ``config.json`` differs from the point's settings (the sweep file was edited) is a
conflict: reported, never overwritten. Each attempt is ``python -m advplug train --config
SWEEP_DIR/.points/<name>.json --out SWEEP_DIR/<name>`` (or ``--resume``), its output appended to
``SWEEP_DIR/logs/<name>.log``; a failed point is tried again (resumed from its checkpoint when
it has one) up to ``retries`` times; one failing point never stops the others.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from advplug.config import NUMBERS_FREE, RECORD_ONLY, TrainConfig
from advplug.errors import AdvplugError, Interrupted, OptionError, RunDirError
from advplug.run import directory as rundir

STATUS_FILE = "sweep.json"
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Set by the sweep itself, not by the sweep file.
RESERVED = ("out", "progress")
# Settings that do not change a run's numbers: left out of point names and of the check that a
# run directory holds this point's run.
NAME_FREE = NUMBERS_FREE
# Keys that are not settings: where a point runs and with what environment.
EXEC_KEYS = ("env", "resources")
TOP_KEYS = ("out", "retries", "jobs", "base", "grid", "method", "resources", "env", "slurm")
RAY_MISSING = "--launcher ray needs Ray: pip install 'advplug[ray]' (or pip install 'ray>=2.9')"
SUBMITIT_MISSING = "--launcher slurm needs submitit: pip install 'advplug[slurm]' (or pip install 'submitit>=1.5')"


@dataclass
class Point:
    name: str
    settings: dict[str, Any]  # TrainConfig keyword arguments (plugin options under plugin_options)
    axes: dict[str, Any] = field(default_factory=dict)  # the point's non-seed grid values (one table each)
    env: dict[str, str] = field(default_factory=dict)
    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class Sweep:
    path: Path
    out: Path
    points: list[Point]
    retries: int = 2
    jobs: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)  # submitit parameters (slurm_partition, timeout_min ...)

    def dir(self, p: Point) -> Path:
        return self.out / p.name


# -- the sweep file -----------------------------------------------------------------------
def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise OptionError(f"sweep file {str(path)!r} not found")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        import tomllib

        return tomllib.loads(path.read_text())
    except ValueError as e:
        raise OptionError(f"sweep file {str(path)!r} cannot be parsed: {e}") from None


def _layer(table: dict[str, Any], where: str, allow_name: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], dict[str, float], str | None]:
    """Split one table into (settings, plugin options, env, resources, name)."""
    if not isinstance(table, dict):
        raise OptionError(f"sweep file: {where} must be a table, got {table!r}")
    settings: dict[str, Any] = {}
    popts: dict[str, Any] = {}
    env: dict[str, str] = {}
    res: dict[str, float] = {}
    name = None
    for k, v in table.items():
        key = k.replace("-", "_")
        if key in RESERVED or key == "resume":
            raise OptionError(f"sweep file: {where} sets {k!r}; the sweep sets it (one run directory per point under the sweep's out)")
        if key in FIELDS and key != "plugin_options":
            settings[key] = v
        elif key == "plugin_options":
            if not isinstance(v, dict):
                raise OptionError(f"sweep file: {where}.plugin_options must be a table")
            popts.update(v)
        elif key == "env":
            if not isinstance(v, dict):
                raise OptionError(f"sweep file: {where}.env must be a table of NAME = \"value\"")
            env.update({str(a): str(b) for a, b in v.items()})
        elif key == "resources":
            if not isinstance(v, dict) or set(v) - {"cpus", "gpus"} or not all(isinstance(x, (int, float)) for x in v.values()):
                raise OptionError(f"sweep file: {where}.resources must be {{ cpus = N, gpus = N }}, got {v!r}")
            res.update({a: float(b) for a, b in v.items()})
        elif key == "name" and allow_name:
            if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", v):
                raise OptionError(f"sweep file: {where}.name must be a plain name (letters, digits, . _ + -), got {v!r}")
            name = v
        elif isinstance(v, dict):  # [method.mail] gamma = 10
            popts.update({f"{k}-{a}": b for a, b in v.items()})
        elif "-" in k:  # "mail-gamma" = 10
            popts[k] = v
        else:
            raise OptionError(f"sweep file: unknown setting {k!r} in {where} (the names of `advplug train --config`, "
                              "plugin options as \"plugin-option\")")
    return settings, popts, env, res, name


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


def _flat(settings: dict[str, Any], popts: dict[str, Any]) -> dict[str, Any]:
    return {**settings, **{f"plugin:{k}": v for k, v in popts.items()}}


def expand(raw: dict[str, Any], where: str = "sweep file") -> list[Point]:
    """The points of a parsed sweep file, validated (settings, plugins and their options)."""
    unknown = set(raw) - set(TOP_KEYS)
    if unknown:
        raise OptionError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected {', '.join(TOP_KEYS)})")
    base_s, base_p, base_env, base_res, _ = _layer(
        {**raw.get("base", {}), **({"env": raw["env"]} if "env" in raw else {}),
         **({"resources": raw["resources"]} if "resources" in raw else {})}, "[base]")
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
        s, p, _, _, _ = _layer({k: vals[0]}, "[grid]")
        if not s and not p:
            raise OptionError(f"{where}: [grid] {k} is not a setting")
        axes.append((next(iter(s)) if s else k, bool(p), vals))
    axes.sort(key=lambda a: a[0] != "seed")  # seed outermost: every method's seed 0 runs first
    points: list[Point] = []
    for combo in itertools.product(*[a[2] for a in axes]) if axes else [()]:
        g_s = {k: v for (k, is_p, _), v in zip(axes, combo) if not is_p}
        g_p = {k: v for (k, is_p, _), v in zip(axes, combo) if is_p}
        for i, m in enumerate(methods):
            m_s, m_p, m_env, m_res, label = _layer(m, f"[[method]] #{i + 1}", allow_name=True)
            settings = {**base_s, **m_s, **g_s}
            popts = {**base_p, **m_p, **g_p}
            if popts:
                settings["plugin_options"] = popts
            varied = {**({} if label else _flat(m_s, m_p)), **_flat(g_s, g_p)}
            res = {"cpus": 1.0, "gpus": 0.0, **base_res, **m_res}
            table_axes = {k: v for k, v in _flat(g_s, g_p).items()
                          if k not in ("seed", "plugins", "objective") and not k.startswith("plugin:")}
            points.append(Point(point_name(settings, varied, label), settings, table_axes, {**base_env, **m_env},
                                res["cpus"], res["gpus"]))
    seen: dict[str, Point] = {}
    for p in points:
        if p.name in seen:
            raise OptionError(f"{where}: two points are both named {p.name!r} ({_describe(seen[p.name])} and "
                              f"{_describe(p)}): give the methods different settings or names")
        seen[p.name] = p
    _validate(points)
    return points


def _validate(points: list[Point]) -> None:
    from advplug.plugins import enable

    checked: set[str] = set()
    for p in points:
        try:
            cfg = TrainConfig(**p.settings).resolved()
        except TypeError as e:
            raise OptionError(f"point {p.name}: {e}") from None
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
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "retries" else 1):
            raise OptionError(f"sweep file {str(path)!r}: {k} must be a whole number >= {0 if k == 'retries' else 1}, got {v!r}")
    slurm = raw.get("slurm", {})
    if not isinstance(slurm, dict):
        raise OptionError(f"sweep file {str(path)!r}: [slurm] must be a table of submitit parameters")
    if not isinstance(raw.get("out", ""), str):
        raise OptionError(f"sweep file {str(path)!r}: out must be a directory path (a string), got {raw['out']!r}")
    out = Path(out or raw.get("out") or Path("sweeps") / path.stem)
    return Sweep(path, out.absolute(), points, retries, jobs, dict(slurm))


# -- the state of a point -----------------------------------------------------------------
def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    d = {k: v for k, v in d.items() if k not in NAME_FREE and k not in RECORD_ONLY}
    if d.get("model") == "auto":
        d.pop("model")
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def settings_differ(p: Point, run: Path) -> list[str]:
    """The settings in which ``run/config.json`` differs from the point's (empty: the same run)."""
    try:
        saved = json.loads((run / "config.json").read_text())
    except OSError:
        return []
    except ValueError as e:  # damaged: never resumed or overwritten as if it were this point's run
        return [f"config.json is not readable ({e})"]
    if not isinstance(saved, dict):
        return [f"config.json is not a JSON object ({type(saved).__name__})"]
    # None: filled by the trainer (the objective's attack start ...); "auto" models: from the data
    want = {k: v for k, v in _comparable(TrainConfig(**p.settings).resolved().to_json()).items() if v is not None}
    have = _comparable(saved)
    return [f"{k} {have.get(k)!r} (sweep: {want.get(k)!r})" for k in sorted(want) if have.get(k) != want.get(k)]


def _locked(run: Path) -> str | None:
    """The message of a lock another process holds on ``run`` (None: free)."""
    if not (run / rundir.LOCK).exists():
        return None
    try:
        rundir.RunLock(run).acquire().release()
    except RunDirError as e:
        return str(e)
    return None


def state(p: Point, run: Path) -> tuple[str, str]:
    """``(kind, detail)``: done, busy, conflict, resume, overwrite or new."""
    if (run / "results.json").is_file():  # finished: counted only if it is this point's run
        diff = settings_differ(p, run)
        if diff:
            return "conflict", (f"{run} holds a finished run with other settings: {'; '.join(diff[:3])}; move it "
                                "away or give the sweep another out")
        return "done", ""
    busy = _locked(run)
    if busy:
        return "busy", busy
    if run.exists() and not run.is_dir():
        return "conflict", f"{run} is a file"
    if rundir.holds_run(run):
        diff = settings_differ(p, run)
        if diff:
            return "conflict", (f"{run} holds a run with other settings: {'; '.join(diff[:3])}; move it away or "
                                "give the sweep another out")
        return ("resume", "") if (run / "last.pt").is_file() else ("overwrite", "stopped before its first checkpoint")
    if run.is_dir() and rundir._has_content(run):
        return "conflict", f"{run} is not empty and holds no advplug run"
    return "new", ""


def train_args(sweep: Sweep, p: Point, kind: str) -> list[str]:
    """``advplug train`` arguments for this attempt (after ``python -m advplug``)."""
    run = str(sweep.dir(p))
    if kind == "resume":
        args = ["train", "--resume", run, "--no-progress"]
        model, data = p.settings.get("model"), p.settings.get("data")
        if isinstance(model, str) and ":" in model:
            args += ["--model", model]
        if isinstance(data, str) and data.startswith("module:"):
            args += ["--data", data]
        return args
    cfg_file = sweep.out / ".points" / f"{p.name}.json"
    args = ["train", "--config", str(cfg_file), "--out", run, "--no-progress"]
    return args + (["--overwrite"] if kind == "overwrite" else [])


def last_error(log: Path, rc: int | None) -> str:
    """The line that says why an attempt failed: advplug's ``error:`` line, else a traceback's last line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    # only this attempt's lines (the log is appended per attempt)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("=== attempt"):
            lines = lines[i + 1:]
            break
    for pat in (r"^error: ", r"^[\w.]*(Error|Exception|Interrupt|Fault)\b"):
        hits = [x for x in lines if re.match(pat, x)]
        if hits:
            return hits[-1][:300]
    if rc is not None and rc < 0:
        return f"killed by signal {-rc}" + (f" ({signal.Signals(-rc).name})" if -rc in signal.Signals._value2member_map_ else "")
    if rc == 137:
        return "exit status 137 (killed, e.g. out of memory)"
    return (lines[-1][:300] if lines else "") or f"exit status {rc}"


# -- the status file ----------------------------------------------------------------------
def read_status(out: Path) -> dict[str, Any]:
    """``SWEEP_DIR/sweep.json`` (``{}`` when missing or damaged: the run directories are the truth)."""
    try:
        raw = json.loads((out / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or not isinstance(raw.get("points", {}), dict):
        return {}
    return raw


class Status:
    """``SWEEP_DIR/sweep.json``: each point's status, attempts, last error; written atomically."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        old = read_status(sweep.out).get("points", {})
        self.points: dict[str, dict[str, Any]] = {}
        for p in sweep.points:
            rec = old.get(p.name, {})
            rec = dict(rec) if isinstance(rec, dict) else {}  # a damaged entry: started afresh
            rec.update(settings=p.settings, dir=str(sweep.dir(p)), log=str(sweep.out / "logs" / f"{p.name}.log"))
            if not isinstance(rec.get("attempts"), int) or isinstance(rec.get("attempts"), bool):
                rec["attempts"] = 0
            if not isinstance(rec.get("status"), str):
                rec["status"] = "pending"
            self.points[p.name] = rec

    def set(self, name: str, **kw: Any) -> None:
        self.points[name].update(kw)
        self.save()

    def save(self) -> None:
        counts: dict[str, int] = {}
        for r in self.points.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        rundir.write_json(self.sweep.out / STATUS_FILE, {
            "sweep_file": str(self.sweep.path.absolute()), "updated": _now(), "counts": counts, "points": self.points})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- launchers ----------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the run gets SIGKILL when the process that started it dies (no orphaned runs
    holding a run directory's lock after the sweep was killed); its last checkpoint stays."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn(args: list[str], env: dict[str, str], log: Path, header: str, cwd: str | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n=== attempt {header} ({_now()}): python -m advplug {' '.join(args)}\n")
        f.flush()
        return subprocess.Popen([sys.executable, "-m", "advplug", *args], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **env}, cwd=cwd,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def run_point_command(args: list[str], env: dict[str, str], log: str, header: str, cwd: str | None) -> int:
    """One attempt, on whichever machine runs it (a Ray worker): the same subprocess as locally."""
    if cwd is not None and not os.path.isdir(cwd):
        cwd = None
    proc = _spawn(args, env, Path(log), header, cwd)
    try:
        return proc.wait()
    except BaseException:
        proc.kill()
        raise


class LocalLauncher:
    """``jobs`` runs at once as subprocesses of this process; ``gpus``: one GPU id per running
    run (``CUDA_VISIBLE_DEVICES``), ``jobs`` runs sharing them round-robin."""

    name = "local"

    def __init__(self, jobs: int, gpus: list[str] | None = None) -> None:
        self.capacity = jobs
        self.gpus = gpus or []
        self.procs: dict[str, tuple[subprocess.Popen, str | None]] = {}
        self.cpu_threads = max(1, (os.cpu_count() or 1) // jobs)

    def submit(self, key: str, p: Point, args: list[str], log: Path, header: str) -> None:
        env = dict(p.env)
        env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(self.cpu_threads)))
        gpu = None
        if self.gpus:
            used = [g for _, g in self.procs.values()]
            gpu = min(self.gpus, key=used.count)
            env["CUDA_VISIBLE_DEVICES"] = gpu
        self.procs[key] = (_spawn(args, env, log, header), gpu)

    def wait(self, timeout: float) -> list[tuple[str, int, str | None]]:
        end = time.monotonic() + timeout
        while True:
            done = [(k, pr.poll()) for k, (pr, _) in self.procs.items() if pr.poll() is not None]
            if done or time.monotonic() >= end:
                for k, _ in done:
                    del self.procs[k]
                return [(k, rc, None) for k, rc in done]
            time.sleep(0.2)

    def stop(self, grace: float = 30.0) -> None:
        """Ask every run to stop (SIGINT: it keeps its last checkpoint), then kill the stragglers."""
        for pr, _ in self.procs.values():
            if pr.poll() is None:
                pr.send_signal(signal.SIGINT)
        end = time.monotonic() + grace
        for pr, _ in self.procs.values():
            try:
                pr.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
        self.procs.clear()

    def close(self) -> None:
        pass


class RayLauncher:
    """Each attempt is a Ray task (``num_cpus``/``num_gpus`` from the point's resources) that runs
    the same ``python -m advplug train`` subprocess on the worker. The sweep directory must be on
    a file system every worker sees at the same path."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus: float | None = None, gpus: float | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise OptionError(RAY_MISSING) from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": address} if address else {"include_dashboard": False}
            ray.init(log_to_driver=False, **kw)
            self.started = True
        self.cpus, self.gpus = cpus, gpus
        self.capacity = 1 << 30  # Ray queues tasks until their resources are free
        self.remote = ray.remote(run_point_command)
        self.refs: dict[Any, str] = {}

    def submit(self, key: str, p: Point, args: list[str], log: Path, header: str) -> None:
        cpus = self.cpus if self.cpus is not None else p.cpus
        gpus = self.gpus if self.gpus is not None else p.gpus
        self._check_fits(cpus, gpus)
        ref = self.remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=0).remote(
            args, dict(p.env), str(log), header, os.getcwd())
        self.refs[ref] = key

    def _check_fits(self, cpus: float, gpus: float) -> None:
        """Warn once when no node has what a run asks for (its tasks would wait until one joins)."""
        if getattr(self, "_warned", False):
            return
        self._warned = True
        try:
            nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        except Exception:
            return
        if nodes and not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
            print(f"warning: no node of this Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) for one run "
                  "(--cpus/--gpus or the sweep file's resources); the runs wait until such a node joins",
                  file=sys.stderr)

    def wait(self, timeout: float) -> list[tuple[str, int, str | None]]:
        if not self.refs:
            time.sleep(min(timeout, 0.2))
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        out = []
        for ref in ready:
            key = self.refs.pop(ref)
            try:
                out.append((key, int(self.ray.get(ref)), None))
            except Exception as e:  # the worker died, the node was lost ...
                msg = [x for x in str(e).splitlines() if x.strip()]
                out.append((key, -1, f"ray: {type(e).__name__}: {msg[-1] if msg else ''}"[:300]))
        return out

    def stop(self, grace: float = 30.0) -> None:
        for ref in list(self.refs):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        self.refs.clear()

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class SlurmLauncher:
    """Each attempt is a SLURM job submitted with submitit (one task: ``cpus_per_task`` and
    ``gpus_per_node`` from the point's resources; the sweep file's ``[slurm]`` table is passed to
    ``AutoExecutor.update_parameters``, e.g. ``slurm_partition``, ``timeout_min``, ``mem_gb``;
    ``cluster = "local"`` or ``"debug"`` tries the sweep without SLURM). The job runs the same
    ``python -m advplug train`` subprocess; a job killed at its time limit is resumed from its
    checkpoint by the next attempt. The sweep directory must be on the cluster's shared file system."""

    name = "slurm"

    def __init__(self, folder: Path, params: dict[str, Any], cpus: float | None = None, gpus: float | None = None) -> None:
        try:
            import submitit
        except ImportError:
            raise OptionError(SUBMITIT_MISSING) from None
        params = dict(params)
        cluster = params.pop("cluster", None)
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        try:
            self.executor.update_parameters(**params)
        except (NameError, AssertionError, TypeError) as e:
            raise OptionError(f"[slurm]: {str(e).splitlines()[0]}") from None
        self.cpus, self.gpus = cpus, gpus
        self.capacity = 1 << 30  # the scheduler queues the jobs
        self.jobs: dict[str, Any] = {}

    def submit(self, key: str, p: Point, args: list[str], log: Path, header: str) -> None:
        cpus = self.cpus if self.cpus is not None else p.cpus
        gpus = self.gpus if self.gpus is not None else p.gpus
        self.executor.update_parameters(name=key, cpus_per_task=max(1, int(round(cpus))), gpus_per_node=int(round(gpus)))
        self.jobs[key] = self.executor.submit(run_point_command, args, dict(p.env), str(log), header, os.getcwd())

    def wait(self, timeout: float) -> list[tuple[str, int, str | None]]:
        end = time.monotonic() + timeout
        while True:
            out = []
            for key, job in list(self.jobs.items()):
                if job.done():
                    del self.jobs[key]
                    try:
                        out.append((key, int(job.result()), None))
                    except Exception as e:  # timeout, preemption, node failure
                        msg = [x for x in str(e).splitlines() if x.strip()]
                        out.append((key, -1, f"slurm: {type(e).__name__}: {msg[-1] if msg else ''}"[:300]))
            if out or time.monotonic() >= end:
                return out
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))

    def stop(self, grace: float = 30.0) -> None:
        for job in self.jobs.values():
            try:
                job.cancel(check=False)
            except Exception:
                pass
        self.jobs.clear()

    def close(self) -> None:
        pass


def make_launcher(name: str, jobs: int, address: str | None = None, cpus: float | None = None,
                  gpus: float | None = None, gpu_ids: list[str] | None = None, sweep: Sweep | None = None) -> Any:
    if name == "local":
        return LocalLauncher(jobs, gpu_ids)
    if name == "ray":
        return RayLauncher(address, cpus, gpus)
    if name == "slurm":
        if sweep is None:
            raise OptionError("--launcher slurm needs the sweep (its [slurm] table and directory)")
        return SlurmLauncher(sweep.out / "slurm", sweep.slurm, cpus, gpus)
    raise OptionError(f"unknown launcher {name!r} (local, ray, slurm)")


# -- running a sweep ----------------------------------------------------------------------
def dry_run(sweep: Sweep) -> list[str]:
    lines = [f"sweep {sweep.path} -> {sweep.out} ({len(sweep.points)} points)"]
    for p in sweep.points:
        kind, detail = state(p, sweep.dir(p))
        what = {"done": "finished", "new": "new run", "resume": "resume from last.pt", "overwrite": "start again (--overwrite)",
                "busy": "running elsewhere", "conflict": "conflict"}[kind]
        s = {k: v for k, v in p.settings.items()}
        lines.append(f"{p.name}  [{what}{': ' + detail if detail and kind == 'conflict' else ''}]  "
                     + json.dumps(s, sort_keys=True, default=str))
    return lines


def run_sweep(sweep: Sweep, launcher: Any, *, retries: int | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every point that is not finished; returns the status file's points."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    retries = sweep.retries if retries is None else retries
    lock = rundir.RunLock(sweep.out)
    try:
        lock.acquire()
    except RunDirError:
        raise RunDirError(f"sweep {str(sweep.out)!r} is being run by another advplug process; "
                          "watch it with `advplug sweep SWEEP.toml --report`") from None
    status = Status(sweep)
    (sweep.out / ".points").mkdir(exist_ok=True)
    queue: deque[Point] = deque()
    for p in sweep.points:
        rundir.write_json(sweep.out / ".points" / f"{p.name}.json", p.settings)
        kind, detail = state(p, sweep.dir(p))
        if kind == "done":
            status.points[p.name].update(status="done", last_error=None)
        elif kind == "busy":
            status.points[p.name].update(status="busy", last_error=detail)
        elif kind == "conflict":
            status.points[p.name].update(status="conflict", last_error=detail)
        else:
            status.points[p.name].update(status="pending")
            queue.append(p)
    status.save()
    n_done = sum(r["status"] == "done" for r in status.points.values())
    log(f"sweep {sweep.out}: {len(sweep.points)} points, {n_done} finished, {len(queue)} to run "
        f"({launcher.name} launcher)")
    tries: dict[str, int] = {}
    running: dict[str, tuple[Point, float]] = {}
    bar = _bar(len(sweep.points), n_done, progress)

    def say(msg: str) -> None:
        (bar.write if bar is not None else log)(msg)

    def refresh() -> None:
        if bar is not None:
            c = {s: sum(r["status"] == s for r in status.points.values()) for s in ("done", "running", "failed")}
            bar.n = c["done"]
            bar.set_postfix_str(f"done {c['done']}, running {c['running']}, failed {c['failed']}, queued {len(queue)}")
            bar.refresh()

    old_term = _on_sigterm()
    try:
        while queue or running:
            while queue and len(running) < launcher.capacity:
                p = queue.popleft()
                kind, detail = state(p, sweep.dir(p))  # again: another process may have moved it on
                if kind in ("done", "busy", "conflict"):
                    status.set(p.name, status=kind, last_error=detail or None)
                    continue
                tries[p.name] = tries.get(p.name, 0) + 1
                attempts = status.points[p.name]["attempts"] + 1
                action = {"new": "new run", "resume": "resume", "overwrite": "start again"}[kind]
                status.set(p.name, status="running", attempts=attempts, action=action, started=_now(), ended=None)
                launcher.submit(p.name, p, train_args(sweep, p, kind), sweep.out / "logs" / f"{p.name}.log",
                                f"{attempts} ({action})")
                running[p.name] = (p, time.monotonic())
                say(f"start {p.name} ({action}, attempt {tries[p.name]})")
                refresh()
            for name, rc, err in launcher.wait(1.0):
                p, t0 = running.pop(name)
                secs = time.monotonic() - t0
                if rc == 0 and (sweep.dir(p) / "results.json").is_file():
                    status.set(name, status="done", last_error=None, ended=_now(), seconds=round(secs, 1))
                    say(f"done  {name} ({secs:.0f} s)")
                else:
                    line = err or last_error(sweep.out / "logs" / f"{name}.log", rc)
                    again = tries[name] <= retries
                    status.set(name, status="pending" if again else "failed", last_error=line, ended=_now(),
                                seconds=round(secs, 1))
                    say(f"{'retry' if again else 'FAIL '} {name}: {line}")
                    if again:
                        queue.append(p)
                refresh()
    except KeyboardInterrupt:
        launcher.stop()
        for name in running:
            status.points[name].update(status="interrupted", ended=_now())
        status.save()
        raise Interrupted(f"sweep interrupted; {len(running)} run(s) stopped at their last checkpoint; "
                          f"run the same command again to continue") from None
    finally:
        signal.signal(signal.SIGTERM, old_term) if old_term is not None else None
        if bar is not None:
            bar.close()
        launcher.close()
        lock.release()
    return status.points


def _on_sigterm() -> Any:
    """SIGTERM (a scheduler's stop) stops the runs as Ctrl-C does, keeping their checkpoints."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(*_: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _bar(total: int, initial: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="run", desc="sweep", dynamic_ncols=True)


def summary(sweep: Sweep, points: dict[str, Any] | None = None) -> list[str]:
    """Counts, then one line per point that did not finish, with its last error line."""
    points = points if points is not None else Status(sweep).points
    live: dict[str, str] = {}
    for p in sweep.points:  # the run directories are the truth; the status file adds errors
        rec = points.get(p.name, {})
        kind, detail = state(p, sweep.dir(p))
        if kind == "done":
            live[p.name] = "done"
        elif kind in ("busy", "conflict"):
            live[p.name] = "running" if kind == "busy" else "conflict"
            pid = re.search(r"\(pid (\S+)\)", detail) if kind == "busy" else None
            rec = {**rec, "last_error": f"pid {pid.group(1)}" if pid else detail}
            points[p.name] = rec
        else:
            live[p.name] = rec.get("status", "pending") if rec.get("status") in ("failed", "interrupted") else (
                "interrupted" if kind == "resume" else "pending")
    counts = {s: sum(v == s for v in live.values()) for s in ("done", "running", "failed", "interrupted", "conflict", "pending")}
    lines = [f"{len(sweep.points)} points: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v or k == "done")]
    for name, s in live.items():
        if s != "done":
            err = points.get(name, {}).get("last_error")
            att = points.get(name, {}).get("attempts", 0)
            lines.append(f"  {s:<11} {name}" + (f" ({att} attempt{'s' * (att != 1)})" if att else "")
                         + (f": {err}" if err else ""))
    return lines


def report(sweep: Sweep, fmt: str = "markdown") -> tuple[str, list[str]]:
    """The compare table over the finished points, one table per combination of the non-seed
    grid axes (data sets...), mean ± std over seeds; and compare's warnings."""
    from advplug.tools.compare import compare

    groups: dict[str, list[str]] = {}
    skipped = []
    for p in sweep.points:
        kind, detail = state(p, sweep.dir(p))
        if kind == "conflict" and (sweep.dir(p) / "results.json").is_file():
            skipped.append(f"{p.name} left out of the table: {detail}")  # run under other settings
        elif kind == "done":
            key = ", ".join(f"{k.removeprefix('plugin:')} = {v}" for k, v in p.axes.items())
            groups.setdefault(key, []).append(str(sweep.dir(p)))
    if not groups:
        return "(no finished points yet)", skipped
    texts, warnings = [], list(skipped)
    for key, paths in groups.items():
        text, warn = compare(paths, fmt)
        texts.append((f"### {key}\n\n" if key and fmt == "markdown" else "") + text)
        warnings += warn
    return "\n\n".join(texts), warnings


__all__ = ["Point", "Sweep", "load_sweep", "expand", "point_name", "state", "run_sweep", "report", "summary",
           "dry_run", "make_launcher", "LocalLauncher", "RayLauncher", "SlurmLauncher"]
