"""BAT (seed paper 002) by hand, with advplug's defaults: PGD (torchattacks, uniform start); memorisation estimated
as ``1 - `` the true-class confidence averaged over the epochs so far (one snapshot per sample and epoch, from the
adversarial training forward); the top 20 % of that estimate atypical; ``w = exp(-alpha q)`` with
``q = max_{t != y} p_t(x')`` for atypical samples predicted wrongly, else 1 (Eq. 6-7), normalised to mean 1 (Eq. 8);
plus beta times the discrimination loss of Eq. 9 on the penultimate features of the typical samples (raw dot
products / tau, Eq. 10); alpha 1, beta 0.2, tau 10. Before the first estimate (epoch 1) every sample is typical and
the weights are 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from benchmarks.twins.common import Penultimate, Run, Twin


def discrimination_loss(h: Tensor, y: Tensor, typical: Tensor, tau: float) -> Tensor:
    """Eq. 9: mean over ordered same-label pairs (i, j) of typical samples of
    ``log sum_{k: y_k != y_i} exp(s_ik) - s_ij``, ``s = h h^T / tau``, k over typical samples."""
    s = h @ h.t() / tau
    t2 = typical[:, None] & typical[None, :]
    same = y[:, None] == y[None, :]
    other = t2 & ~same
    pairs = t2 & same & ~torch.eye(len(y), dtype=torch.bool, device=y.device) & other.any(1, keepdim=True)
    denom = torch.logsumexp(s.masked_fill(~other, float("-inf")), dim=1, keepdim=True)
    return (denom - s).masked_fill(~pairs, 0.0).sum() / pairs.sum().clamp_min(1)


class BAT(Twin):
    alpha, beta, tau, atypical_share = 1.0, 0.2, 10.0, 0.2

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, run: Run) -> None:
        super().__init__(model, opt, run)
        self.attack = torchattacks.PGD(model, eps=run.eps, alpha=run.alpha, steps=run.steps)
        self.forward = Penultimate(model)
        dev = next(model.parameters()).device
        self.conf_sum, self.conf_n = torch.zeros(run.num_train, device=dev), torch.zeros(run.num_train, device=dev)
        self.conf_now = torch.zeros(run.num_train, device=dev)
        self.seen = torch.zeros(run.num_train, dtype=torch.bool, device=dev)
        self.atypical: Tensor | None = None

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv = self.attack(x, y)
        logits, h = self.forward(self.model, x_adv)
        p = logits.detach().softmax(1)
        ce = F.cross_entropy(logits, y, reduction="none")
        typical = torch.ones_like(y, dtype=torch.bool)
        if self.atypical is not None:
            atyp = self.atypical[index]
            q = p.scatter(1, y[:, None], float("-inf")).amax(1)  # Eq. 6
            w = torch.where(atyp & (p.argmax(1) != y), torch.exp(-self.alpha * q), torch.ones_like(q))  # Eq. 7
            ce, typical = ce * (w / w.mean()), ~atyp  # Eq. 8
        loss = self.update(ce.mean() + self.beta * discrimination_loss(h, y, typical, self.tau))  # Eq. 10
        self.conf_now[index] = p.gather(1, y[:, None]).squeeze(1)
        self.seen[index] = True
        return loss

    def end_epoch(self, epoch: int) -> None:
        self.conf_sum += self.conf_now * self.seen
        self.conf_n += self.seen.float()
        self.conf_now.zero_()
        self.seen.zero_()
        mem = 1 - self.conf_sum / self.conf_n.clamp_min(1)
        known = self.conf_n > 0
        cut = torch.quantile(mem[known], 1 - self.atypical_share) if known.any() else float("inf")
        self.atypical = known & (mem > cut)
