"""AWP: adversarial weight perturbation (Wu, Xia and Wang, NeurIPS 2020).

Adversarial training flattens the loss landscape in the input; AWP also flattens it in the
weights. Each step, after the adversarial examples are made, the weights ``w`` are moved to
``w + v``, where ``v`` (one step of gradient ascent on the weights, layer by layer, relative to
each layer's norm) increases the training loss; the step's loss and its gradient are taken at
``w + v``; ``v`` is removed and the optimizer updates ``w`` with that gradient. The paper's
problem is ``min_w max_{v in V} rho(w + v)`` with ``||v_l|| <= gamma ||w_l||`` for every layer
``l``; its Algorithm 1 (AT-AWP; pseudo-code for TRADES-AWP, MART-AWP and RST-AWP in its
Appendix D) takes one ascent step on ``v`` per step. **Sources:** only the paper's abstract and
introduction were available to us, so the problem statement and the update above are as we know
the paper, not checked line by line, and no equation numbers are cited; every detail below follows
the authors' code (``csdongxian/AWP``: ``AT_AWP/utils_awp.py``, ``AT_AWP/train_cifar10.py``,
``trades_AWP/utils_awp.py``, ``trades_AWP/train_trades_cifar.py``):

* **the proxy step** (``calc_awp``): the gradient ``g_l`` of the run's training loss, unweighted,
  at the current weights, on the step's adversarial (and, for TRADES/MART, natural) inputs. The
  authors take one SGD step on a copy of the model (the "proxy") with the negated loss and read
  the difference; without momentum or weight decay that difference is ``lr * g_l``, and the
  scaling below divides ``lr`` out. We take ``g_l`` with ``torch.autograd.grad`` on the model
  itself: no copy of the model, and BatchNorm's running statistics are restored afterwards (the
  authors' proxy keeps the model's statistics untouched in the same way).
* **the layer-wise size** (``diff_in_weights``): ``v_l = gamma * ||w_l|| * g_l / (||g_l|| + 1e-20)``
  for every parameter with more than one dimension whose name contains ``weight`` (convolution
  and linear weights; biases and BatchNorm's affine parameters are not perturbed). So
  ``||v_l|| = gamma ||w_l||`` exactly: the projection ``Pi_gamma`` of the paper is active.
* **the loss**: for the built-in objectives it is the authors' proxy loss exactly: ``at``: mean CE on
  the adversarial examples (``AdvWeightPerturb.calc_awp``); ``trades``: ``CE(x) + beta KL``
  (``TradesAWP.calc_awp``); ``mart``: MART's loss (the authors report MART-AWP but publish no code
  for it; we use MART's loss the same way). In general it is the run's loss function
  (``TrainContext.loss_fn``: the loss owner plus wrappers) with no weights, on a scratch
  ``StepContext`` whose forward passes are not shared with the step. **Choice:** reweighting plugins
  (``--plugin awp --plugin mail``) weigh the training loss at ``w + v`` but not the proxy loss:
  their weights come from the forward at ``w + v``, which needs ``v`` first. The TRADES script's
  training step runs the natural forward twice, like TRADES' own code (adversarial, natural for the KL's
  target, natural for CE): ``--trades-natural-forwards 2`` for its BatchNorm statistics (in the order
  natural, adversarial, natural); the proxy's passes leave the statistics alone either way.

**Measured on the digits default (digits-cnn, 20 epochs, no BatchNorm):** AT-AWP with gamma 0.01
from the first epoch stays at chance (10 % test accuracy: the model never leaves the initial
plateau of the loss, and the ascent step keeps it there); with ``--awp-warmup 6`` it reaches
96.1 / 58.3 (natural / PGD-20), with ``--awp-gamma 0.002`` 97.5 / 58.6 (AT: 97.8 / 62.8). The
paper's setting (PreActResNet-18 on CIFAR-10) starts AWP at epoch 1; small models may need a warm-up.
This is AWP's, not ours: a line-by-line transcription of the authors' step (``calc_awp``, ``perturb``,
``opt.step()``, ``restore``) stays at chance on the same data too. On the plateau (near-constant logits)
the gradient at ``w + v`` is 0.3 times as long as at ``w`` and at cosine 0.5 to it (gamma 0.01; 0.9 and
0.99 at gamma 0.001), so the escape is about 7 times slower, and ``||v_l|| = gamma ||w_l||`` does not
shrink with the gradient. Once AT has left the plateau (about 3 epochs here) gamma 0.01 trains.

Order within advplug's step (hook ``perturb_weights``): the attack runs at ``w``
(``generate_adversaries``); AWP computes ``v`` and the core enters its perturbation; every forward
pass the weights and the loss use (``compute_weights``, ``combine_loss``) and the backward pass run
at ``w + v``; the core restores ``w`` exactly (a saved copy, not ``w + v - v``) and then steps the
optimizer. **Choice where paper and code differ:** the authors' scripts call ``optimizer.step()``
at ``w + v`` and subtract ``v`` afterwards (``awp_adversary.restore`` after ``opt.step()``), so
their weight decay is applied to ``w + v``; we restore before the step, as the paper's Algorithm 1
writes the update (``w <- (w + v) - eta grad - v``) and as advplug's contract requires (the
update is applied to the unperturbed weights). The difference is ``lr * weight_decay * v`` per
step.

Defaults (the authors' scripts): ``gamma`` 0.01 for ``--objective at`` (``AT_AWP/train_cifar10.py``),
0.005 for ``trades`` (``trades_AWP/train_trades_cifar.py``) and, our choice for want of a script,
0.005 for ``mart``; ``warmup``: AT-AWP perturbs from the first epoch (``--awp-warmup 0``),
TRADES-AWP from the tenth (``--awp-warmup 10`` with epochs counted from 1: ``epoch >= 10``), so 9
epochs without AWP in advplug's 0-based count, of the script's default 200 epochs (``--epochs 200``; learning
rate x0.1 at epochs 100 and 150), a 4.5 % share; MART: 0 (our choice). A TRADES run shorter than 100 epochs
warms up for 9 % of its epochs, rounded down (``min(9, floor(9 epochs / 100))``: 1 of 20). That rule is ours,
not the script's: it was written as "the script's 9 of 100 epochs", but the script trains 200, and we keep it
so that earlier runs stay identical; ``--awp-warmup N`` sets any warm-up (``floor(0.045 epochs)`` for the
script's share, 0 of 20). Cost: one extra forward and
backward pass per step (the proxy), the same as the authors' code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from advplug import FeatureTap, OptionError, StepContext, TrainContext, Variant, hookimpl, opt

__version__ = "0.1.0"

EPS = 1e-20  # the authors' EPS in diff_in_weights
GAMMA = {"at": 0.01, "trades": 0.005, "mart": 0.005}
WARMUP = {"at": 0, "trades": 9, "mart": 0}


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel."""
    return getattr(model, "module", model)


def perturbed_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The authors' selection (``diff_in_weights``): weights with more than one dimension whose
    name contains ``weight`` (convolution and linear weights)."""
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad and p.dim() > 1 and "weight" in n]


def layer_perturbation(weights: list[Tensor], grads: list[Tensor | None], gamma: float) -> list[Tensor]:
    """``v_l = gamma ||w_l|| g_l / (||g_l|| + 1e-20)`` per layer (zeros where a layer has no gradient)."""
    out = []
    for w, g in zip(weights, grads):
        if g is None:
            out.append(torch.zeros_like(w))
            continue
        out.append(g * (gamma * w.detach().norm() / (g.norm() + EPS)))
    return out


@contextlib.contextmanager
def applied(params: list[Tensor], v: list[Tensor], backup: list[Tensor]) -> Iterator[None]:
    """``w <- w + v`` in place; on exit ``w`` is copied back from ``backup`` (bit-exact restore)."""
    with torch.no_grad():
        for p, b, d in zip(params, backup, v):
            b.copy_(p)
            p.add_(d)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


class AWP:
    """AWP: adversarial weight perturbation, one layer-wise ascent step per batch (hook perturb_weights)."""

    @dataclass(frozen=True)
    class Options:
        gamma: float | None = opt(
            None, "relative size ||v_l|| / ||w_l|| (default: 0.01 at, 0.005 trades and mart)", min=0.0
        )
        warmup: int | None = opt(
            None,
            "epochs trained without AWP first (default: 0 at and mart; trades 9 as the script, of its 200 "
            "epochs, or 9 % of a run shorter than 100 epochs, rounded down: our rule)",
            min=0,
        )

    def __init__(self, options: Options) -> None:
        self.options = options
        self.loss_fn = None
        self.tap: FeatureTap | None = None
        self.world_size = 1
        self._backup: list[Tensor] | None = None

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        o = self.options
        gamma = o.gamma if o.gamma is not None else GAMMA.get(ctx.objective, 0.01)
        # the script's 9 warm-up epochs; a run shorter than 100 epochs keeps 9 % (our rule: the script trains 200)
        warmup = (
            o.warmup
            if o.warmup is not None
            else min(WARMUP.get(ctx.objective, 0), int(WARMUP.get(ctx.objective, 0) * ctx.epochs / 100))
        )
        if ctx.loss_fn is None:
            raise OptionError("awp needs the run's loss function (TrainContext.loss_fn)")
        if gamma > 0 and warmup >= ctx.epochs:
            raise OptionError(f"--awp-warmup {warmup} leaves no epoch with AWP ({ctx.epochs} epochs)")
        self.options = dataclasses.replace(o, gamma=gamma, warmup=warmup)
        self.loss_fn = ctx.loss_fn
        self.world_size = ctx.world_size
        self.tap = FeatureTap(unwrap(ctx.model))  # features for the scratch context's forwards
        n = len(perturbed_parameters(ctx.model))
        ctx.log(
            f"awp: gamma {gamma} on {n} weight tensors, from epoch {warmup + 1}, proxy loss: the run's loss unweighted"
        )

    def active(self, epoch: int) -> bool:
        return self.options.gamma > 0 and epoch >= self.options.warmup

    def scratch(self, ctx: StepContext, variants: list[Variant]) -> StepContext:
        """A StepContext for the same batch and views whose forward passes stay out of ``ctx``."""
        s = StepContext(
            model=ctx.model,
            x=ctx.x,
            y=ctx.y,
            index=ctx.index,
            epoch=ctx.epoch,
            step=ctx.step,
            num_classes=ctx.num_classes,
            config=ctx.config,
            lr=ctx.lr,
            tap=self.tap,
            reduce_mean=ctx.batch_mean,
        )
        s.variants = list(variants)
        for attr in ("anchor_name",):  # declared by the core in newer versions
            if hasattr(ctx, attr):
                setattr(s, attr, getattr(ctx, attr))
        return s

    def proxy_gradient(self, ctx: StepContext, variants: list[Variant], params: list[Tensor]) -> list[Tensor | None]:
        """Gradient of the run's unweighted loss at the current weights (the authors' proxy step),
        with BatchNorm's running statistics left as they were."""
        model = unwrap(ctx.model)
        buffers = [b.detach().clone() for b in model.buffers()]
        sync = getattr(ctx.model, "no_sync", None)  # DDP: no gradient reduction for this pass
        try:
            with sync() if callable(sync) else contextlib.nullcontext():
                loss = self.loss_fn(self.scratch(ctx, variants), variants, None)
                grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        finally:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
        if self.world_size > 1:  # the authors' DataParallel proxy sees the whole batch: average
            import torch.distributed as dist

            for i, g in enumerate(grads):
                g = torch.zeros_like(params[i]) if g is None else g
                dist.all_reduce(g)
                grads[i] = g / self.world_size
        return grads

    @hookimpl
    def perturb_weights(self, ctx: StepContext, variants: list[Variant]) -> Any:
        if not self.active(ctx.epoch):
            return None
        params = [p for _, p in perturbed_parameters(ctx.model)]
        grads = self.proxy_gradient(ctx, variants, params)
        v = layer_perturbation(params, grads, self.options.gamma)
        if (
            self._backup is None
            or len(self._backup) != len(params)
            or any(b.shape != p.shape or b.device != p.device for b, p in zip(self._backup, params))
        ):
            self._backup = [torch.empty_like(p) for p in params]  # allocated once, reused every step
        return applied(params, v, self._backup)

    @hookimpl
    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        return {"gamma": self.options.gamma, "active": self.active(epoch)}
