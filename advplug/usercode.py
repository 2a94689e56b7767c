"""Importing code the user named (``--model pkg.mod:fn``, ``--data module:pkg.mod:fn``): the one
place advplug imports code that is not an installed plugin, and only when the user asked for it
on the command line, in a config file they passed, or from Python; never because a run
directory or a checkpoint names it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def import_callable(
    spec: str, option: str, value: str, allow_import: bool, error: type[Exception]
) -> Callable[..., Any]:
    """``pkg.mod:attr`` imported, for ``--<option> <value>`` as the user writes it."""
    if not allow_import:
        raise error(
            f"{option} {value!r} is code to import; advplug imports code only when you name it: "
            f"repeat --{option} {value}"
        )
    mod, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise error(f"--{option} {value}: cannot import ({e})") from None
