"""TRADES (Zhang et al., 2019) by hand, as ``trades.py``: the KL attack from ``x + 0.001 N(0, 1)`` (not clamped) in
eval mode, then ``CE(f(x), y) + beta KL(p(x) || p(x'))`` (batchmean), beta = 6."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.twins.common import Run, Twin, eval_mode, project, start


def kl_attack(model: torch.nn.Module, x: Tensor, run: Run) -> Tensor:
    """Sign ascent on ``sum KL(p(x) || p(x'))`` from the unclamped normal start, eval mode."""
    with eval_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x), dim=1)
        adv = start(x, run.eps, "normal")
        for _ in range(run.steps):
            adv.requires_grad_(True)
            loss = F.kl_div(F.log_softmax(model(adv), dim=1), p_nat, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
            adv = project(adv.detach() + run.alpha * grad.sign(), x, run.eps)
    return adv


class TRADES(Twin):
    beta = 6.0

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv = kl_attack(self.model, x, self.run)
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="sum") / len(x)
        return self.update(F.cross_entropy(logits, y) + self.beta * robust)
