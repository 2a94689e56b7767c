"""Hand-written twins: each method's training step as one plain PyTorch loop, the same math on the same samples as
advplug's plugin with its defaults (reweighting from the first epoch: ``REWEIGHT_NOW``). No plugin code is imported:
a twin is the method written again from its paper and its authors' code, so that advplug's time, memory and loss can
be compared with what a researcher would write by hand. ``tests/test_twins.py`` checks that every twin's loss equals
advplug's on the same batches.

    TWINS[name](model, opt, Run.of(trainer))   # a twin on its own model and optimizer
    make_twin(name, trainer)                   # the twin of an advplug Trainer: a copy of its model, same optimizer
    advplug_settings(name)                     # the TrainConfig fields that make advplug run the method
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.twins.at import AT
from benchmarks.twins.awp import AWP
from benchmarks.twins.bat import BAT
from benchmarks.twins.bilaw import BiLAW
from benchmarks.twins.common import Run, Twin
from benchmarks.twins.fat import FAT
from benchmarks.twins.gairat import GAIRAT
from benchmarks.twins.lrat import LRAT
from benchmarks.twins.mail import MAIL
from benchmarks.twins.mart import MART
from benchmarks.twins.meow import MeoW
from benchmarks.twins.trades import TRADES
from benchmarks.twins.wmmr import WMMR

__all__ = ["METHODS", "REWEIGHT_NOW", "TWINS", "Run", "Twin", "advplug_settings", "make_twin"]

TwinFactory = Callable[[nn.Module, torch.optim.Optimizer, Run], Twin]
TWINS: dict[str, TwinFactory] = {
    "at": AT,
    "trades": TRADES,
    "mart": MART,
    "meow": MeoW,
    "mail": MAIL,
    "gairat": GAIRAT,
    "bat": BAT,
    "bilaw": BiLAW,
    "lrat": LRAT,
    "awp": AWP,
    "fat": FAT,
    "wmmr": WMMR,
}
METHODS = tuple(TWINS)
OBJECTIVES = ("at", "trades", "mart")

# reweighting active from the first step: time (and compare) the reweighting itself, not a burn-in
REWEIGHT_NOW: dict[str, dict[str, Any]] = {
    "mail": {"mail-burn-in": 0},
    "gairat": {"gairat-begin-epoch": 0},
    "bat": {"bat-burn-in": 0},
    "awp": {"awp-warmup": 0},
    # no twins, timed against advplug AT (overhead.py --plugin): their switches after the untimed first epoch
    "cfa": {"cfa-begin": 1},
    "dafa": {"dafa-warmup": 1},
}


def advplug_settings(name: str) -> dict[str, Any]:
    """The ``TrainConfig`` fields that make advplug train method ``name`` as its twin does: ``objective``,
    ``plugins`` and ``plugin_options`` (a new dict each call). A ``KeyError`` names the methods."""
    if name not in TWINS:
        raise KeyError(f"no twin for {name!r}; methods: {', '.join(METHODS)}")
    if name in OBJECTIVES:
        return {"objective": name, "plugins": (), "plugin_options": {}}
    return {"objective": "at", "plugins": (name,), "plugin_options": copy.deepcopy(REWEIGHT_NOW.get(name, {}))}


def make_twin(name: str, trainer: Any) -> Twin:
    """The twin of an advplug ``Trainer`` (before it trains): a model with the trainer's initial weights, an SGD
    optimizer with the trainer's settings, and the run's facts."""
    from advplug.models import build_model

    cfg = trainer.cfg
    model = build_model(cfg.model, trainer.data.num_classes, trainer.data.input_shape).to(trainer.device)
    model.load_state_dict(trainer.model.state_dict())
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return TWINS[name](model, opt, Run.of(trainer))
