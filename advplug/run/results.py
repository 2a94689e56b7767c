"""Evaluation results of a run, one entry with fields per (checkpoint, attack, settings): the training
run's final evaluation (``RUN_DIR/results.json``) and ``advplug eval``'s (``RUN_DIR/eval.json``, where
re-running the same key replaces only that entry, so a quick FGSM check never wipes minutes of
AutoAttack). A run's results are both files merged by key, ``eval.json``'s entry replacing the
``results.json`` one of the same key (``read_run``). This module owns both files: entries are made,
written, read (older versions too), checked and chosen here, and turned into display strings only
to be printed.

An entry::

    {"checkpoint": "best", "epoch": 8, "attack": "pgd20", "precision": "fp32", "backend": "torchattacks",
     "accuracy": 0.52, "eps": 0.031, "alpha": 0.0078, "n_test": 10000, "n_total": 10000, "data": "cifar10",
     "seed": 0}

``checkpoint``: best, last, best-ema, last-ema (``checkpoint`` for a file given by path); ``epoch``:
1-based; ``attack``: the canonical spec (``attacks.canonical_spec``); ``precision``: the autocast the
attack ran under (fp32, or after low-precision training also the run's bf16 / fp16: a gap shows
gradient masking); ``n_test``: the test samples it saw, ``n_total``: the size of the test set;
``per_class`` (entries written since it was added): the accuracy per class ``[K]`` from the same
predictions, ``null`` for a class without test samples.

Both files are ``{"format": "advplug-results", "version": 3, "entries": {key: entry}}``;
``results.json`` also holds the training's ``cost`` (``read_cost``: wall time, forward / backward
passes, peak memory, device). Older files
still read: ``results.json`` version 1 (``{"last (epoch 20)": {"Natural": 0.9, "PGD-20 (bf16 eval)":
...}}``), ``eval.json`` version 1 (``{"settings", "results"}``) and 2 (entries whose ``attack`` is a
display name, ``format`` ``advplug-eval``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from advplug.attack_names import canonical_spec, display_name
from advplug.errors import DataError, OptionError
from advplug.run.directory import write_json

FORMAT, VERSION = "advplug-results", 3
CHECKPOINTS = ("best", "last", "best-ema", "last-ema")  # -ema: the EMA weights of runs trained with --ema
SETTING_KEYS = ("precision", "data", "eps", "alpha", "backend", "n_test", "seed")

# The type of each field of an entry (``None`` allowed where listed): checked on reading, so that a
# damaged or hand-edited file is one clear error, never a crash or a silently wrong ``compare``.
_V2_FIELDS: dict[str, tuple[type, ...]] = {
    "checkpoint": (str,),
    "epoch": (int,),
    "attack": (str,),
    "accuracy": (int, float),
    "data": (str, type(None)),
    "eps": (int, float),
    "alpha": (int, float),
    "backend": (str,),
    "n_test": (int,),
    "seed": (int,),
    "n_total": (int, type(None)),
}
FIELDS = {**_V2_FIELDS, "precision": (str,), "n_test": (int, type(None))}  # n_test None: not recorded (version 1)
PRECISIONS = ("fp32", "bf16", "fp16")
COST_NUMBERS = ("train_seconds", "forward_passes", "backward_passes", "peak_memory_bytes")  # what compare --cost reads


def entry(
    checkpoint: str,
    epoch: int,
    attack: str,
    accuracy: float,
    *,
    precision: str = "fp32",
    backend: str = "torchattacks",
    eps: float,
    alpha: float,
    n_test: int | None,
    n_total: int | None,
    data: str | None,
    seed: int,
    per_class: list[float | None] | None = None,
) -> dict[str, Any]:
    """A result entry (the fields above); ``per_class``: the accuracy per class from the same predictions
    (``evaluate``'s ``per_class``; ``None`` for a class absent from the test samples), left out when not given."""
    return {
        "checkpoint": checkpoint,
        "epoch": epoch,
        "attack": attack,
        "precision": precision,
        "backend": backend,
        "accuracy": accuracy,
        "eps": eps,
        "alpha": alpha,
        "n_test": n_test,
        "n_total": n_total,
        "data": data,
        "seed": seed,
    } | ({"per_class": per_class} if per_class is not None else {})


def key(e: dict[str, Any]) -> str:
    """What makes an entry: the same key is the same evaluation (its later result replaces it)."""
    return "|".join(
        [
            f"{e['checkpoint']}@{e['epoch']}",
            e["attack"],
            *(f"{k}={e[k]:.6g}" if isinstance(e[k], float) else f"{k}={e[k]}" for k in SETTING_KEYS),
        ]
    )


# -- display: made only when printing ----------------------------------------------------------------
def label(e: dict[str, Any]) -> str:
    """The attack as tables show it: ``PGD-20``, ``PGD-20 (bf16 eval)``, ``PGD-20 (ART)``."""
    text = display_name(e["attack"])
    if e["precision"] != "fp32":
        text += f" ({e['precision']} eval)"
    return text + (" (ART)" if e["backend"] == "art" else "")


def row(e: dict[str, Any]) -> str:
    return f"{e['checkpoint']} (epoch {e['epoch']})"


def by_row(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{"last (epoch 20)": {"Natural": 0.9, "PGD-20": 0.5, ...}, ...}``: the printed table as data."""
    out: dict[str, dict[str, float]] = {}
    for e in entries:
        out.setdefault(row(e), {})[label(e)] = e["accuracy"]
    return out


def results_table(entries: list[dict[str, Any]], title: str = "") -> str:
    """``entries`` as an aligned text table (accuracy %), one row per checkpoint."""
    results = by_row(entries)
    rows = list(results)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in results[r] if c not in cols]
    head = ["checkpoint", *cols]
    body = [[r, *(f"{100 * results[r][c]:.2f}" if c in results[r] else "-" for c in cols)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [title] if title else []
    out += [line(head), line(["-" * w for w in widths]), *(line(b) for b in body)]
    return "\n".join(out)


# -- checking and older versions ---------------------------------------------------------------------
def check(e: Any, fields: dict[str, tuple[type, ...]] = FIELDS) -> None:
    """Raise ``ValueError`` naming the first field of ``e`` that is missing or of the wrong type or range."""
    if not isinstance(e, dict):
        raise ValueError(f"an entry is a {type(e).__name__}, not an object")
    for k, types in fields.items():
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
    if "per_class" in e:
        _check_per_class(e["per_class"])
    if fields is FIELDS:
        if e["precision"] not in PRECISIONS:
            raise ValueError(f"precision {e['precision']!r} is not one of {', '.join(PRECISIONS)}")
        if _spec(e["attack"]) != e["attack"]:
            raise ValueError(f"attack {e['attack']!r} is not an attack spec (e.g. pgd20)")


def _check_per_class(pc: Any) -> None:
    """``per_class``: a list of accuracies in [0, 1], ``null`` for a class without test samples."""
    ok = isinstance(pc, list) and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1) for v in pc
    )
    if not ok:
        raise ValueError(f"per_class {pc!r} is not a list of accuracies in [0, 1] (or null)")


def _spec(attack: str) -> str | None:
    try:
        return canonical_spec(attack)
    except OptionError:
        return None


# Display names of versions 1 and 2, as ``display_name`` made them, back to specs.
_NAMED = [
    (re.compile(p), s)
    for p, s in (
        (r"Natural", "natural"),
        (r"FGSM", "fgsm"),
        (r"PGD-(\d+)", "pgd"),
        (r"CW-Linf margin \(PGD-(\d+)\)", "cw"),
        (r"APGD-CE-(\d+)", "apgd-ce"),
        (r"AutoAttack", "aa"),
    )
]
_SUFFIX = re.compile(r"^(.*?)(?: \((fp32|bf16|fp16) eval\))?(?: \(ART\))?$")


def _from_display(name: str) -> tuple[str, str]:
    """``"PGD-20 (bf16 eval)"`` -> ``("pgd20", "bf16")``; ``ValueError`` for a name no advplug wrote."""
    m = _SUFFIX.match(name)
    base, precision = m.group(1), m.group(2) or "fp32"
    for pattern, kind in _NAMED:
        n = pattern.fullmatch(base)
        if n is not None:
            spec = kind + "".join(n.groups())
            if display_name(spec) == base:
                return spec, precision
    raise ValueError(f"attack {name!r} is not an attack advplug evaluates")


def _upgrade(e: dict[str, Any]) -> dict[str, Any]:
    """A version-2 entry (a display name for an attack) as a version-3 one."""
    attack, precision = _from_display(e["attack"])
    return entry(
        e["checkpoint"],
        e["epoch"],
        attack,
        e["accuracy"],
        precision=precision,
        backend=e["backend"],
        eps=e["eps"],
        alpha=e["alpha"],
        n_test=e["n_test"],
        n_total=e.get("n_total"),
        data=e["data"],
        seed=e["seed"],
    )


def _from_eval_v1(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of an ``eval.json`` of version 1: ``{"settings": ..., "results": {which: {attack: acc,
    "epoch": E}}}``."""
    s = rec["settings"]
    out = []
    for which, res in rec["results"].items():
        for attack, acc in res.items():
            if attack == "epoch":
                continue
            out.append(
                {
                    "checkpoint": which,
                    "epoch": int(res["epoch"]),
                    "attack": attack,
                    "accuracy": float(acc),
                    "data": s.get("data"),
                    "eps": float(s["eps"]),
                    "alpha": float(s["alpha"]),
                    "backend": s.get("backend", "torchattacks"),
                    "n_test": int((s.get("n_test") or {}).get(attack, -1)),
                    "seed": int(s.get("seed", 0)),
                    "n_total": s.get("n_total"),
                }
            )
    return out


def _entries(raw: Any) -> dict[str, dict[str, Any]]:
    """The entries of a version-3 document, checked, by key."""
    entries = raw["entries"]
    if not isinstance(entries, dict):
        raise ValueError(f"'entries' is a {type(entries).__name__}, not an object")
    for e in entries.values():
        check(e)
    return {key(e): e for e in entries.values()}


# -- eval.json ---------------------------------------------------------------------------------------
def read_evals(path: str | Path) -> dict[str, dict[str, Any]]:
    """``eval.json``'s entries by key; ``{}`` if the file does not exist. Corrupt files give a one-line error."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        raw = json.loads(p.read_text())
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            return _entries(raw)
        if isinstance(raw, dict) and raw.get("format") == "advplug-eval":  # version 2
            old = raw["entries"]
            if not isinstance(old, dict):
                raise ValueError(f"'entries' is a {type(old).__name__}, not an object")
        else:  # version 1
            old = {str(i): e for i, e in enumerate(_from_eval_v1(raw))}
        for e in old.values():
            check(e, _V2_FIELDS)
        return {key(e): e for e in map(_upgrade, old.values())}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{str(p)!r} is corrupt: {type(e).__name__}: {e}") from None


def merge_evals(path: str | Path, new: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add ``new`` entries to ``eval.json`` (same key: replaced), atomically."""
    entries = read_evals(path)
    for e in new:
        entries.pop(key(e), None)  # re-inserted last: the most recent result wins ties in ``select``
        entries[key(e)] = e
    write_json(Path(path), {"format": FORMAT, "version": VERSION, "entries": entries})
    return entries


# -- results.json ------------------------------------------------------------------------------------
def write_results(path: str | Path, entries: list[dict[str, Any]], cost: dict[str, Any] | None = None) -> None:
    """``results.json`` with ``entries`` (the training run's final evaluation) and the training's ``cost`` (the
    trainer's ``CostMeter.result``), atomically."""
    doc = {"format": FORMAT, "version": VERSION, "entries": {key(e): e for e in entries}}
    write_json(Path(path), doc | ({"cost": cost} if cost is not None else {}))


def read_cost(run_dir: str | Path) -> dict[str, Any] | None:
    """What training the run cost (``results.json``'s ``cost``): ``None`` for a run without one (not finished, or
    trained before costs were recorded); a damaged one is a one-line error."""
    p = Path(run_dir) / "results.json"
    if not p.is_file():
        return None
    try:
        raw = json.loads(p.read_text())
    except ValueError as e:
        raise DataError(f"{str(p)!r} is corrupt: {e}") from None
    cost = raw.get("cost") if isinstance(raw, dict) and raw.get("format") == FORMAT else None
    if cost is None:
        return None
    get = cost.get if isinstance(cost, dict) else (lambda k: None)
    bad = [k for k in COST_NUMBERS if isinstance(get(k), bool) or not isinstance(get(k), (int, float))]
    if bad or not isinstance(get("device"), str):
        raise DataError(f"{str(p)!r} is corrupt: its cost {cost!r} lacks numbers for {', '.join(bad) or 'device'}")
    return cost


def read_results(path: str | Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """``results.json``'s entries. ``config``: the run's settings (``config.json``), which fill in what
    version 1 did not record: the run's eps, step eps/4, torchattacks, the whole test set."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except ValueError as e:
        raise DataError(f"{str(p)!r} is corrupt: {e}") from None
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        try:
            return list(_entries(raw).values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{str(p)!r} is corrupt: {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{str(p)!r} is damaged: expected an object of checkpoints, got {type(raw).__name__}")
    out = []
    for name, res in raw.items():  # version 1: {"last (epoch 20)": {"Natural": 0.9, ...}}
        m = re.fullmatch(r"(\S+) \(epoch (\d+)\)", name)
        if m is None or m.group(1) not in CHECKPOINTS or not isinstance(res, dict):
            raise DataError(f"{str(p)!r} is damaged: entry {name!r} is not a checkpoint's results")
        for attack, acc in res.items():
            if attack == "epoch":
                continue
            acc = _accuracy(acc, f"{str(p)!r} is damaged: {name} {attack}")
            try:
                spec, precision = _from_display(attack)
            except ValueError as e:
                raise DataError(f"{str(p)!r} is damaged: {name}: {e}") from None
            out.append(
                entry(
                    m.group(1),
                    int(m.group(2)),
                    spec,
                    acc,
                    precision=precision,
                    eps=config.get("eps"),
                    alpha=config.get("eps") / 4,
                    n_test=None,
                    n_total=None,
                    data=config.get("data"),
                    seed=int(config.get("seed", 0)),
                )
            )
    return out


def _accuracy(v: Any, where: str) -> float:
    """An accuracy read from a run file: a number in [0, 1] (NaN, 7 or "0.5" would be averaged
    into the table silently, or crash it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise DataError(f"{where}: expected an accuracy in [0, 1], got {v!r}")
    return float(v)


def best_from_last(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A training run records ``best`` only when it is not the last epoch: there, its best is its last."""
    out = list(entries)
    for kind in ("", "-ema"):
        if not any(e["checkpoint"] == f"best{kind}" for e in entries):
            out += [{**e, "checkpoint": f"best{kind}"} for e in entries if e["checkpoint"] == f"last{kind}"]
    return out


def read_run(run_dir: str | Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's entries from both files, merged by key: ``results.json``'s (best filled in from last
    where training recorded last only), then ``eval.json``'s. An ``eval.json`` entry replaces the
    ``results.json`` entry of the same key (the same evaluation, measured again: the newer wins);
    every other entry of either file is kept (``select`` then chooses among those of one column).
    ``[]`` when the run has neither file."""
    run = Path(run_dir)
    merged: dict[str, dict[str, Any]] = {}
    if (run / "results.json").is_file():
        merged = {key(e): e for e in best_from_last(read_results(run / "results.json", config))}
    merged.update(read_evals(run / "eval.json"))  # same key: replaced in place (column order kept)
    return list(merged.values())


# -- choosing what compare shows ---------------------------------------------------------------------
def _samples(picked: list[dict[str, Any]]) -> str:
    """``all`` when every chosen entry saw the whole test set (as a training run's results do),
    else ``attack count`` per attack (``all`` for those that saw the whole set)."""
    full = [e["n_test"] == e.get("n_total") for e in picked]  # None == None: version 1 of results.json
    if picked and all(full):
        return "all"
    return ", ".join(sorted({f"{label(e)} {'all' if f else e['n_test']}" for e, f in zip(picked, full)}))


def chosen_entries(entries: list[dict[str, Any]], eps: float | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """The entry ``select`` shows per ``(checkpoint, column)``: of the checkpoint's latest epoch, the run's own
    ``eps`` first, then the most test samples, then the most recent."""
    latest: dict[str, int] = {}
    for e in entries:
        latest[e["checkpoint"]] = max(latest.get(e["checkpoint"], -1), int(e["epoch"]))
    chosen: dict[tuple[str, str], tuple[tuple, dict[str, Any]]] = {}
    for i, e in enumerate(entries):
        if int(e["epoch"]) != latest[e["checkpoint"]]:
            continue
        rank = (eps is None or abs(e["eps"] - eps) < 1e-9, e["n_test"] or 0, i)
        k = (e["checkpoint"], label(e))
        if k not in chosen or rank > chosen[k][0]:
            chosen[k] = (rank, e)
    return {k: e for k, (_, e) in chosen.items()}


def select(
    entries: list[dict[str, Any]], eps: float | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """For ``compare``: per checkpoint (best / last, its latest epoch) and attack column, one accuracy.

    Preference among entries of the same checkpoint and column: the run's own ``eps``, then
    the most test samples, then the most recent. Returns ``(results, settings)``: results as
    ``{checkpoint: {column: accuracy}}`` and the settings of the chosen entries (several values
    are joined, so ``compare`` flags them)."""
    chosen = chosen_entries(entries, eps)
    results: dict[str, dict[str, float]] = {}
    for (which, column), e in chosen.items():
        results.setdefault(which, {})[column] = e["accuracy"]
    picked = list(chosen.values())

    def joined(k: str) -> Any:
        vals = sorted({e[k] for e in picked}, key=str)
        return vals[0] if len(vals) == 1 else ", ".join(map(str, vals))

    settings = {
        "eval eps": joined("eps"),
        # each column's eps, so that a cell averaging runs attacked at different budgets can be marked
        "column eps": {k: e["eps"] for k, e in chosen.items()},
        "eval step": joined("alpha"),
        "backend": joined("backend"),
        "test samples": _samples(picked),
    }
    return results, settings
