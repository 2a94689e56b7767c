"""LRAT-SAA+CW (ICLR 2022 submission) by hand, with x* = PGD: the three attacks in the plugin's order (SAA: targeted
APGD-DLR on the 3 highest non-true classes, 20 steps, advplug's ``SAA``; CW-Linf, advplug's ``CWLinf``; PGD,
torchattacks), ``t = p_y - max_{i != y} p_i`` (Eq. 11), ``w = alpha (1 - t)^beta`` for CW and SAA (Eq. 12), the floor
``[C - sum w]_+`` on x* (Eq. 7), all weights divided by the batch mean of each pair's total (Eq. 15), then
``mean_i sum_j W_ij CE_ij`` (Eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from advplug.attacks import SAA, CWLinf
from benchmarks.twins.common import Run, Twin, margin


class LRAT(Twin):
    alpha, beta, c = 2.0, 0.5, 0.1

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, run: Run) -> None:
        super().__init__(model, opt, run)
        self.saa = SAA(model, eps=run.eps, steps=20, n_target_classes=min(3, run.num_classes - 1))
        self.cw = CWLinf(model, eps=run.eps, alpha=run.alpha, steps=run.steps)
        self.pgd = torchattacks.PGD(model, eps=run.eps, alpha=run.alpha, steps=run.steps)

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_saa, x_cw, x_star = self.saa(x, y), self.cw(x, y), self.pgd(x, y)
        logits = [self.model(v) for v in (x_cw, x_star, x_saa)]
        ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])
        w_cw, w_saa = (
            self.alpha * (1 - margin(z.detach().softmax(1), y)).clamp_min(0) ** self.beta for z in logits[::2]
        )
        w = torch.stack([w_cw, (self.c - w_cw - w_saa).clamp_min(0), w_saa])  # Eq. 12; Eq. 7's floor on x*
        w = w / w.sum(0).mean()  # Eq. 15
        return self.update((w * ce).sum(0).mean())  # Eq. 7
