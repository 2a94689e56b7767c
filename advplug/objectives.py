"""Built-in objectives, chosen with ``--objective``. Each is a plugin that owns ``combine_loss``.

* ``at``: Madry et al. (2018), cross-entropy on the adversarial variants, per-sample weighted
  and averaged over variants. ``trylast``: any other loss owner (e.g. LRAT) takes precedence.
* ``trades``: Zhang et al. (2019), ``CE(f(x), y) + beta * KL(p(x) || p(x'))`` with the KL
  attack from ``x + 0.001 N(0, 1)``, not clamped, as in TRADES' ``trades.py`` (torchattacks'
  TPGD clamps the start to [0, 1] first: ``--attack-start normal-clamped``); natural weights on
  the CE term, adversarial weights on the KL term (as MAIL-TRADES Eq. 10 and MeoW Eq. 6 place them).
  Natural forward passes (``--trades-natural-forwards``): ``1`` (default) runs ``f(x)`` once, for CE and
  KL; the authors' ``trades.py`` runs it twice in train mode (``model(x_natural)`` for CE, ``model(x_adv)``,
  then ``model(x_natural)`` again for the KL's target), which is ``2``. The loss and its gradient are the
  same (the same batch statistics); BatchNorm's running statistics, used at evaluation, differ (one more
  momentum update with the natural batch), and so would dropout's masks. Default ``1``: earlier runs stay
  bit-identical and a step costs one forward less. With ``2`` the order is the code's, natural, adversarial,
  natural, unless a weighting plugin read the adversarial logits first. The KL attack runs in eval mode
  (``--attack-bn eval``, as ``trades.py``) and updates no statistics, so the option counts training forwards
  only; under ``--attack-bn train`` the attack's passes update them as well, in torchattacks' TPGD order
  (``f(x)`` once, then ``f(x')`` per step; ``trades.py`` would run ``f(x)`` at every step).
* ``mart``: Wang et al. (2020), ``BCE(p(x'), y) + beta * KL(p(x) || p(x')) (1 - p_y(x))``,
  where BCE is CE plus ``-log(1 - max_{k != y} p_k(x'))``; training attack from
  ``x + 0.001 N(0, 1)`` as in MART's code. Adversarial weights (``--mart-weighted``): ``bce``
  (default) on the BCE term only, as the one authors' code that reweights MART does (MAIL's
  ``mail_loss.py``; MAIL's Algorithm 1, whose regulariser is unweighted, reads the same); ``both``
  on the BCE and the KL term.

TRADES' and MART's ``beta`` may be set per sample by a plugin (``attack_budget`` returning ``Budget.beta`` ``[B]``):
the regulariser is then ``mean_b(w_b * beta_b * KL_b)`` in place of ``beta * mean_b(w_b * KL_b)``, and TRADES' KL
attack takes the step's per-sample ``eps`` / ``alpha`` (``Budget``) when set.

Each objective's training attack starts as its authors' code starts it (``attacks.OBJECTIVE_START``:
``at`` uniform in the eps-ball, ``trades`` and ``mart`` ``x + 0.001 N(0, 1)``); ``--attack-start``
overrides it and the run header logs the start used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from advplug.context import NATURAL, StepContext, TrainContext, Variant, Weights
from advplug.errors import PluginError
from advplug.hookspecs import hookimpl
from advplug.options import opt
from advplug.weights import adv_matrix, nat_vector


def _check_no_natural(name: str, weights: Weights | None) -> None:
    if weights is not None and weights.nat is not None:
        raise PluginError(
            f"objective {name!r} has no natural term, but a plugin supplied natural weights; "
            "use --objective trades (or a plugin whose objective has one)"
        )


def regularised(beta: float, ctx: StepContext, w: Tensor, kl: Tensor) -> Tensor:
    """The regulariser ``beta * mean(w * KL)`` over ``[V, B]``; with a per-sample strength ``ctx.budget.beta`` ``[B]``
    (``attack_budget``), ``mean(w[v, b] * beta_b * KL[v, b])`` in its place."""
    b = ctx.budget.beta
    return beta * (w * kl).mean() if b is None else (w * (b * kl)).mean()


class AdversarialCE:
    """AT (Madry et al.): weighted cross-entropy over the adversarial variants."""

    @hookimpl(trylast=True)
    def combine_loss(self, ctx: StepContext, variants: list[Variant], weights: Weights | None) -> Tensor:
        _check_no_natural("at", weights)
        ce = torch.stack([F.cross_entropy(ctx.logits(v), ctx.y, reduction="none") for v in variants])  # [V, B]
        return (adv_matrix(weights, len(variants), ctx.batch_size, ce) * ce).mean()


def trades_kl(nat_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """Per-sample KL(p(x) || p(x')) = sum_k p_k(x) (log p_k(x) - log p_k(x'))."""
    log_p_nat = F.log_softmax(nat_logits, dim=1)
    return (log_p_nat.exp() * (log_p_nat - F.log_softmax(adv_logits, dim=1))).sum(1)


class TRADES:
    """TRADES (Zhang et al., 2019): natural CE plus beta times the KL to the adversarial view."""

    @dataclass(frozen=True)
    class Options:
        beta: float = opt(6.0, "trade-off 1/lambda between natural CE and the KL term", min=0.0)
        natural_forwards: int = opt(
            1,
            "forward passes of the natural batch per step: 1 (its logits serve CE and KL) or 2 (the authors' "
            "trades.py: again for the KL's target, so BatchNorm's running statistics are updated once more)",
            min=1,
            max=2,
        )

    def __init__(self, options: Options) -> None:
        self.options = options
        self.attack = None

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        self.attack = ctx.make_attack("tpgd")
        if self.options.natural_forwards == 2:
            ctx.log("trades: the natural forward twice per step, for CE and again for the KL's target (trades.py)")

    @hookimpl
    def generate_adversaries(self, ctx: StepContext) -> list[Variant]:
        b = ctx.budget  # a per-sample eps / alpha (attack_budget), if a plugin sets one
        x_adv = (
            self.attack(ctx.x, ctx.y)
            if b.eps is None and b.alpha is None
            else self.attack(ctx.x, ctx.y, b.eps, b.alpha)
        )
        return [Variant("tpgd", x_adv, self.attack.stats())]

    @hookimpl
    def combine_loss(self, ctx: StepContext, variants: list[Variant], weights: Weights | None) -> Tensor:
        nat = ctx.logits(NATURAL)
        ce = F.cross_entropy(nat, ctx.y, reduction="none")
        adv = [ctx.logits(v) for v in variants]
        target = ctx.logits_again(NATURAL) if self.options.natural_forwards == 2 else nat  # trades.py: after x_adv
        kl = torch.stack([trades_kl(target, a) for a in adv])  # [V, B]
        w_adv = adv_matrix(weights, len(variants), ctx.batch_size, kl)
        return (nat_vector(weights, ctx.batch_size, ce) * ce).mean() + regularised(self.options.beta, ctx, w_adv, kl)


def mart_terms(nat_logits: Tensor, adv_logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample MART terms (Wang et al., 2020, Eq. 9 and the authors' code):
    ``bce = CE(x', y) - log(1.0001 - p_{y'}(x'))`` with ``y'`` the most probable wrong class, and
    ``kl = KL(p(x) || p(x')) * (1.0000001 - p_y(x))``."""
    adv_probs = F.softmax(adv_logits, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(adv_logits, y, reduction="none") + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), new_y, reduction="none"
    )
    nat_probs = F.softmax(nat_logits, dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = (torch.xlogy(nat_probs, nat_probs) - nat_probs * torch.log(adv_probs + 1e-12)).sum(1)
    return bce, kl * (1.0000001 - true_probs)


class MART:
    """MART (Wang et al., 2020): boosted CE on adversarial data plus a misclassification-aware KL."""

    @dataclass(frozen=True)
    class Options:
        beta: float = opt(6.0, "weight of the misclassification-aware KL term", min=0.0)
        weighted: str = opt(
            "bce",
            "terms the adversarial weights multiply: bce (MAIL's mail_loss.py) or both (BCE and KL)",
            choices=("bce", "both"),
        )

    def __init__(self, options: Options) -> None:
        self.options = options

    @hookimpl
    def combine_loss(self, ctx: StepContext, variants: list[Variant], weights: Weights | None) -> Tensor:
        _check_no_natural("mart", weights)
        nat = ctx.logits(NATURAL)
        terms = [mart_terms(nat, ctx.logits(v), ctx.y) for v in variants]
        bce = torch.stack([t[0] for t in terms])
        kl = torch.stack([t[1] for t in terms])
        w = adv_matrix(weights, len(variants), ctx.batch_size, bce)
        w_kl = w if self.options.weighted == "both" else torch.ones_like(w)
        return (w * bce).mean() + regularised(self.options.beta, ctx, w_kl, kl)


OBJECTIVES: dict[str, type] = {"at": AdversarialCE, "trades": TRADES, "mart": MART}
