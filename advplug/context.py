"""The small data types that flow through the hooks: Variant, Weights, StepContext, TrainContext."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from advplug.errors import OptionError

NATURAL = "natural"


@dataclass
class Variant:
    """One adversarial view of the batch.

    ``name`` identifies the view (unique within a step), ``x`` has the batch's shape, and
    ``stats`` holds per-sample signals ``[B]`` the attack recorded for free while iterating
    (e.g. ``"kappa"``: PGD iterations at which the sample was still classified correctly).
    """

    name: str
    x: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Weights:
    """Per-sample weights returned by ``compute_weights``: two kinds, which combine differently.

    * **Global** (how much an instance's pair counts in the loss; GAIRAT, MAIL, BAT, BiLAW, MeoW,
      focal): ``adv`` ``[B]``, one weight per instance, applied to every variant of the pair
      (``[1, B]`` is accepted); ``nat`` ``[B]``, the weight of the objective's natural term
      (TRADES' CE, MeoW's mixture).
    * **Local** (how the pair's weight is distributed over its variants; LRAT): ``local``
      ``[V, B]``, one weight per variant in the order of the ``variants`` list, and ``local_nat``
      ``[B]`` when the natural input is a member of the pair (LRAT's ``--lrat-floor nat``).

    Any field may be ``None``. Weights are returned at the scale the plugin's method defines;
    how the core combines them is ``weights.combine_weights``.
    """

    adv: Tensor | None = None
    nat: Tensor | None = None
    local: Tensor | None = None
    local_nat: Tensor | None = None


@dataclass
class CombinedWeights(Weights):
    """What ``combine_loss`` receives: the final weights and, for inspection, their parts.

    ``adv`` ``[V, B]``: the final weight of each variant, ``instance[b] * local[v, b]``;
    ``nat`` ``[B]`` or ``None``: the final weight of the natural term (the product of the global
    natural weights, times ``instance * local_nat`` when the natural input is in the pair).
    ``instance`` ``[B]``: the product of the global weights (``None``: no global contributor);
    ``local`` / ``local_nat``: the local method's weights exactly as it returned them.
    """

    instance: Tensor | None = None


BUDGET_FIELDS = ("eps", "alpha", "beta")


@dataclass
class Budget:
    """Per-sample attack budget and loss strength of one step, from the ``attack_budget`` hook (``StepContext.budget``).

    ``eps`` ``[B]``: the Linf radius of each sample's training attack; ``alpha`` ``[B]``: its step size; ``beta``
    ``[B]``: the strength of the objective's regulariser per sample (TRADES' and MART's ``beta_b * KL_b``). Each on the
    device; ``None``: the run's scalar (``--eps``, ``--alpha``, ``--trades-beta`` / ``--mart-beta``). The core's PGD
    and TRADES' KL attack apply ``eps`` and ``alpha`` broadcast as ``[B, 1, 1, 1]`` to the random start, the step and
    the projection; the ``pgd`` / ``tpgd`` attacks of ``TrainContext.make_attack`` take them as
    ``atk(x, y, eps=ctx.budget.eps, alpha=ctx.budget.alpha)`` (or ``atk.set_budget``); a plugin's own attack reads
    them here.
    """

    eps: Tensor | None = None
    alpha: Tensor | None = None
    beta: Tensor | None = None

    def fields_set(self) -> list[str]:
        """The names of the fields that are not ``None``, in ``BUDGET_FIELDS`` order."""
        return [f for f in BUDGET_FIELDS if getattr(self, f) is not None]


class ClassStats:
    """Per-class accuracies of the run, kept by the core in one place on the device (``TrainContext.class_stats``,
    ``StepContext.class_stats``; read them, do not modify them). ``[K]`` tensors, ``K = num_classes``; ``None`` until
    known.

    * ``train_correct`` / ``train_seen`` (long): per class, the training samples of the last finished epoch that the
      anchor's (the first variant's) adversarial logits of the training step classified correctly (the logits
      ``train_acc`` counts), and all training samples of that epoch; summed over DDP ranks.
    * ``train_robust_acc`` (float): ``train_correct / train_seen`` (0 for a class not seen).
    * ``val_clean_acc`` / ``val_robust_acc`` (float): per-class accuracy of the model on the held-out selection split
      (clean, and under the selection's PGD; the test samples it uses under ``--selection test``), from the latest
      evaluation (every ``--eval-every`` epochs), 0 for a class the split lacks; ``val_seen`` (long): the split's
      samples per class (``val_robust_acc * val_seen`` are counts).
    * ``train_epoch`` / ``val_epoch``: the epoch (0-based) those numbers are from (-1: none yet).

    Plugins with their authors' normalisation (e.g. ``K * correct_k / N``) compute it from the counts. The core updates
    the training counts every step with ``index_add_`` (no host sync) and the snapshots at each epoch's end, before
    ``on_epoch_end``; they are checkpointed, so a resumed run reads the same numbers.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.train_correct: Tensor | None = None
        self.train_seen: Tensor | None = None
        self.train_robust_acc: Tensor | None = None
        self.val_clean_acc: Tensor | None = None
        self.val_robust_acc: Tensor | None = None
        self.val_seen: Tensor | None = None
        self.train_epoch = -1
        self.val_epoch = -1
        self._correct = torch.zeros(num_classes, dtype=torch.long, device=device)
        self._seen = torch.zeros(num_classes, dtype=torch.long, device=device)

    # -- the core's side -------------------------------------------------------------------------------------------
    def add(self, y: Tensor, correct: Tensor | None) -> None:
        """Count one step's samples ``y`` ``[B]`` and which were classified correctly (``correct`` ``[B]`` bool, or
        ``None``: none counted), on the device."""
        self._seen.index_add_(0, y, torch.ones_like(y))
        if correct is not None:
            self._correct.index_add_(0, y, correct.to(torch.long))

    def end_epoch(self, epoch: int, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Snapshot the epoch's counts (``reduce``: summed across ranks) and start the next epoch's."""
        counts = torch.stack([self._correct, self._seen])
        counts = reduce(counts) if reduce is not None else counts
        self.train_correct, self.train_seen = counts[0].clone(), counts[1].clone()
        self.train_robust_acc = self.train_correct.double().div(self.train_seen.clamp_min(1)).float()
        self.train_epoch = epoch
        self._correct.zero_()
        self._seen.zero_()

    def set_validation(self, epoch: int, y: Tensor, clean: list[float | None], robust: list[float | None]) -> None:
        """The held-out split's per-class accuracies (``evaluate(per_class=...)``'s lists; ``None``: class absent)."""
        device = self._seen.device
        self.val_clean_acc = torch.tensor([a or 0.0 for a in clean], device=device)
        self.val_robust_acc = torch.tensor([a or 0.0 for a in robust], device=device)
        self.val_seen = torch.bincount(y, minlength=self.num_classes).to(device)
        self.val_epoch = epoch

    _STATE = ("train_correct", "train_seen", "train_robust_acc", "val_clean_acc", "val_robust_acc", "val_seen")

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {n: getattr(self, n) for n in self._STATE}
        out.update(train_epoch=self.train_epoch, val_epoch=self.val_epoch)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s snapshots (a KeyError for a state that lacks one)."""
        for n in self._STATE:
            v = state[n]
            setattr(self, n, v.to(self._seen.device) if isinstance(v, Tensor) else None)
        self.train_epoch, self.val_epoch = int(state["train_epoch"]), int(state["val_epoch"])


ANCHOR = "anchor"
DECLARED_NEEDS = ("natural", "features", "validation", "loss", "stat:<key>")


@dataclass(frozen=True)
class Declaration:
    """What a plugin needs from a run and what it gives it, from the ``declare`` hook; the core
    checks the whole set at start-up (``composition.check_composition``), before any data is loaded.

    ``weights``: the kind of ``compute_weights`` result, ``"global"``, ``"local"`` or ``None``.
    ``view``: the view a global method reads when the pair has several variants:
    ``"anchor"`` (the pair's stand-in: the local method's ``anchor``, else the only variant,
    else the first by name), ``"natural"`` or a variant name.
    ``natural_weights``: returns ``Weights.nat`` (needs a loss owner with a natural term).
    ``variants``: ``{name: stats keys}`` of the variants ``generate_adversaries`` returns.
    ``anchor``: a local method's stand-in view of its pair (LRAT's x*), or ``None``.
    ``needs``: ``"natural"`` (natural logits), ``"features"`` (penultimate features: taken from the model only
    when a plugin declares this need or declares nothing; ``advplug.models``), ``"validation"`` (also ask for
    it with ``requirements``), ``"loss"`` (the run's loss as a function of this plugin's weights
    alone: meta-learning), ``"stat:KEY"`` (per-sample ``Variant.stats[KEY]`` on its view).
    ``provides``: ``"natural-term"`` for a loss owner whose loss weighs a natural term.
    ``own_scale``: the weights carry a loss scale of their own rather than mean 1 (MeoW's raw
    Eq. 4, MAIL's fixed ``3 w``; for a local method, a normalisation such as LRAT's Eq. 15). A
    global with its own scale beside a local method with its own is refused: both set the scale.
    ``meaning``: one line on what the weights mean (``advplug hooks``, the pair table, docs/pairs.md).
    ``sets``: the per-sample quantities its ``attack_budget`` returns, a subset of ``{"eps", "alpha", "beta"}``
    (``Budget``); two plugins setting the same one, or ``"beta"`` under a loss without a regulariser (``at``), are
    refused, and returning a field not declared here is an error at the first step.
    ``reads``: the quantities of ``ctx.budget`` it honours, a subset of ``{"eps", "alpha", "beta"}``: ``eps`` /
    ``alpha`` for a plugin whose ``variants`` come from an attack that applies them (FAT's early-stopped PGD); ``beta``
    for a loss owner whose loss applies it. A plugin that sets ``eps`` or ``alpha`` beside one that makes the run's
    variants without reading it (or an undeclared generator) is refused, as is ``beta`` beside a plugin's loss that
    does not read it: the budget would have no effect.
    ``provides`` may also hold ``"averaging"``: the plugin's ``average_weights`` keeps the run's averaged model.
    """

    weights: str | None = None
    view: str = ANCHOR
    natural_weights: bool = False
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    anchor: str | None = None
    needs: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    own_scale: bool = False
    meaning: str = ""
    sets: frozenset[str] = frozenset()
    reads: frozenset[str] = frozenset()


FEATURES_HOW = (
    "end it in an nn.Linear classifier (its input is taken), or define a method features(x) that returns the "
    "penultimate features and call it in forward (README: models without an nn.Linear head)"
)


class _FeaturesCall:
    """Stands in for a model's ``features`` method on the instance: calls it and keeps its output, flattened to
    ``[B, D]``, as the tap's ``last``."""

    def __init__(self, tap: FeatureTap, inner: Callable[..., Tensor]) -> None:
        self.tap, self.inner = tap, inner

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.inner(*args, **kwargs)
        self.tap.last = out.flatten(1) if out.dim() > 2 else out
        return out


class FeatureTap:
    """Keeps the penultimate features of the model's latest forward pass, without a forward pass of its own: the
    input of its head (``advplug_head``, else its last ``nn.Linear``: a forward pre-hook), or the output of its
    ``features(x)`` method when it defines one (``advplug.models``: how a model exposes its features).

    ``needed_by``: the plugins that read features (``needs={"features"}``); ``[]`` taps nothing, and a model that
    exposes no features is then an ``OptionError`` naming them. ``None`` (needs unknown): taps what the model
    exposes; ``StepContext.features`` says what is missing."""

    def __init__(self, model: nn.Module, needed_by: Sequence[str] | None = None) -> None:
        self.last: Tensor | None = None
        self.missing: str | None = None  # why there are no features; None when tapped
        self.needed_by = list(needed_by or [])
        self._undo: Callable[[], None] | None = None
        if needed_by is not None and not needed_by:
            self.missing = "no enabled plugin declares that it reads features (needs={'features'})"
            return
        self._undo = self._attach(model)
        if self._undo is None:
            self.missing = f"the model {type(model).__name__} exposes none: {FEATURES_HOW}"
            if needed_by:
                raise OptionError(
                    f"{' and '.join(needed_by)} {'reads' if len(needed_by) == 1 else 'read'} the model's penultimate "
                    f"features, but {type(model).__name__} has no nn.Linear layer or features(x) method: to expose "
                    f"them, {FEATURES_HOW}"
                )

    def _attach(self, model: nn.Module) -> Callable[[], None] | None:
        """Tap the model's feature source; returns how to undo it (``None``: it exposes none)."""
        head = getattr(model, "advplug_head", None)
        if isinstance(head, nn.Module):
            return head.register_forward_pre_hook(self._hook).remove
        if inspect.isfunction(getattr(type(model), "features", None)):
            before = vars(model).get("features")
            vars(model)["features"] = _FeaturesCall(self, model.features)  # shadows the method on this instance

            def undo() -> None:
                if before is None:
                    vars(model).pop("features", None)
                else:
                    vars(model)["features"] = before

            return undo
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        return linears[-1].register_forward_pre_hook(self._hook).remove if linears else None

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self.last = inputs[0]

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


def _at_least_fp32(t: Tensor) -> Tensor:
    """fp16/bf16 (autocast) results as fp32; fp32 and fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class StepContext:
    """Everything a plugin may read during one training step.

    Forward passes are cached per view: the first call to ``logits(view)`` runs the model on that
    view (train mode, with gradients, so the loss reuses it); later calls, from any plugin,
    return the cached tensors. ``features(view)`` returns the penultimate features captured in
    that same forward. Plugins must treat the context as read-only. The natural view records no
    gradient when the run's loss cannot read it (``natural_grad`` False: the core's AT loss with no
    wrapper), as its only readers are then plugins' signals, which are detached anyway.

    Under ``--precision bf16|fp16`` the forward runs under autocast and the cached logits and
    features are cast to fp32 (with gradient), so that every plugin's weights, margins and
    codebooks, and the loss, are computed in fp32.

    ``budget``: the step's ``Budget`` (per-sample ``eps``, ``alpha``, ``beta``, from ``attack_budget``; all ``None``
    when no plugin sets one). ``class_stats``: the run's ``ClassStats`` (per-class accuracies, on the device).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        index: Tensor,
        epoch: int,
        step: int,
        num_classes: int,
        config: Any,
        lr: float,
        tap: FeatureTap,
        reduce_mean: Callable[[Tensor], Tensor] | None = None,
        autocast: Callable[[], Any] | None = None,
        class_stats: ClassStats | None = None,
    ) -> None:
        self.model = model
        self._autocast = autocast or contextlib.nullcontext
        self.x, self.y, self.index = x, y, index
        self.epoch, self.step, self.lr = epoch, step, lr
        self.num_classes = num_classes
        self.config = config
        self.variants: list[Variant] = []
        self._tap = tap
        self._logits: dict[str, Tensor] = {}
        self._features: dict[str, Tensor] = {}
        self._reduce_mean = reduce_mean
        self.forward_count = 0
        self.anchor_name: str | None = None  # set by the core from the plugins' declarations
        self.budget = Budget()  # set by the core from attack_budget, before generate_adversaries
        self.class_stats = class_stats
        # set by the core: False when no part of the run's loss reads the natural logits (the core's AT loss, no
        # wrapper): the natural pass then records no graph (its activations are not held through the step)
        self.natural_grad = True

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    def _key_and_input(self, view: Variant | str) -> tuple[str, Tensor]:
        if isinstance(view, Variant):
            return view.name, view.x
        if view == NATURAL:
            return NATURAL, self.x
        for v in self.variants:
            if v.name == view:
                return v.name, v.x
        raise KeyError(f"no view named {view!r}; views: {[NATURAL] + [v.name for v in self.variants]}")

    @property
    def anchor(self) -> Variant | str:
        """The view that stands for the pair (a Variant, or ``"natural"``): the local method's
        declared anchor (LRAT's x*), else the only variant, else the first by name. Global
        methods read their signal here when the pair has several variants."""
        return self.view(ANCHOR)

    def view(self, spec: str) -> Variant | str:
        """``"anchor"``, ``"natural"`` or a variant name -> the Variant (or ``"natural"``)."""
        if spec == ANCHOR:
            if self.anchor_name is not None:
                return self.view(self.anchor_name)
            if not self.variants:
                raise KeyError("no variants yet: the anchor is defined after generate_adversaries")
            return min(self.variants, key=lambda v: v.name)
        if spec == NATURAL:
            return NATURAL
        for v in self.variants:
            if v.name == spec:
                return v
        raise KeyError(f"no view named {spec!r}; views: {[NATURAL] + [v.name for v in self.variants]}")

    def logits(self, view: Variant | str = NATURAL) -> Tensor:
        """Logits ``[B, K]`` of the model on ``view`` (a Variant, its name, or ``"natural"``); detached for the natural
        view when the run's loss does not read it (``natural_grad``)."""
        key, x = self._key_and_input(view)
        if key not in self._logits:
            self._tap.last = None
            graph = contextlib.nullcontext() if self.natural_grad or key != NATURAL else torch.no_grad()
            with self._autocast(), graph:  # --precision: the forward in low precision, what follows in fp32
                out = self.model(x)
            self._logits[key] = _at_least_fp32(out)
            self.forward_count += 1
            if self._tap.last is not None:
                self._features[key] = _at_least_fp32(self._tap.last)
        return self._logits[key]

    def logits_again(self, view: Variant | str = NATURAL) -> Tensor:
        """Logits ``[B, K]`` of one more forward pass on ``view``, not cached (counted in ``forward_count``): for a
        loss whose authors' code runs a view twice, so that BatchNorm's running statistics (and dropout's masks)
        follow that code. ``logits(view)`` still returns the first pass."""
        _, x = self._key_and_input(view)
        with self._autocast():
            out = self.model(x)
        self.forward_count += 1
        return _at_least_fp32(out)

    def features(self, view: Variant | str = NATURAL) -> Tensor:
        """Penultimate features ``[B, D]`` from the same forward pass as ``logits(view)``."""
        key, _ = self._key_and_input(view)
        self.logits(view)
        if key not in self._features:
            if self._tap.missing:
                raise RuntimeError(f"no penultimate features for {key!r}: {self._tap.missing}")
            who = " and ".join(self._tap.needed_by) or "a plugin"
            name = type(getattr(self.model, "module", self.model)).__name__  # unwrapped from DDP
            raise OptionError(
                f"{who} reads the model's penultimate features, but the forward of {name} did not pass through its "
                "head or call its features(x) method: forward must call features(x)"
            )
        return self._features[key]

    def probs(self, view: Variant | str = NATURAL) -> Tensor:
        """Softmax probabilities ``[B, K]``, detached (for weights and signals)."""
        return torch.softmax(self.logits(view).detach(), dim=1)

    def has_logits(self, view: Variant | str) -> bool:
        return self._key_and_input(view)[0] in self._logits

    def batch_mean(self, t: Tensor) -> Tensor:
        """Mean of ``t`` over the last dimension across the global batch (all ranks under DDP)."""
        if self._reduce_mean is not None:
            return self._reduce_mean(t)
        return t.mean(dim=-1, keepdim=True)


@dataclass
class TrainContext:
    """What ``on_train_start`` receives: the run's fixed facts and tools; ``class_stats``, the run's ``ClassStats``
    (per-class accuracies, updated by the core each epoch: keep the object, read it later)."""

    model: nn.Module
    config: Any
    num_train: int
    num_classes: int
    input_shape: tuple[int, ...]
    device: torch.device
    epochs: int
    milestones: tuple[int, ...]
    objective: str
    make_attack: Callable[..., Any]
    log: Callable[[str], None]
    validation: tuple[Tensor, Tensor] | None = None
    train_data: Any = None
    rank: int = 0
    world_size: int = 1
    loss_fn: Callable[..., Any] | None = None
    class_stats: ClassStats | None = None
