"""EMA of a model's weights (``--ema DECAY``), as the robustness literature uses it (Gowal et al.
2020, Rebuffi et al. 2021): after every optimizer step

    decay_t = min(decay, (1 + t) / (10 + t))        (warm-up: early averages follow the model)
    ema = decay_t * ema + (1 - decay_t) * weights   (parameters and floating-point buffers)

Integer buffers (BatchNorm's ``num_batches_tracked``) are copied. The step count is a Python int
and the update is one fused ``_foreach_lerp_``: no host sync per step (``torch.optim.swa_utils
.AveragedModel`` tests ``n_averaged == 0`` on the device every step, a sync on a GPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, shadow: nn.Module, decay: float) -> None:
        """``shadow``: a fresh instance of the same architecture (not a deepcopy: hooks stay off it)."""
        self.decay, self.steps = float(decay), 0
        self.model = shadow
        self.model.load_state_dict(model.state_dict())
        self.model.eval().requires_grad_(False)
        self._pairs(model)

    def _pairs(self, model: nn.Module) -> None:
        src, dst = model.state_dict(keep_vars=True), self.model.state_dict(keep_vars=True)
        self._float = [(dst[k], src[k]) for k in dst if dst[k].is_floating_point()]
        self._other = [(dst[k], src[k]) for k in dst if not dst[k].is_floating_point()]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the tracked model's current weights."""
        d = self.current_decay()
        self.steps += 1
        ema = [e for e, _ in self._float]
        torch._foreach_lerp_(ema, [w.detach() for _, w in self._float], 1.0 - d)
        for e, w in self._other:
            e.copy_(w)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.steps, self.decay = int(state["steps"]), float(state["decay"])
