"""AT-AWP (Wu, Xia and Wang, NeurIPS 2020) by hand, as ``AT_AWP/utils_awp.py``: after PGD (torchattacks, uniform
start), the gradient of the mean CE at ``w`` (the proxy step; BatchNorm's running statistics left as they were),
``v_l = gamma ||w_l|| g_l / (||g_l|| + 1e-20)`` for every conv/linear weight, the loss and its gradient at ``w + v``,
``w`` restored, then the update (restored before the step, as the paper's Algorithm 1 writes it); gamma 0.01."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from benchmarks.twins.common import Run, Twin


class AWP(Twin):
    gamma = 0.01

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, run: Run) -> None:
        super().__init__(model, opt, run)
        self.attack = torchattacks.PGD(model, eps=run.eps, alpha=run.alpha, steps=run.steps)
        self.weights = [p for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n]

    def perturbation(self, x_adv: Tensor, y: Tensor) -> list[Tensor]:
        stats = [b.clone() for b in self.model.buffers()]
        grads = torch.autograd.grad(F.cross_entropy(self.model(x_adv), y), self.weights)
        with torch.no_grad():
            for b, s in zip(self.model.buffers(), stats):
                b.copy_(s)
        return [g * (self.gamma * w.detach().norm() / (g.norm() + 1e-20)) for w, g in zip(self.weights, grads)]

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv = self.attack(x, y)
        v = self.perturbation(x_adv, y)
        saved = [w.detach().clone() for w in self.weights]
        with torch.no_grad():
            for w, d in zip(self.weights, v):
                w.add_(d)
        loss = F.cross_entropy(self.model(x_adv), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for w, s in zip(self.weights, saved):
                w.copy_(s)
        self.opt.step()
        return loss.detach()
