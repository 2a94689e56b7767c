"""Multi-process runs (torchrun, 2 gloo CPU processes): exact resume with every rank's own RNG
stream, and workers that stop when their torchrun agent is killed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advplug.run import checkpoint

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(out: Path, *extra: str, env: dict | None = None, epochs: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "advplug",
        "train",
        *extra,
    ]
    if "--resume" not in extra:
        cmd += [
            "--epochs",
            str(epochs),
            "--milestones",
            "1",
            "--steps",
            "2",
            "--eval-steps",
            "2",
            "--n-eval",
            "32",
            "--no-progress",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env or ENV)


def test_resume_after_a_kill_is_exact_with_per_rank_rng(tmp_path):
    """Each rank draws its own PGD random starts; a resume that restored rank 0's RNG on every
    rank (the old behaviour) would diverge from the uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert torchrun(full).returncode == 0
    res = torchrun(part, env={**ENV, "ADVPLUG_FAULT": "after-metrics@0"})
    assert res.returncode != 0 and "InjectedFault" in res.stderr
    ck = checkpoint.load(part, need="training")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # the ranks' streams differ
    res = torchrun(part, "--resume", str(part))
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = checkpoint.load(full), checkpoint.load(part)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # resuming the 2-process run in one process would not continue exactly: refused
    res = subprocess.run(
        [sys.executable, "-m", "advplug", "train", "--resume", str(part)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert res.returncode == 2 and "written by 2 process(es), this run has 1" in res.stderr


def _workers(out: Path, agent: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != agent:
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(out) in cmd and "advplug" in cmd:
                pids.append(int(d.name))
    return pids


def test_workers_stop_when_the_torchrun_agent_is_killed(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "advplug",
        "train",
        "--epochs",
        "50",
        "--steps",
        "2",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.5)
        workers = _workers(out, agent.pid)
        assert len(workers) == 2, workers
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.time() + 10
        while time.time() < deadline and _workers(out, agent.pid):
            time.sleep(0.2)
        assert _workers(out, agent.pid) == []
    finally:
        for pid in _workers(out, agent.pid):
            os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()
