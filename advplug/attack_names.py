"""The names of evaluation attacks (``natural``, ``fgsm``, ``pgd20``, ``cw``, ``apgd-ce``, ``aa``): parsing,
the one spelling results are keyed by, and the names tables print. No torch: the run store and ``compare``
read and print attack names without loading the attacks."""

from __future__ import annotations

import re

from advplug.errors import OptionError, did_you_mean

_EVAL_RE = re.compile(r"^(natural|fgsm|pgd|cw|apgd-ce|aa)(\d+)?$")
EVAL_ATTACKS = "natural, fgsm, pgdK (e.g. pgd20), cw / cwK (CW-Linf margin, PGD-K), apgd-ce, aa (AutoAttack standard)"


def parse_eval_attack(spec: str) -> tuple[str, int | None]:
    m = _EVAL_RE.match(spec.lower())
    if not m:
        joined = re.sub(r"[-_ ]+(?=\d)", "", spec.lower())  # pgd-100 -> pgd100
        choices = [joined] if _EVAL_RE.match(joined) else ["natural", "fgsm", "pgd20", "cw20", "apgd-ce", "aa"]
        hint = did_you_mean(joined, choices)
        raise OptionError(f"unknown attack {spec!r} ({hint}choose from {EVAL_ATTACKS})")
    kind, steps = m.group(1), int(m.group(2)) if m.group(2) else None
    if kind in ("natural", "fgsm", "aa") and steps is not None:
        raise OptionError(f"attack {spec!r}: {kind} takes no step count")
    if steps is not None and steps < 1:
        raise OptionError(f"attack {spec!r}: steps must be >= 1")
    return kind, steps


def display_name(spec: str) -> str:
    kind, steps = parse_eval_attack(spec)
    return {
        "natural": "Natural",
        "fgsm": "FGSM",
        "pgd": f"PGD-{steps or 20}",
        "cw": f"CW-Linf margin (PGD-{steps or 20})",
        "apgd-ce": f"APGD-CE-{steps or 100}",
        "aa": "AutoAttack",
    }[kind]


def canonical_spec(spec: str) -> str:
    """The one spelling results are keyed by: lower case, the step count explicit (``pgd`` -> ``pgd20``)."""
    kind, steps = parse_eval_attack(spec)
    default = {"pgd": 20, "cw": 20, "apgd-ce": 100}.get(kind)  # as display_name and make_eval_attack default them
    return kind if default is None else f"{kind}{steps or default}"
