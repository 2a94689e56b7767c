"""Running a sweep: the dry run, the run loop, the tally of where it stands, and the report.

Each attempt is ``python -m advplug train --config SWEEP_DIR/.points/<name>.json --out
SWEEP_DIR/<name>`` (or ``--resume``), its output appended to ``SWEEP_DIR/logs/<name>.log``; a
failed point is tried again (resumed from its checkpoint when it has one) up to ``retries``
times; one failing point never stops the others. Points already finished, or running elsewhere,
are skipped (``state``).
"""

from __future__ import annotations

import json
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from advplug.errors import Interrupted, RunDirError
from advplug.run import directory as rundir
from advplug.tools.sweep.spec import Point, Sweep
from advplug.tools.sweep.state import Status, last_error, now, state

NOTHING_FINISHED = "(no finished points yet)"
# What each state is called in the dry run.
DRY_RUN_WORDS = {
    "done": "finished",
    "new": "new run",
    "resume": "resume from last.pt",
    "overwrite": "start again (--overwrite)",
    "busy": "running elsewhere",
    "conflict": "conflict",
}
ACTIONS = {"new": "new run", "resume": "resume", "overwrite": "start again"}
TALLY_STATES = ("done", "running", "failed", "interrupted", "conflict", "pending")


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


def dry_run(sweep: Sweep) -> list[str]:
    lines = [f"sweep {sweep.path} -> {sweep.out} ({len(sweep.points)} points)"]
    for p in sweep.points:
        st = state(p, sweep.dir(p))
        why = f": {st.detail}" if st.detail and st.kind == "conflict" else ""
        settings = json.dumps(p.settings, sort_keys=True, default=str)
        lines.append(f"{p.name}  [{DRY_RUN_WORDS[st.kind]}{why}]  {settings}")
    return lines


def run_sweep(
    sweep: Sweep,
    launcher: Any,
    *,
    retries: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every point that is not finished; returns the status file's points."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    retries = sweep.retries if retries is None else retries
    lock = rundir.RunLock(sweep.out)
    try:
        lock.acquire()
    except RunDirError:
        raise RunDirError(
            f"sweep {str(sweep.out)!r} is being run by another advplug process; "
            "watch it with `advplug sweep SWEEP.toml --report`"
        ) from None
    status = Status(sweep)
    (sweep.out / ".points").mkdir(exist_ok=True)
    queue: deque[Point] = deque()
    for p in sweep.points:
        rundir.write_json(sweep.out / ".points" / f"{p.name}.json", p.settings)  # read by `advplug train --config`
        st = state(p, sweep.dir(p))
        if st.kind == "done":
            status.points[p.name].update(status="done", last_error=None)
        elif st.kind in ("busy", "conflict"):
            status.points[p.name].update(status=st.kind, last_error=st.detail)
        else:
            status.points[p.name].update(status="pending")
            queue.append(p)
    status.save()
    n_done = sum(r["status"] == "done" for r in status.points.values())
    log(
        f"sweep {sweep.out}: {len(sweep.points)} points, {n_done} finished, {len(queue)} to run "
        f"({launcher.name} launcher)"
    )
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
                st = state(p, sweep.dir(p))  # again: another process may have moved it on
                if st.kind in ("done", "busy", "conflict"):
                    status.set(p.name, status=st.kind, last_error=st.detail or None)
                    continue
                tries[p.name] = tries.get(p.name, 0) + 1
                attempts = status.points[p.name]["attempts"] + 1
                action = ACTIONS[st.kind]
                status.set(p.name, status="running", attempts=attempts, action=action, started=now(), ended=None)
                launcher.submit(
                    p.name,
                    p,
                    train_args(sweep, p, st.kind),
                    sweep.out / "logs" / f"{p.name}.log",
                    f"{attempts} ({action})",
                )
                running[p.name] = (p, time.monotonic())
                say(f"start {p.name} ({action}, attempt {tries[p.name]})")
                refresh()
            for name, rc, err in launcher.wait(1.0):
                p, t0 = running.pop(name)
                secs = time.monotonic() - t0
                if rc == 0 and (sweep.dir(p) / "results.json").is_file():
                    status.set(name, status="done", last_error=None, ended=now(), seconds=round(secs, 1))
                    say(f"done  {name} ({secs:.0f} s)")
                else:
                    line = err or last_error(sweep.out / "logs" / f"{name}.log", rc)
                    again = tries[name] <= retries
                    status.set(
                        name,
                        status="pending" if again else "failed",
                        last_error=line,
                        ended=now(),
                        seconds=round(secs, 1),
                    )
                    say(f"{'retry' if again else 'FAIL '} {name}: {line}")
                    if again:
                        queue.append(p)
                refresh()
    except KeyboardInterrupt:
        launcher.stop()
        for name in running:
            status.points[name].update(status="interrupted", ended=now())
        status.save()
        raise Interrupted(
            f"sweep interrupted; {len(running)} run(s) stopped at their last checkpoint; "
            f"run the same command again to continue"
        ) from None
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
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


@dataclass
class Tally:
    """Where a sweep stands: each point's state (its run directory is the truth) and its record
    in the status file (attempts, last error)."""

    states: dict[str, str]  # point name -> one of TALLY_STATES
    records: dict[str, dict[str, Any]]

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(v == s for v in self.states.values()) for s in TALLY_STATES}

    def lines(self) -> list[str]:
        """Counts, then one line per point that did not finish, with its last error line."""
        head = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v or k == "done")
        lines = [f"{len(self.states)} points: {head}"]
        for name, s in self.states.items():
            if s != "done":
                err = self.records.get(name, {}).get("last_error")
                att = self.records.get(name, {}).get("attempts", 0)
                lines.append(
                    f"  {s:<11} {name}"
                    + (f" ({att} attempt{'s' * (att != 1)})" if att else "")
                    + (f": {err}" if err else "")
                )
        return lines


def tally(sweep: Sweep, points: dict[str, Any] | None = None) -> Tally:
    """The state of every point, from the run directories; the status file (or ``points``) adds
    attempts and errors; a busy point's error is the pid that holds it."""
    points = points if points is not None else Status(sweep).points
    states: dict[str, str] = {}
    for p in sweep.points:
        rec = points.get(p.name, {})
        st = state(p, sweep.dir(p))
        if st.kind == "done":
            states[p.name] = "done"
        elif st.kind in ("busy", "conflict"):
            states[p.name] = "running" if st.kind == "busy" else "conflict"
            points[p.name] = {**rec, "last_error": f"pid {st.pid}" if st.pid else st.detail}
        elif rec.get("status") in ("failed", "interrupted"):
            states[p.name] = rec["status"]
        else:
            states[p.name] = "interrupted" if st.kind == "resume" else "pending"
    return Tally(states, points)


def summary(sweep: Sweep, points: dict[str, Any] | None = None) -> list[str]:
    """Counts, then one line per point that did not finish, with its last error line."""
    return tally(sweep, points).lines()


def report(sweep: Sweep, fmt: str = "markdown") -> tuple[str, list[str]]:
    """The compare table over the finished points, one table per combination of the non-seed
    grid axes (data sets...), mean ± std over seeds, with the sweep's reported numbers beside them; and
    compare's warnings."""
    from advplug.tools.compare import compare
    from advplug.tools.reported import beside

    groups: dict[str, list[str]] = {}
    skipped = []
    for p in sweep.points:
        st = state(p, sweep.dir(p))
        if st.kind == "conflict" and (sweep.dir(p) / "results.json").is_file():
            skipped.append(f"{p.name} left out of the table: {st.detail}")  # run under other settings
        elif st.kind == "done":
            key = ", ".join(f"{k.removeprefix('plugin:')} = {v}" for k, v in p.axes.items())
            groups.setdefault(key, []).append(str(sweep.dir(p)))
    if not groups:
        return NOTHING_FINISHED, skipped
    texts, warnings = [], list(skipped)
    method_of = {str(sweep.dir(p)): p.method for p in sweep.points}
    for key, paths in groups.items():
        if sweep.reported:  # the papers' numbers beside ours (advplug.tools.reported)
            text, warn = beside(paths, fmt, sweep.reported, lambda path, cfg: method_of.get(path))
        else:
            text, warn = compare(paths, fmt)
        texts.append((f"### {key}\n\n" if key and fmt == "markdown" else "") + text)
        warnings += warn
    return "\n\n".join(texts), warnings
