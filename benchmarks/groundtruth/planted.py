"""A test double for the benchmark, with a known answer."""

from __future__ import annotations

from typing import Any

import torch

from advplug import Weights, hookimpl
from benchmarks.groundtruth.injection import flags_for_config


class PlantedFlipped:
    """A test double with a known answer: weight 0.1 for exactly the flipped samples, 1 for every
    other one (read from the run's injected data file in ``on_train_start``). The benchmark must
    give it AUROC 1 for ``flipped``; register it with ``advplug.testing.installed_plugins(
    planted="benchmarks.groundtruth.planted:PlantedFlipped")``."""

    def __init__(self) -> None:
        self.down: torch.Tensor | None = None

    @hookimpl
    def on_train_start(self, ctx: Any) -> None:
        self.down = torch.as_tensor(flags_for_config(ctx.config)["flipped"], device=ctx.device)

    @hookimpl
    def compute_weights(self, ctx: Any, variants: list) -> Any:
        return Weights(adv=torch.where(self.down[ctx.index], 0.1, 1.0).float())
