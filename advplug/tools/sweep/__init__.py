"""``advplug sweep SWEEP.toml``: a grid of training runs (methods x seeds x settings), one run
directory per point, run by a launcher (``local`` subprocesses, a Ray cluster, SLURM through
submitit), resumable, and summarised as the ``compare`` table.

``spec``: the sweep file, its points and their names; ``state``: a point's state from its run
directory, and the status file ``SWEEP_DIR/sweep.json``; ``launchers``: how attempts run;
``runner``: the run loop, dry run, tally and report.
"""

from advplug.tools.sweep.launchers import (
    LAUNCHERS,
    RAY_MISSING,
    SUBMITIT_MISSING,
    LocalLauncher,
    RayLauncher,
    SlurmLauncher,
    make_launcher,
)
from advplug.tools.sweep.runner import NOTHING_FINISHED, Tally, dry_run, report, run_sweep, summary, tally, train_args
from advplug.tools.sweep.spec import Point, Sweep, expand, load_sweep, point_name
from advplug.tools.sweep.state import STATUS_FILE, PointState, last_error, state

__all__ = [
    "LAUNCHERS",
    "NOTHING_FINISHED",
    "RAY_MISSING",
    "STATUS_FILE",
    "SUBMITIT_MISSING",
    "LocalLauncher",
    "Point",
    "PointState",
    "RayLauncher",
    "SlurmLauncher",
    "Sweep",
    "Tally",
    "dry_run",
    "expand",
    "last_error",
    "load_sweep",
    "make_launcher",
    "point_name",
    "report",
    "run_sweep",
    "state",
    "summary",
    "tally",
    "train_args",
]
