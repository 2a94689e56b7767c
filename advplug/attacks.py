"""Attacks by name, from torchattacks, plus the two the libraries lack in the form we need.

* ``TrackedPGD`` / ``TrackedTPGD``: torchattacks' PGD and TRADES-PGD loops from an explicit
  start (``--attack-start``: ``uniform``, ``normal`` = ``x + 0.001 N(0, 1)`` unclamped as in the
  TRADES/MART/MAIL code, ``normal-clamped`` = torchattacks TPGD, ``none``; default per objective,
  ``OBJECTIVE_START``), that also count per sample the iterations at which the prediction
  (before the update) was still correct: GAIRAT's kappa, as its authors' code counts it. On the
  device, no host sync.
* ``SAA``: targeted APGD-DLR as LRAT trains with it: torchattacks' ``APGDT`` iteration written
  with device tensors only (checked bit for bit against it), the few highest non-true classes
  attacked in waves, every sample perturbed, no global reseed.
* ``CWLinf``: PGD under the Linf budget on the CW margin loss (confidence 50, true class masked
  with -1e4 before the max over other classes), the "CW" of the reweighting papers' tables.
  torchattacks' ``CW`` is the L2 optimisation attack, a different thing.
"""

from __future__ import annotations

from typing import Any

import torch
import torchattacks
from torch import Tensor, nn
from torchattacks.attack import Attack

from advplug.attack_names import parse_eval_attack
from advplug.config import ATTACK_STARTS
from advplug.errors import OptionError


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
    track = True  # False: no bookkeeping and ``stats()`` is empty (the trainer's PGD when nothing reads it)

    def _reset(self, labels: Tensor) -> None:
        self._labels = labels
        self.kappa = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
        self._found = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        self.p_true_lps = torch.zeros(labels.shape[0], device=labels.device)

    def get_logits(self, inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        logits = super().get_logits(inputs, *args, **kwargs)  # type: ignore[misc]
        if self.track and inputs.requires_grad:
            z = logits.detach()
            correct = z.argmax(1) == self._labels
            self.kappa += correct
            p_true = torch.softmax(z.float(), 1).gather(1, self._labels[:, None]).squeeze(1)
            self.p_true_lps = torch.where(self._found, self.p_true_lps, p_true)
            self._found |= ~correct
        return logits

    def stats(self) -> dict[str, Tensor]:
        return {"kappa": self.kappa, "p_true_lps": self.p_true_lps} if self.track else {}


OBJECTIVE_START = {"at": "uniform", "trades": "normal", "mart": "normal"}
"""The official start of each built-in objective's training attack: Madry et al.'s PGD starts
uniformly in the eps-ball; TRADES' ``trades.py`` and MART's ``train_wideresnet.py`` (and MAIL's
``mail_loss.py`` / ``at_loss.py``, for all three of its objectives) start from
``x + 0.001 N(0, 1)``, not clamped to [0, 1] before the first gradient."""


def random_start(images: Tensor, start: str, eps: float, eps_b: Tensor | None = None) -> Tensor:
    """The attack's first iterate (``--attack-start``).

    * ``uniform``: ``clamp(x + U(-eps, eps), 0, 1)`` (Madry et al.; torchattacks PGD; GAIRAT's code); with a
      per-sample budget ``eps_b`` (``[B, 1, ...]``), ``U(-eps, eps)`` drawn as torchattacks draws it, scaled by
      ``eps_b / eps`` (uniform in each sample's ball; a sample at the run's eps keeps the draw exactly)
    * ``normal``: ``x + 0.001 N(0, 1)``, *not* clamped (TRADES', MART's and MAIL's code): on
      saturated pixels half of the start lies outside [0, 1], which changes the first gradient
    * ``normal-clamped``: ``clamp(x + 0.001 N(0, 1), 0, 1)`` (torchattacks TPGD)
    * ``none``: ``x``
    """
    if start == "uniform":
        noise = torch.empty_like(images).uniform_(-eps, eps)
        if eps_b is not None:  # where(): no division where the budget is the run's (CUDA divides by a reciprocal)
            noise = torch.where(eps_b == eps, noise, noise * (eps_b / eps))
        return torch.clamp(images + noise, 0, 1).detach()
    if start == "normal":
        return (images + 0.001 * torch.randn_like(images)).detach()
    if start == "normal-clamped":
        return torch.clamp(images + 0.001 * torch.randn_like(images), 0, 1).detach()
    if start == "none":
        return images.clone().detach()
    raise OptionError(f"--attack-start: {start!r} is not one of {', '.join(ATTACK_STARTS)}")


def resolve_attack_start(requested: str | None, objective: str, plugins: list[tuple[str, Any]]) -> tuple[str, str]:
    """(start, who chose it). ``requested`` (``--attack-start``) wins; else a plugin that defines
    ``attack_start(objective) -> str | None`` (a plain method, like ``owns_loss``: MAIL's code
    starts every objective from ``normal``); if plugins disagree, or none says, the objective's
    official start (``OBJECTIVE_START``; ``uniform`` for objectives it does not list)."""
    if requested is not None:
        if requested not in ATTACK_STARTS:
            raise OptionError(f"--attack-start: {requested!r} is not one of {', '.join(ATTACK_STARTS)}")
        return requested, "--attack-start"
    # hookspecs.StartsAttacks; callable(): a plain attribute of that name is no wish
    wishes = {n: p.attack_start(objective) for n, p in plugins if callable(getattr(p, "attack_start", None))}
    wishes = {n: s for n, s in wishes.items() if s is not None}
    if wishes and len(set(wishes.values())) == 1:
        return next(iter(wishes.values())), f"{', '.join(wishes)} default"
    return OBJECTIVE_START.get(objective, "uniform"), f"{objective} default"


def per_sample(t: Tensor | None, like: Tensor) -> Tensor | None:
    """A ``[B]`` budget as ``[B, 1, ...]`` in ``like``'s dtype (broadcasts over a sample), or ``None``."""
    return None if t is None else t.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


class TrackedPGD(_CountsCorrect, torchattacks.PGD):
    """torchattacks.PGD's loop (sign steps on the mean CE, projection, clamp to [0, 1]) from a
    chosen start (``random_start``), recording GAIRAT's kappa (iterations still correctly
    classified). ``start="uniform"`` is torchattacks.PGD exactly.

    Per-sample budgets (``advplug.Budget``): ``set_budget(eps, alpha)`` (kept until changed) or ``atk(x, y, eps=,
    alpha=)`` with ``[B]`` tensors (``None``: the scalar), broadcast as ``[B, 1, 1, 1]`` in the random start, the step
    ``alpha_b sign(g)`` and the projection onto ``[-eps_b, eps_b]``; all equal to the scalars, the result is the
    scalar attack's bit for bit. On the device, no host sync.

    >>> atk = TrackedPGD(model, eps=8/255, alpha=2/255, steps=10); x_adv = atk(x, y); atk.kappa
    """

    start = "uniform"
    budget_eps: Tensor | None = None
    budget_alpha: Tensor | None = None

    def set_budget(self, eps: Tensor | None = None, alpha: Tensor | None = None) -> TrackedPGD:
        """Per-sample ``eps`` / ``alpha`` ``[B]`` for the following calls (``None``: the attack's scalar)."""
        self.budget_eps, self.budget_alpha = eps, alpha
        return self

    def forward(  # type: ignore[override]
        self, images: Tensor, labels: Tensor, eps: Tensor | None = None, alpha: Tensor | None = None
    ) -> Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        eps_b = per_sample(eps if eps is not None else self.budget_eps, images)
        alpha_b = per_sample(alpha if alpha is not None else self.budget_alpha, images)
        step = self.alpha if alpha_b is None else alpha_b
        self._reset(labels)
        self.prepare(images)
        adv = random_start(images, self.start if self.random_start else "none", self.eps, eps_b)
        for _ in range(self.steps):
            adv = self.ascend(images, adv.requires_grad_(True), labels, step, eps_b)
        return adv

    def ascend(
        self,
        images: Tensor,
        adv: Tensor,
        labels: Tensor,
        step: float | Tensor | None = None,
        eps_b: Tensor | None = None,
    ) -> Tensor:
        """One iteration from ``adv`` (which requires grad): the loss, its input gradient, the sign step (``step``,
        default ``alpha``) and the projection onto the eps-ball (``eps_b`` ``[B, 1, ...]``: per sample) and [0, 1].
        Compiles as one graph when dynamo traces ``torch.autograd.grad`` (``tests/test_graph_breaks.py``)."""
        cost = self.loss_fn(images, adv, labels)
        grad = torch.autograd.grad(cost, adv)[0]
        adv = adv.detach() + (self.alpha if step is None else step) * grad.sign()
        delta = adv - images
        delta = torch.clamp(delta, -self.eps, self.eps) if eps_b is None else torch.clamp(delta, -eps_b, eps_b)
        return torch.clamp(images + delta, 0, 1).detach()

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

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 20,
        confidence: float = 50.0,
        random_start: bool = True,
    ) -> None:
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


def dlr_targeted(logits: Tensor, y: Tensor, y_target: Tensor) -> Tensor:
    """Targeted DLR loss (Croce & Hein 2020, Eq. 7; LRAT Eq. 9), per sample:
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` with ``z_pi`` the sorted logits."""
    z_sorted = logits.sort(dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, y_target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12)


class SAA(Attack):
    """LRAT's "simplified targeted APGD-DLR" (LRAT Eq. 9, Sec. 5.1): APGD (Croce & Hein 2020,
    Alg. 1: momentum 0.75, step 2 eps halved at the checkpoints where the loss oscillates or stalls)
    on the targeted DLR loss, towards the ``n_target_classes`` highest non-true classes at the
    original point (3 in LRAT), ``steps`` iterations each (20 in LRAT).

    ``run`` is torchattacks' ``APGDT.attack_single_run`` (Linf, one EOT draw) written with device
    tensors only: the same arithmetic in the same order, so from the same random start it returns
    the same four tensors (a test checks it bit for bit), without the per-iteration host copies,
    ``nonzero`` and numpy oscillation checks of the original. What ``forward`` does differently
    from ``APGDT.perturb``, which follows AutoAttack's evaluation conventions:

    * targets run in *waves* (``waves``, default ``(1, n - 1)``): the first target on every
      sample classified correctly at ``x``, then all remaining targets *at once* on the samples it
      did not fool (each sample repeated once per target, one batch). ``APGDT`` runs one target
      after another on shrinking batches; a wave gives every target it holds the same samples, so
      the attack is the same per sample (BatchNorm in eval mode while attacking makes samples
      independent) or stronger, in fewer, larger model calls. Of the targets that fool a sample,
      the first in score order wins, as in ``APGDT``. ``waves = (1,) * n`` is ``APGDT``'s order;
      ``(n,)`` attacks every target at once (no host sync at all after the first);
    * a correctly classified sample that no target fools gets the iterate with the highest
      targeted-DLR loss over all targets, not the clean input: a training attack must perturb;
    * the global RNG is not reseeded (``APGDT`` calls ``torch.manual_seed(seed)`` on every batch,
      which would freeze every other random draw of the run); random starts come from torch's
      global RNG, which the trainer seeds and checkpoints;
    * the logits at ``x`` are computed once for the correctness check and all targets (``APGDT``
      recomputes them per target);
    * ``self.targets`` ``[B, n]`` records the classes each sample was attacked towards (-1: not
      attacked, because already fooled or already misclassified).

    A sample already misclassified at ``x`` is returned as it is. Host syncs: one per wave (the
    sizes of the batches to attack).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        steps: int = 20,
        n_target_classes: int = 3,
        rho: float = 0.75,
        waves: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__("SAA", model)
        self.eps, self.steps, self.n_target_classes, self.rho = eps, steps, n_target_classes, rho
        self.waves = waves
        self.supported_mode = ["default"]

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        x = images.clone().detach().to(self.device)
        y = labels.clone().detach().to(self.device)
        n = self.n_target_classes
        if x.shape[0] == 0:
            self.targets = torch.full((0, n), -1, dtype=torch.long, device=x.device)
            return x
        with torch.no_grad():
            z = self.get_logits(x)
        order = z.sort(dim=1)[1]  # ascending; column -k: the k-th highest class (APGDT's target_class k)
        ranked = order.flip(1)[:, 1 : n + 1]  # [B, n]: for a correct sample, the highest non-true classes
        adv, best = x.clone(), torch.full(y.shape, float("-inf"), device=x.device)
        todo = z.argmax(1) == y  # still to attack: correct at x, not fooled yet
        self.targets = torch.full((y.shape[0], n), -1, dtype=torch.long, device=x.device)
        waves = self.waves or ((1, n - 1) if n > 1 else (1,))
        first = 0
        for width in waves:
            cols = list(range(first, min(first + width, n)))
            first += width
            if not cols:
                break
            idx = todo.nonzero().squeeze(1)  # the one host sync of the wave
            m = idx.numel()
            if m == 0:
                break
            tgt = ranked[idx][:, cols]  # [m, w]
            self.targets[idx[:, None], torch.tensor(cols, device=x.device)[None]] = tgt
            w = len(cols)
            xs, ys, ts = x[idx].repeat(w, *[1] * (x.dim() - 1)), y[idx].repeat(w), tgt.t().reshape(-1)
            x_best, acc, loss_best, x_best_adv = self.run(xs, ys, ts)  # rows: target-major, [w * m]
            fooled = ~acc.view(w, m)
            loss_best = loss_best.view(w, m).to(best.dtype)
            shape = (w, m, *x.shape[1:])
            x_best, x_best_adv = x_best.view(shape), x_best_adv.view(shape)
            # the first target (in score order) that fools the sample wins; else the highest loss
            any_fooled = fooled.any(0)
            k_fool = fooled.float().argmax(0)  # first True
            k_loss = loss_best.argmax(0)
            ar = torch.arange(m, device=x.device)
            pick_fool, pick_loss = x_best_adv[k_fool, ar], x_best[k_loss, ar]
            top = loss_best[k_loss, ar]
            better = ~any_fooled & (top > best[idx])
            bshape = (-1, *[1] * (x.dim() - 1))
            adv[idx] = torch.where(
                any_fooled.view(bshape), pick_fool, torch.where(better.view(bshape), pick_loss, adv[idx])
            )
            best[idx] = torch.where(better, top, best[idx])
            todo[idx] = ~any_fooled
        return adv

    def run(self, x: Tensor, y: Tensor, y_target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """APGD on the targeted DLR loss from one random start: ``(x_best, acc, loss_best,
        x_best_adv)`` as ``APGDT.attack_single_run`` returns them (Linf, ``eot_iter`` 1)."""
        steps, eps = self.steps, self.eps
        steps_2, steps_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
        flat = (-1, *[1] * (x.dim() - 1))
        t = 2 * torch.rand(x.shape, device=x.device) - 1
        x_adv = (x + eps * t / t.flatten(1).abs().max(dim=1, keepdim=True)[0].view(flat)).clamp(0.0, 1.0)
        x_best, x_best_adv = x_adv.clone(), x_adv.clone()
        loss_steps = torch.zeros((steps, x.shape[0]), device=x.device)

        def loss_grad(xa: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            xa.requires_grad_()
            with torch.enable_grad():
                logits = self.get_logits(xa)
                loss_indiv = dlr_targeted(logits, y, y_target)
                g = torch.autograd.grad(loss_indiv.sum(), [xa])[0].detach()
            return logits.detach(), loss_indiv.detach(), g

        logits, loss_indiv, grad = loss_grad(x_adv)
        grad_best = grad.clone()
        acc = logits.argmax(1) == y
        loss_best = loss_indiv.clone()
        step_size = torch.full((x.shape[0], *flat[1:]), 2.0 * eps, device=x.device)
        x_adv_old = x_adv.clone()
        k, counter3 = steps_2, 0
        loss_best_last_check = loss_best.clone()
        reduced_last_check = torch.ones_like(acc)
        for i in range(steps):
            with torch.no_grad():
                x_adv = x_adv.detach()
                grad2 = x_adv - x_adv_old
                x_adv_old = x_adv.clone()
                a = 0.75 if i > 0 else 1.0  # momentum (APGD Alg. 1)
                x_adv_1 = x_adv + step_size * torch.sign(grad)
                x_adv_1 = torch.clamp(torch.min(torch.max(x_adv_1, x - eps), x + eps), 0.0, 1.0)
                x_adv_1 = torch.clamp(
                    torch.min(torch.max(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a), x - eps), x + eps), 0.0, 1.0
                )
                x_adv = x_adv_1 + 0.0
            logits, loss_indiv, grad = loss_grad(x_adv)
            with torch.no_grad():
                pred = logits.argmax(1) == y
                acc = acc & pred
                x_best_adv = torch.where((~pred).view(flat), x_adv, x_best_adv)
                loss_steps[i] = loss_indiv
                better = loss_indiv > loss_best
                x_best = torch.where(better.view(flat), x_adv, x_best)
                grad_best = torch.where(better.view(flat), grad, grad_best)
                loss_best = torch.where(better, loss_indiv, loss_best)
                counter3 += 1
                if counter3 == k:  # checkpoint: halve the step where the loss oscillated or stalled
                    rises = sum((loss_steps[i - c] > loss_steps[i - c - 1]).to(torch.int64) for c in range(k))
                    osc = rises <= k * self.rho
                    no_impr = ~reduced_last_check & (loss_best_last_check >= loss_best)
                    osc = osc | no_impr
                    reduced_last_check = osc.clone()
                    loss_best_last_check = loss_best.clone()
                    step_size = torch.where(osc.view(flat), step_size / 2.0, step_size)
                    x_adv = torch.where(osc.view(flat), x_best, x_adv)
                    grad = torch.where(osc.view(flat), grad_best, grad)
                    counter3 = 0
                    k = max(k - size_decr, steps_min)
        return x_best, acc, loss_best, x_best_adv


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
    if start not in ATTACK_STARTS:
        raise OptionError(f"--attack-start: {start!r} is not one of {', '.join(ATTACK_STARTS)}")
    return start


TRAIN_ATTACKS = ("pgd", "tpgd", "cw", "saa", "fgsm", "apgd-ce", "apgdt")


def make_attack(
    name: str,
    model: nn.Module,
    *,
    eps: float,
    alpha: float,
    steps: int,
    bn: str = "eval",
    num_classes: int = 10,
    seed: int = 0,
    **extra: Any,
) -> Attack:
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
        atk = SAA(
            model, eps=eps, steps=steps, n_target_classes=min(int(extra.get("n_target_classes", 3)), num_classes - 1)
        )
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


def make_eval_attack(
    spec: str, model: nn.Module, *, eps: float, alpha: float | None, num_classes: int, seed: int = 0
) -> Attack | None:
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
