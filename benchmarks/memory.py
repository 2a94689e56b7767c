"""Peak memory per method: advplug with the method against the method's hand-written twin (``benchmarks/twins``).

Each contender runs in a fresh subprocess (nothing allocated by the other, no allocator cache shared) the same few
training steps on the same batches, after the same set-up (the run's ``Trainer``: model, data, optimizer); a twin
trains a copy of that model with its own optimizer. What is measured, on both devices alike, is the **peak of the
memory allocated during the steps above what was allocated just before the first one**: activations, attack
iterates, gradients, the optimizer's and the plugins' lazily made state (momentum, per-sample histories), and
anything a step keeps alive. The model, the data and the set-up are before the baseline and count for neither.

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` at the start (after
  ``reset_peak_memory_stats``); the caching allocator's counts of live tensor blocks.
* CPU: the profiler's memory events (``torch.profiler.profile(profile_memory=True)``): torch's CPU allocator reports
  every allocation and free with its size while it profiles; the running sum of those events is the live tensor
  memory above the baseline, and its maximum the peak. Unlike peak RSS (which includes the Python heap, glibc's
  arenas and pages never returned, and is a high-water mark of the whole process), it counts tensor storage only and
  is exact; ``--check`` verifies it on allocations of known size (a buffer, and an MLP's forward, whose activations
  are computed by hand).

    python benchmarks/memory.py --plugin all                       # every method with a twin, digits
    python benchmarks/memory.py --plugin mail --shape cifar --n 64 --batch-size 32 --attack-steps 2
    python benchmarks/memory.py --check                            # the CPU measurement on known sizes

Prints, per method, advplug's and the twin's peak and their ratio (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.10


# -- the measurement ----------------------------------------------------------------------------------------------
def cpu_peak(events: list[tuple[int, int]]) -> int:
    """Peak of the running sum of ``(time, bytes)`` allocation (+) and free (-) events, from 0."""
    live = peak = 0
    for _, n in sorted(events):
        live += n
        peak = max(peak, live)
    return peak


def measure(run: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """``run()``'s peak allocated bytes above those allocated before it (see the module's docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak": peak - base, "baseline": base, "how": "torch.cuda.max_memory_allocated"}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return {"peak": cpu_peak(events), "baseline": None, "how": "profiler memory events"}


def check() -> None:
    """The CPU measurement on allocations whose size is known."""
    dev = torch.device("cpu")
    n = 1_000_000
    got = measure(lambda: torch.empty(n).fill_(1), dev)["peak"]
    print(f"torch.empty({n}) float32: measured {got} bytes, expected {4 * n}")
    b, d, h, k = 64, 100, 256, 10
    mlp = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, k))
    x = torch.randn(b, d)

    def forward() -> None:
        with torch.no_grad():
            mlp(x)

    got = measure(forward, dev)["peak"]
    # Linear(d, h) out [b, h] and ReLU's out [b, h] live together, then the first is freed before Linear(h, k)
    want = max(2 * 4 * b * h, 4 * b * h + 4 * b * k)
    print(f"MLP {d}-{h}-{k} forward of {b} samples (no grad): measured {got} bytes, expected {want} (2 x [{b}, {h}])")


# -- one contender, in its own process ----------------------------------------------------------------------------
def run_config(method: str, shape: str, n: int, batch_size: int, attack_steps: int, device: str) -> Any:
    """The ``TrainConfig`` of the measured run: the method's settings (``advplug_settings``) on the benchmark's
    model and data."""
    from advplug.config import TrainConfig

    settings = twin_registry()["advplug_settings"](method)
    digits = shape == "digits"
    return TrainConfig(
        data="digits",
        model="digits-cnn" if digits else "preactresnet18",
        epochs=1000,
        batch_size=batch_size,
        lr=0.01,
        milestones=(),
        eps=0.2 if digits else 8 / 255,
        alpha=0.05 if digits else 2 / 255,
        steps=attack_steps,
        device=device,
        progress=False,
        out=f"/tmp/advplug-bench-memory/{method}",
        n_eval=16,
        selection="test",
        **settings,
    )


def twin_registry() -> dict[str, Any]:
    """``benchmarks.twins``' registry (the repository root on the path, as when run from anywhere)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import twins

    return {"TWINS": twins.TWINS, "advplug_settings": twins.advplug_settings, "make_twin": twins.make_twin}


def contender(args: argparse.Namespace) -> dict[str, Any]:
    """Set up ``args.method`` (advplug's trainer; the twin on a copy of its model), then measure ``args.steps``
    training steps of ``args.side`` on the trainer's first batches."""
    sys.path.insert(0, str(ROOT))
    from advplug.engine.trainer import Trainer
    from benchmarks.overhead import bundle

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = run_config(args.method, args.shape, args.n, args.batch_size, args.attack_steps, args.device)
    t = Trainer(cfg, data=bundle(args.shape, args.n), log=lambda s: None, overwrite=True)
    loader = t.loader
    loader.set_epoch(0)
    batches = [b for _, b in zip(range(args.steps), loader)]
    if args.side == "advplug":
        t.runtime.net.train()

        def steps() -> None:
            for k, (x, y, i) in enumerate(batches):
                t.step(x, y, i, 0, k)

    else:
        twin = twin_registry()["make_twin"](args.method, t)
        twin.model.train()

        def steps() -> None:
            for x, y, i in batches:
                twin.step(x, y, i, 0)

    out = measure(steps, t.device)
    t.close()
    return {"method": args.method, "side": args.side, "device": str(t.device), **out}


def spawn(args: argparse.Namespace, method: str, side: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        side,
        "--plugin",
        method,
        "--shape",
        args.shape,
        "--n",
        str(args.n),
        "--batch-size",
        str(args.batch_size),
        "--attack-steps",
        str(args.attack_steps),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ]
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"{method} ({side}) failed:\n{res.stderr[-2000:]}")
    return json.loads(lines[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", action="append", default=[], help="a method with a twin (at, trades, mail ...) or all")
    ap.add_argument("--shape", choices=["digits", "cifar"], default="digits")
    ap.add_argument("--n", type=int, default=256, help="samples for --shape cifar")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="training steps measured")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check", action="store_true", help="the CPU measurement on allocations of known size")
    ap.add_argument("--child", choices=["advplug", "twin"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.check:
        check()
        return
    if args.child:
        args.method, args.side = args.plugin[0], args.child
        print(json.dumps(contender(args)))
        return
    methods = args.plugin or ["at"]
    if "all" in methods:
        methods = list(twin_registry()["TWINS"])
    print(
        f"{args.shape}, batch {args.batch_size}, PGD-{args.attack_steps}, {args.steps} steps on {args.device}; "
        "peak allocated above the baseline before the first step, MiB (each contender in a fresh process)"
    )
    print(f"{'method':<10} {'advplug':>9} {'twin':>9} {'ratio':>7}")
    for method in methods:
        a, t = spawn(args, method, "advplug"), spawn(args, method, "twin")
        ratio = a["peak"] / max(t["peak"], 1)
        flag = "" if ratio <= TARGET else f"  > {TARGET}"
        print(f"{method:<10} {mib(a['peak']):>9} {mib(t['peak']):>9} {ratio:7.3f}{flag}", flush=True)
    print(f"measured with {a['how']}")


if __name__ == "__main__":
    main()
