"""AT (Madry et al., 2018) by hand: PGD-K from a uniform start (torchattacks' PGD, the model in eval mode while
attacking), then the mean cross-entropy on the adversarial batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from benchmarks.twins.common import Run, Twin


class AT(Twin):
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, run: Run) -> None:
        super().__init__(model, opt, run)
        self.attack = torchattacks.PGD(model, eps=run.eps, alpha=run.alpha, steps=run.steps)

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv = self.attack(x, y)
        return self.update(F.cross_entropy(self.model(x_adv), y))
