"""MART (Wang et al., 2020) by hand, as ``train_wideresnet.py``'s ``mart_loss``: PGD on CE from
``x + 0.001 N(0, 1)``, then the boosted CE on the adversarial batch (CE plus ``-log(1 - p_{y'}(x'))`` for the most
probable wrong class ``y'``) plus beta times the KL to the natural prediction weighted by ``1 - p_y(x)``, beta = 6."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.twins.common import Twin, pgd


class MART(Twin):
    beta = 6.0

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv, _ = pgd(self.model, x, y, self.run, "normal")
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        adv_probs = F.softmax(logits_adv, dim=1)
        top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
        new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
        nat_probs = F.softmax(logits, dim=1)
        true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
        kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
        loss_robust = (kl * (1.0000001 - true_probs)).sum() / len(x)
        return self.update(loss_adv + self.beta * loss_robust)
