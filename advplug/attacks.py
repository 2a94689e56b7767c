"""Attacks by name, from torchattacks, plus the two the libraries lack in the form we need.

* ``TrackedPGD`` / ``TrackedTPGD``: torchattacks' PGD and TRADES-PGD loops from an explicit
  start (``--attack-start``: ``uniform``, ``normal`` = ``x + 0.001 N(0, 1)`` unclamped as in the
  TRADES/MART/MAIL code, ``normal-clamped`` = torchattacks TPGD, ``none``; default per objective,
  ``OBJECTIVE_START``), that also count per sample the iterations at which the prediction
  (before the update) was still correct: GAIRAT's kappa, as its authors' code counts it. On the
  device, no host sync.
* ``SAA``: torchattacks' targeted APGD-DLR (``APGDT``) as LRAT trains with it: the few highest
  non-true classes, every sample perturbed, no global reseed.
* ``CWLinf``: PGD under the Linf budget on the CW margin loss (confidence 50, true class masked
  with -1e4 before the max over other classes), the "CW" of the reweighting papers' tables.
  torchattacks' ``CW`` is the L2 optimisation attack, a different thing.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torchattacks
from torchattacks.attack import Attack
from torch import Tensor, nn

from .errors import OptionError


def cw_margin_loss(logits: Tensor, y: Tensor, confidence: float = 50.0) -> Tensor:
    """Per-sample CW margin loss ``-clamp(z_y - max_{j != y} z_j + confidence, min=0)``.

    The max over other classes masks the true class with -1e4 (so it is right even when all
    logits are negative). Ascending this loss pushes the true logit below the best other one.
    """
    onehot = torch.nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    real = (onehot * logits).sum(1)
    other = ((1.0 - onehot) * logits - onehot * 1e4).max(1).values
    return -torch.clamp(real - other + confidence, min=0.0)


class _CountsCorrect:
    """Mixin for attacks whose loop calls ``get_logits`` once per iteration on an input that
    requires grad (call ``_reset`` first). After each call: ``self.kappa`` ``[B]`` (long), the
    iterations at which the prediction was still correct (GAIRAT's kappa), and ``self.p_true_lps``
    ``[B]``, the true-class probability at the first misclassified iteration (the last one if
    none): MAIL's Eq. 7."""

    kappa: Tensor
    p_true_lps: Tensor

    def _reset(self, labels: Tensor) -> None:
        self._labels = labels
        self.kappa = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
        self._found = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        self.p_true_lps = torch.zeros(labels.shape[0], device=labels.device)

    def get_logits(self, inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        logits = super().get_logits(inputs, *args, **kwargs)  # type: ignore[misc]
        if inputs.requires_grad:
            z = logits.detach()
            correct = z.argmax(1) == self._labels
            self.kappa += correct
            p_true = torch.softmax(z.float(), 1).gather(1, self._labels[:, None]).squeeze(1)
            self.p_true_lps = torch.where(self._found, self.p_true_lps, p_true)
            self._found |= ~correct
        return logits

    def stats(self) -> dict[str, Tensor]:
        return {"kappa": self.kappa, "p_true_lps": self.p_true_lps}


START_CHOICES = ("uniform", "normal", "normal-clamped", "none")
OBJECTIVE_START = {"at": "uniform", "trades": "normal", "mart": "normal"}
"""The official start of each built-in objective's training attack: Madry et al.'s PGD starts
uniformly in the eps-ball; TRADES' ``trades.py`` and MART's ``train_wideresnet.py`` (and MAIL's
``mail_loss.py`` / ``at_loss.py``, for all three of its objectives) start from
``x + 0.001 N(0, 1)``, not clamped to [0, 1] before the first gradient."""


def random_start(images: Tensor, start: str, eps: float) -> Tensor:
    """The attack's first iterate (``--attack-start``).

    * ``uniform``: ``clamp(x + U(-eps, eps), 0, 1)`` (Madry et al.; torchattacks PGD; GAIRAT's code)
    * ``normal``: ``x + 0.001 N(0, 1)``, *not* clamped (TRADES', MART's and MAIL's code): on
      saturated pixels half of the start lies outside [0, 1], which changes the first gradient
    * ``normal-clamped``: ``clamp(x + 0.001 N(0, 1), 0, 1)`` (torchattacks TPGD)
    * ``none``: ``x``
    """
    if start == "uniform":
        return torch.clamp(images + torch.empty_like(images).uniform_(-eps, eps), 0, 1).detach()
    if start == "normal":
        return (images + 0.001 * torch.randn_like(images)).detach()
    if start == "normal-clamped":
        return torch.clamp(images + 0.001 * torch.randn_like(images), 0, 1).detach()
    if start == "none":
        return images.clone().detach()
    raise OptionError(f"--attack-start: {start!r} is not one of {', '.join(START_CHOICES)}")


def resolve_attack_start(requested: str | None, objective: str, plugins: list[tuple[str, Any]]) -> tuple[str, str]:
    """(start, who chose it). ``requested`` (``--attack-start``) wins; else a plugin that defines
    ``attack_start(objective) -> str | None`` (a plain method, like ``owns_loss``: MAIL's code
    starts every objective from ``normal``); if plugins disagree, or none says, the objective's
    official start (``OBJECTIVE_START``; ``uniform`` for objectives it does not list)."""
    if requested is not None:
        if requested not in START_CHOICES:
            raise OptionError(f"--attack-start: {requested!r} is not one of {', '.join(START_CHOICES)}")
        return requested, "--attack-start"
    wishes = {n: p.attack_start(objective) for n, p in plugins if callable(getattr(p, "attack_start", None))}
    wishes = {n: s for n, s in wishes.items() if s is not None}
    if wishes and len(set(wishes.values())) == 1:
        return next(iter(wishes.values())), f"{', '.join(wishes)} default"
    return OBJECTIVE_START.get(objective, "uniform"), f"{objective} default"


class TrackedPGD(_CountsCorrect, torchattacks.PGD):
    """torchattacks.PGD's loop (sign steps on the mean CE, projection, clamp to [0, 1]) from a
    chosen start (``random_start``), recording GAIRAT's kappa (iterations still correctly
    classified). ``start="uniform"`` is torchattacks.PGD exactly.

    >>> atk = TrackedPGD(model, eps=8/255, alpha=2/255, steps=10); x_adv = atk(x, y); atk.kappa
    """

    start = "uniform"

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        self._reset(labels)
        self.prepare(images)
        adv = random_start(images, self.start if self.random_start else "none", self.eps)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            cost = self.loss_fn(images, adv, labels)
            grad = torch.autograd.grad(cost, adv)[0]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = torch.clamp(images + torch.clamp(adv - images, -self.eps, self.eps), 0, 1).detach()
        return adv

    def prepare(self, images: Tensor) -> None:
        pass

    def loss_fn(self, images: Tensor, adv: Tensor, labels: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(self.get_logits(adv), labels)


class TrackedTPGD(TrackedPGD):
    """TRADES' KL attack: sign ascent on ``KL(p(x) || p(x'))`` (summed over the batch) from a
    chosen start, recording kappa. Default start ``normal`` (TRADES' ``trades.py``, not clamped);
    ``normal-clamped`` is torchattacks.TPGD exactly."""

    start = "normal"

    def prepare(self, images: Tensor) -> None:
        with torch.no_grad():
            self._p_nat = torch.softmax(self.get_logits(images), dim=1)

    def loss_fn(self, images: Tensor, adv: Tensor, labels: Tensor) -> Tensor:
        log_q = torch.log_softmax(self.get_logits(adv), dim=1)
        return torch.nn.functional.kl_div(log_q, self._p_nat, reduction="sum")


class CWLinf(Attack):
    """PGD on the CW margin loss under an Linf budget (Carlini & Wagner loss, Madry's PGD).

    As in the GAIRAT / MAIL / LRAT evaluation code: confidence 50, random start, sign steps.

    >>> atk = CWLinf(model, eps=8/255, alpha=2/255, steps=20); x_adv = atk(x, y)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 20,
                 confidence: float = 50.0, random_start: bool = True) -> None:
        super().__init__("CWLinf", model)
        self.eps, self.alpha, self.steps = eps, alpha, steps
        self.confidence, self.random_start = confidence, random_start
        self.supported_mode = ["default"]

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        if self.random_start:
            adv = torch.clamp(adv + torch.empty_like(adv).uniform_(-self.eps, self.eps), 0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            cost = cw_margin_loss(self.get_logits(adv), labels, self.confidence).sum()
            grad = torch.autograd.grad(cost, adv)[0]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = torch.clamp(images + torch.clamp(adv - images, -self.eps, self.eps), 0, 1).detach()
        return adv


class SAA(torchattacks.APGDT):
    """LRAT's "simplified targeted APGD-DLR" (LRAT Eq. 9, Sec. 5.1): torchattacks' ``APGDT``
    (adaptive step, targeted DLR loss) on the ``n_target_classes`` classes with the highest scores
    at the original point, excluding the true one (3 in LRAT), ``steps`` each (20 in LRAT).

    Three changes from ``APGDT.perturb``, which follows AutoAttack's evaluation conventions:

    * a correctly classified sample that no target fools gets the iterate with the highest
      targeted-DLR loss over all targets, not the clean input: a training attack must perturb;
    * the global RNG is not reseeded (``APGDT`` calls ``torch.manual_seed(seed)`` on every batch,
      which would freeze every other random draw of the run); random starts come from torch's
      global RNG, which the trainer seeds and checkpoints;
    * ``self.targets`` ``[B, n]`` records the classes each sample was attacked towards (-1: not
      attacked, because already fooled or already misclassified).

    Like ``APGDT``, targets are attacked one after another on the samples still classified
    correctly, and a sample already misclassified at ``x`` is returned as it is.
    """

    def perturb(self, x_in: Tensor, y_in: Tensor, best_loss: bool = False, cheap: bool = True) -> tuple[Tensor, Tensor]:
        x, y = x_in.clone(), y_in.clone()
        adv = x.clone()
        acc = self.get_logits(x).argmax(1) == y
        best = torch.full(y.shape, float("-inf"), device=x.device)
        self.targets = torch.full((y.shape[0], self.n_target_classes), -1, dtype=torch.long, device=x.device)
        record = self.dlr_loss_targeted
        for k, target_class in enumerate(range(2, self.n_target_classes + 2)):
            self.target_class = target_class
            idx = acc.nonzero().squeeze(1)
            if idx.numel() == 0:
                break

            def dlr(logits: Tensor, yy: Tensor, y_target: Tensor, _k: int = k, _idx: Tensor = idx) -> Tensor:
                self.targets[_idx, _k] = y_target
                return record(logits, yy, y_target)

            self.dlr_loss_targeted = dlr  # type: ignore[method-assign]
            try:
                x_best, acc_curr, loss_best, x_best_adv = self.attack_single_run(x[idx], y[idx])
            finally:
                del self.dlr_loss_targeted
            fooled = ~acc_curr.bool()
            better = ~fooled & (loss_best > best[idx])
            adv[idx] = torch.where(fooled.view(-1, *[1] * (x.dim() - 1)), x_best_adv,
                                   torch.where(better.view(-1, *[1] * (x.dim() - 1)), x_best, adv[idx]))
            best[idx] = torch.where(better, loss_best.to(best.dtype), best[idx])
            acc[idx] = ~fooled
        return acc, adv


def set_bn_mode(attack: Attack, bn: str) -> Attack:
    """``eval``: the whole model in eval mode while attacking (torchattacks' default; TRADES,
    MART, MAIL, GAIRAT code). ``train``: train mode, BatchNorm uses and updates batch statistics
    (robust_overfitting, AWP code)."""
    if bn == "train":
        attack.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=False)
    elif bn != "eval":
        raise OptionError(f"--attack-bn: {bn!r} is not one of eval, train")
    return attack


def random_start_name(start: str | None, default: str) -> str:
    if start is None:
        return default
    if start not in START_CHOICES:
        raise OptionError(f"--attack-start: {start!r} is not one of {', '.join(START_CHOICES)}")
    return start


TRAIN_ATTACKS = ("pgd", "tpgd", "cw", "saa", "fgsm", "apgd-ce", "apgdt")


def make_attack(name: str, model: nn.Module, *, eps: float, alpha: float, steps: int, bn: str = "eval",
                num_classes: int = 10, seed: int = 0, **extra: Any) -> Attack:
    """A torchattacks attack by name under an Linf budget.

    ``pgd`` (TrackedPGD), ``tpgd`` (TrackedTPGD), ``cw`` (CWLinf), ``fgsm``, ``apgd-ce`` (APGD on
    CE), ``apgdt`` (targeted APGD-DLR; ``n_target_classes`` in ``extra``, default all), ``saa``
    (LRAT's training form of ``apgdt``; ``n_target_classes`` default 3).
    """
    if eps <= 0:
        raise OptionError(f"eps must be > 0, got {eps}")
    if steps < 1:
        raise OptionError(f"attack steps must be >= 1, got {steps}")
    if name == "pgd":
        atk = TrackedPGD(model, eps=eps, alpha=alpha, steps=steps, random_start=extra.get("random_start", True))
        atk.start = random_start_name(extra.get("start"), "uniform")
    elif name == "tpgd":
        atk = TrackedTPGD(model, eps=eps, alpha=alpha, steps=steps)
        atk.start = random_start_name(extra.get("start"), "normal")
    elif name == "cw":
        atk = CWLinf(model, eps=eps, alpha=alpha, steps=steps, confidence=extra.get("confidence", 50.0))
    elif name == "saa":
        atk = SAA(model, norm="Linf", eps=eps, steps=steps, seed=seed, n_classes=num_classes)
        atk.n_target_classes = min(int(extra.get("n_target_classes", 3)), num_classes - 1)
    elif name == "fgsm":
        atk = torchattacks.FGSM(model, eps=eps)
    elif name == "apgd-ce":
        atk = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, loss="ce", seed=seed, n_restarts=1)
    elif name == "apgdt":
        atk = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, seed=seed, n_classes=num_classes)
        atk.n_target_classes = int(extra.get("n_target_classes", num_classes - 1))
    else:
        raise OptionError(f"unknown attack {name!r} (choose from {', '.join(TRAIN_ATTACKS)})")
    return set_bn_mode(atk, bn)


_EVAL_RE = re.compile(r"^(natural|fgsm|pgd|cw|apgd-ce|aa)(\d+)?$")
EVAL_ATTACKS = "natural, fgsm, pgdK (e.g. pgd20), cw / cwK (CW-Linf margin, PGD-K), apgd-ce, aa (AutoAttack standard)"


def parse_eval_attack(spec: str) -> tuple[str, int | None]:
    m = _EVAL_RE.match(spec.lower())
    if not m:
        raise OptionError(f"unknown attack {spec!r} (choose from {EVAL_ATTACKS})")
    kind, steps = m.group(1), int(m.group(2)) if m.group(2) else None
    if kind in ("natural", "fgsm", "aa") and steps is not None:
        raise OptionError(f"attack {spec!r}: {kind} takes no step count")
    if steps is not None and steps < 1:
        raise OptionError(f"attack {spec!r}: steps must be >= 1")
    return kind, steps


def display_name(spec: str) -> str:
    kind, steps = parse_eval_attack(spec)
    return {
        "natural": "Natural", "fgsm": "FGSM", "pgd": f"PGD-{steps or 20}",
        "cw": f"CW-Linf margin (PGD-{steps or 20})", "apgd-ce": f"APGD-CE-{steps or 100}", "aa": "AutoAttack",
    }[kind]


def make_eval_attack(spec: str, model: nn.Module, *, eps: float, alpha: float | None, num_classes: int,
                     seed: int = 0) -> Attack | None:
    """An evaluation attack by spec (``None`` for ``natural``). PGD/CW step size defaults to eps/4."""
    kind, steps = parse_eval_attack(spec)
    alpha = alpha if alpha is not None else eps / 4
    if kind == "natural":
        return None
    if kind == "fgsm":
        return torchattacks.FGSM(model, eps=eps)
    if kind == "pgd":
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps or 20, random_start=True)
    if kind == "cw":
        return CWLinf(model, eps=eps, alpha=alpha, steps=steps or 20)
    if kind == "apgd-ce":
        return torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps or 100, loss="ce", seed=seed)
    return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed)
