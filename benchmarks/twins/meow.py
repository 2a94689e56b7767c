"""MeoW (AAAI 2023) by hand, with advplug's defaults where the paper is open: PGD (torchattacks, uniform start); a
codebook over the penultimate embeddings, N scaled to about 24 training samples per code, seeded from the first
batch; ``d`` the distance to the nearest code; ``w- = exp(-d(F(x')) / T)``, ``w+ = exp(d(F(x)) / T)`` with
``d / T`` capped at 3 (Eq. 4); the loss ``0.2 w+ CE(x) + 0.8 w- CE(x')`` (Eq. 5); then the codes move by VQ-VAE
moving averages (decay 0.99) towards the misclassified natural and adversarial embeddings of the batch (Eq. 3, Sec.
3.4), and codes unused for an epoch are re-seeded from recent natural embeddings. T: the paper's 10 on its
configurations, else the running mean (decay 0.9 per step) of the batch-mean natural distance (1 at the seeding
step's T = inf)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from benchmarks.twins.common import Penultimate, Run, Twin

PAPER = (("cifar10", "cifar100", "svhn"), ("preactresnet18", "wrn-34-10", "wrn-28-10", "wrn-32-10"))


class MeoW(Twin):
    alpha, cap, decay, t_decay = 0.2, 3.0, 0.99, 0.9

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, run: Run) -> None:
        super().__init__(model, opt, run)
        self.attack = torchattacks.PGD(model, eps=run.eps, alpha=run.alpha, steps=run.steps)
        self.forward = Penultimate(model)
        self.n_codes = 2048 if run.num_train >= 50000 else max(run.num_classes, round(run.num_train * 2048 / 50000))
        self.fixed_t = 10.0 if run.data in PAPER[0] and run.model in PAPER[1] else None
        self.codes: Tensor | None = None
        self.t_mean: Tensor | None = None

    def seed_codes(self, f: Tensor) -> None:
        n = self.n_codes
        pick = torch.randint(0, len(f), (n,), device=f.device)
        self.codes = f[pick] + 0.01 * f.std().clamp_min(1e-6) * torch.randn(n, f.shape[1], device=f.device)
        self.count, self.sums = torch.ones(n, device=f.device), self.codes.clone()
        self.usage = torch.zeros(n, dtype=torch.long, device=f.device)
        self.ring, self.ring_at, self.ring_full = torch.zeros(4 * n, f.shape[1], device=f.device), 0, False

    def temperature(self, d_nat: Tensor, fresh: bool) -> Tensor | float:
        if self.fixed_t is not None:
            return self.fixed_t
        if fresh:
            return float("inf")
        m = d_nat.mean().reshape(1)
        self.t_mean = m if self.t_mean is None else self.t_mean
        t = self.t_mean.clamp_min(1e-12)
        self.t_mean = self.t_decay * self.t_mean + (1 - self.t_decay) * m
        return t

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv = self.attack(x, y)
        logits, f = self.forward(self.model, x)
        logits_adv, f_adv = self.forward(self.model, x_adv)
        f, f_adv = f.detach(), f_adv.detach()
        fresh = self.codes is None
        if fresh:
            self.seed_codes(f)
        d, k = torch.cdist(f, self.codes).min(1)
        d_adv, k_adv = torch.cdist(f_adv, self.codes).min(1)
        t = self.temperature(d, fresh)
        w_minus, w_plus = torch.exp(-(d_adv / t).clamp(max=self.cap)), torch.exp((d / t).clamp(max=self.cap))  # Eq. 4
        ce, ce_adv = F.cross_entropy(logits, y, reduction="none"), F.cross_entropy(logits_adv, y, reduction="none")
        loss = self.alpha * (w_plus * ce).mean() + (1 - self.alpha) * (w_minus * ce_adv).mean()  # Eq. 5
        wrong = torch.cat([logits.detach().argmax(1) != y, logits_adv.detach().argmax(1) != y])
        loss = self.update(loss)
        self.move_codes(torch.cat([f, f_adv]), torch.cat([k, k_adv]), wrong.float())
        self.remember(f)
        return loss

    @torch.no_grad()
    def move_codes(self, f: Tensor, k: Tensor, selected: Tensor) -> None:
        """Eq. 3 by moving averages: each code towards the mean of its selected embeddings (VQ-VAE, App. A.1)."""
        n = torch.zeros_like(self.count).index_add_(0, k, selected)
        sums = torch.zeros_like(self.sums).index_add_(0, k, f * selected[:, None])
        self.count.mul_(self.decay).add_((1 - self.decay) * n)
        self.sums.mul_(self.decay).add_((1 - self.decay) * sums)
        total = self.count.sum()
        smoothed = (self.count + 1e-5) / (total + len(self.count) * 1e-5) * total
        moved = n > 0
        self.codes[moved] = (self.sums / smoothed[:, None])[moved]
        self.usage += torch.bincount(k, minlength=len(self.usage))

    def remember(self, f: Tensor) -> None:
        """The ring of recent natural embeddings that dead codes are re-seeded from."""
        r = len(self.ring)
        n = min(len(f), r)
        end = self.ring_at + n
        if end <= r:
            self.ring[self.ring_at : end] = f[:n]
        else:
            self.ring[self.ring_at :] = f[: r - self.ring_at]
            self.ring[: end - r] = f[r - self.ring_at : n]
            self.ring_full = True
        self.ring_full = self.ring_full or end == r
        self.ring_at = end % r

    def end_epoch(self, epoch: int) -> None:
        if self.codes is None:
            return
        dead = self.usage == 0
        n_dead = int(dead.sum())
        if n_dead:
            filled = len(self.ring) if self.ring_full else self.ring_at
            src = self.ring[torch.randint(0, max(filled, 1), (n_dead,), device=self.ring.device)]
            self.codes[dead] = src
            self.sums[dead] = src * self.count[dead, None]
        self.usage.zero_()
