"""MeoW: memorization weights for adversarial training (AAAI 2023; seed paper 000).

A codebook ``B`` of N codes is learned over penultimate embeddings ``F = g(x)`` (the classifier
without its last layer) with the VQ loss of Eq. 3, ``sum_i ||sg[F_i] - e_k(i)||^2``: it trains
the codes and sends no gradient into the network. With ``d(F, B)`` the Euclidean distance to the
nearest code, Eq. 4 gives ``w- = exp(-d(F_hat, B) / T)`` on adversarial and
``w+ = exp(d(F, B) / T)`` on natural samples.

Temperature (``--meow-temperature``; the paper's T = 10 is tied to its feature scale):

* on the paper's configurations (CIFAR-10, CIFAR-100, SVHN with PreActResNet-18 or a WRN), the
  paper's ``T = 10``;
* elsewhere, by default, the scale rule ``T = --meow-temperature-scale x`` the running mean
  (EMA, decay 0.9 per step) of the natural embeddings' nearest-code distance, taken before
  each step's weights: a sample at the typical distance gets ``w- = 1/e``, ``w+ = e``, whatever the
  feature scale. Why: the digits CNN's distances start at 0.2 and grow to 5-7 within a few
  epochs, so at T = 10 the weights span 0.96-1.0 in epoch 1 and 0.79-0.93 in the issue's run
  (effective sample size 0.98-1.0): reweighting is nearly off, and what differs from AT is
  mostly Eq. 5's natural term. With the rule, on the default digits run (20 epochs, measured)
  the adversarial weights span 0.20-0.80 per epoch, ESS 0.97-0.98 (natural 99.2%, PGD-20
  52.2% last); on the test mixture the ESS is 0.86-0.97. Active, though mildly: the distances
  of one batch are concentrated around their mean. The first step (the codebook is seeded
  from that batch) has weights 1;
* a number sets T for the whole run.

Overflow guard (not in the paper): ``d / T`` is clamped at ``--meow-max-log-weight`` (3), so
``w+ <= e^3 = 20`` and ``w- >= e^-3``. ``exp(d / T)`` is unbounded: at ``T = 1`` on digits the
distances outgrow T and the loss was NaN by epoch 3 (with the guard it stays finite, but every
``w-`` sits at the floor e^-3 and PGD-20 accuracy falls to 4%: T = 1 is simply too small there);
with the scale rule a cap of e^5 still let
a 2-d toy MLP collapse in 2 of 4 runs (w+ up to 148 on the natural term), e^3 in none of 6. At
the paper's T = 10 the guard acts only where ``d > 30``. The epoch metrics report T and the
fraction of natural weights clamped.

Objectives, chosen by ``--objective``:

* ``at``: MeoW owns the loss, Eq. 5:
  ``alpha * w+ CE(p(x), y) + (1 - alpha) * w- CE(p(x_hat), y)``, alpha = 0.2.
* ``trades``: the built-in TRADES objective applies ``w+`` to its natural CE and ``w-`` to its
  KL term with beta = lambda = 6: exactly Eq. 6. MeoW does not own the loss then.

Choices where the paper is open (written here so results can be compared):

* Codes minimise Eq. 3 over only the *wrongly classified* natural and adversarial embeddings of
  each batch (Sec. 3.4; ``--meow-select all`` uses every embedding). By default they are updated
  by exponential moving averages as in VQ-VAE (van den Oord et al. 2017, App. A.1, which the
  paper cites): each code moves to the running mean of the embeddings assigned to it, the
  minimiser of Eq. 3, with no learning rate to tune to the scale of the features (decay
  ``--meow-decay`` 0.99 per step). ``--meow-update adam`` instead takes Adam steps on Eq. 3
  (``--meow-codebook-lr``); with few steps per run it barely moves the codes.
* Which samples the Sec. 3.4 selection down-weights (tested on a two-cluster mixture with 24
  known atypical points scattered between the clusters): with the selection (the default) the
  codes follow the *misclassified* embeddings, so misclassified and atypical samples are the
  nearest and get the *larger* ``w-``; the smallest ``w-`` (and the largest ``w+``) go to the
  correctly classified, typical samples of the clusters. That is the paper's "focus on
  misclassified samples" (Sec. 2.2, 3.4), and the opposite of Sec. 3.2's "suppress atypical
  samples": with the selection, MeoW does not down-weight atypical adversarial samples. With
  ``--meow-select all`` the codes settle on the popular embeddings, isolated samples are the
  farthest, and atypical samples get the smallest ``w-`` (Sec. 3.2's reading).
* Codes start as randomly chosen embeddings of the first batch (plus small noise), and codes no
  embedding was nearest to during an epoch ("dead codes") are re-seeded at the epoch's end from a
  ring buffer of recent natural embeddings (the usual VQ codebook reset).
* N defaults to 2048 (Sec. 4.1); when the training set is small the codebook is scaled to keep
  the paper's CIFAR-10 ratio of about 24 training samples per code (logged).
* Eq. 4 weights are used at their raw scale (the paper does not normalise them); combined with
  another weighting plugin, the core keeps the product at MeoW's batch mean times the other's.
* Features and logits come from the step's own forward passes; the distance of a batch to the
  codebook is computed once (``cdist``) and reused for the codebook update.
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
    StepContext,
    TrainContext,
    Variant,
    Weights,
    adv_matrix,
    hookimpl,
    nat_vector,
    opt,
)

__version__ = "0.1.0"
PAPER_TRAIN_SIZE, PAPER_CODES = 50000, 2048


def nearest_code(features: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """(Euclidean distance to the nearest code ``[B]``, its index ``[B]``)."""
    d = torch.cdist(features.float(), codebook.float())
    dist, idx = d.min(dim=1)
    return dist, idx


PAPER_DATA = ("cifar10", "cifar100", "svhn")
PAPER_MODELS = ("preactresnet18", "wrn-34-10", "wrn-28-10", "wrn-32-10")
PAPER_TEMPERATURE = 10.0
T_DECAY = 0.9  # EMA decay per step of the scale rule's mean distance (follows the growing feature scale)


def memorization_weights(
    dist: Tensor, temperature: float, max_log_weight: float | None = None
) -> tuple[Tensor, Tensor]:
    """Eq. 4: ``(w-, w+) = (exp(-d / T), exp(d / T))``, with ``d / T`` clamped at
    ``max_log_weight`` (the overflow guard) when given."""
    z = dist / temperature
    if max_log_weight is not None:
        z = z.clamp(max=max_log_weight)
    return torch.exp(-z), torch.exp(z)


class MeoW:
    """MeoW: down-weight atypical adversarial embeddings, far from a learned codebook (AAAI 2023)."""

    # named by the core's inert-reweighting warning
    strength_hint = "--meow-temperature or --meow-temperature-scale (lower: stronger reweighting)"

    @dataclass(frozen=True)
    class Options:
        codebook_size: int = opt(2048, "number of codes N (scaled down for small training sets)", min=1)
        temperature: float | None = opt(
            None,
            "T of Eq. 4 (default: 10, the paper's, on its configurations; "
            "else the scale rule, T = scale x running mean nearest-code distance)",
            gt=0.0,
        )
        temperature_scale: float = opt(1.0, "scale rule: T = this x the running mean nearest-code distance", gt=0.0)
        max_log_weight: float = opt(3.0, "overflow guard: |d / T| clamped here, w+ <= e^this", gt=0.0)
        alpha: float = opt(0.2, "natural-term share alpha of Eq. 5 (objective at)", min=0.0, max=1.0)
        update: str = opt(
            "ema", "codebook update minimising Eq. 3: ema (VQ-VAE moving averages) or adam", choices=("ema", "adam")
        )
        decay: float = opt(0.99, "EMA decay per step (update ema)", gt=0.0, max=1.0)
        codebook_lr: float = opt(1e-3, "learning rate of the codebook's Adam optimizer (update adam)", gt=0.0)
        select: str = opt(
            "wrong", "embeddings that update the codebook: wrong (Sec. 3.4) or all", choices=("wrong", "all")
        )
        reset_dead: bool = opt(True, "re-seed codes unused for a whole epoch from recent embeddings")
        scale_codebook: bool = opt(True, "scale N to the training-set size (about 24 samples per code)")

    def __init__(self, options: Options) -> None:
        self.options = options
        self.n_codes = options.codebook_size
        self.codebook: Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.usage: Tensor | None = None
        self.ring: Tensor | None = None
        self.ring_pos = 0
        self.ring_full = False
        self._step: dict[str, Any] = {}
        self._epoch_stats: dict[str, Tensor] = {}
        self.objective = "at"
        self.log = print
        self.fixed_t: float | None = options.temperature
        self.t_ema: Tensor | None = None

    # -- set-up ---------------------------------------------------------------------------
    def owns_loss(self, objective: str) -> bool:
        return objective == "at"

    @hookimpl
    def declare(self, objective: str) -> Declaration:
        return Declaration(
            weights="global",
            natural_weights=True,
            needs=frozenset({"natural", "features"}),
            own_scale=True,
            provides=frozenset({"natural-term"}) if objective == "at" else frozenset(),
            meaning="w- = exp(-d(F(x'), B) / T) on the adversarial term, w+ = exp(d(F(x), B) / T) on the "
            "natural term (Eq. 4), raw scale",
        )

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        if ctx.objective not in ("at", "trades"):
            raise OptionError(f"meow defines objectives for at (Eq. 5) and trades (Eq. 6), not {ctx.objective!r}")
        self.objective, self.log, self.device = ctx.objective, ctx.log, ctx.device
        n = self.options.codebook_size
        if self.options.scale_codebook and ctx.num_train * PAPER_CODES < n * PAPER_TRAIN_SIZE:
            n = max(ctx.num_classes, round(ctx.num_train * PAPER_CODES / PAPER_TRAIN_SIZE))
            ctx.log(
                f"meow: {ctx.num_train} training samples, codebook scaled from {self.options.codebook_size} "
                f"to {n} codes (the paper's ~{PAPER_TRAIN_SIZE // PAPER_CODES} samples per code)"
            )
        self.n_codes = n
        cfg = ctx.config
        paper = (
            cfg is not None and getattr(cfg, "data", None) in PAPER_DATA and getattr(cfg, "model", None) in PAPER_MODELS
        )
        self.fixed_t = (
            self.options.temperature if self.options.temperature is not None else (PAPER_TEMPERATURE if paper else None)
        )
        how = (
            f"T = {self.fixed_t:g}"
            + (" (the paper's, on its configuration)" if self.options.temperature is None else "")
            if self.fixed_t is not None
            else f"T = {self.options.temperature_scale:g} x running mean nearest-code distance "
            f"(scale rule; not the paper's "
            f"configuration, where T = {PAPER_TEMPERATURE:g})"
        )
        ctx.log(f"meow: {how}, |d / T| clamped at {self.options.max_log_weight:g}")

    def temperature(self, ctx: StepContext, d_nat: Tensor, fresh: bool) -> Tensor | float:
        """T for this step: fixed, or the scale rule (EMA of the batch-mean natural distance before
        this step; the step that seeds the codebook gets T = inf, i.e. weights 1)."""
        if self.fixed_t is not None:
            return self.fixed_t
        if fresh:
            return float("inf")
        m = ctx.batch_mean(d_nat.float())  # [1], all-reduced under DDP
        if self.t_ema is None:
            self.t_ema = m
        t = self.options.temperature_scale * self.t_ema.clamp_min(1e-12)
        self.t_ema = T_DECAY * self.t_ema + (1 - T_DECAY) * m
        return t

    def _init_codebook(self, feats: Tensor) -> None:
        n, d = self.n_codes, feats.shape[1]
        pick = torch.randint(0, feats.shape[0], (n,), device=feats.device)
        noise = 0.01 * feats.std().clamp_min(1e-6) * torch.randn(n, d, device=feats.device)
        self._set_codebook((feats[pick] + noise).float())

    def _set_codebook(self, codes: Tensor, ring: Tensor | None = None) -> None:
        adam = self.options.update == "adam"
        self.codebook = codes.clone().requires_grad_(adam)
        self.optimizer = torch.optim.Adam([self.codebook], lr=self.options.codebook_lr) if adam else None
        self.ema_count = torch.ones(codes.shape[0], device=codes.device)
        self.ema_sum = codes.clone()
        self.usage = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        self.ring = ring if ring is not None else torch.zeros(4 * codes.shape[0], codes.shape[1], device=codes.device)
        self._epoch_stats = {}

    # -- weights ----------------------------------------------------------------------------
    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights:
        f_nat = ctx.features(NATURAL).detach()
        f_adv = [ctx.features(v).detach() for v in variants]
        fresh = self.codebook is None
        if fresh:
            self._init_codebook(f_nat)
        codes = self.codebook.detach()
        d_nat, k_nat = nearest_code(f_nat, codes)
        nearest = [nearest_code(f, codes) for f in f_adv]
        d_adv = torch.stack([d for d, _ in nearest])  # [V, B]
        t = self.temperature(ctx, d_nat, fresh)
        w_minus, _ = memorization_weights(d_adv, t, self.options.max_log_weight)  # Eq. 4 on x'
        _, w_plus = memorization_weights(d_nat, t, self.options.max_log_weight)  # Eq. 4 on x
        s = self._epoch_stats
        s["clamped"] = s.get("clamped", 0) + (d_nat / t > self.options.max_log_weight).sum()
        s["t"] = t
        self._step = {
            "f": [f_nat, *f_adv],
            "k": [k_nat, *(k for _, k in nearest)],
            "wrong": [
                ctx.logits(NATURAL).detach().argmax(1) != ctx.y,
                *(ctx.logits(v).detach().argmax(1) != ctx.y for v in variants),
            ],
        }
        self._accumulate(d_nat, d_adv)
        names = [v.name for v in variants]
        anchor = getattr(ctx.anchor, "name", None)
        return Weights(adv=w_minus[names.index(anchor) if anchor in names else 0], nat=w_plus)  # global: per instance

    def _accumulate(self, d_nat: Tensor, d_adv: Tensor) -> None:
        s = self._epoch_stats
        for key, val in (("d_nat", d_nat.sum()), ("d_adv", d_adv.mean(0).sum())):
            s[key] = s.get(key, 0) + val
        s["n"] = s.get("n", 0) + d_nat.numel()  # a Python int: no host-to-device copy per step

    @hookimpl
    def combine_loss(self, ctx: StepContext, variants: list[Variant], weights: Weights | None) -> Tensor | None:
        """Eq. 5 (objective at only; with trades the TRADES objective computes Eq. 6)."""
        if self.objective != "at":
            return None
        a = self.options.alpha
        ce_nat = F.cross_entropy(ctx.logits(NATURAL), ctx.y, reduction="none")
        ce_adv = torch.stack([F.cross_entropy(ctx.logits(v), ctx.y, reduction="none") for v in variants])
        w_nat = nat_vector(weights, ctx.batch_size, ce_nat)
        w_adv = adv_matrix(weights, len(variants), ctx.batch_size, ce_adv)
        return a * (w_nat * ce_nat).mean() + (1 - a) * (w_adv * ce_adv).mean()  # Eq. 5

    # -- codebook upkeep ----------------------------------------------------------------------
    @hookimpl
    def on_batch_end(self, ctx: StepContext) -> None:
        """Eq. 3 on the selected embeddings of this batch (distances reused from compute_weights)."""
        st = self._step
        if not st:
            return
        feats, idx = torch.cat(st["f"]), torch.cat(st["k"])
        mask = torch.cat(st["wrong"]) if self.options.select == "wrong" else torch.ones_like(idx, dtype=torch.bool)
        if self.optimizer is not None:
            sq = (feats.float() - self.codebook[idx]).pow(2).sum(1)  # ||sg[F] - e_k||^2, F detached
            loss = (sq * mask).sum()  # Eq. 3 over the selected embeddings
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        else:
            self._ema_update(feats.float(), idx, mask.float())
        self.usage.index_add_(0, idx, torch.ones_like(idx))  # codes' use counts (no data-dependent shape)
        s = self._epoch_stats
        s["selected"] = s.get("selected", 0) + mask.sum()
        s["candidates"] = s.get("candidates", 0) + mask.numel()  # Python int
        self._push_ring(st["f"][0].float())
        self._step = {}

    @torch.no_grad()
    def _ema_update(self, feats: Tensor, idx: Tensor, mask: Tensor) -> None:
        """VQ-VAE EMA step: each code -> running mean of its selected embeddings (argmin of Eq. 3)."""
        g = self.options.decay
        n = torch.zeros_like(self.ema_count).index_add_(0, idx, mask)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, feats * mask[:, None])
        self.ema_count.mul_(g).add_((1 - g) * n)
        self.ema_sum.mul_(g).add_((1 - g) * sums)
        total = self.ema_count.sum()
        k = self.ema_count.shape[0]
        smoothed = (self.ema_count + 1e-5) / (total + k * 1e-5) * total  # Laplace smoothing (Sonnet's VQ-VAE)
        updated = n > 0  # codes without selected embeddings this step stay where they are
        self.codebook.copy_(torch.where(updated[:, None], self.ema_sum / smoothed[:, None], self.codebook))

    def _push_ring(self, feats: Tensor) -> None:
        r = self.ring.shape[0]
        n = min(feats.shape[0], r)
        end = self.ring_pos + n
        if end <= r:
            self.ring[self.ring_pos : end] = feats[:n]
        else:
            self.ring[self.ring_pos :] = feats[: r - self.ring_pos]
            self.ring[: end - r] = feats[r - self.ring_pos : n]
            self.ring_full = True
        self.ring_pos = end % r
        self.ring_full = self.ring_full or end == r

    @hookimpl
    def on_epoch_end(self) -> dict[str, Any] | None:
        if self.codebook is None:
            return None
        dead = self.usage == 0
        n_dead = int(dead.sum())
        if self.options.reset_dead and n_dead:
            filled = self.ring.shape[0] if self.ring_full else self.ring_pos
            src = self.ring[torch.randint(0, max(filled, 1), (n_dead,), device=self.ring.device)]
            with torch.no_grad():
                self.codebook[dead] = src
                self.ema_sum[dead] = src * self.ema_count[dead, None]
            if self.optimizer is not None:
                for state in self.optimizer.state.values():  # fresh Adam moments for re-seeded codes
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key][dead] = 0
        s = self._epoch_stats
        n = float(s.get("n", 1.0))
        out = {
            "codes": self.codebook.shape[0],
            "dead_codes": n_dead,
            "reset": bool(self.options.reset_dead and n_dead),
            "mean_dist_nat": float(s.get("d_nat", 0.0)) / n,
            "mean_dist_adv": float(s.get("d_adv", 0.0)) / n,
            "selected_frac": float(s.get("selected", 0)) / max(float(s.get("candidates", 1)), 1.0),
            "temperature": float(s.get("t", float("nan"))),
            "clamped_frac": float(s.get("clamped", 0)) / n,
        }
        self.usage.zero_()
        self._epoch_stats = {}
        return out

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.codebook is None:
            return {"initialized": False}
        return {
            "initialized": True,
            "codebook": self.codebook.detach().clone(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "ema_count": self.ema_count.clone(),
            "ema_sum": self.ema_sum.clone(),
            "usage": self.usage.clone(),
            "ring": self.ring.clone(),
            "ring_pos": self.ring_pos,
            "ring_full": self.ring_full,
            "t_ema": None if self.t_ema is None else self.t_ema.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("initialized"):
            return
        dev = getattr(self, "device", state["codebook"].device)
        if state["codebook"].shape[0] != self.n_codes:
            raise ValueError(f"meow: checkpoint has {state['codebook'].shape[0]} codes, this run {self.n_codes}")
        self._set_codebook(state["codebook"].to(dev), state["ring"].to(dev))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.ema_count, self.ema_sum = state["ema_count"].to(dev), state["ema_sum"].to(dev)
        self.usage = state["usage"].to(dev)
        self.ring_pos, self.ring_full = int(state["ring_pos"]), bool(state["ring_full"])
        t_ema = state.get("t_ema")
        self.t_ema = None if t_ema is None else t_ema.to(dev)
