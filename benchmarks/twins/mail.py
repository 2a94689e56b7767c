"""MAIL-AT (Wang et al., NeurIPS 2021) by hand: PGD from ``x + 0.001 N(0, 1)`` (the authors' ``mail_loss.py``
start), the probabilistic margin on the adversarial training forward (Eq. 5), ``w = sigmoid(-gamma (PM - beta))``
(Eq. 8, AT presets gamma 10, beta -0.5), normalised to ``M w / sum w`` (Alg. 1), then the weighted mean CE (Eq. 9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.twins.common import Twin, margin, pgd


class MAIL(Twin):
    gamma, bias = 10.0, -0.5

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv, _ = pgd(self.model, x, y, self.run, "normal")
        logits = self.model(x_adv)
        pm = margin(logits.detach().softmax(1), y)  # Eq. 5
        w = torch.sigmoid(-self.gamma * (pm - self.bias))  # Eq. 8
        w = w / w.mean()  # M w_i / sum_j w_j
        return self.update((w * F.cross_entropy(logits, y, reduction="none")).mean())  # Eq. 9
