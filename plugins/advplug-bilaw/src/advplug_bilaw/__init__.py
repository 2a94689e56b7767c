"""BiLAW: bilevel learnable adversarial reweighting (seed paper 001, Sec. 3-4, App. A).

An auxiliary network ``omega_mu`` maps each sample's multi-class margin ``Delta = p_y - p``
(Def. 3, a K-vector) to a weight; one hidden layer of 128 ReLU units and a sigmoid by default
(``--bilaw-hidden 64-64`` etc., Table 6). Weights are normalised per batch, ``w_i / sum_j w_j``
(Sec. 4), and handed to the core at mean 1.

Def. 3 writes the margin on the clean sample, ``f_theta(x_i)`` (and Eq. 8: "the multi-class
margin of f_theta at x_i"): that is the default (``--bilaw-margin-on clean``), and its cost is
the natural forward pass (free with ``--objective trades``, one extra pass with ``at``; in train
mode, like every forward of the step). ``--bilaw-margin-on adv`` reads the margin off the
adversarial variant the loss uses (no extra pass; what advplug did before, and not Def. 3).
The same choice applies to ``--bilaw-input margin``.

Each step runs Algorithm 1 (the MAML trick):

1. pseudo-update ``theta~ = theta - lr grad_theta L_tr(theta, w_mu)`` (Eq. 5) with the
   classifier's current learning rate, where ``L_tr`` is the run's own training loss (the loss
   owner through ``TrainContext.loss_fn``: weighted adversarial CE for ``--objective at``, Eq. 8
   for ``--objective trades``) on the logits the step already computed; ``torch.func.functional_call``
   evaluates the model at ``theta~``: no copy of the model, BatchNorm buffers are cloned so the
   meta pass does not move the running statistics;
2. the *unweighted* robust validation loss at ``theta~`` on a batch of the held-out validation
   split (the core holds it out: ``requirements -> {"validation"}``; 1000 samples in the paper,
   ``min(1000, 10%)`` by default, never trained on), with PGD adversarial validation examples
   made at ``theta``; its gradient flows back through the pseudo-update into ``mu`` (Eq. 6) and
   the auxiliary optimiser steps (Adam, lr 1e-3, weight decay 1e-4, as in the MW-Net code the
   MAML trick comes from; the paper does not give its values);
3. the weights for the real update come from the updated ``mu`` (Alg. 1, line 7-8).

Variants (``--bilaw-method``): ``parametric`` (BiLAW; with ``--objective trades`` it is
BiLAW-TRADES, Eq. 8, 1/lambda = 6 is TRADES' beta) and ``nonparametric`` (Sec. 4, item 1: the
weight of sample j is ``[g_val(theta~)^T grad l_j(theta)]_+``, normalised, read off the gradient
of the validation loss with respect to per-sample loss multipliers set to 1, as in
learning-to-reweight). ``--bilaw-input`` selects the auxiliary network's input (Table 8):
``multiclass`` (Def. 3), ``margin`` (Def. 2, ``p_y - max_{j != y} p_j``), ``loss`` (the robust
loss) or ``loss-diff`` (robust minus natural loss; needs the natural forward).

The auxiliary network, its optimiser and the validation sampler are plugin state and survive
``--resume``. Not supported under DDP (the pseudo-gradient bypasses DDP's reducer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from advplug import NATURAL, Declaration, OptionError, StepContext, TrainContext, Variant, Weights, hookimpl, opt
from advplug.signals import probabilistic_margin, true_prob

__version__ = "0.1.0"
INPUTS = ("multiclass", "margin", "loss", "loss-diff")


def multiclass_margin(probs: Tensor, y: Tensor) -> Tensor:
    """Def. 3: ``Delta^(j) = p_y - p_j`` for every class j; ``probs`` ``[..., B, K]``."""
    return true_prob(probs, y).unsqueeze(-1) - probs


class WeightNet(nn.Module):
    """``omega_mu``: input -> hidden ReLU layers -> one sigmoid unit."""

    def __init__(self, d_in: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(d_in, h), nn.ReLU()]
            d_in = h
        layers.append(nn.Linear(d_in, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.net(x)).squeeze(-1)


def parse_hidden(spec: str) -> tuple[int, ...]:
    try:
        hidden = tuple(int(h) for h in spec.split("-") if h.strip())
    except ValueError:
        hidden = ()
    if not hidden or min(hidden) < 1:
        raise OptionError(f"--bilaw-hidden {spec!r}: hidden layer widths joined by '-', e.g. 128 or 64-64")
    return hidden


def mean_one(w: Tensor) -> Tensor:
    """``w_i / sum_j w_j`` per row, scaled by the batch size (mean 1)."""
    return w / w.mean(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


class BiLAW:
    """BiLAW: weights from the multi-class margin, learned by a one-step meta-gradient on a validation split."""

    @dataclass(frozen=True)
    class Options:
        method: str = opt(
            "parametric",
            "parametric (BiLAW) or nonparametric (Sec. 4, item 1)",
            choices=("parametric", "nonparametric"),
        )
        input: str = opt(
            "multiclass", "input of omega: multiclass (Def. 3), margin, loss or loss-diff (Table 8)", choices=INPUTS
        )
        hidden: str = opt("128", "hidden widths of omega joined by '-' (Table 6: 128, 64, 64-64, 256)")
        meta_lr: float = opt(1e-3, "learning rate of omega's Adam optimiser", gt=0.0)
        meta_weight_decay: float = opt(1e-4, "weight decay of omega's optimiser", min=0.0)
        val_batch: int = opt(128, "validation batch size per meta step (paper: 128)", min=1)
        margin_on: str = opt(
            "clean",
            "margin input on the clean sample (Def. 3, one natural forward) or the adversarial variant (adv)",
            choices=("clean", "adv"),
        )

    def __init__(self, options: Options) -> None:
        self.options = options
        self.hidden = parse_hidden(options.hidden)
        self.net: WeightNet | None = None
        self.opt: torch.optim.Optimizer | None = None

    @hookimpl
    def requirements(self) -> set[str]:
        return {"validation"}

    @hookimpl
    def declare(self) -> Declaration:
        return Declaration(
            weights="global",
            needs=frozenset({"validation", "loss"}),
            meaning=f"omega_mu({self.options.input}) learned by a meta-gradient on validation data "
            "(its pseudo-update sees its own weights only), mean 1",
        )

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        if ctx.world_size > 1:
            raise OptionError("bilaw does not run under DDP: its pseudo-gradient bypasses DDP's gradient reducer")
        if ctx.validation is None or ctx.loss_fn is None:
            raise OptionError("bilaw needs the core's validation split and loss function")
        o = self.options
        self.model, self.loss_fn, self.device = ctx.model, ctx.loss_fn, ctx.device
        self.val_x, self.val_y = ctx.validation
        self.val_attack = ctx.make_attack("pgd")
        self.gen = torch.Generator(device=ctx.device).manual_seed(int(ctx.config.seed) + 7919)
        d_in = ctx.num_classes if o.input == "multiclass" else 1
        with torch.random.fork_rng(devices=[]):  # omega's init is seeded without moving the run's RNG
            torch.manual_seed(int(ctx.config.seed))
            self.net = WeightNet(d_in, self.hidden).to(ctx.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=o.meta_lr, weight_decay=o.meta_weight_decay)
        ctx.log(
            f"bilaw: {o.method}, input {o.input} on "
            f"{'the clean sample' if o.margin_on == 'clean' else 'the adversarial variant'}, "
            f"omega {d_in}-{'-'.join(map(str, self.hidden))}-1, "
            f"meta Adam lr {o.meta_lr}, validation {len(self.val_y)} samples, batches of {o.val_batch}"
        )

    # -- pieces ---------------------------------------------------------------------------
    def net_input(self, ctx: StepContext, variants: list[Variant]) -> Tensor:
        """``[V, B, d]`` inputs of omega, detached, from the step's cached logits."""
        kind = self.options.input
        views = [NATURAL] * len(variants) if self.options.margin_on == "clean" else variants  # Def. 3: f(x_i)
        if kind == "multiclass":
            return torch.stack([multiclass_margin(ctx.probs(v), ctx.y) for v in views])
        if kind == "margin":
            return torch.stack([probabilistic_margin(ctx.probs(v), ctx.y) for v in views])[..., None]
        ce = torch.stack([F.cross_entropy(ctx.logits(v).detach(), ctx.y, reduction="none") for v in variants])
        if kind == "loss-diff":
            ce = ce - F.cross_entropy(ctx.logits(NATURAL).detach(), ctx.y, reduction="none")
        return ce[..., None]

    def validation_batch(self) -> tuple[Tensor, Tensor]:
        """A random validation batch with PGD examples made at the current parameters."""
        idx = torch.randint(
            len(self.val_y), (min(self.options.val_batch, len(self.val_y)),), generator=self.gen, device=self.device
        )
        x, y = self.val_x[idx], self.val_y[idx]
        return self.val_attack(x, y), y

    def meta_loss(self, ctx: StepContext, variants: list[Variant], w: Tensor, xv: Tensor, yv: Tensor) -> Tensor:
        """Unweighted robust validation loss after the pseudo-update with weights ``w`` (Eq. 5);
        differentiable with respect to ``w`` (and what ``w`` came from)."""
        loss_tr = self.loss_fn(ctx, variants, Weights(adv=w))
        names, params = zip(*[(n, p) for n, p in self.model.named_parameters() if p.requires_grad])
        grads = torch.autograd.grad(loss_tr, params, create_graph=True, retain_graph=True, allow_unused=True)
        theta = {n: p if g is None else p - ctx.lr * g for n, p, g in zip(names, params, grads)}  # Eq. 5
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return F.cross_entropy(functional_call(self.model, {**theta, **buffers}, (xv,)), yv)

    # -- the hook -------------------------------------------------------------------------
    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights:
        xv, yv = self.validation_batch()
        if self.options.method == "nonparametric":
            eps = torch.ones(len(variants), ctx.batch_size, dtype=ctx.x.dtype, device=ctx.y.device, requires_grad=True)
            (g,) = torch.autograd.grad(self.meta_loss(ctx, variants, eps, xv, yv), eps)
            w = (-g).clamp_min(0.0)  # proportional to [g_val(theta~)^T grad l_j(theta)]_+
            w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
            return Weights(adv=mean_one(w).detach())
        inp = self.net_input(ctx, variants)
        loss_val = self.meta_loss(ctx, variants, mean_one(self.net(inp)), xv, yv)
        self.opt.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(loss_val, list(self.net.parameters()))  # Eq. 6, through the pseudo-update
        for p, g in zip(self.net.parameters(), grads):
            p.grad = g
        self.opt.step()
        with torch.no_grad():
            return Weights(adv=mean_one(self.net(inp)))  # Alg. 1, line 7: weights from the updated mu

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
