"""CFA: class-wise calibrated fair adversarial training (Wei, Wang, Guo and Wang, CVPR 2023).

Three class-wise calibrations, each an option (all on by default, as the paper's CFA), computed as the authors' code
(``PKU-ML/CFA``: ``train.py``, ``attack.py``, ``utils.py``) computes them; the paper's equation numbers are not cited
(its text was not available to us), the code's names are:

* **CCM** (``--cfa-ccm``), the class-wise calibrated margin: after ``--cfa-begin`` epochs, each sample's attack radius
  is ``eps_y = (lambda_1 + t_y) * eps`` (``train.py``, ``class_eps``; ``cw_pgd_loss`` / ``cw_trades_loss`` /
  ``cw_fat_loss`` index it with ``cw_eps[y]``), the step size unchanged. It reaches the attack as ``Budget.eps``
  (hook ``attack_budget``): the core's PGD (``--objective at``, the code's AT mode), TRADES' KL attack
  (``trades``, its TRADES mode), FAT's early-stopped attack (``--plugin fat``, its FAT mode), MART's PGD (``mart``,
  not in the code).
* **CCR** (``--cfa-ccr``), the class-wise calibrated regularisation, TRADES only: ``beta'_y = s_y / (1 + s_y)``,
  ``s_y = (lambda_2 + t_y) * beta`` (``train.py``, ``class_beta``) in ``attack.py``'s ``trades_loss``
  ``sum_b ((1 - beta'_b) CE_b + beta'_b KL_b) / B``. Through the contract: ``Budget.beta = s_y`` and global weights
  ``w = 1 / (1 + s_y)`` on the natural and the adversarial term (own scale), so the run's TRADES loss
  ``mean(w CE) + mean(beta_b w KL)`` is the code's, term for term.
* **FAWA** (``--cfa-fawa``), fairness-aware weight averaging: after each epoch the averaged model (the slot of
  ``--ema``: checkpointed, evaluated with the ``ema_`` prefix, ``best-ema``) takes the weights only if the worst class's
  PGD accuracy on the held-out split is at least ``--cfa-threshold``: the first such epoch copies them
  (``weight_average(..., init=True)``), later ones average ``avg = decay * avg + (1 - decay) * w``; below it nothing
  changes (``weight_average(FAWA_model, model, 1.)``). Hook ``average_weights``.

``t_y`` is class ``y``'s robust training accuracy of the last finished epoch, from the adversarial logits of the
training step (``ctx.class_stats``; the code's ``robust_output``), normalised as the code's ``CW_log.result()``
does: ``m * cw_robust / N``, K times the class's correct count over all N samples of the epoch, not over the class's
own count. The two agree on a class-balanced epoch (the code's CIFAR-10 split: 4900 per class); on unequal classes a
rare class reads low and a frequent one can read above 1. The code hard-codes ``m = 10``; here ``K`` is the number of
classes.

Where advplug differs from the code, and the choices (defaults named):

* **TRADES' scale** (``--cfa-loss-scale``, default ``code``). The code's TRADES loss is ``(CE + beta KL) / (1 +
  beta)`` even without CCR and before ``--begin`` (``class_beta = beta / (1 + beta)``): ``1 / (1 + beta)`` (1/7 at
  beta 6) times Zhang et al.'s, so SGD's steps are 1/7 as long while weight decay is not scaled. ``code`` reproduces
  it (weights ``1 / (1 + beta)`` on both terms until CCR starts or with ``--cfa-ccr false``): ``--plugin cfa
  --cfa-ccm false --cfa-ccr false --cfa-fawa false`` is then the code's TRADES baseline, not advplug's plain
  ``trades``. ``trades`` multiplies the whole loss by ``1 + beta`` (weights ``(1 + beta) / (1 + s_y)``): the same
  class-wise calibration at Zhang et al.'s scale, equal to plain ``--objective trades`` before CCR starts and
  without it, so that a comparison with TRADES at one learning rate measures the calibration, not a 1/7 step size
  (on a short schedule the code's scale leaves the model under-trained: docs/ground-truth.md, the harder class).
  ``code`` stays the default, as the authors ran it. beta is the run's ``--trades-beta`` (6, the code's ``--beta``).
* **CCR under ``at`` / ``mart``**: the code passes ``class_beta`` to ``pgd_loss`` / ``fat_loss``, which ignore it;
  ``--cfa-ccr`` (on by default) is ignored there with a line in the log, not an error.
* **``--cfa-begin``** (the code's ``--begin 10`` of its 200 epochs, a 0-based epoch index: CCM and CCR apply from
  epoch ``begin + 1`` as advplug counts, after ``begin`` epochs): default 5 % of ``--epochs``, rounded, at least 1
  (2 epochs: 1; 120: 6; 200: 10, the code's). It must be at least 1 (the first epoch has no statistics; the code
  fails at ``--begin 0``); an explicit value at or past ``--epochs`` is an error while CCM or CCR is on.
* **FAWA's split and measure.** The code's validation split (``generate_validation.py``: the first 100 training
  images of each class, never trained on) is advplug's held-out selection split (``--selection-size``, drawn at
  random, not per class). The code's ``R_min`` is the minimum over classes of ``m * correct_k / N`` on that balanced
  split, i.e. the worst class's accuracy; here the worst class's accuracy ``val_pgd_worst_class_acc`` itself, which
  stays that quantity on a split whose classes are not equal (K * count / N would mostly measure a class's share of
  the split). Its attack is the selection's PGD (``--eval-steps``, the run's eps; the code: PGD-10, 8/255, step
  2/255, model in eval mode). With ``--selection test`` the decision reads the test samples (logged); with
  ``--eval-every N`` only evaluated epochs decide. Before its first update the averaged model is the initial model and
  is not evaluated (the code's is a second random initialisation, evaluated every epoch). Integer buffers
  (``num_batches_tracked``) are copied, where the code averages and truncates them. ``--ema`` is refused beside
  FAWA (one averaged model per run): ``--cfa-fawa false`` leaves the slot to ``--ema``. The code's second, plain
  per-epoch EMA, kept for comparison only, is not reproduced.
* **CCM's random start** (``at``): the code draws ``(rand - 0.5) * 2 * eps_y``; advplug's PGD draws torchattacks'
  ``U(-eps, eps)`` and scales it by ``eps_y / eps``: the same distribution, other numbers.
* **BatchNorm while attacking**: the code's AT and FAT attacks run with the model in train mode (batch statistics,
  running statistics updated by every attack forward), its TRADES attack in eval mode; advplug's ``--attack-bn``
  (default ``eval``) applies to all; ``--attack-bn train`` for the code's AT / FAT.
* **The code's FAT mode** (``fat_loss``, its own early stop, not FAT's ``earlystop.py``): ``tau`` fixed at 3 (its
  ``--tau``), uniform start, no noise, and a sample whose ``tau`` wrong iterations are spent stops even when it is
  classified correctly again (``earlystop.py``, and advplug's ``fat``, continue it). Closest with ``--plugin fat``:
  ``--fat-tau 3 --fat-dynamic false --fat-omega 0 --attack-bn train``.
* The code runs one more clean forward per batch in train mode for its logs (``update_clean``), which moves
  BatchNorm's running statistics; not reproduced. Its TRADES loss runs the natural forward twice
  (``--trades-natural-forwards 2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from advplug import Budget, Declaration, OptionError, StepContext, TrainContext, Variant, Weights, hookimpl, opt

__version__ = "0.1.0"

TRADES_BETA = 6.0  # TRADES' default --trades-beta (the code's --beta 6); a test checks it against advplug's
BEGIN_FRACTION = 10 / 200  # the code's --begin 10 of --epochs 200


def code_class_acc(correct: Tensor, seen: Tensor) -> Tensor:
    """The class-wise robust accuracy ``[K]`` as ``train.py``'s ``CW_log.result()`` computes it: ``m * cw_robust / N``,
    K times the class's count of correct predictions over *all* N samples of the epoch (not over the class's own
    count; the two agree on a class-balanced epoch, as the authors' CIFAR-10 split is). ``correct``, ``seen``: ``[K]``
    counts of the epoch."""
    k = correct.shape[-1]
    return k * correct.float() / seen.float().sum().clamp_min(1.0)


def ccm_class_eps(acc: Tensor, eps: float, lambda_1: float) -> Tensor:
    """CCM, ``train.py``: ``class_eps = (lambda_1 + train_robust) * eps`` ``[K]``."""
    return (lambda_1 + acc) * eps


def ccr_strength(acc: Tensor, beta: float, lambda_2: float) -> Tensor:
    """CCR, ``train.py``: ``s_k = (lambda_2 + train_robust_k) * beta`` ``[K]``; the code's class beta is
    ``beta'_k = s_k / (1 + s_k)``."""
    return (lambda_2 + acc) * beta


def trades_terms(s: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``attack.py``'s ``trades_loss`` ``sum_b ((1 - beta'_b) CE_b + beta'_b KL_b) / B`` with ``beta' = s / (1 + s)``,
    written as the contract's ``mean(w CE) + mean(beta_b w KL)``: ``(beta_b, w) = (s, 1 / (1 + s))``, since
    ``1 - beta' = 1 / (1 + s)`` and ``beta' = s / (1 + s)``; times ``scale`` (``--cfa-loss-scale trades``: ``1 +
    beta``, so that ``s = beta`` gives ``w = 1``, plain TRADES)."""
    return s, scale / (1.0 + s)


def loss_scale(name: str, beta: float) -> float:
    """The factor on the code's TRADES loss: 1 (``code``) or ``1 + beta`` (``trades``, Zhang et al.'s scale)."""
    return 1.0 + beta if name == "trades" else 1.0


def fawa_decay(worst: float | None, threshold: float, started: bool, decay: float) -> tuple[float | None, bool]:
    """FAWA, ``train.py``: ``(decay of this epoch's average or None for no update, started)``. The averaged model
    takes the weights only when the worst class's robust accuracy on the held-out split is at least ``threshold``:
    the first such epoch copies them (``weight_average(..., init=True)``: decay 0), later ones average with
    ``decay``; below it (the code's ``weight_average(FAWA, model, 1.)``) or without a measurement, nothing changes."""
    if worst is None or worst < threshold:
        return None, started
    return (decay if started else 0.0), True


def begin_default(epochs: int) -> int:
    """``--cfa-begin``'s default: the code's 10 of 200 epochs as a fraction of the run, rounded, at least 1."""
    return max(1, round(BEGIN_FRACTION * epochs))


def run_beta(plugin_options: dict[str, Any], objective: str) -> float:
    """The run's TRADES beta (``--trades-beta``), as the run's plugin options give it, else TRADES' default."""
    for key, value in (plugin_options or {}).items():
        if key.replace("_", "-") == f"{objective}-beta":
            return float(value)
    return TRADES_BETA


class CFA:
    """CFA: class-wise calibrated budgets (CCM), TRADES strengths (CCR) and fairness-aware weight averaging (FAWA)."""

    strength_hint = (
        "--cfa-lambda-2 (CCR's weights differ only as the classes' robust training accuracies do; before --cfa-begin "
        "and with --cfa-ccr false they are uniform: the code's TRADES scale 1 / (1 + beta), or 1 with --cfa-loss-scale "
        "trades)"
    )

    @dataclass(frozen=True)
    class Options:
        ccm: bool = opt(True, "class-wise calibrated margin: eps_y = (lambda_1 + t_y) eps per sample from --cfa-begin")
        ccr: bool = opt(
            True, "class-wise calibrated TRADES strength beta'_y = s / (1 + s), s = (lambda_2 + t_y) beta (trades only)"
        )
        fawa: bool = opt(
            True,
            "fairness-aware weight averaging: average only when the held-out worst-class PGD accuracy >= threshold",
        )
        lambda_1: float = opt(0.5, "CCM's base: eps_y = (lambda_1 + t_y) eps", min=0.0)
        lambda_2: float = opt(0.5, "CCR's base: s_y = (lambda_2 + t_y) beta", min=0.0)
        threshold: float = opt(0.24, "FAWA: the worst-class held-out PGD accuracy needed to average", min=0.0, max=1.0)
        begin: int | None = opt(
            None,
            "epochs trained before CCM and CCR start (the code's --begin 10 of 200; default 5 % of --epochs, "
            "at least 1)",
            min=1,
        )
        decay: float = opt(
            0.88, "FAWA's decay: avg = decay avg + (1 - decay) w (the code's --decay-rate)", min=0.0, max=1.0
        )
        loss_scale: str = opt(
            "code",
            "TRADES' loss scale: code (the authors' (CE + beta KL) / (1 + beta)) or trades (times 1 + beta: "
            "Zhang et al.'s, plain --objective trades before CCR starts)",
            choices=("code", "trades"),
        )

    def __init__(self, options: Options) -> None:
        self.options = options
        if not options.fawa:  # pluggy registers marked methods only: no average_weights, the slot stays --ema's
            self.average_weights = None  # type: ignore[method-assign]
        self.objective = "trades"
        self.begin = options.begin or 1
        self.eps, self.beta = 0.0, TRADES_BETA
        self.stats: Any = None
        self.fawa_key = "val_pgd_worst_class_acc"
        self.fawa_started = False
        self.fawa_last: str | None = None
        self._epoch = -1  # the epoch of the cached class quantities
        self._eps_k: Tensor | None = None
        self._s_k: Tensor | None = None

    # -- start-up --------------------------------------------------------------------------------------------------
    def ccr_on(self, objective: str) -> bool:
        return self.options.ccr and objective == "trades"

    @hookimpl
    def declare(self, objective: str) -> Declaration:
        o, trades = self.options, objective == "trades"
        sets = {"eps"} if o.ccm else set()
        if self.ccr_on(objective):
            sets.add("beta")
        parts = (["CCM eps_y"] if o.ccm else []) + (["CCR beta_y"] if self.ccr_on(objective) else [])
        if trades:
            parts.append("TRADES scaled 1 / (1 + beta)" if o.loss_scale == "code" else "TRADES at Zhang et al.'s scale")
        return Declaration(
            weights="global" if trades else None,
            natural_weights=trades,
            own_scale=trades,
            sets=frozenset(sets),
            provides=frozenset({"averaging"}) if o.fawa else frozenset(),
            meaning="CFA: " + (", ".join(parts + (["FAWA"] if o.fawa else [])) or "nothing (all off)"),
        )

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        o, cfg = self.options, ctx.config
        self.objective, self.stats, self.eps = ctx.objective, ctx.class_stats, float(cfg.eps)
        self.beta = run_beta(cfg.plugin_options, "trades")
        self.begin = o.begin if o.begin is not None else begin_default(ctx.epochs)
        calibrates = o.ccm or self.ccr_on(ctx.objective)
        if o.begin is not None and calibrates and o.begin >= ctx.epochs:
            raise OptionError(
                f"--cfa-begin {o.begin}: CCM and CCR would never start in a run of {ctx.epochs} epochs "
                f"(use fewer than {ctx.epochs}, or turn them off with --cfa-ccm false --cfa-ccr false)"
            )
        prefix = "val" if getattr(cfg, "selection", "validation") == "validation" else "test"
        self.fawa_key = f"{prefix}_pgd_worst_class_acc"
        ctx.log(self.header(ctx, calibrates, prefix))

    def header(self, ctx: TrainContext, calibrates: bool, prefix: str) -> str:
        o, parts = self.options, []
        if o.ccm:
            parts.append(f"CCM eps_y = ({o.lambda_1} + t_y) eps")
        if self.ccr_on(ctx.objective):
            parts.append(f"CCR beta'_y = s / (1 + s), s = ({o.lambda_2} + t_y) {self.beta}")
        when = f" from epoch {self.begin + 1}" if calibrates else ""
        line = f"cfa: {', '.join(parts) or 'no calibration'}{when}"
        if ctx.objective == "trades" and o.loss_scale == "code":
            line += f"; TRADES scaled by 1 / (1 + beta) as the code's trades_loss (beta {self.beta})"
        elif ctx.objective == "trades":
            line += f"; TRADES at Zhang et al.'s scale, the code's trades_loss times 1 + beta (beta {self.beta})"
        elif o.ccr:
            line += f"; CCR is defined for TRADES only, off under --objective {ctx.objective}"
        if o.fawa:
            split = "the held-out split" if prefix == "val" else "TEST samples (--selection test)"
            line += f"; FAWA: average (decay {o.decay}) when the worst class's PGD accuracy on {split} >= {o.threshold}"
        return line

    # -- each step -------------------------------------------------------------------------------------------------
    def class_terms(self, epoch: int) -> tuple[Tensor | None, Tensor | None]:
        """This epoch's ``(eps_k, s_k)`` ``[K]`` (``None`` before ``--cfa-begin`` or without statistics), computed
        once per epoch on the device."""
        if epoch != self._epoch:
            self._epoch, self._eps_k, self._s_k = epoch, None, None
            st = self.stats
            if epoch >= self.begin and st is not None and st.train_correct is not None:
                acc = code_class_acc(st.train_correct, st.train_seen)
                self._eps_k = ccm_class_eps(acc, self.eps, self.options.lambda_1)
                self._s_k = ccr_strength(acc, self.beta, self.options.lambda_2)
        return self._eps_k, self._s_k

    @hookimpl
    def attack_budget(self, ctx: StepContext) -> Budget | None:
        eps_k, s_k = self.class_terms(ctx.epoch)
        if eps_k is None:
            return None
        eps = eps_k[ctx.y] if self.options.ccm else None
        beta = s_k[ctx.y] if self.ccr_on(self.objective) else None
        return Budget(eps=eps, beta=beta) if eps is not None or beta is not None else None

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights | None:
        if self.objective != "trades":
            return None
        _, s_k = self.class_terms(ctx.epoch)
        if s_k is not None and self.ccr_on(self.objective):
            s = s_k[ctx.y]
        else:
            s = torch.full((ctx.batch_size,), self.beta, device=ctx.y.device)
        # the code's 1 - beta'_y (times 1 + beta at --cfa-loss-scale trades), on CE and KL (beta_b = s_y: attack_budget)
        _, w = trades_terms(s, loss_scale(self.options.loss_scale, self.beta))
        return Weights(adv=w, nat=w)

    # -- each epoch ------------------------------------------------------------------------------------------------
    @hookimpl
    def average_weights(self, epoch: int, metrics: dict[str, Any]) -> float | None:
        o = self.options
        worst = metrics.get(self.fawa_key)
        d, started = fawa_decay(worst, o.threshold, self.fawa_started, o.decay)
        self.fawa_last = (
            "none" if worst is None else "skip" if d is None else "copy" if not self.fawa_started else "average"
        )
        self.fawa_started = started
        return d

    @hookimpl
    def on_epoch_end(self, epoch: int) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        eps_k, s_k = (self._eps_k, self._s_k) if self._epoch == epoch else (None, None)
        if eps_k is not None and self.options.ccm:
            out.update(eps_min=float(eps_k.min()), eps_max=float(eps_k.max()))
        if s_k is not None and self.ccr_on(self.objective):
            b = s_k / (1 + s_k)
            out.update(beta_min=float(b.min()), beta_max=float(b.max()))
        if self.options.fawa:
            out["fawa"] = self.fawa_last
        self.fawa_last = None
        return out or None

    def state_dict(self) -> dict[str, Any]:
        return {"fawa_started": self.fawa_started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fawa_started = bool(state["fawa_started"])
