"""Errors that the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdvplugError(Exception):
    """Base class: anything the user can fix (bad option, missing data, ...)."""


class PluginError(AdvplugError):
    """Unknown plugin, import failure, conflicting plugins, bad hook implementation."""


class CompositionError(PluginError):
    """Plugins that cannot run together; ``short`` says why in a few words (the pair table, docs/pairs.md)."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short


class OptionError(AdvplugError):
    """An invalid or misplaced option value."""


class DataError(AdvplugError):
    """A data set that cannot be found or read."""


class CheckpointError(AdvplugError):
    """A checkpoint that is missing, corrupt or belongs to another model."""


class NonFiniteLossError(AdvplugError):
    """The loss became NaN or Inf; training stopped."""


class RunDirError(AdvplugError):
    """A run directory that cannot be used: holds another run, is locked, is not writable."""


class Interrupted(AdvplugError):
    """Training was interrupted (Ctrl-C); the message names the last checkpoint and the resume command."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean X? "`` for the choice closest to a mistyped ``word`` (difflib), else ``""``: the hint that
    opens the parenthesis of an "unknown ..." message."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]}? " if close else ""
