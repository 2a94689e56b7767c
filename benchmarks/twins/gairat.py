"""GAIRAT (Zhang et al., ICLR 2021) by hand: PGD from a uniform start counting kappa, the iterations at which the
prediction was still right (``GA_PGD``), ``w = (1 + tanh(lambda + 5 (h - kappa) / h)) / 2`` with ``h = K // 2`` and
lambda -1 (``GAIR.py``), normalised to sum to the batch size, then the weighted mean CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.twins.common import Twin, pgd


class GAIRAT(Twin):
    lam = -1.0

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv, kappa = pgd(self.model, x, y, self.run, "uniform")
        h = self.run.steps // 2
        w = (torch.tanh(self.lam + 5 * (h - kappa.float()) / h) + 1) / 2
        w = w * len(w) / w.sum()
        return self.update((w * F.cross_entropy(self.model(x_adv), y, reduction="none")).mean())
