"""GAIRAT: geometry-aware instance-reweighted adversarial training (Zhang et al., ICLR 2021).

The baseline every seed paper compares against. ``kappa`` is the number of PGD iterations at
which the sample was still classified correctly (prediction before each update), exactly as the
authors' code counts it; advplug's training attack records it on the device (``stats["kappa"]``),
so it is free. With ``K`` attack steps and ``h = K // 2`` (the code's ``int(K / 2)``):

* ``tanh`` (default): ``w = (1 + tanh(lambda + 5 (h - kappa) / h)) / 2``, i.e.
  ``(1 + tanh(lambda + 5 (1 - 2 kappa / K))) / 2`` for even K (LRAT paper, Eq. 10)
* ``sigmoid``: ``w = sigmoid(lambda + 5 (h - kappa) / h)``
* ``discrete``: ``w = (K + 1 - kappa) / (K + 1)``

normalised so the weights sum to the batch size (mean 1; all-reduced under DDP). Burn-in: weights
are 1 until ``begin_epoch`` (default the first learning-rate drop; the authors' 60 of 120).
Lambda schedule as in the authors' code: ``fixed`` (lambda from the burn-in on), ``linear``
(``lambda_max - (epoch / epochs) (lambda_max - lambda)``, needs a finite ``--gairat-lambda-max``)
and ``piecewise`` (lambda, then lambda - 1 at 3/4 and lambda - 1.5 at 11/12 of the epochs: the
authors' code orders these branches so that only the first can fire; we apply the evident intent).

GAIRAT's weights are global, one per instance. With several variants (LRAT's pair), kappa is read
from one view, ``--gairat-view`` (default ``anchor``: LRAT's x*, else the only variant); the view
must record kappa (the PGD variants do; LRAT's CW and SAA variants do not), checked at start-up.

Where advplug and the authors' ``GAIRAT.py`` / ``GAIR.py`` / ``attack_generator.py`` differ, or
the paper is open (defaults named):

* kappa counts the K iterations whose prediction, *before* the update, is the label (the code;
  in [0, K]); the paper's "least PGD steps" is the same number for samples that stay wrong once
  misclassified. Tested against a model whose prediction flips at a known iteration.
* ``h = int(K / 2)`` as in ``GAIR.py``, which differs from ``K / 2`` for odd K (tested for K = 3,
  5, 7 against a transcription of ``GAIR.py``).
* The training attack starts uniformly in the eps-ball (``GA_PGD``, ``rand_init=True``), which
  is ``--objective at``'s default start (``--attack-start uniform``).
* Burn-in: the code reweights when ``epoch + 1 >= begin_epoch`` (0-based epoch 59 for its 60);
  ``--gairat-begin-epoch`` is the first reweighted 0-based epoch, by default the first lr drop
  (the code's lr also drops at 0-based 59: ``lr_schedule(epoch + 1)``), so both start together.
  ``examples/configs/gairat-cifar10-resnet18.toml`` reproduces the authors' run and lists what
  it cannot (their lr / 2 at epoch 110, their test-set "best" checkpoint).
* ``piecewise`` lambda: the evident intent, not the code's unreachable branches (above).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from advplug import (
    Declaration,
    OptionError,
    SampleDump,
    StepContext,
    TrainContext,
    Variant,
    Weights,
    burn_in_default,
    hookimpl,
    opt,
)

__version__ = "0.1.0"


def gair_weights(kappa: Tensor, steps: int, lam: float, func: str = "tanh") -> Tensor:
    """Unnormalised GAIR weights from kappa ``[..., B]`` for a K-step attack."""
    k = kappa.float()
    h = steps // 2
    if func == "tanh":
        return (torch.tanh(lam + 5 * (h - k) / h) + 1) / 2
    if func == "sigmoid":
        return torch.sigmoid(lam + 5 * (h - k) / h)
    if func == "discrete":
        return (steps + 1 - k) / (steps + 1)
    raise ValueError(f"unknown weight function {func!r}")


def lambda_at(epoch: int, epochs: int, begin: int, lam: float, lam_max: float, schedule: str) -> float:
    """The authors' ``adjust_Lambda``, with the burn-in epoch as the switch point."""
    if epoch < begin:
        return lam_max
    if schedule == "linear":
        return lam_max - (epoch / epochs) * (lam_max - lam)
    if schedule == "piecewise":
        if epoch >= round(epochs * 11 / 12):
            return lam - 1.5
        if epoch >= round(epochs * 3 / 4):
            return lam - 1.0
    return lam


class GAIRAT:
    """GAIRAT: larger weights for samples that PGD misclassifies in fewer steps (small kappa)."""

    # named by the core's inert-reweighting warning
    strength_hint = "--gairat-lam and --gairat-schedule (lower lambda: stronger reweighting)"

    @dataclass(frozen=True)
    class Options:
        lam: float = opt(-1.0, "lambda of the weight function (authors' default -1)")
        lambda_max: float = opt(math.inf, "lambda before the burn-in ends / start of the linear schedule")
        schedule: str = opt(
            "fixed", "lambda schedule: fixed, linear or piecewise", choices=("fixed", "linear", "piecewise")
        )
        func: str = opt("tanh", "weight function: tanh, sigmoid or discrete", choices=("tanh", "sigmoid", "discrete"))
        begin_epoch: int | None = opt(None, "first reweighted epoch (default: the first lr drop)", min=0)
        dump: bool = opt(False, "write per-sample kappa and weights with indices each epoch (RUN_DIR/dumps)")
        view: str = opt(
            "anchor",
            "variant whose kappa weighs the pair when there are several: anchor "
            "(LRAT's x*, else the only variant) or a variant name",
        )

    def __init__(self, options: Options) -> None:
        self.options = options
        self.steps = 10
        self.epochs = 1
        self.dumper: SampleDump | None = None

    @hookimpl
    def declare(self) -> Declaration:
        o = self.options
        return Declaration(
            weights="global",
            view=o.view,
            needs=frozenset({"stat:kappa"}),
            meaning=f"GAIR {o.func} of kappa (lambda {o.lam}, {o.schedule}), mean 1",
        )

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        o = self.options
        begin = o.begin_epoch if o.begin_epoch is not None else burn_in_default(ctx.milestones, ctx.epochs)
        if begin >= ctx.epochs:
            raise OptionError(f"--gairat-begin-epoch {begin} is not before the last epoch ({ctx.epochs} epochs)")
        if o.schedule == "linear" and not math.isfinite(o.lambda_max):
            raise OptionError("--gairat-schedule linear needs a finite --gairat-lambda-max")
        self.options = dataclasses.replace(o, begin_epoch=begin)
        self.steps, self.epochs = ctx.config.steps, ctx.epochs
        if self.steps < 2:
            raise OptionError("gairat needs an attack of at least 2 steps (kappa / (K // 2))")
        if o.dump:
            self.dumper = SampleDump(ctx.config.out, "gairat")
        ctx.log(f"gairat: {o.func} weights, lambda {o.lam} ({o.schedule}), reweighting from epoch {begin + 1}")

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights | None:
        o = self.options
        if ctx.epoch < o.begin_epoch:
            return None
        view = ctx.view(o.view)
        if view == "natural" or "kappa" not in view.stats:
            raise OptionError(f"gairat needs kappa from the attack, but view {getattr(view, 'name', view)!r} has none")
        kappa = view.stats["kappa"]  # [B]: one weight per instance, the pair's
        lam = lambda_at(ctx.epoch, self.epochs, o.begin_epoch, o.lam, o.lambda_max, o.schedule)
        w = gair_weights(kappa, self.steps, lam, o.func)
        w = w / ctx.batch_mean(w)  # sum to the batch size
        if self.dumper is not None:
            self.dumper.add(index=ctx.index, kappa=kappa, weight=w)
        return Weights(adv=w)

    @hookimpl
    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        if self.dumper is not None:
            self.dumper.write(epoch)
        o = self.options
        return {
            "lambda": lambda_at(epoch, self.epochs, o.begin_epoch, o.lam, o.lambda_max, o.schedule),
            "reweighting": epoch >= o.begin_epoch,
        }
