"""WMMR: weighted minimax risk (Zeng, Zhu, Goldstein and Huang, AAAI 2021, "Are Adversarial Examples
Created Equal? A Learnable Weighted Minimax Risk for Robustness under Non-uniform Attacks").

**Source, and what could not be checked.** We could not read the paper's method section (only its
abstract and introduction were available to us), so this plugin does **not** cite the paper's
equation numbers and does not claim to transcribe its equations. It implements the weights as the
authors' code defines them (``huiminzeng/WeightedTraining_AAAI``, ``--mode margin``:
``AT_base/trainers/trainer.py``, ``AT_base/attacks/pgd.py``, ``TRADES_base/trades.py``), which
agrees with how the BiLAW paper (Def. 2 and Sec. 2.2) summarises WMMR:

    m_i = p_{y_i}(x'_i) - max_{t != y_i} p_t(x'_i)       (probabilistic margin of the adversarial example)
    w_i = exp(-alpha m_i)                                 (exponential kernel: small or negative margin, large weight)

so ``w`` lies in ``[exp(-alpha), exp(alpha)]``. In the code, ``--objective at`` weighs the
adversarial cross-entropy, ``mean_i w_i CE(x'_i, y_i)``, and ``--objective trades`` weighs TRADES'
KL term, ``CE(x) + beta mean_i w_i KL_i``; MART (no code) gets the weights on its adversarial
terms like every global weight in advplug (our choice).

Choices (code vs what advplug does):

* **scale** (``--wmmr-normalise``): ``none`` (default) keeps ``w`` as defined, ``mean(w l)``, as
  both training scripts do; ``batch`` divides by the batch mean of ``w``
  (``sum(w l) / sum(w)``, the ``--normalize`` branch of ``AT_base/trades.py``).
* **gradient through the weights**: the code does not detach ``w`` in the training loss, so its
  gradient also flows through ``exp(-alpha m)``. advplug's weights are constants of the step
  (``compute_weights`` results are detached by the core), as importance weights of a weighted
  risk are; this is a difference from the code, not an option.
* **attack** (``--wmmr-attack``): in ``margin`` mode the authors' PGD maximises the *weighted* loss
  (``mean(w CE)`` for AT from ``x + U(-eps, eps)``; ``sum(w KL)`` for TRADES from
  ``x + 0.001 N(0, 1)``; ``w`` computed on the current iterate, with its gradient). ``weighted``
  (default) reproduces it as the variant ``"wmmr"``, which replaces the objective's own attack;
  ``plain`` keeps the run's attack (use it to combine WMMR with another attack plugin: FAT, LRAT).
  eps, step and steps are the run's; the BatchNorm mode while attacking is the run's
  ``--attack-bn`` (the AT script attacks in train mode, the TRADES script in eval mode). The
  attack also records GAIRAT's ``kappa`` and MAIL's ``p_true_lps`` like the core's PGD, so
  ``--plugin wmmr --plugin gairat`` works.
* **the TRADES attack is the file before its last commit**: the KL attack above follows
  ``TRADES_base/trades.py`` as of commit ``66dc538``. Commit ``0652a2d``, the file's last change, added a
  ``break`` after the weighted KL inside the step loop, so at HEAD the loop ends before its first sign step
  and WMMR-TRADES trains on ``clamp(x + 0.001 N(0, 1), 0, 1)``, with no attack at all. We read it as a
  debugging leftover (``AT_base/trades.py`` holds the same function without it) and offer no option for it.
  The same commit removed that file's ``--normalize`` branch (still in ``AT_base/trades.py``).
* **alpha** defaults per objective from the scripts: ``at`` 0.5 (``train_at_cifar10.py``),
  ``trades`` 2.0 (``train_trades_cifar10.py``); ``mart`` 0.5 (our choice: no script). BiLAW's
  MNIST baseline used alpha 0.1 (``AT_base/configs/train.json``).
* **view**: WMMR's weight is global (one per instance); with several variants the margin is read
  from one view (``--wmmr-view``, default the pair's anchor), as MAIL's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from advplug import Declaration, StepContext, TrainContext, Variant, Weights, hookimpl, opt, set_bn_mode
from advplug.signals import probabilistic_margin

__version__ = "0.1.0"

ALPHA = {"at": 0.5, "trades": 2.0, "mart": 0.5}


def wmmr_weights(probs: Tensor, y: Tensor, alpha: float) -> Tensor:
    """``exp(-alpha (p_y - max_{t != y} p_t))`` per sample, from probabilities ``[..., B, K]``."""
    return torch.exp(-alpha * probabilistic_margin(probs, y))


class WeightedPGD(torchattacks.PGD):
    """The authors' margin-mode training attack: sign ascent on the WMMR-weighted loss, the weight
    ``exp(-alpha m(x'))`` recomputed on every iterate and differentiated through.

    ``loss="ce"``: ``mean(w CE(x', y))`` from ``x + U(-eps, eps)`` (``AT_base/attacks/pgd.py``);
    ``loss="kl"``: ``sum(w KL(p(x) || p(x')))`` from ``x + 0.001 N(0, 1)`` (``TRADES_base/trades.py``).
    Neither start is clamped to [0, 1] before the first step, as in the code.

    >>> atk = WeightedPGD(model, eps=8/255, alpha=2/255, steps=10, weight_alpha=0.5); x_adv = atk(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        weight_alpha: float = 0.5,
        loss: str = "ce",
    ) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        self.weight_alpha, self.loss = weight_alpha, loss

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        if self.loss == "kl":
            adv = images + 0.001 * torch.randn_like(images)
            with torch.no_grad():
                p_nat = torch.softmax(self.get_logits(images), dim=1)
        else:
            adv = images + torch.empty_like(images).uniform_(-self.eps, self.eps)
        b = labels.shape[0]
        kappa = torch.zeros(b, dtype=torch.long, device=images.device)
        p_true_lps = torch.zeros(b, device=images.device)
        found = torch.zeros(b, dtype=torch.bool, device=images.device)
        for _ in range(self.steps):
            adv = adv.detach().requires_grad_(True)
            logits = self.get_logits(adv)
            probs = torch.softmax(logits, dim=1)
            with torch.no_grad():  # GAIRAT's kappa and MAIL's p_y at the least step, as the core's PGD records them
                correct = probs.argmax(1) == labels
                kappa += correct
                p_true_lps = torch.where(found, p_true_lps, probs.gather(1, labels[:, None]).squeeze(1).float())
                found |= ~correct
            w = wmmr_weights(probs, labels, self.weight_alpha)  # with its gradient
            if self.loss == "kl":
                kl = F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="none").sum(1)
                cost = (kl * w).sum()
            else:
                cost = (w * F.cross_entropy(logits, labels, reduction="none")).mean()
            grad = torch.autograd.grad(cost, adv)[0]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = torch.clamp(images + torch.clamp(adv - images, -self.eps, self.eps), 0, 1)
        self.kappa, self.p_true_lps = kappa, p_true_lps
        return adv.detach()

    def stats(self) -> dict[str, Tensor]:
        return {"kappa": self.kappa, "p_true_lps": self.p_true_lps}


class WMMR:
    """WMMR: exp(-alpha * probabilistic margin of the adversarial example), the authors' code."""

    strength_hint = "--wmmr-alpha (higher: stronger reweighting)"  # named by the core's inert-reweighting warning

    @dataclass(frozen=True)
    class Options:
        alpha: float | None = opt(
            None, "kernel width: w = exp(-alpha m) (default: 0.5 at and mart, 2.0 trades)", min=0.0
        )
        normalise: str = opt(
            "none", "none: w as defined (authors' scripts); batch: w / mean(w)", choices=("none", "batch")
        )
        attack: str = opt(
            "weighted",
            "weighted: the authors' attack on the weighted loss (variant wmmr); plain: the run's attack",
            choices=("weighted", "plain"),
        )
        view: str = opt(
            "anchor", "view whose margin weighs the pair when there are several variants: anchor, natural, or a name"
        )

    def __init__(self, options: Options) -> None:
        self.options = options
        self.attack: WeightedPGD | None = None

    @hookimpl
    def declare(self, objective: str) -> Any:
        o = self.options
        scale = "mean 1 per batch" if o.normalise == "batch" else "in [exp(-alpha), exp(alpha)], not rescaled"
        variants = {"wmmr": ("kappa", "p_true_lps")} if o.attack == "weighted" else {}
        return Declaration(
            weights="global",
            view=o.view,
            variants=variants,
            own_scale=o.normalise != "batch",
            meaning=f"exp(-alpha (p_y - max_t p_t)) on the adversarial example, {scale}",
        )

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        o = self.options
        alpha = o.alpha if o.alpha is not None else ALPHA.get(ctx.objective, 0.5)
        self.options = dataclasses.replace(o, alpha=alpha)
        cfg = ctx.config
        if o.attack == "weighted":
            self.attack = WeightedPGD(
                ctx.model,
                eps=cfg.eps,
                alpha=cfg.alpha,
                steps=cfg.steps,
                weight_alpha=alpha,
                loss="kl" if ctx.objective == "trades" else "ce",
            )
            set_bn_mode(self.attack, cfg.attack_bn)
        ctx.log(f"wmmr: w = exp(-{alpha} margin), normalise {o.normalise}, attack {o.attack}")

    @hookimpl
    def generate_adversaries(self, ctx: StepContext) -> list[Variant] | None:
        if self.attack is None:
            return None
        x_adv = self.attack(ctx.x, ctx.y)
        return [Variant("wmmr", x_adv, self.attack.stats())]

    def view(self, ctx: StepContext, variants: list[Variant]) -> Any:
        if hasattr(ctx, "view"):
            return ctx.view(self.options.view)
        if self.options.view == "natural":
            return "natural"
        named = [v for v in variants if v.name == self.options.view]
        return named[0] if named else variants[0]

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights:
        w = wmmr_weights(ctx.probs(self.view(ctx, variants)), ctx.y, self.options.alpha)
        if self.options.normalise == "batch":
            w = w / ctx.batch_mean(w)
        return Weights(adv=w)
