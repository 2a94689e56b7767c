"""WMMR (Zeng et al., AAAI 2021) by hand, ``--mode margin`` of the authors' AT code: PGD on the *weighted* loss
``mean(w CE)`` from ``x + U(-eps, eps)`` (not clamped), ``w = exp(-alpha m(x'))`` recomputed on every iterate with
its gradient, then the mean of ``w CE`` on the training forward (w from its probabilities, a constant), alpha 0.5."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.twins.common import Twin, eval_mode, margin, project


class WMMR(Twin):
    weight_alpha = 0.5

    def attack(self, x: Tensor, y: Tensor) -> Tensor:
        eps = self.run.eps
        with eval_mode(self.model):
            adv = x + torch.empty_like(x).uniform_(-eps, eps)
            for _ in range(self.run.steps):
                adv = adv.detach().requires_grad_(True)
                logits = self.model(adv)
                w = torch.exp(-self.weight_alpha * margin(logits.softmax(1), y))
                loss = (w * F.cross_entropy(logits, y, reduction="none")).mean()
                (grad,) = torch.autograd.grad(loss, adv)
                adv = project(adv.detach() + self.run.alpha * grad.sign(), x, eps)
        return adv

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv = self.attack(x, y)
        logits = self.model(x_adv)
        w = torch.exp(-self.weight_alpha * margin(logits.detach().softmax(1), y))
        return self.update((w * F.cross_entropy(logits, y, reduction="none")).mean())
