"""DAFA: distance-aware fair adversarial training (Lee, Lee, Jang, Park, Bae and Yoon, ICLR 2024).

DAFA gives each class a weight from how similar it is to the others under attack, measured once after a warm-up,
and uses it twice: as the weight of that class's samples in the loss and as the scale of their attack budget (the
abstract's "distinct loss weights and adversarial margins to each class"). A hard class that is confused with an
easier one gains weight and budget, the easier one gives some up.

**Sources.** The paper's text was not available to us beyond its abstract; everything below follows the
authors' code (``rucy74/DAFA``: ``train.py``, ``losses.py``, ``utils.py``, ``arguments.py``), which is the
reference, and cites its functions rather than equation numbers we could not check.

Memory and class weights, as the code computes them:

* **memory** (``train.py``, ``losses.py``): during the last warm-up epoch, the softmax of the *adversarial*
  logits of the training forward (train mode, the logits the loss uses; TRADES' ``x_adv`` and ``madry_loss``'s
  alike) is recorded for every training sample with its label. Here it is kept on the device as a per-class sum
  ``[K, K]`` and count ``[K]`` (float64, as numpy's mean), no host sync per step; the view is the run's anchor (the
  objective's attack, or the variant another plugin makes). Every training sample is seen once per epoch, so the
  sums equal the code's per-index array; under DDP they are summed over the ranks at the epoch's end (a sample the
  distributed sampler repeats to even out the ranks counts twice, where the code has one process).
* **class weights** (``utils.calculate_class_weights``): ``S[i] = mean of p(x') over class i`` and, for every
  other class ``j``: if ``S[i, i] < S[j, j]`` (``i`` is harder) ``w_i += lambda S[i, j] S[j, j]``, else
  ``w_i -= lambda S[j, i] S[i, i]`` (a tie subtracts), from ``w = 1``. Computed once, at the end of the warm-up
  epoch, and kept for the rest of the run (``train.py``).

How the weights enter a step (``losses.py``; ``w_y`` is the class weight of each sample's label, 1 before the end
of the warm-up):

* ``--objective trades`` (``trades_loss``, their main setting): the KL attack's budget is ``w_y eps`` and its step
  ``w_y alpha`` per sample (``attack_budget``: the core's TRADES attack, start ``x + 0.001 N(0, 1)`` as theirs);
  the loss is ``mean(w_y CE(f(x), y)) + beta * sum KL / B``: the class weights multiply the **natural CE only**
  (``Weights.nat``), the KL term is not weighted and beta stays the run's.
* ``--objective at`` (``madry_loss``): the loss is ``mean(w_y CE(f(x'), y))`` (``Weights.adv``). Its attack: see
  ``--dafa-at-attack`` below.
* ``--objective mart``: not in the code; refused.

The weights are returned as the code computes them (``own_scale``: not mean 1, their mean over the classes is 1
plus the gains minus the losses, and the batch mean follows the class mix); beside other global weights the
product is rescaled to the product of the batch means, as for every global method.

Differences and choices (each with its default):

* **warm-up** (``--dafa-warmup``): the code's ``--dafa_warmup 70`` of 110 epochs: epochs 1..70 train unweighted,
  the memory is recorded during epoch 70, the weights apply from epoch 71. ``--dafa-warmup N`` is that epoch
  count (memory in epoch N, weights from N + 1); it must be below ``--epochs`` (the weights must get an epoch).
  Default: the code's share, ``round(70 epochs / 110)``, at least 1 (70 of 110, 10 of 15, 1 of 2); a one-epoch
  run has no epoch after a warm-up and gets none (0). ``0``: no warm-up epoch, the weights stay 1 (the code's
  ``epoch == 0`` never happens). A run extended with ``--resume --epochs`` keeps a warm-up that has happened; one
  still ahead moves with the default's share.
* **lambda** (``--dafa-lambda``): 1.0, the code's default for CIFAR-10 (1.5 for CIFAR-100 and STL-10).
* **negative weights** (``--dafa-min-weight``, default 0): ``w_i`` has no lower bound in the code; a class far
  easier than several others that many classes are confused with can reach ``w_i < 0``, where the code's loss
  ascends that class's CE and its projection bounds cross. Weights are clamped at this floor (logged with the
  classes it clamped, the unclamped ones in ``metrics.jsonl`` as ``raw_weights``); advplug's weights must be >= 0,
  so no setting reproduces a negative weight.
* **AT's attack** (``--dafa-at-attack``): ``budget`` (default) runs the core's PGD with per-sample budget
  ``w_y eps`` and step ``w_y alpha`` (the class margins of the abstract; PGD's start as the run's, uniform in the
  per-sample ball for ``at``), so that DAFA-AT is plain AT until its warm-up ends. ``code`` runs ``madry_loss``'s
  loop exactly: start ``x + 0.001 N(0, 1)`` (unclamped; ``--attack-start`` does not apply, ``--attack-bn`` does),
  and at each iteration a step ``w_y alpha`` and the projection onto ``w_y eps``, **then** a second step ``alpha``
  along the same gradient sign and the projection onto ``eps``, then ``[0, 1]``. Those two lines, left from plain
  PGD, make each iteration's step ``(1 + w_y) alpha`` (``2 alpha`` during the warm-up) and bound each class's
  perturbation by ``min(eps, w_y eps + alpha)``: a weight above 1 enlarges no budget. ``code`` makes its own
  variant (``dafa``), which replaces the objective's attack; beside another plugin's variants it is refused at the
  first step.
* **Order of the forward passes** (TRADES): the code runs ``f(x_adv)``, then ``f(x)``, in train mode; advplug's
  TRADES runs ``f(x)`` first, except in the memory epoch, where this plugin reads the adversarial probabilities
  before the loss does. The loss and its gradient are the same; BatchNorm's running statistics take the two
  batches in the other order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from advplug import (
    Budget,
    Declaration,
    OptionError,
    PluginError,
    StepContext,
    TrainContext,
    Variant,
    Weights,
    all_sum,
    hookimpl,
    opt,
    set_bn_mode,
)

__version__ = "0.1.0"

CODE_WARMUP, CODE_EPOCHS = 70, 110  # arguments.py: --dafa_warmup 70, --epochs 110
OBJECTIVES = ("trades", "at")


# -- the memory and the class weights (pure) --------------------------------------------------------------------------
def memory_add(total: Tensor, count: Tensor, probs: Tensor, y: Tensor) -> None:
    """Add one step's probabilities ``[B, K]`` to the per-class sums ``total`` ``[K, K]`` and counts ``[K]``, in
    place, on the device (a ``[K, B] x [B, K]`` product: deterministic, no host sync)."""
    onehot = (y.unsqueeze(1) == torch.arange(total.shape[0], device=y.device)).to(total.dtype)  # [B, K]
    total.add_(onehot.T @ probs.to(total.dtype))
    count.add_(onehot.sum(0))


def class_similarity(total: Tensor, count: Tensor) -> Tensor:
    """``S[i] = mean of p(x') over the samples of class i`` ``[K, K]`` (calculate_class_weights' class_similarity);
    a class without samples gets a zero row."""
    return total / count.clamp_min(1).unsqueeze(1)


def class_weights(similarity: Tensor, lamb: float) -> Tensor:
    """calculate_class_weights: from ``w = 1``, for each pair ``i != j``, ``w_i += lamb S[i, j] S[j, j]`` when
    ``S[i, i] < S[j, j]`` (class i is the harder one), else ``w_i -= lamb S[j, i] S[i, i]``."""
    s = similarity
    d = s.diagonal()
    off = ~torch.eye(len(d), dtype=torch.bool, device=s.device)
    harder = d.unsqueeze(1) < d.unsqueeze(0)  # [i, j]: S_ii < S_jj
    gain = (harder * s * d.unsqueeze(0)).sum(1)  # sum_j S_ij S_jj over the easier classes j
    loss = ((~harder & off) * s.T * d.unsqueeze(1)).sum(1)  # sum_j S_ji S_ii over the others
    return 1 + lamb * gain - lamb * loss


def default_warmup(epochs: int) -> int:
    """The code's share of warm-up epochs, ``round(70 epochs / 110)``, at least 1 and below ``epochs`` (0 when
    the run has a single epoch)."""
    if epochs < 2:
        return 0
    return min(max(1, math.floor(CODE_WARMUP * epochs / CODE_EPOCHS + 0.5)), epochs - 1)


# -- madry_loss's attack (--dafa-at-attack code) ----------------------------------------------------------------------
class MadryLossPGD(torchattacks.PGD):
    """The attack of the authors' ``madry_loss``, line by line: from ``x + 0.001 N(0, 1)`` (not clamped), each
    iteration takes the sign of the mean-CE gradient, steps ``w alpha`` and projects onto ``x +- w eps`` (``w``
    per sample, ``scale``), then steps ``alpha`` and projects onto ``x +- eps``, then clamps to [0, 1].

    >>> atk = MadryLossPGD(model, eps=8/255, alpha=2/255, steps=10); atk.set_scale(w_y); x_adv = atk(x, y)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        object.__setattr__(self, "scale", None)

    def set_scale(self, scale: Tensor | None) -> None:
        """Per-sample budget scale ``[B]`` for the next call (``None``: 1)."""
        object.__setattr__(self, "scale", scale)  # torchattacks' __setattr__ walks attributes for attacks

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        x = images.clone().detach().to(self.device)
        y = labels.clone().detach().to(self.device)
        w = self.scale if self.scale is not None else torch.ones(len(y), device=x.device)
        shape = (-1, *[1] * (x.dim() - 1))
        w_eps, w_alpha = (w * self.eps).view(shape), (w * self.alpha).view(shape)
        x_adv = x + 0.001 * torch.randn_like(x)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            grad = torch.autograd.grad(F.cross_entropy(self.get_logits(x_adv), y), x_adv)[0]
            x_adv = x_adv.detach() + w_alpha * torch.sign(grad)
            x_adv = torch.min(torch.max(x_adv, x - w_eps), x + w_eps)  # the class budget
            x_adv = x_adv.detach() + self.alpha * torch.sign(grad)  # madry_loss's second, unscaled step
            x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        return x_adv.detach()


# -- the plugin --------------------------------------------------------------------------------------------------------
class DAFA:
    """DAFA: class weights from inter-class similarity after a warm-up, on the loss and the attack budget."""

    @dataclass(frozen=True)
    class Options:
        warmup: int | None = opt(
            None,
            "epochs trained before the class weights apply; the memory is recorded in the last of them "
            "(default: the code's 70 of 110, round(70 epochs / 110), at least 1; 0: weights stay 1)",
            min=0,
        )
        lambda_: float = opt(
            1.0, "scale of the class-weight updates (the code: cifar10 1.0, cifar100/stl10 1.5)", min=0.0
        )
        min_weight: float = opt(0.0, "floor of the class weights (the code has none; weights must be >= 0)", min=0.0)
        at_attack: str = opt(
            "budget",
            "with --objective at: budget (the core's PGD, eps and step scaled per class) or code (madry_loss's loop "
            "exactly, with its second unscaled step)",
            choices=("budget", "code"),
        )

    def __init__(self, options: Options) -> None:
        self.options = options
        self.objective = "trades"
        self.warmup = 0
        self.weights: Tensor | None = None  # [K] class weights, after the warm-up
        self.attack: MadryLossPGD | None = None
        self.eps = self.alpha = 0.0
        self._total: Tensor | None = None
        self._count: Tensor | None = None
        self._log: Any = print

    @hookimpl
    def declare(self, objective: str) -> Declaration:
        if objective not in OBJECTIVES:
            raise OptionError(f"dafa with --objective {objective}: not in the authors' code (trades, at)")
        code = objective == "at" and self.options.at_attack == "code"
        term = "the natural CE" if objective == "trades" else "the adversarial CE"
        return Declaration(
            weights="global",
            natural_weights=objective == "trades",
            variants={"dafa": ()} if code else {},
            own_scale=True,
            sets=frozenset() if code else frozenset({"eps", "alpha"}),  # code: its own attack scales them
            meaning=f"class weights from class similarity after a warm-up, on {term} and the class's eps",
        )

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        o, cfg = self.options, ctx.config
        self.objective = ctx.objective
        self.warmup = o.warmup if o.warmup is not None else default_warmup(ctx.epochs)
        if self.warmup and self.warmup >= ctx.epochs:
            raise OptionError(
                f"--dafa-warmup {self.warmup} leaves no epoch with class weights ({ctx.epochs} epochs): "
                f"use at most {ctx.epochs - 1}"
            )
        k = ctx.num_classes
        self._total = torch.zeros(k, k, dtype=torch.float64, device=ctx.device)
        self._count = torch.zeros(k, dtype=torch.float64, device=ctx.device)
        self.eps, self.alpha, self._log = cfg.eps, cfg.alpha, ctx.log
        if self.objective == "at" and o.at_attack == "code":
            self.attack = MadryLossPGD(ctx.model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps)
            set_bn_mode(self.attack, cfg.attack_bn)
        where = "natural CE" if self.objective == "trades" else "adversarial CE"
        attack = "madry_loss's PGD" if self.attack is not None else "eps and step"
        ctx.log(
            f"dafa: warm-up of {self.warmup} epoch{'s' * (self.warmup != 1)} (memory in epoch {self.warmup}), "
            f"lambda {o.lambda_}; class weights "
            f"on the {where} and the {attack} per class"
            if self.warmup
            else "dafa: no warm-up epoch (--dafa-warmup 0 or a one-epoch run): class weights stay 1"
        )

    def sample_weights(self, y: Tensor) -> Tensor | None:
        """Each sample's class weight ``[B]`` (``None`` before the end of the warm-up)."""
        return None if self.weights is None else self.weights[y]

    @hookimpl
    def attack_budget(self, ctx: StepContext) -> Budget | None:
        w = self.sample_weights(ctx.y)
        if w is None or self.attack is not None:
            return None
        return Budget(eps=w * self.eps, alpha=w * self.alpha)  # losses.py: class_weights_mask * epsilon / step_size

    @hookimpl
    def generate_adversaries(self, ctx: StepContext) -> list[Variant] | None:
        if self.attack is None:
            return None
        self.attack.set_scale(self.sample_weights(ctx.y))
        return [Variant("dafa", self.attack(ctx.x, ctx.y))]

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights | None:
        if self.attack is not None and len(variants) > 1:
            raise PluginError(
                "dafa --dafa-at-attack code makes its own attack (madry_loss's), but other plugins make variants "
                f"too ({', '.join(v.name for v in variants)}): use --dafa-at-attack budget"
            )
        if ctx.epoch == self.warmup - 1:  # the last warm-up epoch: the memory (train.py: epoch == dafa_warmup)
            memory_add(self._total, self._count, ctx.probs(ctx.anchor), ctx.y)
        w = self.sample_weights(ctx.y)
        if w is None:
            return None
        return Weights(nat=w) if self.objective == "trades" else Weights(adv=w)

    @hookimpl
    def on_epoch_end(self, epoch: int) -> dict[str, Any] | None:
        if epoch != self.warmup - 1:
            return None
        sim = class_similarity(all_sum(self._total), all_sum(self._count))
        raw = class_weights(sim, self.options.lambda_)
        self.weights = raw.clamp_min(self.options.min_weight).float()
        raw_list, diag = raw.tolist(), sim.diagonal().tolist()
        clamped = [i for i, v in enumerate(raw_list) if v < self.options.min_weight]
        self._log(
            "dafa: class weights "
            + ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(self.weights.tolist()))
            + (f" (clamped at {self.options.min_weight}: classes {clamped})" if clamped else "")
        )
        self._total.zero_()
        self._count.zero_()
        return {"class_weights": self.weights.tolist(), "raw_weights": raw_list, "similarity_diag": diag}

    def state_dict(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"]
        if self.weights is not None:  # the warm-up happened: it stays where it was
            self.weights = self.weights.to(self._total.device if self._total is not None else "cpu")
            self.warmup = int(state["warmup"])
