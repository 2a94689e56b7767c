"""MAIL: margin-aware instance reweighting learning (Wang et al., NeurIPS 2021; seed paper 004).

Probabilistic margin of each sample (Eq. 5-7), from logits the step already computed:

* ``adv`` (default, the paper's experiments): ``PM = p_y(x') - max_{j != y} p_j(x')`` (Eq. 5)
* ``nat``: the same on the natural input (Eq. 6; needs the natural forward, which TRADES and
  MART run anyway; with ``--objective at`` it is the one extra pass the method implies)
* ``dif``: ``p_y(x) - p_y(x^(t_i))`` (Eq. 7) with ``t_i`` the least PGD step that misclassifies
  ``x``; ``p_y(x^(t_i))`` is recorded by the training attack from its own iterations (the last
  iteration for samples it never misclassifies), so it costs no forward pass.

Weight ``w = sigmoid(-gamma (PM - beta))`` (Eq. 8), normalised per batch to
``omega_i = M w_i / sum_j w_j`` (Alg. 1, line 11; mean 1, all-reduced under DDP). The authors'
code multiplies by a fixed 3 instead: ``--mail-normalise fixed``. Weights are 1 (the plugin
abstains) during the burn-in, by default until the first learning-rate drop (Sec. 4.1).

Objectives: MAIL-AT is ``--objective at`` (Eq. 9), MAIL-TRADES ``--objective trades`` (the
weights go on the KL term, Eq. 10), MAIL-MART ``--objective mart``. Slope/bias presets per
objective (Sec. 4.1): AT gamma 10, beta -0.5; TRADES and MART gamma 2, beta 0; both
overridable. MAIL's weights are global, one per instance: with several variants (LRAT's pair)
the margin is read from one view, ``--mail-view`` (default ``anchor``: LRAT's x*, e.g. its PGD
variant, else the only variant; or ``natural``, or a variant name), never recomputed per variant
(that would be LRAT's Eq. 11 again); LRAT then splits the pair's weight over its variants.
PM-dif needs the view to record ``p_y`` at the least PGD step (the PGD variants do), checked at
start-up.

Where the paper and the authors' code (QizhouWang/MAIL, ``mail_loss.py``) differ, or the paper
is open, and what advplug does by default:

* MAIL-MART (App. C is not in the text we have): the code multiplies only MART's BCE term by
  the weights, ``mean(omega * BCE) + beta * mean(KL (1 - p_y(x)))``; Algorithm 1's unweighted
  regulariser reads the same. Default: the code's (``--mart-weighted bce``, an option of the
  MART objective); ``--mart-weighted both`` also weights the KL term.
* Normalisation: the paper's ``M w_i / sum_j w_j`` by default; the code's fixed ``3 w``:
  ``--mail-normalise fixed``.
* Training attack start: the code starts every objective's PGD from ``x + 0.001 N(0, 1)``
  (not clamped), which MAIL declares (``attack_start``), so MAIL-AT also starts there unless
  ``--attack-start`` says otherwise (plain AT starts uniformly in the eps-ball). Logged in the
  run header.
* PM-dif (Eq. 7) uses the least PGD step that misclassifies ``x`` (the paper); the code has no
  PM-dif. The code's PM is always PM-adv.
* MAIL-TRADES' beta: the paper sets 5 (Sec. 4.1), the code's default is 6; advplug's TRADES
  objective keeps TRADES' 6 (``--trades-beta 5`` for the paper's, as the example config does).
* Burn-in: the paper starts reweighting at the first lr drop (its 75 of 100 epochs); that is the
  default here (``--mail-burn-in``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from advplug import (
    NATURAL,
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
from advplug.signals import probabilistic_margin, true_prob  # PM of Eq. 5/6: p_y - max_{j != y} p_j

__version__ = "0.1.0"
PRESETS = {"at": (10.0, -0.5), "trades": (2.0, 0.0), "mart": (2.0, 0.0)}
FIXED_SCALE = 3.0


def mail_weights(pm: Tensor, gamma: float, beta: float) -> Tensor:
    """Eq. 8, unnormalised: ``sigmoid(-gamma (PM - beta))``."""
    return torch.sigmoid(-gamma * (pm - beta))


class MAIL:
    """MAIL: weights from the probabilistic margin, large for samples near or past the boundary."""

    strength_hint = "--mail-gamma (higher: steeper weights)"  # named by the core's inert-reweighting warning

    @dataclass(frozen=True)
    class Options:
        margin: str = opt(
            "adv", "probabilistic margin: adv (Eq. 5), nat (Eq. 6) or dif (Eq. 7)", choices=("adv", "nat", "dif")
        )
        gamma: float | None = opt(None, "slope of Eq. 8 (default by objective: at 10, trades/mart 2)", min=0.0)
        beta: float | None = opt(None, "bias of Eq. 8 (default by objective: at -0.5, trades/mart 0)")
        normalise: str = opt(
            "batch", "batch: M w / sum w (paper); fixed: 3 w (authors' code)", choices=("batch", "fixed")
        )
        burn_in: int | None = opt(None, "epochs with weights 1 (default: until the first lr drop)", min=0)
        dump: bool = opt(False, "write per-sample PM and weights with indices each epoch (RUN_DIR/dumps)")
        view: str = opt(
            "anchor",
            "view whose margin weighs the pair when there are several variants: anchor "
            "(LRAT's x*, else the only variant), natural, or a variant name",
        )

    def __init__(self, options: Options) -> None:
        self.options = options
        self.dumper: SampleDump | None = None

    @hookimpl
    def declare(self) -> Declaration:
        o = self.options
        needs = {"natural"} if o.margin in ("nat", "dif") else set()
        if o.margin == "dif":
            needs.add("stat:p_true_lps")
        scale = "M w / sum w, mean 1" if o.normalise == "batch" else "3 w, the authors' fixed scale (mean not 1)"
        return Declaration(
            weights="global",
            view=NATURAL if o.margin == "nat" else o.view,
            needs=frozenset(needs),
            own_scale=o.normalise == "fixed",
            meaning=f"sigmoid(-gamma (PM-{o.margin} - beta)) (Eq. 8), {scale}",
        )

    def attack_start(self, objective: str) -> str:
        """The authors' code starts the training attack from ``x + 0.001 N(0, 1)`` for AT, TRADES and MART."""
        return "normal"

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        gamma, beta = PRESETS.get(ctx.objective, PRESETS["at"])
        o = self.options
        burn = o.burn_in if o.burn_in is not None else burn_in_default(ctx.milestones, ctx.epochs)
        if burn >= ctx.epochs:
            raise OptionError(
                f"--mail-burn-in {burn} is not before the last epoch ({ctx.epochs} epochs): MAIL would never reweight"
            )
        self.options = dataclasses.replace(
            o,
            gamma=o.gamma if o.gamma is not None else gamma,
            beta=o.beta if o.beta is not None else beta,
            burn_in=burn,
        )
        if o.dump:
            self.dumper = SampleDump(ctx.config.out, "mail")
        ctx.log(
            f"mail: PM-{self.options.margin}, gamma {self.options.gamma}, beta {self.options.beta}, "
            f"{self.options.normalise} normalisation, reweighting from epoch {burn + 1}"
        )

    def margins(self, ctx: StepContext, variants: list[Variant]) -> Tensor:
        """PM ``[B]`` of the chosen kind, on the view ``--mail-view`` names (one per instance)."""
        kind = self.options.margin
        if kind == "nat":
            return probabilistic_margin(ctx.probs(NATURAL), ctx.y)
        view = ctx.view(self.options.view)
        if kind == "adv":
            return probabilistic_margin(ctx.probs(view), ctx.y)
        if view == NATURAL or "p_true_lps" not in view.stats:
            name = view if view == NATURAL else view.name
            raise OptionError(
                f"--mail-margin dif needs the attack's record of p_y at the least PGD step; view {name!r} has none"
            )
        return true_prob(ctx.probs(NATURAL), ctx.y) - view.stats["p_true_lps"]

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights | None:
        if ctx.epoch < self.options.burn_in:
            return None
        pm = self.margins(ctx, variants)
        w = mail_weights(pm, self.options.gamma, self.options.beta)
        w = w / ctx.batch_mean(w) if self.options.normalise == "batch" else FIXED_SCALE * w
        if self.dumper is not None:
            self.dumper.add(index=ctx.index, pm=pm, weight=w)
        return Weights(adv=w)  # global: one weight per instance, the pair's

    @hookimpl
    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        if self.dumper is not None:
            self.dumper.write(epoch)
        return {"reweighting": epoch >= self.options.burn_in}
