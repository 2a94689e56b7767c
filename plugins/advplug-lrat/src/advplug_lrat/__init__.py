"""LRAT: locally reweighted adversarial training (seed paper 003, ICLR 2022 submission).

Each instance is paired with several adversarial variants (Sec. 4.3, "locally simulated"), one
per attack in ``--lrat-attacks`` (any of ``pgd``, ``cw``, ``saa``):

* ``pgd``: PGD-K on cross-entropy (Eq. 13; torchattacks PGD, the run's eps, step and K);
* ``cw``: PGD-K on the CW margin loss with confidence 50 (Eq. 8/14; the core's ``CWLinf``);
* ``saa``: targeted APGD-DLR (Eq. 9) on the 3 highest non-true classes, 20 steps each
  (``--lrat-saa-steps``, ``--lrat-saa-targets``; the core's ``SAA``: torchattacks' ``APGDT``
  iteration with device tensors only, bit for bit the same from the same start, the first target
  on every correct sample, then the other targets at once on those it did not fool).

The paper's settings: LRAT-SAA ``--lrat-attacks saa``, LRAT-CW ``--lrat-attacks cw``,
LRAT-SAA+CW ``--lrat-attacks saa,cw`` (default); LSAT-X adds ``--lrat-lsat``.

Inside each pair the variants are reweighted ("locally reweighted"), never across instances:

* variable factor ``t = p_y(x') - max_{i != y} p_i(x')`` (Eq. 11), from the step's own logits;
* weight ``w(t) = alpha (1 - t)^beta`` (Eq. 12; alpha 2, beta 0.5);
* the adversarial data term ``x*`` gets the floor ``[C - sum_j w_ij]_+`` (Eq. 7; C = 0.1). Its
  definition is an option, as Appendix B describes: ``pgd`` (default: Sec. 5.2 simulates PGD
  besides the reweighted CW and SAA, which is the 40-step budget PGD-10 + CW-10 + SAA-20),
  ``saa`` (the appendix's recommendation for unseen attacks), ``nat`` (the natural instance, for
  natural accuracy) or ``none`` (the term removed). If ``x*`` is also a reweighted variant, its
  weight is ``w + floor`` and no attack runs twice;
* all weights are normalised so that ``(1/n) sum_i ([C - sum_j w_ij]_+ + sum_j w_ij) = 1``
  (Eq. 15; the batch mean is all-reduced under DDP). ``--lrat-normalise none`` skips it.

LSAT (``--lrat-lsat``): the same variants with ``w = 1`` and no floor (Sec. 4.2: ``C < 1``); with
Eq. 15 this is the mean loss over the variants.

The loss (Eq. 7) is LRAT's own: ``(1/n) sum_i (sum_j W_ij l(x_ij) + W*_i l(x*_i))`` with ``l`` the
cross-entropy; LRAT owns ``combine_loss`` with ``--objective at``. Its weights are *local*
(``Weights.local``: they distribute each pair's weight over its variants, and the floor and
Eq. 15 hold on them whatever else is enabled). A global weighting plugin beside it (``--plugin
mail``, ``gairat``, ``bat``, ``focal``) gives each pair one weight, read from LRAT's x* (the
*anchor*, ``--lrat-floor``; with ``none``, the first variant by name), and the loss receives
``W_ij = g_i * local_ij``: the global method decides how much the pair counts, LRAT how the pair
is split. Variants another plugin produces join the pair and are reweighted by Eq. 12 too. TRADES
and MART have their own loss; combining them with LRAT is not defined by the paper and is refused
at start-up, and so is BiLAW (its meta-gradient needs the loss as a function of its own weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
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
    adv_matrix,
    hookimpl,
    natural_weights,
    opt,
)
from advplug.signals import probabilistic_margin

__version__ = "0.1.0"
ATTACKS = ("pgd", "cw", "saa")
FLOORS = ("pgd", "cw", "saa", "nat", "none")


def variable_factor(probs: Tensor, y: Tensor) -> Tensor:
    """Eq. 11: ``t = p_y - max_{i != y} p_i`` per row of ``probs`` ``[..., B, K]``."""
    return probabilistic_margin(probs, y)


def local_weight(t: Tensor, alpha: float, beta: float) -> Tensor:
    """Eq. 12: ``w(t) = alpha (1 - t)^beta`` (t in [-1, 1], so 1 - t >= 0)."""
    return alpha * (1.0 - t).clamp_min(0.0).pow(beta)


def floor_weight(w_pair: Tensor, c: float) -> Tensor:
    """Eq. 7: ``[C - sum_j w_ij]_+`` from the pair's weights ``[m, B]``."""
    return (c - w_pair.sum(0)).clamp_min(0.0)


def parse_attacks(spec: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(a.strip().lower() for a in spec.split(",") if a.strip()))
    bad = [a for a in names if a not in ATTACKS]
    if bad or not names:
        raise OptionError(f"--lrat-attacks {spec!r}: choose one or more of {', '.join(ATTACKS)}, comma-separated")
    return names


class LRAT:
    """LRAT: several attacks per instance (PGD, CW-Linf, targeted APGD-DLR), reweighted inside each pair."""

    @dataclass(frozen=True)
    class Options:
        attacks: str = opt("saa,cw", "reweighted variants, comma-separated from pgd, cw, saa (Sec. 4.3)")
        floor: str = opt("pgd", "adversarial data term x* of Eq. 7 (App. B): pgd, cw, saa, nat or none", choices=FLOORS)
        alpha: float = opt(2.0, "alpha of Eq. 12", gt=0.0)
        beta: float = opt(0.5, "beta of Eq. 12", gt=0.0)
        c: float = opt(0.1, "C of Eq. 7: the minimum weight sum of each instance", gt=0.0)
        normalise: str = opt("eq15", "eq15: mean total weight 1 per instance (App. B); none", choices=("eq15", "none"))
        lsat: bool = opt(False, "LSAT: simulate the attacks with w = 1 and no floor (no reweighting)")
        saa_steps: int = opt(20, "APGD iterations per target class of the SAA variant", min=1)
        saa_targets: int = opt(3, "target classes of the SAA variant (highest non-true scores)", min=1)
        dump: bool = opt(False, "write per-sample t and weights with indices each epoch (RUN_DIR/dumps)")

    def __init__(self, options: Options) -> None:
        self.options = options
        self.attacks = parse_attacks(options.attacks)
        self.runners: dict[str, Any] = {}
        self.dumper: SampleDump | None = None

    def owns_loss(self, objective: str) -> bool:
        return True  # Eq. 7 is LRAT's objective; TRADES / MART with LRAT are refused as two owners

    @hookimpl
    def declare(self) -> Declaration:
        o = self.options
        needed = list(self.attacks) + ([o.floor] if o.floor in ATTACKS and o.floor not in self.attacks else [])
        stats = {"pgd": ("kappa", "p_true_lps")}  # what the core's attacks record (TrackedPGD); cw and saa: nothing
        anchor = None if o.lsat or o.floor == "none" else (NATURAL if o.floor == "nat" else o.floor)
        what = (
            "LSAT, w = 1"
            if o.lsat
            else f"Eq. 12 w = {o.alpha} (1 - t)^{o.beta}"
            + ("" if o.floor == "none" else f", floor [C - sum w]_+ on x* = {o.floor} (Eq. 7)")
        )
        return Declaration(
            weights="local",
            variants={n: stats.get(n, ()) for n in needed},
            anchor=anchor,
            natural_weights=False,
            needs=frozenset({"natural"} if o.floor == "nat" else ()),
            provides=frozenset({"natural-term"}),
            own_scale=o.normalise == "eq15",
            meaning=what + (", Eq. 15 mean pair total 1" if o.normalise == "eq15" else ""),
        )

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        o = self.options
        needed = list(self.attacks) + ([o.floor] if o.floor in ATTACKS and o.floor not in self.attacks else [])
        for name in needed:
            extra = dict(steps=o.saa_steps, n_target_classes=o.saa_targets) if name == "saa" else {}
            self.runners[name] = ctx.make_attack(name, **extra)
        if o.lsat and o.floor not in ("none",) + self.attacks:
            raise OptionError(f"--lrat-lsat has no floor term: --lrat-floor {o.floor} would never be used (use none)")
        if o.dump:
            self.dumper = SampleDump(ctx.config.out, "lrat")
        kind = "LSAT" if o.lsat else f"LRAT (alpha {o.alpha}, beta {o.beta}, C {o.c})"
        ctx.log(
            f"lrat: {kind}, variants {', '.join(self.attacks)}, x* = {o.floor}, "
            f"normalisation {o.normalise}, attacks run: {', '.join(needed)}"
        )

    @hookimpl
    def generate_adversaries(self, ctx: StepContext) -> list[Variant]:
        out = []
        for name, atk in self.runners.items():
            x_adv = atk(ctx.x, ctx.y)
            out.append(Variant(name, x_adv, atk.stats() if hasattr(atk, "stats") else {}))
        return out

    def local_weights(self, ctx: StepContext, variants: list[Variant]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(t [V, B], W [V, B], W_nat [B] or None)`` before Eq. 15, in the order of ``variants``."""
        o = self.options
        own_floor = o.floor in ATTACKS and o.floor not in self.attacks
        t = torch.stack([variable_factor(ctx.probs(v), ctx.y) for v in variants])
        rows = [
            torch.zeros_like(t[i])
            if own_floor and v.name == o.floor  # x* only, not in the pair
            else torch.ones_like(t[i])
            if o.lsat
            else local_weight(t[i], o.alpha, o.beta)
            for i, v in enumerate(variants)
        ]
        w_nat = None
        if not o.lsat and o.floor != "none":
            floor = floor_weight(torch.stack(rows), o.c)
            if o.floor == "nat":
                w_nat = floor
            else:
                i = [v.name for v in variants].index(o.floor)
                rows[i] = rows[i] + floor
        return t, torch.stack(rows), w_nat

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights:
        t, w, w_nat = self.local_weights(ctx, variants)
        if self.options.normalise == "eq15":
            total = w.sum(0) + (w_nat if w_nat is not None else 0.0)  # Eq. 15
            scale = ctx.batch_mean(total).clamp_min(torch.finfo(w.dtype).tiny)
            w = w / scale
            w_nat = w_nat / scale if w_nat is not None else None
        if self.dumper is not None:
            cols = {f"t_{v.name}": t[i] for i, v in enumerate(variants)}
            cols.update({f"weight_{v.name}": w[i] for i, v in enumerate(variants)})
            if w_nat is not None:
                cols["weight_nat"] = w_nat
            self.dumper.add(index=ctx.index, **cols)
        return Weights(local=w, local_nat=w_nat)  # local: the pair's split; Eq. 7 and 15 hold on it

    @hookimpl
    def combine_loss(self, ctx: StepContext, variants: list[Variant], weights: Weights | None) -> Tensor:
        ce = torch.stack([F.cross_entropy(ctx.logits(v), ctx.y, reduction="none") for v in variants])  # [V, B]
        per_sample = (adv_matrix(weights, len(variants), ctx.batch_size, ce) * ce).sum(0)  # Eq. 7, inner sums
        w_nat = natural_weights(weights)
        if w_nat is not None:
            per_sample = per_sample + w_nat * F.cross_entropy(ctx.logits(NATURAL), ctx.y, reduction="none")
        return per_sample.mean()

    @hookimpl
    def on_epoch_end(self, epoch: int) -> dict[str, Any] | None:
        if self.dumper is not None:
            self.dumper.write(epoch)
        return None
