"""Data source names as a run's config records them: the built-in data sets, the user's own
(``folder:``, ``npz:``, ``module:``) and in-memory data from Python; made absolute, and checked
against what a saved run names."""

from __future__ import annotations

import os
from typing import Any

from advplug.errors import DataError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")
SOURCES = ("folder:PATH", "npz:PATH", "module:pkg.mod:callable")
PYTHON = "python"  # the data name of a run whose data came from Python (advplug.tools.api.train(data=...))


def is_custom(data: str) -> bool:
    return isinstance(data, str) and (data.startswith(("folder:", "npz:", "module:")) or data == PYTHON)


def normalise_source(data: str) -> str:
    """``folder:``/``npz:`` paths made absolute (a run's config then names the same files from any
    directory); ``module:`` checked for its ``pkg.mod:callable`` form; other names unchanged."""
    for kind in ("folder:", "npz:"):
        if data.startswith(kind):
            path = data[len(kind) :]
            if not path:
                raise DataError(f"--data {data}: give a path, e.g. {kind}./my-images")
            return kind + os.path.abspath(os.path.expanduser(path))
    if data.startswith("module:"):
        mod, sep, attr = data[len("module:") :].partition(":")
        if not (mod and sep and attr):
            raise DataError(f"--data {data}: expected module:pkg.mod:callable (a function returning (train, test))")
    return data


def needs_import(data: Any) -> bool:
    return isinstance(data, str) and data.startswith("module:")


def check_data_import(saved: Any, given: str | None) -> None:
    """Refuse a saved ``module:`` data source unless the user named the same one (code is imported
    only when the user names it, as for ``--model module:callable``)."""
    if needs_import(saved) and given != saved:
        raise DataError(
            f"this run's data {saved!r} is code to import; advplug imports code only when you name it: "
            f"add --data {saved}" + (f" (you gave {given!r})" if given else "")
        )
    if given is not None and given != saved and normalise_source(given) != saved:
        raise DataError(f"--data {given}: this run was trained on {saved!r}")
