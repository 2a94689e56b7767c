"""Ground-truth benchmark: do the reweighting methods weigh the samples their papers say?

Injects known samples into the embedded digits (flipped labels, atypical but correctly labelled
images, duplicates), trains every method on them in-process (AT, TRADES, MART and every installed
plugin, several seeds), and scores the per-sample weights of the ``--dump-weights`` files against
the flags. The definitions (transforms, weights, AUROC direction) are in the package docstring
(``benchmarks/groundtruth/__init__.py``). From the repository root:

    python -m benchmarks.groundtruth --out runs/groundtruth            # everything: 20 epochs, 5 seeds
    python -m benchmarks.groundtruth --methods at,bat,meow --seeds 2    # a subset
    python -m benchmarks.groundtruth --out runs/groundtruth --score-only --score-epochs 6,20

Writes ``OUT/groundtruth.{md,csv,json}``, ``OUT/plots/<method>.png`` and one run directory per
(method, seed) under ``OUT/runs/`` (each with ``injection.npz``: ``advplug report RUN_DIR`` draws
``roc.png``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.groundtruth.injection import TRANSFORMS
from benchmarks.groundtruth.runner import Settings, default_methods, run
from benchmarks.groundtruth.table import write_outputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.groundtruth",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", default=Settings.out, help="output folder (runs/, data/, plots/, groundtruth.{md,csv,json})"
    )
    p.add_argument("--methods", default="", help="comma-separated: at,trades,mart and plugin names (default: all)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--flip", type=float, default=Settings.flip)
    p.add_argument("--atypical", type=float, default=Settings.atypical)
    p.add_argument("--duplicate", type=float, default=Settings.duplicate)
    p.add_argument("--transform", choices=TRANSFORMS, default=Settings.transform)
    p.add_argument("--epochs", type=int, default=Settings.epochs)
    p.add_argument(
        "--steps", type=int, default=Settings.steps, help="PGD steps of the training attack (step 0.1, eps 0.2)"
    )
    p.add_argument(
        "--score-epochs", default="", help="comma-separated 1-based epochs (default: first reweighted and last)"
    )
    p.add_argument("--score-only", action="store_true", help="re-score existing runs under --out; train nothing")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = Settings(
        out=a.out,
        methods=tuple(m for m in a.methods.split(",") if m),
        seeds=tuple(range(a.seeds)),
        flip=a.flip,
        atypical=a.atypical,
        duplicate=a.duplicate,
        transform=a.transform,
        epochs=a.epochs,
        steps=a.steps,
        score_epochs=tuple(int(e) for e in a.score_epochs.split(",") if e),
    )
    if a.score_only:
        runs = {m: [Path(s.out) / "runs" / f"{m}-seed{k}" for k in s.seeds] for m in (s.methods or default_methods())}
        runs = {m: [d for d in ds if (d / "results.json").is_file()] for m, ds in runs.items()}
        runs = {m: ds for m, ds in runs.items() if ds}
    else:
        runs = {m: ds for m, ds in run(s, keep_going=True).items() if ds}
    write_outputs(runs, s)
    print((Path(s.out) / "groundtruth.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
