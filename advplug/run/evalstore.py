"""``RUN_DIR/eval.json``: evaluation results of a run, one entry per (checkpoint and its epoch,
attack, settings). ``advplug eval`` adds entries; re-running the same key replaces only that
entry, so a quick FGSM check never wipes minutes of AutoAttack."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from advplug.errors import DataError

FORMAT, VERSION = "advplug-eval", 2
SETTING_KEYS = ("data", "eps", "alpha", "backend", "n_test", "seed")


def entry_key(e: dict[str, Any]) -> str:
    return "|".join([f"{e['checkpoint']}@{e['epoch']}", e["attack"],
                     *(f"{k}={e[k]:.6g}" if isinstance(e[k], float) else f"{k}={e[k]}" for k in SETTING_KEYS)])


def entries_from_results(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of one ``evaluate_checkpoints`` result (or a pre-version-2 ``eval.json``)."""
    s = rec["settings"]
    out = []
    for which, res in rec["results"].items():
        for attack, acc in res.items():
            if attack == "epoch":
                continue
            out.append({"checkpoint": which, "epoch": int(res["epoch"]), "attack": attack, "accuracy": float(acc),
                        "data": s.get("data"), "eps": float(s["eps"]), "alpha": float(s["alpha"]),
                        "backend": s.get("backend", "torchattacks"), "n_test": int((s.get("n_test") or {}).get(attack, -1)),
                        "seed": int(s.get("seed", 0)), "n_total": s.get("n_total")})
    return out


# The type of each field of an entry (``None`` allowed where listed): checked on reading, so that a
# damaged or hand-edited file is one clear error, never a crash or a silently wrong ``compare``.
FIELDS: dict[str, tuple[type, ...]] = {
    "checkpoint": (str,), "epoch": (int,), "attack": (str,), "accuracy": (int, float), "data": (str, type(None)),
    "eps": (int, float), "alpha": (int, float), "backend": (str,), "n_test": (int,), "seed": (int,),
    "n_total": (int, type(None))}


def check_entry(e: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``e`` that is missing or of the wrong type or range."""
    import math

    if not isinstance(e, dict):
        raise ValueError(f"an entry is a {type(e).__name__}, not an object")
    for k, types in FIELDS.items():
        v = e.get(k, ...)
        if v is ... and k != "n_total":  # n_total: absent in entries of older versions
            raise ValueError(f"an entry has no {k!r}")
        if v is not ... and (isinstance(v, bool) or not isinstance(v, types)):
            want = "a number" if float in types else "a whole number" if int in types else "a string"
            raise ValueError(f"{k} {v!r} is not {want}{' or null' if type(None) in types else ''}")
    if not 0 <= e["accuracy"] <= 1:
        raise ValueError(f"accuracy {e['accuracy']!r} is not in [0, 1]")
    if not (math.isfinite(e["eps"]) and math.isfinite(e["alpha"])):
        raise ValueError(f"eps {e['eps']!r} / alpha {e['alpha']!r} is not finite")


def read(path: str | Path) -> dict[str, dict[str, Any]]:
    """Entries by key; ``{}`` if the file does not exist. Corrupt files give a one-line error."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        raw = json.loads(p.read_text())
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            entries = raw["entries"]
            if not isinstance(entries, dict):
                raise ValueError(f"'entries' is a {type(entries).__name__}, not an object")
        else:  # version 1: {"settings", "results"}
            entries = {entry_key(e): e for e in entries_from_results(raw)}
        for e in entries.values():
            check_entry(e)
        return dict(entries)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{str(p)!r} is corrupt: {type(e).__name__}: {e}") from None


def merge(path: str | Path, new: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add ``new`` entries to the file (same key: replaced), atomically."""
    from advplug.run.directory import write_json

    entries = read(path)
    for e in new:
        entries.pop(entry_key(e), None)  # re-inserted last: the most recent result wins ties in ``select``
        entries[entry_key(e)] = e
    write_json(Path(path), {"format": FORMAT, "version": VERSION, "entries": entries})
    return entries


def _samples(picked: list[dict[str, Any]]) -> str:
    """``all`` when every chosen entry saw the whole test set (as a training run's results do),
    else ``attack count`` per attack (``all`` for those that saw the whole set)."""
    full = [e.get("n_total") is not None and e["n_test"] == e["n_total"] for e in picked]
    if picked and all(full):
        return "all"
    return ", ".join(sorted({f"{e['attack']} {'all' if f else e['n_test']}" for e, f in zip(picked, full)}))


def select(entries: dict[str, dict[str, Any]], eps: float | None = None) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """For ``compare``: per checkpoint (best / last, its latest epoch) and attack, one accuracy.

    Preference among entries of the same checkpoint and attack: the run's own ``eps``, then
    the most test samples, then the most recent. Returns ``(results, settings)`` with the
    settings of the chosen entries (several values are joined, so ``compare`` flags them)."""
    latest: dict[str, int] = {}
    for e in entries.values():
        latest[e["checkpoint"]] = max(latest.get(e["checkpoint"], -1), int(e["epoch"]))
    chosen: dict[tuple[str, str], tuple[tuple, dict[str, Any]]] = {}
    for i, e in enumerate(entries.values()):
        if int(e["epoch"]) != latest[e["checkpoint"]]:
            continue
        rank = (eps is None or abs(e["eps"] - eps) < 1e-9, e["n_test"], i)
        k = (e["checkpoint"], e["attack"])
        if k not in chosen or rank > chosen[k][0]:
            chosen[k] = (rank, e)
    results: dict[str, dict[str, float]] = {}
    for (which, attack), (_, e) in chosen.items():
        results.setdefault(which, {})[attack] = e["accuracy"]
    picked = [e for _, e in chosen.values()]

    def joined(key: str) -> Any:
        vals = sorted({e[key] for e in picked}, key=str)
        return vals[0] if len(vals) == 1 else ", ".join(map(str, vals))

    settings = {"eval eps": joined("eps"), "eval step": joined("alpha"), "backend": joined("backend"),
                "test samples": _samples(picked)}
    return results, settings
