"""BiLAW (seed paper 001) by hand, Algorithm 1 with advplug's defaults: PGD (torchattacks, uniform start); a batch
of 128 held-out validation samples (its own seeded generator) attacked with PGD at theta; omega_mu, an MLP
K-128-1 with a sigmoid, maps the multi-class margin ``p_y - p`` of the clean forward (Def. 3) to weights normalised
to mean 1; the pseudo-update ``theta~ = theta - lr grad L_tr`` (Eq. 5) with ``L_tr`` the weighted adversarial CE;
the unweighted validation CE at ``theta~`` (``torch.func.functional_call``) differentiated into mu (Eq. 6), one Adam
step (lr 1e-3, weight decay 1e-4); then the weights from the updated mu weigh the real step's CE (Alg. 1, 7-8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn
from torch.func import functional_call

from benchmarks.twins.common import Run, Twin


class BiLAW(Twin):
    hidden, val_batch, meta_lr, meta_wd = 128, 128, 1e-3, 1e-4

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, run: Run) -> None:
        super().__init__(model, opt, run)
        if run.validation is None:
            raise ValueError("BiLAW's twin needs the run's validation split (Run.validation)")
        dev = next(model.parameters()).device
        self.attack = torchattacks.PGD(model, eps=run.eps, alpha=run.alpha, steps=run.steps)
        self.val_attack = torchattacks.PGD(model, eps=run.eps, alpha=run.alpha, steps=run.steps)
        self.val_x, self.val_y = run.validation
        self.gen = torch.Generator(device=dev).manual_seed(run.seed + 7919)
        with torch.random.fork_rng(devices=[]):  # omega's initialisation does not move the run's RNG
            torch.manual_seed(run.seed)
            k = run.num_classes
            self.omega = nn.Sequential(nn.Linear(k, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1)).to(dev)
        self.meta_opt = torch.optim.Adam(self.omega.parameters(), lr=self.meta_lr, weight_decay=self.meta_wd)

    def weights(self, delta: Tensor) -> Tensor:
        w = torch.sigmoid(self.omega(delta)).squeeze(-1)
        return w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        x_adv = self.attack(x, y)
        n_val = min(self.val_batch, len(self.val_y))
        pick = torch.randint(len(self.val_y), (n_val,), generator=self.gen, device=self.val_y.device)
        yv = self.val_y[pick]
        xv = self.val_attack(self.val_x[pick], yv)
        p = self.model(x).detach().softmax(1)
        delta = p.gather(1, y[:, None]) - p  # Def. 3, on the clean sample
        ce = F.cross_entropy(self.model(x_adv), y, reduction="none")
        # Eq. 5: one pseudo-update with the weights of the current mu, differentiable in mu
        params = dict(self.model.named_parameters())
        grads = torch.autograd.grad((self.weights(delta) * ce).mean(), list(params.values()), create_graph=True)
        theta = {n: p - self.opt.param_groups[0]["lr"] * g for (n, p), g in zip(params.items(), grads)}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        loss_val = F.cross_entropy(functional_call(self.model, {**theta, **buffers}, (xv,)), yv)
        self.meta_opt.zero_grad(set_to_none=True)
        for q, g in zip(self.omega.parameters(), torch.autograd.grad(loss_val, list(self.omega.parameters()))):
            q.grad = g
        self.meta_opt.step()  # Eq. 6
        with torch.no_grad():
            w = self.weights(delta)  # Alg. 1, line 7: the updated mu
        return self.update((w * ce).mean())
