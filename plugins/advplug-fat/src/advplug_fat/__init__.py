"""FAT: friendly adversarial training (Zhang, Xu, Han, Niu, Cui, Sugiyama and Kankanhalli, ICML 2020,
"Attacks which do not kill training make adversarial learning stronger").

FAT trains on *friendly* adversarial data: PGD stopped early, ``tau`` steps after the iterate is
first misclassified (the paper's early-stopped PGD, PGD-K-tau, its Algorithm 1, as the authors'
``earlystop.py`` says it follows; the "min-min" formulation of the authors' README). It is a
``generate_adversaries`` plugin: with ``--objective at`` it is FAT, with ``trades`` FAT-TRADES (the
KL attack, which then replaces TRADES' own), with ``mart`` FAT-MART.

**Sources.** The paper's text was not available to us beyond its title and the authors'
README; every detail below follows the authors' code (``zjfheart/Friendly-Adversarial-Training``:
``earlystop.py``, ``FAT.py``, ``FAT_for_TRADES.py``, ``FAT_for_MART.py``), and equation or section
numbers of the paper are not cited because we could not check them.

Early stop, as the authors' ``earlystop.py`` implements Algorithm 1 (our own code, on torchattacks'
``PGD``): at each of the ``K`` iterations the prediction on the current iterate is checked
*before* the update; a sample predicted wrongly with no budget left (``tau`` exhausted) is
returned as it is; a sample predicted wrongly with budget left spends one unit of ``tau`` and is
updated; a correctly predicted sample is updated. Samples still running after ``K`` iterations
are returned after ``K`` updates. The budget counts misclassified iterations (not consecutive
ones), as in the code. Like the code, stopped samples leave the batch (no further forward
passes), so FAT costs fewer passes than PGD-K; with BatchNorm in eval mode while attacking (the
authors' ``model.eval()``, advplug's default) this is the same as masking.

Per-sample signals recorded in ``Variant.stats`` (``[B]``, on the device) for other plugins:

* ``stop_step``: the number of PGD updates the returned example received (0..K), the early-stop
  step;
* ``first_wrong``: the iteration (0-based, = updates so far) at which the sample was first
  predicted wrongly, ``K`` if it never was during the iterations run;
* ``kappa``: iterations at which the prediction was still correct (GAIRAT's kappa, over the
  iterations run), and ``p_true_lps``: the true-class probability at the first misclassified
  iteration (the last one run if none; MAIL's Eq. 7), so GAIRAT and MAIL combine with FAT.

tau schedule (``dynamic``, default on, the increases of the authors' ``adjust_tau`` with epochs counted
from 1): ``tau = tau0 + #{m in tau_epochs : epoch > m}``, i.e. tau increases by one after each listed
epoch (``tau0`` is ``--fat-tau``, which ``adjust_tau`` ignores: see below). Defaults per objective,
from the authors' scripts: ``at`` (``FAT.py``): 50, 90 (tau 0, 1, 2 over 120 epochs);
``trades`` (``FAT_for_TRADES.py``): 30, 50, 70 (tau 0..3 over 85 epochs);
``mart`` (``FAT_for_MART.py``): 20, 40, 60, 80 (tau 0..4 over 90 epochs). Whether the paper
states the same schedules we could not check.

Attack settings per objective (the scripts): ``at``: cross-entropy, start uniform in the eps-ball
(``uniform_randominit``), ``omega`` 0.001 (Gaussian noise ``omega N(0, 1)`` added at every update
to escape local maxima); ``trades``: the KL loss ``KL(p(x) || p(x'))`` with ``p(x)`` from the clean
batch in eval mode, start ``clamp(x + 0.001 N(0, 1), 0, 1)`` (``normal_distribution_randominit``),
omega 0; ``mart``: cross-entropy, start normal, omega 0. eps and step size are the run's
(``--eps``, ``--alpha``; the scripts use 0.031 and 0.007) and ``K`` is ``--steps`` (10).
``tau >= K`` recovers the conventional attack (the authors' README). A per-sample budget a plugin sets
(``ctx.budget``: ``eps`` / ``alpha`` ``[B]``, e.g. CFA's class-wise radius, its ``cw_fat_loss``) replaces the run's
eps and step size per sample in the uniform start, the step and the projection.

Where advplug's numbers differ from the authors' code (each an option; the defaults keep the numbers of
earlier advplug runs; with ``--fat-noise continuing --fat-schedule-base zero`` the attack is ``earlystop.py``'s,
draw for draw, on the CPU from a start without numpy's generator, which the code's uniform start uses; on a
GPU the code draws its noise from the CPU generator, advplug from the device's):

* **omega's noise** (``--fat-noise``): ``active`` (default) draws ``omega N(0, 1)`` for every sample still
  running at an iteration and drops the draws of those that stop there; ``earlystop.py`` shrinks the batch to
  the samples that continue first and draws only for them (``continuing``). Same distribution for every
  sample, other random numbers from the first stop on, and so every later draw of the run differs too.
  ``earlystop.py`` also draws the noise at omega 0 (FAT-TRADES, FAT-MART), which only moves the generator;
  ``continuing`` does the same, ``active`` draws nothing then.
* **tau in the dynamic schedule** (``--fat-schedule-base``): ``tau`` (default) adds the increases to
  ``--fat-tau``; the authors' ``adjust_tau`` returns ``0, 1, 2, ...`` and ignores ``--tau`` while
  ``--dynamictau`` is on (``zero``; a nonzero ``--fat-tau`` is then refused, having no effect). Both agree at
  the scripts' ``--tau 0``; with the schedule off both use ``--fat-tau``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from advplug import Declaration, OptionError, StepContext, TrainContext, Variant, hookimpl, opt, set_bn_mode

__version__ = "0.1.0"

TAU_EPOCHS = {"at": "50,90", "trades": "30,50,70", "mart": "20,40,60,80"}
LOSS = {"at": "ce", "trades": "kl", "mart": "ce"}
START = {"at": "uniform", "trades": "normal", "mart": "normal"}
OMEGA = {"at": 0.001, "trades": 0.0, "mart": 0.0}
STATS = ("stop_step", "first_wrong", "kappa", "p_true_lps")


def parse_epochs(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise OptionError(f"--fat-tau-epochs: {text!r} is not a comma-separated list of epochs") from None
    if any(e < 0 for e in out) or list(out) != sorted(out):
        raise OptionError(f"--fat-tau-epochs: {text!r} must be non-negative and increasing")
    return out


def tau_at(epoch: int, tau0: int, epochs: tuple[int, ...], dynamic: bool = True, base: str = "tau") -> int:
    """tau for 0-based ``epoch``: one per listed epoch already completed (``epoch + 1 > m``, the authors'
    ``adjust_tau(epoch + 1)``) plus ``tau0`` (``base="tau"``) or plus nothing (``"zero"``, as ``adjust_tau``,
    which ignores ``--tau`` when the schedule is on); ``tau0`` alone when the schedule is off."""
    if not dynamic:
        return tau0
    return (tau0 if base == "tau" else 0) + sum(1 for m in epochs if epoch + 1 > m)


class EarlyStoppedPGD(torchattacks.PGD):
    """Early-stopped PGD (FAT, Algorithm 1): torchattacks' PGD loop (sign steps, projection onto
    the eps-ball and [0, 1]) that returns each sample ``tau`` misclassified iterations after its
    first misclassification. ``loss``: ``"ce"`` or ``"kl"`` (TRADES). ``start``: ``"uniform"``,
    ``"normal"`` (``clamp(x + 0.001 N(0, 1), 0, 1)``) or ``"none"``. ``omega``: std of the Gaussian
    noise added at every update; ``noise``: drawn for every sample still running (``"active"``, the
    stopping ones' draws dropped) or only for those updated (``"continuing"``, ``earlystop.py``).
    After a call, ``stats()`` gives the per-sample signals. ``set_budget(eps, alpha)``: per-sample ``[B]`` radius and
    step size (``advplug.Budget``; ``None``: the scalar) for the following calls, in the uniform start (the scalar
    draw scaled by ``eps_b / eps``), the step and the projection; equal to the scalars, the scalar attack bit for bit.

    >>> atk = EarlyStoppedPGD(model, eps=8/255, alpha=2/255, steps=10, tau=1); x_adv = atk(x, y)
    """

    budget_eps: Tensor | None = None
    budget_alpha: Tensor | None = None

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        tau: int = 0,
        loss: str = "ce",
        start: str = "uniform",
        omega: float = 0.0,
        noise: str = "active",
    ) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=start != "none")
        self.tau, self.loss, self.start, self.omega, self.noise = tau, loss, start, omega, noise
        if loss not in ("ce", "kl"):
            raise OptionError(f"--fat-loss: {loss!r} is not one of ce, kl")
        if start not in ("uniform", "normal", "none"):
            raise OptionError(f"--fat-start: {start!r} is not one of uniform, normal, none")
        if noise not in ("active", "continuing"):
            raise OptionError(f"--fat-noise: {noise!r} is not one of active, continuing")
        object.__setattr__(self, "_stats", {})

    def set_budget(self, eps: Tensor | None = None, alpha: Tensor | None = None) -> EarlyStoppedPGD:
        """Per-sample ``eps`` / ``alpha`` ``[B]`` for the following calls (``None``: the attack's scalar)."""
        object.__setattr__(self, "budget_eps", eps)  # torchattacks' __setattr__ would compare tensors
        object.__setattr__(self, "budget_alpha", alpha)
        return self

    def first_iterate(self, images: Tensor, eps_b: Tensor | None = None) -> Tensor:
        if self.start == "uniform":
            noise = torch.empty_like(images).uniform_(-self.eps, self.eps)
            if eps_b is not None:  # each sample's ball; a sample at the run's eps keeps the draw exactly
                noise = torch.where(eps_b == self.eps, noise, noise * (eps_b / self.eps))
            return torch.clamp(images + noise, 0, 1).detach()
        if self.start == "normal":
            return torch.clamp(images + 0.001 * torch.randn_like(images), 0, 1).detach()
        return images.clone().detach()

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        b, k, dev = labels.shape[0], self.steps, images.device
        eps_b, alpha_b = _per_sample(self.budget_eps, images), _per_sample(self.budget_alpha, images)
        adv = self.first_iterate(images, eps_b)
        p_nat = None
        if self.loss == "kl":
            with torch.no_grad():
                p_nat = torch.softmax(self.get_logits(images), dim=1)
        budget = torch.full((b,), int(self.tau), dtype=torch.long, device=dev)
        stop_step = torch.zeros(b, dtype=torch.long, device=dev)
        first_wrong = torch.full((b,), k, dtype=torch.long, device=dev)
        kappa = torch.zeros(b, dtype=torch.long, device=dev)
        p_true_lps = torch.zeros(b, device=dev)
        found = torch.zeros(b, dtype=torch.bool, device=dev)
        active = torch.arange(b, device=dev)
        for t in range(k):
            xa = adv[active].requires_grad_(True)
            ya = labels[active]
            logits = self.get_logits(xa)
            z = logits.detach()
            correct = z.argmax(1) == ya
            p_true = torch.softmax(z.float(), 1).gather(1, ya[:, None]).squeeze(1)
            was_found = found[active]
            kappa[active] += correct
            p_true_lps[active] = torch.where(was_found, p_true_lps[active], p_true)
            first_wrong[active] = torch.where(~correct & ~was_found, torch.full_like(ya, t), first_wrong[active])
            found[active] = was_found | ~correct
            left = budget[active]
            stop = ~correct & (left == 0)
            budget[active] = left - (~correct & ~stop).long()
            if self.loss == "kl":
                cost = F.kl_div(F.log_softmax(logits, dim=1), p_nat[active], reduction="sum")
            else:
                cost = F.cross_entropy(logits, ya, reduction="sum")
            grad = torch.autograd.grad(cost, xa)[0]
            keep = ~stop
            go = active[keep]
            adv[go] = self.update(xa.detach(), grad, images[active], keep, _rows(eps_b, active), _rows(alpha_b, active))
            stop_step[go] += 1
            active = go
            if active.numel() == 0:
                break
        stats = {"stop_step": stop_step, "first_wrong": first_wrong, "kappa": kappa, "p_true_lps": p_true_lps}
        object.__setattr__(self, "_stats", stats)  # torchattacks' __setattr__ walks dicts of attacks
        return adv.detach()

    def update(
        self, x: Tensor, grad: Tensor, x0: Tensor, keep: Tensor, eps: Tensor | None = None, alpha: Tensor | None = None
    ) -> Tensor:
        """The next iterate of the rows ``keep`` of the running batch: sign step, omega's noise, projection.
        ``eps`` / ``alpha``: the running rows' budgets ``[n, 1, ...]`` (``None``: the scalars)."""
        if self.noise == "continuing":  # earlystop.py: the batch shrinks first, then the noise is drawn
            x, grad, x0 = x[keep], grad[keep], x0[keep]
            eps, alpha = _rows(eps, keep), _rows(alpha, keep)
        nxt = x + (self.alpha if alpha is None else alpha) * grad.sign()
        if self.omega or self.noise == "continuing":  # earlystop.py draws the noise even at omega 0
            nxt = nxt + self.omega * torch.randn_like(nxt)
        delta = torch.clamp(nxt - x0, -self.eps, self.eps) if eps is None else torch.clamp(nxt - x0, -eps, eps)
        nxt = torch.clamp(x0 + delta, 0, 1)
        return nxt if self.noise == "continuing" else nxt[keep]

    def stats(self) -> dict[str, Tensor]:
        return dict(self._stats)


def _per_sample(t: Tensor | None, like: Tensor) -> Tensor | None:
    """A ``[B]`` budget as ``[B, 1, ...]`` in ``like``'s dtype, or ``None``."""
    return None if t is None else t.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


def _rows(t: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if t is None else t[rows]


class FAT:
    """FAT: early-stopped PGD (tau steps after the first misclassification), tau growing by epoch."""

    @dataclass(frozen=True)
    class Options:
        tau: int = opt(0, "tau before the schedule's increases (tau0; the scripts' --tau 0)", min=0)
        dynamic: bool = opt(True, "increase tau by one after each of --fat-tau-epochs (the authors' dynamic tau)")
        tau_epochs: str | None = opt(
            None, "epochs (1-based) after which tau grows by one (default: at 50,90; trades 30,50,70; mart 20,40,60,80)"
        )
        loss: str | None = opt(
            None, "attack loss: ce or kl (default: kl for trades, ce otherwise)", choices=("ce", "kl")
        )
        start: str | None = opt(
            None,
            "first iterate: uniform, normal (x + 0.001 N(0,1), clamped) or none "
            "(default: uniform for at, normal otherwise)",
            choices=("uniform", "normal", "none"),
        )
        omega: float | None = opt(
            None, "std of the Gaussian noise added at every update (default: 0.001 at, 0 otherwise)", min=0.0
        )
        noise: str = opt(
            "active",
            "omega's noise drawn for every sample still running (active) or only for those that continue "
            "(continuing, as earlystop.py): same distribution, other random numbers",
            choices=("active", "continuing"),
        )
        schedule_base: str = opt(
            "tau",
            "the dynamic schedule adds one per listed epoch to --fat-tau (tau) or to 0 "
            "(zero, the authors' adjust_tau, which ignores --tau)",
            choices=("tau", "zero"),
        )

    def __init__(self, options: Options) -> None:
        if options.dynamic and options.schedule_base == "zero" and options.tau:
            raise OptionError(
                f"--fat-tau {options.tau} has no effect with --fat-schedule-base zero (the schedule starts at 0); "
                "drop one of them, or turn the schedule off with --fat-dynamic false"
            )
        self.options = options
        self.attack: EarlyStoppedPGD | None = None
        self.epochs: tuple[int, ...] = ()
        self._stop_sum: Any = 0
        self._seen = 0

    @hookimpl
    def declare(self, objective: str) -> Any:
        return Declaration(
            variants={"fat": STATS},
            reads=frozenset({"eps", "alpha"}),  # generate_adversaries: ctx.budget into EarlyStoppedPGD.set_budget
            meaning="early-stopped PGD: tau steps after the first misclassification (stats: stop_step)",
        )

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        o = self.options
        obj = ctx.objective
        o = dataclasses.replace(
            o,
            tau_epochs=o.tau_epochs if o.tau_epochs is not None else TAU_EPOCHS.get(obj, TAU_EPOCHS["at"]),
            loss=o.loss or LOSS.get(obj, "ce"),
            start=o.start or START.get(obj, "uniform"),
            omega=o.omega if o.omega is not None else OMEGA.get(obj, 0.0),
        )
        self.options = o
        self.epochs = parse_epochs(o.tau_epochs)
        cfg = ctx.config
        self.attack = EarlyStoppedPGD(
            ctx.model,
            eps=cfg.eps,
            alpha=cfg.alpha,
            steps=cfg.steps,
            tau=o.tau,
            loss=o.loss,
            start=o.start,
            omega=o.omega,
            noise=o.noise,
        )
        set_bn_mode(self.attack, cfg.attack_bn)
        base = o.tau if o.schedule_base == "tau" else 0
        sched = f"tau {base} + 1 after each of epochs {o.tau_epochs}" if o.dynamic else f"tau {o.tau}"
        noise = f" ({o.noise} samples)" if o.omega or o.noise == "continuing" else ""
        ctx.log(f"fat: early-stopped PGD-{cfg.steps}, {sched}, loss {o.loss}, start {o.start}, omega {o.omega}{noise}")

    def tau(self, epoch: int) -> int:
        o = self.options
        return tau_at(epoch, o.tau, self.epochs, o.dynamic, o.schedule_base)

    @hookimpl
    def generate_adversaries(self, ctx: StepContext) -> list[Variant]:
        self.attack.tau = self.tau(ctx.epoch)
        budget = getattr(ctx, "budget", None)  # per-sample eps / alpha (CFA's CCM); None fields: the run's scalars
        self.attack.set_budget(*((budget.eps, budget.alpha) if budget is not None else (None, None)))
        x_adv = self.attack(ctx.x, ctx.y)
        stats = self.attack.stats()
        self._stop_sum = self._stop_sum + stats["stop_step"].sum()  # on the device; read once per epoch
        self._seen += ctx.batch_size
        return [Variant("fat", x_adv, stats)]

    @hookimpl
    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        mean = float(self._stop_sum) / self._seen if self._seen else None
        self._stop_sum, self._seen = 0, 0
        return {"tau": self.tau(epoch), "mean_stop_step": mean}
