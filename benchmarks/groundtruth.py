"""Ground-truth benchmark (#18): do the reweighting methods weigh the samples their papers say?

Injects known samples into the embedded digits (flipped labels, atypical but correctly labelled
images, duplicates), trains every method on them in-process (AT, TRADES, MART and every installed
plugin, several seeds), and scores the per-sample weights of the ``--dump-weights`` files against
the flags. The definitions (transforms, weights, AUROC direction) are in ``advplug/groundtruth.py``.

    python benchmarks/groundtruth.py --out runs/groundtruth            # everything, 3 seeds
    python benchmarks/groundtruth.py --methods at,bat,meow --seeds 2    # a subset
    python benchmarks/groundtruth.py --out runs/groundtruth --score-only --score-epochs 2,5

Writes ``OUT/groundtruth.{md,csv,json}``, ``OUT/plots/<method>.png`` and one run directory per
(method, seed) under ``OUT/runs/`` (each with ``injection.npz``: ``advplug report RUN_DIR`` draws
``roc.png``).
"""
import sys

from advplug.groundtruth import main

if __name__ == "__main__":
    sys.exit(main())
