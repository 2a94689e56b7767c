"""A quick look at every installed method: a few epochs of each on the embedded digits data, then
the comparison table (what `advplug compare` prints). About 2-4 minutes on 2 CPU cores. A re-run
replaces the runs under --out.

    python examples/quick_compare.py                 # AT, TRADES and every plugin, one seed
    python examples/quick_compare.py --epochs 8 --seeds 3 --out runs/quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

from advplug.plugins import installed
from advplug.tools import api
from advplug.tools.compare import compare

# (label, plugins, objective); a method whose plugin is not installed is skipped, and every other
# installed plugin (third-party ones included) is added as "<name>" with the at objective
METHODS = [
    ("at", (), "at"),
    ("trades", (), "trades"),
    ("mart", (), "mart"),
    ("gairat", ("gairat",), "at"),
    ("mail", ("mail",), "at"),
    ("meow", ("meow",), "at"),
    ("lrat", ("lrat",), "at"),
    ("bat", ("bat",), "at"),
    ("bilaw", ("bilaw",), "at"),
    ("lrat+mail", ("lrat", "mail"), "at"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default="runs/quick-compare")
    args = ap.parse_args()
    have = set(installed())
    listed = {p for _, plugins, _ in METHODS for p in plugins}
    methods = METHODS + [(name, (name,), "at") for name in sorted(have - listed)]
    dirs = []
    for label, plugins, objective in methods:
        if not set(plugins) <= have:
            print(f"skip {label}: not installed")
            continue
        for seed in range(args.seeds):
            out = Path(args.out) / f"{label}-{objective}-seed{seed}"
            print(f"train {label} ({objective}), seed {seed} -> {out}", flush=True)
            api.train(  # its own directory: a re-run replaces it; lr drops follow --epochs
                data="digits",
                plugins=plugins,
                objective=objective,
                epochs=args.epochs,
                seed=seed,
                out=out,
                overwrite=True,
                log=None,
                final_attacks=("natural", "pgd20", "cw20"),
            )
            dirs.append(str(out))
    table, warnings = compare(dirs)
    print()
    print(table)
    for w in warnings:
        print("warning:", w)


if __name__ == "__main__":
    main()
