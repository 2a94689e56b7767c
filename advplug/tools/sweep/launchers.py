"""Launchers: how a sweep's attempts run. Each attempt is the same subprocess,
``python -m advplug train ...`` with its output appended to the point's log; ``local`` runs it
here (``--jobs`` at once, ``--gpu-ids`` spread over the runs), ``ray`` as a Ray task, ``slurm`` as
a SLURM job through submitit. A launcher has ``name``, ``capacity`` (runs at once), ``submit``,
``wait`` (finished attempts as ``(point name, exit status, launcher error)``), ``stop`` and ``close``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from advplug.errors import OptionError
from advplug.tools.sweep.spec import Point, Sweep
from advplug.tools.sweep.state import now

LAUNCHERS = ("local", "ray", "slurm")
RAY_MISSING = "--launcher ray needs Ray: pip install 'advplug[ray]' (or pip install 'ray>=2.9')"
SUBMITIT_MISSING = "--launcher slurm needs submitit: pip install 'advplug[slurm]' (or pip install 'submitit>=1.5')"


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
        f.write(f"\n=== attempt {header} ({now()}): python -m advplug {' '.join(args)}\n")
        f.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "advplug", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            cwd=cwd,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


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
            args, dict(p.env), str(log), header, os.getcwd()
        )
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
            print(
                f"warning: no node of this Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) for one run "
                "(--cpus/--gpus or the sweep file's resources); the runs wait until such a node joins",
                file=sys.stderr,
            )

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

    def __init__(
        self, folder: Path, params: dict[str, Any], cpus: float | None = None, gpus: float | None = None
    ) -> None:
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
        self.executor.update_parameters(
            name=key, cpus_per_task=max(1, int(round(cpus))), gpus_per_node=int(round(gpus))
        )
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


def make_launcher(
    name: str,
    jobs: int,
    address: str | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
    gpu_ids: list[str] | None = None,
    sweep: Sweep | None = None,
) -> Any:
    if name == "local":
        return LocalLauncher(jobs, gpu_ids)
    if name == "ray":
        return RayLauncher(address, cpus, gpus)
    if name == "slurm":
        if sweep is None:
            raise OptionError("--launcher slurm needs the sweep (its [slurm] table and directory)")
        return SlurmLauncher(sweep.out / "slurm", sweep.slurm, cpus, gpus)
    raise OptionError(f"unknown launcher {name!r} ({', '.join(LAUNCHERS)})")
