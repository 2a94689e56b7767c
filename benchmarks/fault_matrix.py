"""Fault matrix: kill ``advplug train`` with SIGKILL at random moments (and at each named point of
the epoch end), resume until done, and check the invariants against an uninterrupted run:

* the final ``last.pt`` weights equal the uninterrupted run's, bit for bit;
* ``metrics.jsonl`` holds every epoch once, equal to the uninterrupted run's (timings aside);
* ``best.pt`` (as ``eval`` reads it) is the recorded best epoch;
* ``results.json`` equals the uninterrupted run's (evaluation is seeded);
* no temp files are left behind.

    python benchmarks/fault_matrix.py --random 12 --epochs 4

Prints one row per scenario: scenario, expected, observed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from advplug.run import checkpoint


def train_cmd(out: Path, epochs: int, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "advplug", "train"]
    if resume:
        return base + ["--resume", str(out), "--no-progress"]
    return base + [
        "--epochs",
        str(epochs),
        "--milestones",
        str(max(1, epochs // 2)),
        "--steps",
        "2",
        "--eval-steps",
        "2",
        "--n-eval",
        "64",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


def records(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("seconds", None)
    return recs


def check(out: Path, ref: Path) -> str:
    problems = []
    a, b = checkpoint.load(ref, need="training"), checkpoint.load(out, need="training")
    if not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]):
        problems.append("weights differ")
    if records(out) != records(ref):
        problems.append(f"metrics differ (epochs {[r['epoch'] for r in records(out)]})")
    if checkpoint.load_best(out)["epoch"] != b["best_epoch"]:
        problems.append("best.pt is not the recorded best")
    if json.loads((out / "results.json").read_text()) != json.loads((ref / "results.json").read_text()):
        problems.append("results.json differs")
    if list(out.glob(".*.tmp*")):
        problems.append("temp files left")
    return "; ".join(problems) or "ok"


def run_to_end(out: Path, epochs: int, env: dict, kill_after: float | None = None) -> int:
    """Start (or resume) training; SIGKILL after ``kill_after`` seconds. Returns the kill count."""
    kills = 0
    resume = False
    while True:
        proc = subprocess.Popen(
            train_cmd(out, epochs, resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                kill_after = None  # one random kill per scenario; the resume runs to the end
                resume = (out / "last.pt").exists()
                if not resume:
                    shutil.rmtree(out, ignore_errors=True)
                continue
        else:
            proc.wait()
        if proc.returncode != 0 and not (out / "results.json").exists():
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise SystemExit(f"training failed: {err[-1] if err else proc.returncode}")
        return kills


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random", type=int, default=12, help="random SIGKILLs (one per scenario)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(tempfile.mkdtemp(prefix="advplug-faults-"))
    ref = root / "ref"
    t0 = time.perf_counter()
    run_to_end(ref, a.epochs, env)
    span = time.perf_counter() - t0
    rows = []
    for point in ("before-last", "after-last", "after-best", "after-metrics"):
        out = root / point
        e = {**env, "ADVPLUG_FAULT": f"{point}@1", "ADVPLUG_FAULT_EXIT": "1"}
        subprocess.run(train_cmd(out, a.epochs, False), env=e, capture_output=True)
        run_to_end(out, a.epochs, env) if not (out / "last.pt").exists() else subprocess.run(
            train_cmd(out, a.epochs, True), env=env, capture_output=True
        )
        rows.append((f"os._exit at {point}, epoch 2", "resume = uninterrupted", check(out, ref)))
    for i in range(a.random):
        out = root / f"random{i}"
        at = rng.uniform(0.3, span)
        run_to_end(out, a.epochs, env, kill_after=at)
        rows.append((f"SIGKILL after {at:.1f} s of {span:.1f} s", "resume = uninterrupted", check(out, ref)))
    print("| scenario | expected | observed |\n| --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
