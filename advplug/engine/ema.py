"""EMA of a model's weights (``--ema DECAY``), as the robustness literature uses it (Gowal et al.
2020, Rebuffi et al. 2021): after every optimizer step

    decay_t = min(decay, (1 + t) / (10 + t))        (warm-up: early averages follow the model)
    ema = decay_t * ema + (1 - decay_t) * weights   (parameters and floating-point buffers)

Integer buffers (BatchNorm's ``num_batches_tracked``) are copied. The step count is a Python int
and the update is one fused ``_foreach_lerp_``: no host sync per step (``torch.optim.swa_utils
.AveragedModel`` tests ``n_averaged == 0`` on the device every step, a sync on a GPU).

The same slot holds a plugin's averaged model (``decay=None``; hook ``average_weights``, e.g. CFA's FAWA): never
updated per step, only by ``blend(d)`` once per epoch, ``avg = d * avg + (1 - d) * weights``; ``steps`` then counts
those updates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, shadow: nn.Module, decay: float | None) -> None:
        """``shadow``: a fresh instance of the same architecture (not a deepcopy: hooks stay off it); ``decay``:
        ``--ema``'s, or ``None`` for a plugin's per-epoch average (``blend``)."""
        self.decay, self.steps = (float(decay) if decay is not None else None), 0
        self.model = shadow
        self.model.load_state_dict(model.state_dict())
        self.model.eval().requires_grad_(False)
        self._pairs(model)

    def _pairs(self, model: nn.Module) -> None:
        src, dst = model.state_dict(keep_vars=True), self.model.state_dict(keep_vars=True)
        self._float = [(dst[k], src[k]) for k in dst if dst[k].is_floating_point()]
        self._other = [(dst[k], src[k]) for k in dst if not dst[k].is_floating_point()]

    @property
    def per_step(self) -> bool:
        """``--ema`` (updated after every optimizer step), not a plugin's per-epoch average."""
        return self.decay is not None

    @torch.no_grad()
    def blend(self, d: float) -> None:
        """``avg = d * avg + (1 - d) * weights`` (``d`` 0: the current weights; 1: the average kept)."""
        self.steps += 1
        torch._foreach_lerp_([e for e, _ in self._float], [w.detach() for _, w in self._float], 1.0 - d)
        for e, w in self._other:
            e.copy_(w)

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
        self.steps, self.decay = int(state["steps"]), (None if state["decay"] is None else float(state["decay"]))
