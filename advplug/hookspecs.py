"""Hook specifications: the contract between the trainer and plugins.

A plugin is a class whose ``__init__`` takes its ``Options`` dataclass instance (or nothing, if it
declares no ``Options``) and whose methods marked ``@advplug.hookimpl`` implement some of the
hooks below. Implementations may take any subset of a spec's arguments, by name.

At start-up, ``declare`` (checked as a whole by ``composition.check_composition`` in
``plugins.enable``), then ``requirements`` and ``on_train_start``. Order of one training step,
for a batch ``(x, y, index)``::

    attack_budget -> generate_adversaries -> perturb_weights (entered) -> (core: forward passes, cached in ctx)
    -> compute_weights -> combine_loss -> (core: backward) -> perturb_weights (exited)
    -> (core: optimizer step) -> on_batch_end

and at each epoch's end: (core: held-out evaluation of the model) -> average_weights -> (core: held-out
evaluation of the averaged model) -> on_epoch_end.

Besides hooks, a plugin may define plain methods and attributes the core looks for, each
described by a ``Protocol`` at the end of this module: ``Stateful`` (``state_dict`` /
``load_state_dict``, for checkpoints), ``OwnsLoss``, ``StartsAttacks`` (``attack_start``) and
``HintsStrength`` (``strength_hint``).

Every hook is called through pluggy, so wrappers (``@hookimpl(wrapper=True)``) are honoured:
a wrapper sees the result of the call it wraps and may change it. The collected hooks whose
results the core attributes to a plugin (``declare``, ``compute_weights``, ``on_epoch_end``) are
called one plugin at a time (``plugins.per_plugin``), so there wrappers wrap each plugin's call
and see that plugin's result as a one-item list (empty if it returned ``None``).

No hook may call ``backward()``, step the optimizer, or modify the ``StepContext``, the
variants or the model (``perturb_weights`` alone changes the weights, for the step's loss, and
restores them before the update); plugin state is the plugin's own.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import pluggy
from torch import Tensor

from advplug.context import Budget, Declaration, StepContext, TrainContext, Variant, Weights

hookspec = pluggy.HookspecMarker("advplug")
hookimpl = pluggy.HookimplMarker("advplug")  # re-exported as advplug.hookimpl


@hookspec
def declare(objective: str) -> Declaration | None:
    """Declare what the plugin needs from the run and what it gives it, for the start-up check.

    :param objective: the chosen objective's name (``at``, ``trades``, ``mart``).
    :return: a ``Declaration``: the kind of weights (``"global"``, ``"local"`` or ``None``), the
        view a global method reads (``"anchor"``, ``"natural"`` or a variant name), whether it
        weighs the natural term, the variants it generates with the per-sample stats they carry,
        a local method's anchor (its x*), its needs (``"stat:kappa"`` on its view,
        ``"validation"``, ``"loss"``, ...) and a one-line meaning; or ``None`` (an undeclared
        plugin: global weights read from ``ctx.anchor``; variants it generates are unchecked, and refused
        beside a plugin that sets a per-sample ``eps`` / ``alpha``).

    **Combining**: collected once, in ``plugins.enable``, before any data is loaded or any step
    runs; ``composition.check_composition`` checks the whole set: duplicate variant names, two local
    methods, a view nobody makes, a stat the view does not record, natural weights with a loss
    that has no natural term, a meta-learning need beside local weights, a per-sample budget that an
    attack making the run's variants ignores (``Declaration.reads``). Each failure is one line
    naming both plugins and the missing piece. Must not touch the model or data.
    """


@hookspec
def requirements() -> set[str] | None:
    """Declare what the core must provide before training starts.

    :return: a set of names, or ``None``. Known names: ``"validation"`` (hold out a
        validation split of the training set and pass it to ``on_train_start``).

    **Combining**: collected; the union of all sets is provided. Unknown names are an error.
    """


@hookspec
def on_train_start(ctx: TrainContext) -> None:
    """Set up the plugin once, before the first epoch (or after a resume has loaded state).

    :param ctx: the model, resolved config, training-set size, number of classes, input shape,
        device, epochs and learning-rate milestones, the chosen objective name, an attack
        factory ``ctx.make_attack(name, **overrides)`` returning torchattacks attacks under the
        run's eps and BatchNorm mode, a ``log`` function, the validation split ``(x, y)`` if
        ``"validation"`` was required, and ``loss_fn(ctx, variants, weights)``, the run's training
        loss for given weights (for meta-learning plugins such as BiLAW; weights may carry a graph).

    Raise ``advplug.OptionError`` for a setting the plugin cannot work with (e.g. an
    objective it does not support, a burn-in past the last epoch).

    **Combining**: collected; every plugin is called, in registration order.
    """


@hookspec
def attack_budget(ctx: StepContext) -> Budget | None:
    """Set this step's per-sample attack budget and loss strength (e.g. from each sample's class: CFA, DAFA).

    :param ctx: the step's context, before ``generate_adversaries``: ``ctx.x``, ``ctx.y``, ``ctx.index``,
        ``ctx.epoch``, ``ctx.class_stats`` (per-class accuracies of the epochs before); no variants yet.
    :return: a ``Budget`` whose fields are ``[B]`` tensors on the device or ``None``: ``eps`` (Linf radius per
        sample), ``alpha`` (step size per sample), ``beta`` (TRADES' / MART's regulariser strength per sample, in
        place of ``--trades-beta`` / ``--mart-beta``: ``beta_b * KL_b``, times the adversarial weights as before);
        or ``None`` (the run's scalars this step, e.g. during a warm-up).

    Called once per step, and only when an enabled plugin implements it. A plugin may return only the fields it
    declares in ``Declaration.sets``; another is a ``PluginError`` naming it at the first step where it appears.

    **Combining**: collected, merged field by field into ``ctx.budget`` (always a ``Budget``, all ``None`` when
    nobody sets one). Two plugins setting the same field, or ``beta`` under a loss without a regulariser (``at``,
    or a plugin's loss), are refused at start-up (``composition.check_composition``), so no field has two sources.
    The core's PGD, TRADES' KL attack and the ``pgd`` / ``tpgd`` attacks of ``TrainContext.make_attack`` apply
    ``eps`` and ``alpha`` (``[B, 1, 1, 1]`` in the random start, the step and the projection; equal to the run's
    scalars they give exactly the scalar attack); a plugin's own attack reads ``ctx.budget`` itself and says so
    with ``Declaration.reads`` (``{"eps", "alpha"}``: FAT's): a per-sample ``eps`` / ``alpha`` beside a plugin whose
    variants come from an attack that does not declare it (LRAT's, WMMR's), or from an undeclared one, is refused at
    start-up, since it would have no effect.

    Must not run the model for training purposes or sync the host (no ``.item()``): it runs every step.
    """


@hookspec
def generate_adversaries(ctx: StepContext) -> list[Variant] | None:
    """Produce adversarial views of the batch.

    :param ctx: the step's context; ``ctx.x`` ``[B, ...]`` in [0, 1], ``ctx.y`` ``[B]``,
        ``ctx.index`` ``[B]`` (positions in the training set).
    :return: a list of ``Variant(name, x_adv, stats)``, or ``None`` to leave it to others.
        ``x_adv`` must be detached, have ``ctx.x``'s shape, and lie within the eps ball.

    **Combining**: collected; all variants are merged and sorted by name; a duplicate name
    is an error. Plugins' variants replace the objective's own attack (TRADES' KL attack): the
    objective's ``generate_adversaries`` runs only if no plugin returns a variant (so FAT's
    early-stopped KL attack *is* FAT-TRADES' attack). If neither returns one, the core's
    training attack (PGD-K, torchattacks) supplies a single variant named ``"pgd"`` with
    ``stats["kappa"]`` (the number of PGD iterations at which the sample was still classified
    correctly, GAIRAT's kappa). Wrappers wrap the plugins' call and, when it runs, the objective's.

    Must not run the model on the clean batch for training purposes (use ``ctx.logits``).
    """


@hookspec
def perturb_weights(ctx: StepContext, variants: list[Variant]) -> AbstractContextManager[None] | None:
    """Perturb the model's weights for this step's loss and gradient, and undo it before the update.

    The one hook that may change the model: for weight-perturbation methods such as AWP
    (Wu et al., 2020), which take the loss and its gradient at ``w + v`` and update ``w``.

    :param ctx: the step's context, after ``generate_adversaries`` (the attack ran at the
        unperturbed weights) and before any forward pass of the step's weights or loss. Do not
        fill its cache (``ctx.logits``) here: those forwards would be at the unperturbed weights;
        compute what the perturbation needs on a fresh ``StepContext`` (e.g. the run's loss,
        ``TrainContext.loss_fn``, unweighted) with ``torch.autograd.grad``.
    :param variants: the merged variants, sorted by name.
    :return: a context manager, or ``None`` to leave the weights alone this step (e.g. during a
        warm-up). Its ``__enter__`` changes the parameters of ``ctx.model`` in place; its
        ``__exit__`` restores them exactly (bit for bit: keep a copy, do not subtract), also when
        the step fails.

    The core enters the managers right after this hook, so ``compute_weights``,
    ``combine_loss`` and ``backward()`` all run at the perturbed weights, and exits them after
    ``backward()`` and before the optimizer step: the gradient taken at ``w + v`` updates ``w``.
    If a forward pass is already cached in ``ctx`` when a manager is entered (a plugin called
    ``ctx.logits`` in ``generate_adversaries``), the core stops with an error rather than
    reuse logits of the unperturbed weights.

    **Combining**: collected; each plugin computes its perturbation at the unperturbed weights;
    the managers are entered in the order the results come (last registered plugin first) and
    exited in reverse order (``contextlib.ExitStack``), so perturbations add up and every one is
    undone.

    Must not call ``backward()`` (use ``torch.autograd.grad``), step the optimizer, or leave any
    other state changed: a forward pass of its own in train mode must restore BatchNorm's
    running statistics.
    """


@hookspec
def compute_weights(ctx: StepContext, variants: list[Variant]) -> Weights | None:
    """Weigh the samples of this step.

    :param ctx: the step's context; ``ctx.logits(view)``, ``ctx.features(view)`` and
        ``ctx.probs(view)`` give cached forward results (``view``: a Variant or ``"natural"``).
        Asking for a view computes its forward pass once, shared with the loss and all plugins.
        ``ctx.anchor`` is the view that stands for the pair (LRAT's x*, else the only variant);
        ``ctx.view(name)`` resolves ``"anchor"``, ``"natural"`` or a variant name.
    :param variants: the merged variants, sorted by name (``V = len(variants)``).
    :return: ``Weights``, or ``None`` to abstain (e.g. during a burn-in period). Values must be
        finite and non-negative. Two kinds: **global** weights, one per instance (how much the
        pair counts): ``adv`` ``[B]`` and ``nat`` ``[B]`` (the natural term); with several
        variants a global method reads one view (its declared ``view``, by default
        ``ctx.anchor``), never one margin per variant. **Local** weights, one per variant inside
        the pair (LRAT): ``local`` ``[V, B]`` and ``local_nat`` ``[B]``.

    **Combining**: collected. Global weights multiply (one contributor: as returned; several:
    the product is rescaled so that its batch mean is the product of theirs, so mean-1 methods
    stay mean 1; all-reduced under DDP); at most one plugin returns local weights (declared, and
    checked at start-up), kept exactly as returned. ``combine_loss`` receives
    ``CombinedWeights``: ``adv[v, b] = instance[b] * local[v, b]``, the natural term's weight, and
    the parts; detached. Abstaining or all-ones weights change nothing; the order of ``--plugin``
    flags changes nothing. If nobody returns weights, ``combine_loss`` receives ``None``. Wrappers
    wrap each plugin's call (a wrapper sees ``[weights]`` of one plugin, or ``[]``); each plugin's
    result, as its wrappers leave it, is checked (finite, >= 0) and a bad one is named.
    """


@hookspec(firstresult=True)
def combine_loss(ctx: StepContext, variants: list[Variant], weights: Weights | None) -> Tensor | None:
    """Compute the scalar training loss.

    :param ctx: the step's context (use its cached logits; they carry gradients).
    :param variants: the merged variants.
    :param weights: the combined, detached weights, or ``None`` (all ones).
    :return: a scalar tensor with gradient, or ``None`` to pass.

    **Combining**: first result; exactly one objective owns the loss. The built-in objective
    chosen with ``--objective`` (``at``, the weighted cross-entropy over variants, is
    ``trylast``; ``trades``; ``mart``) or a plugin such as LRAT owns it; two owners are an error
    at start-up naming both. Extra terms are added by wrappers
    (``@hookimpl(wrapper=True)``: ``loss = yield; return loss + beta * term``).
    """


@hookspec
def on_batch_end(ctx: StepContext, loss: Tensor) -> None:
    """Update the plugin's own state after the optimizer step (codebooks, per-sample histories).

    :param ctx: the step's context; cached logits and features are still available.
    :param loss: the detached scalar loss of the step.

    **Combining**: collected; every plugin is called. No host syncs here, please: this runs
    every step.
    """


@hookspec
def on_epoch_end(epoch: int, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Per-epoch upkeep: burn-in switches, schedules, estimates, dumps.

    :param epoch: the epoch that just ended (0-based).
    :param metrics: the epoch's metrics so far (read-only).
    :return: extra JSON-serialisable metrics to record under the plugin's name, or ``None``.

    **Combining**: collected; every plugin is called, each with its own copy of the metrics;
    results are stored as ``metrics[plugin_name]``. Wrappers wrap each plugin's call (a wrapper
    sees ``[result]`` of one plugin, or ``[]``, and may change it).
    """


@hookspec(firstresult=True)
def average_weights(epoch: int, metrics: dict[str, Any]) -> float | None:
    """Decide, once per epoch, how the run's averaged model takes the current weights (CFA's FAWA).

    Called only for the plugin that declares ``provides={"averaging"}``: the run then keeps an averaged model in the
    slot of ``--ema`` (checkpointed, resumed exactly, evaluated on the held-out split with the ``ema_`` prefix,
    selected as ``best-ema`` and evaluated at the end), updated only by this hook, never per step.

    :param epoch: the epoch that just ended (0-based).
    :param metrics: the epoch's metrics so far (read-only), with the model's held-out numbers when the epoch was
        evaluated (``val_pgd_acc``, ``val_pgd_worst_class_acc``...); per-class numbers in
        ``TrainContext.class_stats``.
    :return: the decay ``d`` in [0, 1] of ``avg = d * avg + (1 - d) * weights`` (parameters and floating-point
        buffers; integer buffers are copied): ``0`` takes the current weights, ``1`` keeps the average; or ``None``:
        no update this epoch. Before its first update the averaged model is not evaluated.

    **Combining**: first result; at most one plugin provides averaging (two are refused at start-up, naming both;
    ``--ema`` beside it is refused, naming it). After the update the core evaluates the averaged model on the
    held-out split, then calls ``on_epoch_end``. Must not change the model or the averaged model itself.
    """


@runtime_checkable
class Stateful(Protocol):
    """A plugin with state to checkpoint: a resumed run continues exactly.

    ``state_dict() -> dict``: the plugin's state after an epoch; tensors, numbers, strings, lists and
    dicts only (checkpoints are loaded with ``weights_only=True``). Saved in ``last.pt`` and
    ``best.pt`` under the plugin's name.
    ``load_state_dict(state: dict) -> None``: restore it, on ``--resume``, after ``on_train_start``.
    Raise ``KeyError``, ``ValueError`` or ``RuntimeError`` for a state that does not fit (reported as
    a checkpoint that does not match the run).

    **Combining**: one state per plugin; a resume whose checkpoint holds the states of other
    plugins than the run's is refused. Both methods or neither: a plugin with only one is not stateful.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class OwnsLoss(Protocol):
    """A plugin that says whether its ``combine_loss`` owns the loss under the chosen objective.

    ``owns_loss(objective: str) -> bool``: e.g. MeoW's mixture owns the loss beside ``at`` and
    yields to ``trades``. Without this method a plugin owns the loss if it implements
    ``combine_loss`` without ``wrapper=True``.

    **Combining**: asked at start-up (``plugins.enable``); two owners are an error naming both,
    except that the ``at`` objective yields to any other owner.
    """

    def owns_loss(self, objective: str) -> bool: ...


@runtime_checkable
class StartsAttacks(Protocol):
    """A plugin whose method starts the training attacks from its own random start.

    ``attack_start(objective: str) -> str | None``: ``"uniform"``, ``"normal"``, ... (see
    ``config.ATTACK_STARTS``), or ``None`` for no wish (e.g. MAIL's code starts every objective
    from ``normal``).

    **Combining**: ``--attack-start`` wins; else the plugins' wish if they all agree; else the
    objective's official start (``attacks.resolve_attack_start``). The run header logs who chose.
    """

    def attack_start(self, objective: str) -> str | None: ...


@runtime_checkable
class HintsStrength(Protocol):
    """A reweighting plugin that names the options making its weights stronger.

    ``strength_hint: str``: e.g. ``"--mail-gamma (higher: steeper weights)"``, quoted by the core's
    warning when the combined weights stay nearly uniform for several epochs.

    **Combining**: each weigher's hint is quoted in the one warning.
    """

    strength_hint: str


SPEC_NAMES = (
    "declare",
    "requirements",
    "on_train_start",
    "attack_budget",
    "generate_adversaries",
    "perturb_weights",
    "compute_weights",
    "combine_loss",
    "on_batch_end",
    "average_weights",
    "on_epoch_end",
)

__all__ = [
    "Any",
    "Budget",
    "Declaration",
    "HintsStrength",
    "OwnsLoss",
    "SPEC_NAMES",
    "StartsAttacks",
    "Stateful",
    "StepContext",
    "Tensor",
    "TrainContext",
    "Variant",
    "Weights",
    "hookimpl",
    "hookspec",
]
