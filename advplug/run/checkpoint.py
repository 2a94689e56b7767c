"""Checkpoints: written atomically (temp file + fsync + rename), loaded with ``weights_only=True``
after the zip container's CRCs are verified, and checked against a schema before use.

A run's checkpoints carry everything ``--resume`` needs: model, optimizer, scheduler, one RNG
state per process, plugin states, the best-so-far record and the epoch metrics so far (so that
``metrics.jsonl`` can be rebuilt exactly after a kill between the checkpoint and the log).
"""

from __future__ import annotations

import json
import os
import random
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advplug.errors import CheckpointError
from advplug.run.directory import create_new, fault_point, os_error_in, write_failure

FORMAT = "advplug-checkpoint"
VERSION = 2

# Keys a training checkpoint must have, with their types (a bare model file needs only the first few).
MODEL_KEYS: dict[str, type | tuple[type, ...]] = {"model": dict, "model_name": str}
EVAL_KEYS: dict[str, type | tuple[type, ...]] = {
    **MODEL_KEYS,
    "epoch": int,
    "num_classes": int,
    "input_shape": list,
    "config": str,
}
TRAIN_KEYS: dict[str, type | tuple[type, ...]] = {
    **EVAL_KEYS,
    "optimizer": dict,
    "scheduler": dict,
    "rng": list,
    "world_size": int,
    "plugins": dict,
    "best_acc": float,
    "best_epoch": int,
    "metrics": str,
}


MAX_CLASSES = 100_000  # a sanity bound (ImageNet-21k has 21,841): a larger count is a damaged file or label


def _first_line(e: BaseException) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[0][:200] if lines else type(e).__name__


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash leaves the old file intact, a failed
    write (disk full) leaves no temp file behind and raises a one-line ``CheckpointError``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(create_new(tmp), "wb") as f:  # never written through a planted symlink
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        fault_point("mid-write", path.name)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = os_error_in(e) if isinstance(e, (OSError, RuntimeError)) else None
        if cause is None:
            raise
        kept = "the previous checkpoint is intact" if path.is_file() else "no checkpoint was written"
        raise CheckpointError(write_failure(cause, "checkpoint", path, kept)) from None


def resolve(path: str | Path, which: str = "last") -> Path:
    """A checkpoint file, or ``RUN_DIR/<which>.pt`` for a run directory."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{which}.pt"
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(p)!r}")
    return p


def _read(p: Path) -> dict[str, Any]:
    name = str(p)
    if p.stat().st_size == 0:
        raise CheckpointError(
            f"{name!r} is empty (0 bytes): an interrupted write; use the run's other checkpoint or retrain"
        )
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except PermissionError:
        raise CheckpointError(f"cannot read {name!r}: permission denied (see its owner and mode: ls -l)") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(
            f"{name!r} is corrupt or truncated: not a readable checkpoint ({_first_line(e)})"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{name!r} is corrupt: the checksum of its entry {bad!r} does not match (damaged on disk or in transfer)"
        )
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # anything but tensors and plain data is refused, never unpickled
        if isinstance(e, __import__("pickle").UnpicklingError) or "weights_only" in str(e):
            raise CheckpointError(
                f"{name!r} is not an advplug checkpoint: it holds pickled objects other than "
                "tensors and plain data, which advplug refuses to load "
                "(loading them could run code)"
            ) from None
        raise CheckpointError(f"{name!r} is corrupt or not an advplug checkpoint ({type(e).__name__})") from None


def check_schema(ck: dict[str, Any], keys: dict[str, type | tuple[type, ...]], name: str) -> None:
    for k, t in keys.items():
        if k not in ck:
            raise CheckpointError(f"{name!r} is damaged or from another program: it has no {k!r} entry")
        v = ck[k]
        ok = isinstance(v, t) and not (t is int and isinstance(v, bool))
        if t is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            want = t.__name__ if isinstance(t, type) else "/".join(x.__name__ for x in t)
            raise CheckpointError(f"{name!r} is damaged: its {k!r} entry is a {type(v).__name__}, expected {want}")
    if "input_shape" in keys:  # numbers a model is built from: checked before any allocation
        shape, k = ck["input_shape"], ck["num_classes"]
        sizes = all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 16 for d in shape)
        if not (1 <= len(shape) <= 4 and sizes):
            raise CheckpointError(f"{name!r} is damaged: its input shape {shape!r} is not a list of sizes")
        if not 2 <= k <= MAX_CLASSES:
            raise CheckpointError(f"{name!r} is damaged: its number of classes {k} is not in 2..{MAX_CLASSES}")
    if "plugins" in keys:
        for n, st in ck["plugins"].items():
            if not isinstance(st, dict):
                raise CheckpointError(
                    f"{name!r} is damaged: the state of plugin {n!r} is a {type(st).__name__}, expected dict"
                )


def load(path: str | Path, which: str = "last", *, need: str = "model") -> dict[str, Any]:
    """Load a checkpoint (file, or ``RUN_DIR/<which>.pt``) and check the entries a use needs:
    ``need`` is ``"model"`` (weights), ``"eval"`` (+ epoch, classes, shape, config) or
    ``"training"`` (everything ``--resume`` reads)."""
    p = resolve(path, which)
    ckpt = _read(p)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(p)!r} is not an advplug checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{str(p)!r} has checkpoint version {ckpt.get('version')}, this advplug reads {VERSION}")
    check_schema(ckpt, {"model": MODEL_KEYS, "eval": EVAL_KEYS, "training": TRAIN_KEYS}[need], str(p))
    ckpt["path"] = str(p)
    return ckpt


def saved_config(ck: dict[str, Any]) -> Any:
    """The run's settings a checkpoint carries (its ``config`` entry, JSON text), parsed."""
    try:
        return json.loads(ck["config"])
    except ValueError as e:
        raise CheckpointError(f"{ck['path']!r} is damaged: its config is not readable ({e})") from None


def has_ema(last: dict[str, Any]) -> bool:
    return isinstance(last.get("ema"), dict) and "model" in last["ema"]


def no_ema(last: dict[str, Any]) -> CheckpointError:
    run = str(Path(last["path"]).parent)
    return CheckpointError(
        f"the run {run!r} has no EMA model: it was trained without --ema (train with --ema DECAY to keep one; "
        "evaluate best or last)"
    )


def last_as(last: dict[str, Any], ema: bool) -> dict[str, Any]:
    """``last.pt``, or the EMA weights it carries, as a model checkpoint."""
    if not ema:
        return last
    if not has_ema(last):
        raise no_ema(last)
    return {**last, "model": last["ema"]["model"]}


def load_best(run_dir: str | Path, ema: bool = False) -> dict[str, Any]:
    """The run's best checkpoint as recorded in ``last.pt`` (``ema``: the best EMA weights).

    ``last.pt`` is written before ``best.pt``; a kill between the two leaves ``best.pt`` older
    than the recorded best, and then the recorded best is ``last.pt`` itself, which is returned.
    """
    last = load(run_dir, "last", need="eval")
    if ema and not has_ema(last):
        raise no_ema(last)
    recorded = int(last.get("best_ema_epoch" if ema else "best_epoch", last["epoch"]))
    which = "best-ema" if ema else "best"
    best_path = Path(run_dir) / f"{which}.pt"
    if best_path.is_file():
        best = load(run_dir, which, need="eval")
        if int(best["epoch"]) == recorded:
            # each checkpoint carries the run's metrics so far (timings included): a best.pt of this
            # run holds a prefix of last.pt's; one copied from another run of the same length does not
            mine, theirs = last.get("metrics"), best.get("metrics")
            if isinstance(mine, str) and isinstance(theirs, str) and not mine.startswith(theirs):
                raise CheckpointError(
                    f"{str(best_path)!r} is not from the run of {last['path']!r} (its metrics record "
                    "differs): the run directory was altered"
                )
            return best
    if recorded == int(last["epoch"]):
        return last_as(last, ema)
    raise CheckpointError(
        f"{str(best_path)!r} does not hold the recorded best epoch {recorded + 1}: the run directory was altered"
    )


def repair_best(run_dir: str | Path, ema: bool = False) -> bool:
    """After a kill between ``last.pt`` and ``best.pt`` when the last epoch was the best: write
    ``best.pt`` (``best-ema.pt``) from ``last.pt``. Returns whether anything was repaired."""
    run = Path(run_dir)
    which = "best-ema" if ema else "best"
    last = load(run, "last", need="eval")
    try:
        if int(load(run, which, need="eval")["epoch"]) == int(last["epoch"]):
            return False
    except CheckpointError:
        pass
    save(run / f"{which}.pt", {k: v for k, v in last_as(last, ema).items() if k not in ("path", "format", "version")})
    return True


def load_model_state(model: nn.Module, ckpt: dict[str, Any], model_name: str) -> None:
    """Load weights, with a clear error when the checkpoint belongs to another model."""
    saved = ckpt.get("model_name")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {ckpt.get('path')!r} was written for model {saved!r} and does not fit model "
            f"{model_name!r}: {_first_line(e)[:300]}"
        ) from None
    # training stops on a NaN/Inf loss, so no run saves such weights: they would give chance-level
    # accuracies that look like results
    bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {ckpt.get('path')!r} is damaged: its weight {bad!r} holds NaN or Inf")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    try:
        torch.set_rng_state(state["torch"])
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's RNG state is damaged ({_first_line(e)})") from None
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
