"""Options are data: a plugin's hyperparameters are a frozen dataclass of ``opt(...)`` fields.

The CLI turns field ``gamma`` of plugin ``mail`` into ``--mail-gamma``; config files set the same
names; values are converted and validated here, with messages that say what is allowed.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import types
import typing
from typing import Any

from advplug.errors import OptionError, did_you_mean


def opt(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field with help text and bounds (``min``/``max`` inclusive, ``gt`` exclusive)."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


def option_name(field_name: str) -> str:
    """A field's option name: a Python keyword with PEP 8's trailing underscore (``lambda_``) is spelt without it."""
    bare = field_name[:-1]
    return bare if field_name.endswith("_") and keyword.iskeyword(bare) else field_name


def flag_name(prefix: str, field_name: str) -> str:
    name = option_name(field_name).replace("_", "-")
    return f"--{prefix.replace('_', '-')}-{name}"  # entry point my_method: --my-method-x


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) from an annotation such as ``float``, ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def parse_value(tp: Any, text: Any, flag: str) -> Any:
    """Convert ``text`` (a CLI string or a config-file value) to the field's type."""
    base, optional = _base_type(tp)
    if optional and (text is None or (isinstance(text, str) and text.lower() in ("none", "null", ""))):
        return None
    try:
        if base is bool:
            if isinstance(text, bool):
                return text
            low = str(text).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            return int(text)
        if base is float:
            return float(text)
        return base(text)
    except (TypeError, ValueError):
        raise OptionError(f"{flag}: expected {base.__name__}, got {text!r}") from None


def validate(options: Any, prefix: str) -> None:
    """Check every field of a filled-in Options instance against its bounds and choices."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        meta = f.metadata
        flag = flag_name(prefix, f.name)
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise OptionError(f"{flag}: {value!r} is not one of {', '.join(meta['choices'])}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and math.isnan(value):
                raise OptionError(f"{flag}: must be a number, got nan")
            if meta.get("min") is not None and value < meta["min"]:
                raise OptionError(f"{flag}: must be >= {meta['min']}, got {value}")
            if meta.get("max") is not None and value > meta["max"]:
                raise OptionError(f"{flag}: must be <= {meta['max']}, got {value}")
            if meta.get("gt") is not None and value <= meta["gt"]:
                raise OptionError(f"{flag}: must be > {meta['gt']}, got {value}")


def build_options(cls: type | None, prefix: str, values: dict[str, Any]) -> Any:
    """Instantiate ``cls`` from ``{field_name: raw value}``; unknown names are an error."""
    if cls is None:
        if values:
            raise OptionError(
                f"plugin {prefix!r} takes no options, got {', '.join(flag_name(prefix, k) for k in values)}"
            )
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, raw in values.items():
        name = name.replace("-", "_")
        name = name + "_" if keyword.iskeyword(name) else name  # --dafa-lambda: field lambda_
        if name not in fields:
            known = ", ".join(flag_name(prefix, n) for n in fields) or "none"
            hint = did_you_mean(flag_name(prefix, name), [flag_name(prefix, n) for n in fields])
            raise OptionError(f"unknown option {flag_name(prefix, name)} ({hint}options of {prefix!r}: {known})")
        kwargs[name] = parse_value(hints[name], raw, flag_name(prefix, name))
    try:
        options = cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise OptionError(f"options of {prefix!r}: {e}") from None
    validate(options, prefix)
    return options


def describe(cls: type | None) -> list[dict[str, Any]]:
    """Fields as dicts (name, type, default, help, bounds), for ``advplug plugins``."""
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        base, optional = _base_type(hints[f.name])
        out.append(
            {
                "name": f.name,
                "type": base.__name__ + (" | None" if optional else ""),
                "default": f.default,
                "help": f.metadata.get("help", ""),
                **{k: f.metadata[k] for k in ("min", "max", "gt", "choices") if f.metadata.get(k) is not None},
            }
        )
    return out
