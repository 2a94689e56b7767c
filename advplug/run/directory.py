"""Run directories: one run per directory, locked while a process writes to it, files written
so that a kill at any point leaves a state that ``--resume`` completes exactly.

Rules (the README's "Errors" section lists them for users):

* a new run refuses a directory that already holds a run (``--resume`` or ``--overwrite``);
  ``--overwrite`` removes every file of the old run first; a non-empty directory that holds no
  run is never touched;
* the default directory is ``runs/<plugins>-<objective>-seed<S>``, with ``-2``, ``-3``... when taken;
* one writer at a time: an advisory ``flock`` on ``RUN/.lock`` (released by the kernel when the
  process dies, so a killed run never leaves a stale lock);
* text files (``config.json``, ``metrics.jsonl``, ``results.json``, ``eval.json``) are replaced
  atomically (temp file + rename); temp files of interrupted writes are removed at start, once
  the lock is held (never those of a running writer).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from advplug.errors import RunDirError

# Files whose presence means "this directory holds an advplug run".
RUN_MARKERS = ("config.json", "last.pt", "best.pt", "metrics.jsonl", "results.json", "eval.json")
LOCK = ".lock"


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def _has_content(path: Path) -> bool:
    """Anything besides our own lock file and temp files of interrupted writes."""
    return any(p.name != LOCK and not (p.name.startswith(".") and ".tmp" in p.name) for p in path.iterdir())


def default_dir(plugins: tuple[str, ...], objective: str, seed: int, root: str | Path = "runs") -> Path:
    """``runs/<plugins>-<objective>-seed<S>``; ``-2``, ``-3``... if that directory is taken."""
    base = Path(root) / "-".join([*plugins, objective, f"seed{seed}"])
    path, k = base, 1
    while path.exists() and (holds_run(path) or _has_content(path)):
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def prepare(out: Path, *, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Check ``out`` for a new run (or a resumed one), create it, lock it, and only then clean it
    (``--overwrite``) and remove stale temp files: a refused second writer touches nothing of the
    process that holds the directory. Returns the held lock (the caller releases it)."""
    refuse_if_in_use(out)  # a live writer first: the checks below would misread its half-written files
    check_target(out, resume=resume, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test{os.getpid()}"  # a name of this process alone: no other writer's file
        probe.unlink(missing_ok=True)  # a planted symlink is removed, never written through
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to {str(out)!r}: {e.strerror or e}") from None
    lock = RunLock(out).acquire()
    try:
        check_target(out, resume=resume, overwrite=overwrite)  # again: it may have changed before we held it
        if overwrite and holds_run(out):
            clear(out)
        remove_stale_temps(out)
    except BaseException:
        lock.release()
        raise
    return lock


def in_use_message(out: Path, holder: str) -> str:
    return f"{str(out)!r} is in use by another advplug process (pid {holder}); wait for it to finish or stop it"


def refuse_if_in_use(out: Path) -> None:
    """Refuse ``out`` when another process holds its lock (reads only: a shared flock tried and dropped at once)."""
    import fcntl

    try:
        fd = os.open(Path(out) / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO never blocks
    except OSError:
        return  # no lock file (or none we can read): acquire() decides
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            raise RunDirError(in_use_message(out, holder)) from None
    finally:
        os.close(fd)  # drops the shared lock, if taken


def check_target(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse ``out`` for this run (reads only)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {str(out)!r} is a file, not a directory")
    if resume:
        if not (out / "last.pt").is_file():
            raise RunDirError(
                f"{str(out)!r} holds no checkpoint to resume (no last.pt): the run stopped before "
                "its first epoch ended; start it again with --overwrite"
            )
    elif holds_run(out):
        if not overwrite:
            raise RunDirError(
                f"{str(out)!r} already holds a run: continue it with `advplug train --resume {out}`, "
                "or replace it with --overwrite (deletes all its files)"
            )
    elif out.is_dir() and _has_content(out):
        raise RunDirError(f"{str(out)!r} is not empty and holds no advplug run: choose another --out")


def clear(out: Path) -> None:
    """Delete everything in ``out`` but ``out`` itself (it may be a symlink to the user's storage)
    and its lock (held by the caller); symlinks inside are removed, never followed, so nothing
    outside ``out`` is deleted."""
    for p in out.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete temp files that interrupted atomic writes left behind (they can be large)."""
    stale = [p for p in out.glob(".*.tmp*") if p.is_file() or p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def create_new(path: Path) -> int:
    """A descriptor of a new, empty file at ``path``, opened for writing. Never follows a symlink
    (a link planted in a run directory must not make advplug write outside it): whatever is at
    ``path`` is removed first, and ``O_EXCL | O_NOFOLLOW`` refuse anything that appears meanwhile."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


# errno values that mean the file system (or the user's share of it) is full
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def os_error_in(e: BaseException) -> OSError | None:
    """The ``OSError`` behind ``e``: itself, or one in its chain (torch's zip writer re-raises a
    failed write as a ``RuntimeError`` whose ``__context__`` is the ``OSError``)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def write_failure(e: OSError, what: str, path: Path, kept: str) -> str:
    """One line for a failed atomic write of ``path`` (``what``: "checkpoint" or ""); ``kept``
    says what is still there, e.g. "the previous checkpoint is intact"."""
    if e.errno in _FULL:
        return f"{_FULL[e.errno]} writing {str(path)!r} ({kept})"
    why = e.strerror or str(e).strip().splitlines()[0]
    if e.errno == errno.EFBIG:
        why = "file too large (a file-size limit: ulimit -f)"
    return f"cannot write {what + ' ' if what else ''}{str(path)!r}: {why}; {kept}"


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically: readers see the old file or the new one, never a mix. A
    symlink at ``path`` is replaced by the file, its target is never written."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with os.fdopen(create_new(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("mid-write", path.name)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "its previous version is intact" if path.exists() else "nothing was written"
        raise RunDirError(write_failure(e, "", path, kept)) from None


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def subdir(run: Path, name: str) -> Path:
    """``run/name`` (``report``, ``dumps``, ``tensorboard``), created; a symlink there is refused,
    so that files advplug writes for a run stay inside its directory."""
    d = Path(run) / name
    if d.is_symlink():
        raise RunDirError(
            f"{str(d)!r} is a symbolic link; advplug writes a run's files only inside its directory: remove it"
        )
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create {str(d)!r}: {e.strerror or e}") from None
    return d


def json_safe(v: Any) -> Any:
    """``v`` with what strict JSON cannot hold made explicit: non-finite floats (e.g. a schedule's
    ``inf``) become the strings ``"inf"``, ``"-inf"``, ``"nan"`` (JSON has no Infinity; Python's
    ``json`` would write one), tuples lists, keys strings, anything else unknown its ``str``."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


class RunLock:
    """Exclusive advisory lock on a run directory; a second writer gets a one-line error."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK
        self.fd: int | None = None
        self.holder: str | None = None  # after acquire() was refused: the pid the holding process wrote

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_NOFOLLOW: a planted ``.lock`` symlink must not make us truncate a file elsewhere
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            why = "it is a symbolic link; remove it" if e.errno == errno.ELOOP else (e.strerror or str(e))
            raise RunDirError(f"cannot lock {str(self.path.parent)!r}: {str(self.path)!r}: {why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                self.holder = holder
                raise RunDirError(in_use_message(self.path.parent, holder)) from None
            raise RunDirError(f"cannot lock {str(self.path.parent)!r}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# -- fault injection (tests): ADVPLUG_FAULT="point@where" raises InjectedFault there ----------
class InjectedFault(BaseException):
    """Raised at a named point when ``ADVPLUG_FAULT`` asks for it (a simulated kill: it is a
    BaseException so that no ``except Exception`` on the way recovers from it)."""


def fault_point(name: str, at: int | str) -> None:
    """``ADVPLUG_FAULT=after-last@1`` stops the run there in epoch 1 (0-based); ``mid-write@last.pt``
    while that file's temp file is written and not yet renamed. ``ADVPLUG_FAULT_EXIT=1`` makes it a
    hard ``os._exit(137)`` instead (no clean-up runs); ``ADVPLUG_FAULT_STOP=1`` a ``SIGSTOP`` of the
    process, once (a test resumes it with ``SIGCONT``)."""
    spec = os.environ.get("ADVPLUG_FAULT")
    if not spec:
        return
    point, _, where = spec.partition("@")
    if point != name or (where and where != str(at)):
        return
    if os.environ.get("ADVPLUG_FAULT_STOP"):
        import signal

        del os.environ["ADVPLUG_FAULT"]
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if os.environ.get("ADVPLUG_FAULT_EXIT"):
        os._exit(137)
    raise InjectedFault(f"{name}@{at}")
