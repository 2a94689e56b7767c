"""FAT (Zhang et al., ICML 2020) by hand: early-stopped PGD as the authors' ``earlystop.py`` (a sample is returned
``tau`` misclassified iterations after its first misclassification; stopped samples leave the batch), CE loss,
uniform start, omega 0.001 noise at every update, tau growing by one after epochs 50 and 90 (``FAT.py``); then the
mean CE on the friendly adversarial batch. The noise is drawn for every sample still running at an iteration (the
draws of those that stop there dropped), as advplug's default ``--fat-noise active``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.twins.common import Twin, eval_mode, project, start


class FAT(Twin):
    tau_epochs, omega = (50, 90), 0.001

    def tau(self, epoch: int) -> int:
        return sum(1 for m in self.tau_epochs if epoch + 1 > m)

    def attack(self, x: Tensor, y: Tensor, tau: int) -> Tensor:
        eps, alpha = self.run.eps, self.run.alpha
        adv = start(x, eps, "uniform")
        budget = torch.full_like(y, tau)
        active = torch.arange(len(y), device=x.device)
        with eval_mode(self.model):
            for _ in range(self.run.steps):
                xa, ya = adv[active].requires_grad_(True), y[active]
                logits = self.model(xa)
                wrong = logits.detach().argmax(1) != ya
                left = budget[active]
                stop = wrong & (left == 0)
                budget[active] = left - (wrong & ~stop).long()
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, ya, reduction="sum"), xa)
                nxt = xa.detach() + alpha * grad.sign() + self.omega * torch.randn_like(xa)
                nxt = project(nxt, x[active], eps)
                keep = ~stop
                active = active[keep]
                adv[active] = nxt[keep]
                if active.numel() == 0:
                    break
        return adv

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv = self.attack(x, y, self.tau(epoch))
        return self.update(F.cross_entropy(self.model(x_adv), y))
