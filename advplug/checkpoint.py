"""Checkpoints: written atomically (temp file + rename), loaded with ``weights_only=True``."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

FORMAT = "advplug-checkpoint"
VERSION = 1


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    os.replace(tmp, path)


def resolve(path: str | Path, which: str = "last") -> Path:
    """A checkpoint file, or ``RUN_DIR/<which>.pt`` for a run directory."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{which}.pt"
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(p)!r}")
    return p


def load(path: str | Path, which: str = "last") -> dict[str, Any]:
    p = resolve(path, which)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, truncated write, pickled code: all mean "not usable"
        raise CheckpointError(f"{str(p)!r} is corrupt or not an advplug checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(p)!r} is not an advplug checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{str(p)!r} has checkpoint version {ckpt.get('version')}, this advplug reads {VERSION}")
    ckpt["path"] = str(p)
    return ckpt


def load_model_state(model: nn.Module, ckpt: dict[str, Any], model_name: str) -> None:
    """Load weights, with a clear error when the checkpoint belongs to another model."""
    saved = ckpt.get("model_name")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {ckpt.get('path')!r} was written for model {saved!r} and does not fit model "
            f"{model_name!r}: {first[:300]}") from None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
