"""Where a sweep's points stand: a point's state read from its run directory (the truth), the
reason an attempt failed read from its log, and the status file ``SWEEP_DIR/sweep.json``.

**Point states**: finished iff ``results.json`` exists and ``config.json`` holds the point's
settings (skipped; a finished run under other settings is a conflict and is left out of the
table); locked by another process (busy: reported with that process's pid, never duplicated);
interrupted iff ``last.pt`` exists (``advplug train --resume``); a run that stopped before its
first checkpoint (``--overwrite``); no run yet (a new run). A run directory whose ``config.json``
differs from the point's settings (the sweep file was edited) is a conflict: reported, never
overwritten.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advplug.config import RECORD_ONLY, build_config
from advplug.errors import RunDirError
from advplug.run import directory as rundir
from advplug.tools.sweep.spec import NAME_FREE, Point, Sweep

STATUS_FILE = "sweep.json"


@dataclass(frozen=True)
class PointState:
    """A point's state: ``kind`` (done, busy, conflict, resume, overwrite or new), ``detail`` (why,
    for busy, conflict and overwrite), ``pid`` (busy: the process holding the run's lock).
    Unpacks as ``kind, detail``."""

    kind: str
    detail: str = ""
    pid: str | None = None

    def __iter__(self) -> Iterator[str]:
        return iter((self.kind, self.detail))

    def __getitem__(self, i: int) -> str:
        return (self.kind, self.detail)[i]


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
    want = {k: v for k, v in _comparable(build_config(p.settings).resolved().to_json()).items() if v is not None}
    have = _comparable(saved)
    return [f"{k} {have.get(k)!r} (sweep: {want.get(k)!r})" for k in sorted(want) if have.get(k) != want.get(k)]


def _busy(run: Path) -> PointState | None:
    """Busy when another process holds ``run``'s lock (or it cannot be locked); None: free."""
    if not (run / rundir.LOCK).exists():
        return None
    lock = rundir.RunLock(run)
    try:
        lock.acquire().release()
    except RunDirError as e:
        return PointState("busy", str(e), lock.holder)
    return None


def state(p: Point, run: Path) -> PointState:
    """The state of point ``p``, whose run directory is ``run``."""
    if (run / "results.json").is_file():  # finished: counted only if it is this point's run
        diff = settings_differ(p, run)
        if diff:
            return PointState(
                "conflict",
                f"{run} holds a finished run with other settings: {'; '.join(diff[:3])}; "
                "move it away or give the sweep another out",
            )
        return PointState("done")
    busy = _busy(run)
    if busy:
        return busy
    if run.exists() and not run.is_dir():
        return PointState("conflict", f"{run} is a file")
    if rundir.holds_run(run):
        diff = settings_differ(p, run)
        if diff:
            return PointState(
                "conflict",
                f"{run} holds a run with other settings: {'; '.join(diff[:3])}; move it "
                "away or give the sweep another out",
            )
        if (run / "last.pt").is_file():
            return PointState("resume")
        return PointState("overwrite", "stopped before its first checkpoint")
    if run.is_dir() and rundir._has_content(run):
        return PointState("conflict", f"{run} is not empty and holds no advplug run")
    return PointState("new")


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
            lines = lines[i + 1 :]
            break
    for pat in (r"^error: ", r"^[\w.]*(Error|Exception|Interrupt|Fault)\b"):
        hits = [x for x in lines if re.match(pat, x)]
        if hits:
            return hits[-1][:300]
    if rc is not None and rc < 0:
        name = f" ({signal.Signals(-rc).name})" if -rc in signal.Signals._value2member_map_ else ""
        return f"killed by signal {-rc}{name}"
    if rc == 137:
        return "exit status 137 (killed, e.g. out of memory)"
    return (lines[-1][:300] if lines else "") or f"exit status {rc}"


def now() -> str:
    """The status file's and the logs' time stamps."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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
        rundir.write_json(
            self.sweep.out / STATUS_FILE,
            {"sweep_file": str(self.sweep.path.absolute()), "updated": now(), "counts": counts, "points": self.points},
        )
