"""Hook specifications: the contract between the trainer and plugins.

A plugin is a class whose ``__init__`` takes its ``Options`` dataclass instance (or nothing, if it
declares no ``Options``) and whose methods marked ``@advplug.hookimpl`` implement some of the
hooks below. Implementations may take any subset of a spec's arguments, by name.

Order of one training step, for a batch ``(x, y, index)``::

    generate_adversaries -> (core: forward passes, cached in ctx) -> compute_weights
    -> combine_loss -> (core: backward, optimizer step) -> on_batch_end

Besides hooks, a plugin may define two plain methods the core calls for checkpoints:
``state_dict() -> dict`` (tensors, numbers, strings, lists and dicts only: checkpoints are loaded
with ``weights_only=True``) and ``load_state_dict(state: dict) -> None``; and
``owns_loss(objective: str) -> bool`` to say whether its ``combine_loss`` owns the loss for the
chosen objective (default: it does if it implements ``combine_loss`` without ``wrapper=True``).

No hook may call ``backward()``, step the optimizer, or modify the ``StepContext``, the
variants or the model; plugin state is the plugin's own.
"""
from __future__ import annotations

from typing import Any

import pluggy
from torch import Tensor

from .context import StepContext, TrainContext, Variant, Weights

hookspec = pluggy.HookspecMarker("advplug")


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
def generate_adversaries(ctx: StepContext) -> list[Variant] | None:
    """Produce adversarial views of the batch.

    :param ctx: the step's context; ``ctx.x`` ``[B, ...]`` in [0, 1], ``ctx.y`` ``[B]``,
        ``ctx.index`` ``[B]`` (positions in the training set).
    :return: a list of ``Variant(name, x_adv, stats)``, or ``None`` to leave it to others.
        ``x_adv`` must be detached, have ``ctx.x``'s shape, and lie within the eps ball.

    **Combining**: collected; all variants are merged and sorted by name; a duplicate name
    is an error. If no plugin returns one, the core's training attack (PGD-K, torchattacks)
    supplies a single variant named ``"pgd"`` with ``stats["kappa"]`` (the number of PGD
    iterations at which the sample was still classified correctly, GAIRAT's kappa).

    Must not run the model on the clean batch for training purposes (use ``ctx.logits``).
    """


@hookspec
def compute_weights(ctx: StepContext, variants: list[Variant]) -> Weights | None:
    """Weigh the samples of this step.

    :param ctx: the step's context; ``ctx.logits(view)``, ``ctx.features(view)`` and
        ``ctx.probs(view)`` give cached forward results (``view``: a Variant or ``"natural"``).
        Asking for a view computes its forward pass once, shared with the loss and all plugins.
    :param variants: the merged variants, sorted by name (``V = len(variants)``).
    :return: ``Weights(adv=[B] or [V, B], nat=[B] or None)``, or ``None`` to abstain
        (e.g. during a burn-in period). Values must be finite and non-negative.

    **Combining**: collected; the core multiplies all results element-wise (``[B]`` broadcasts
    over variants), per part. A single contributor's weights are used as returned (each method's
    own normalisation); when two or more plugins contribute to a part, the product is rescaled
    per variant so that its batch mean is the product of the contributors' batch means (mean-1
    methods leave the others' scale alone; all-reduced under DDP). The result is detached. If nobody returns weights, ``combine_loss`` receives ``None``.
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

    **Combining**: collected; every plugin is called; results are stored as
    ``metrics[plugin_name]``.
    """


SPEC_NAMES = (
    "requirements",
    "on_train_start",
    "generate_adversaries",
    "compute_weights",
    "combine_loss",
    "on_batch_end",
    "on_epoch_end",
)

__all__ = ["hookspec", "SPEC_NAMES", "Any", "Tensor", "StepContext", "TrainContext", "Variant", "Weights"]
