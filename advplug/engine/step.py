"""One training step: the attacks, the plugins' weights (checked on the device), the loss, backward and the update;
and the periodic host check of what the steps flagged."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from pluggy import HookCaller
from torch import Tensor

from advplug.config import TrainConfig
from advplug.context import NATURAL, Budget, ClassStats, CombinedWeights, FeatureTap, StepContext, Variant, Weights
from advplug.engine import distributed
from advplug.engine.runtime import Runtime
from advplug.errors import NonFiniteLossError, PluginError
from advplug.plugins import Enabled, per_plugin
from advplug.signals import probabilistic_margin
from advplug.weights import combine_weights, merge_variants


class Step:
    """``step(x, y, index, epoch, global_step) -> (detached loss, context, combined weights)``.

    The plugins' ``compute_weights`` are called one plugin at a time (``plugins.per_plugin``: wrappers wrap each
    call), so that each result is checked on the device and a bad plugin is named at the next periodic ``check``
    (no host sync in the step)."""

    def __init__(
        self,
        cfg: TrainConfig,
        enabled: Enabled,
        runtime: Runtime,
        *,
        opt: torch.optim.Optimizer,
        tap: FeatureTap,
        attack: Any,
        num_classes: int,
        world: int,
        out: Path,
        class_stats: ClassStats | None = None,
    ) -> None:
        self.cfg, self.enabled, self.pm, self.runtime = cfg, enabled, enabled.pm, runtime
        self.opt, self.tap, self.attack = opt, tap, attack
        self.num_classes, self.world, self.out = num_classes, world, out
        self.class_stats = class_stats
        self._budgeters: list[tuple[str, HookCaller]] | None = None  # attack_budget per plugin, at the first step
        # set at the first step, after any late registration: per weigher, then "a batch trained on nothing"
        self._weighers: list[tuple[str, HookCaller]] | None = None
        self.faults = torch.zeros(1, dtype=torch.bool, device=runtime.device)
        self._attackers: tuple[HookCaller, HookCaller | None] | None = None
        self._natural_grad: bool | None = None

    @property
    def weighers(self) -> list[str]:
        """The plugins that weigh the samples, in pluggy's call order (empty before the first step)."""
        return [name for name, _ in self._weighers or []]

    def __call__(
        self, x: Tensor, y: Tensor, index: Tensor, epoch: int, global_step: int
    ) -> tuple[Tensor, StepContext, CombinedWeights | None]:
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        rt = self.runtime
        ctx = StepContext(
            model=rt.net,
            x=x,
            y=y,
            index=index,
            epoch=epoch,
            step=global_step,
            num_classes=self.num_classes,
            config=self.cfg,
            lr=self.opt.param_groups[0]["lr"],
            tap=self.tap,
            reduce_mean=distributed.global_row_mean if self.world > 1 else None,
            autocast=rt.autocast,
            class_stats=self.class_stats,
        )
        ctx.natural_grad = self._loss_may_read_natural()
        if self._budgeters is None:
            self._budgeters = per_plugin(self.pm, "attack_budget")
        if self._budgeters:  # nobody sets a budget: the scalar path, no per-sample tensors
            ctx.budget = self._budget(ctx)
        plugin_attacks, objective_attack = self._attack_callers()
        with rt.autocast():  # the training attacks in the run's precision
            variants = merge_variants(plugin_attacks(ctx=ctx))
            if not variants and objective_attack is not None:  # plugins' variants replace the objective's attack
                variants = merge_variants(objective_attack(ctx=ctx))
            if not variants:
                b = ctx.budget
                x_adv = self.attack(x, y) if b.eps is None and b.alpha is None else self.attack(x, y, b.eps, b.alpha)
                variants = [Variant("pgd", x_adv, self.attack.stats())]
        ctx.variants = variants
        ctx.anchor_name = self.enabled.composition.anchor
        with contextlib.ExitStack() as perturbed:  # perturb_weights: loss and backward at w + v, then w restored
            managers = self.pm.hook.perturb_weights(ctx=ctx, variants=variants)
            if managers and any(ctx.has_logits(v) for v in (NATURAL, *variants)):
                raise PluginError(
                    "perturb_weights: a forward pass was cached before the weights were perturbed "
                    "(ctx.logits in generate_adversaries?); the loss would use the unperturbed weights"
                )
            for manager in managers:
                perturbed.enter_context(manager)
            weights = combine_weights(self._weights(ctx, variants), len(variants), ctx.batch_size, ctx.batch_mean)
            if weights is not None and weights.adv is not None:
                self.faults[-1] |= weights.adv.amax() <= 0  # a batch that trains on nothing
            loss = self.loss(ctx, variants, weights)
            if loss is None:
                raise PluginError("no plugin returned a training loss (combine_loss)")
            self.opt.zero_grad(set_to_none=True)
            rt.scaler.scale(loss).backward()  # fp16: scaled; otherwise the plain backward
        rt.scaler.step(self.opt)
        rt.scaler.update()
        if rt.ema is not None and rt.ema.per_step:  # --ema; a plugin's average (average_weights) is per epoch
            rt.ema.update()
        loss = loss.detach()
        self.pm.hook.on_batch_end(ctx=ctx, loss=loss)
        self.tap.last = None
        return loss, ctx, weights

    def loss(self, ctx: StepContext, variants: list[Variant], weights: Any) -> Tensor:
        """The run's training loss (loss owner plus wrappers) for given weights: for meta-learning plugins."""
        return self.pm.hook.combine_loss(ctx=ctx, variants=variants, weights=weights)

    def _loss_may_read_natural(self) -> bool:
        """False when the core's AT loss is the only ``combine_loss`` (no other owner, no wrapper): it reads the
        variants only, so the natural forward pass (plugins' signals) needs no graph. Decided at the first step."""
        if self._natural_grad is None:
            impls = [i.plugin for i in self.pm.hook.combine_loss.get_hookimpls()]
            self._natural_grad = not (self.enabled.objective == "at" and impls == [self.pm.get_plugin("at")])
        return self._natural_grad

    def _attack_callers(self) -> tuple[HookCaller, HookCaller | None]:
        """(the plugins' ``generate_adversaries``, the objective's own or ``None``), each inside every wrapper."""
        if self._attackers is None:
            objective = self.enabled.objective
            self._attackers = (
                self.pm.subset_hook_caller("generate_adversaries", [self.pm.get_plugin(objective)]),
                dict(per_plugin(self.pm, "generate_adversaries")).get(objective),
            )
        return self._attackers

    def _budget(self, ctx: StepContext) -> Budget:
        """The plugins' ``attack_budget`` results merged field by field; a field the plugin did not declare in
        ``Declaration.sets``, or not ``[B]``, is an error naming it (start-up refused two setters of one field)."""
        merged, declared = Budget(), self.enabled.declarations
        for name, call in self._budgeters or []:
            for b in call(ctx=ctx):
                if not isinstance(b, Budget):
                    raise PluginError(f"plugin {name!r}: attack_budget must return an advplug.Budget or None")
                for f in b.fields_set():
                    d = declared.get(name)
                    if d is None or f not in d.sets:
                        raise PluginError(
                            f"plugin {name!r} returned a per-sample {f!r} from attack_budget without declaring it: "
                            f"declare it with Declaration(sets={{{f!r}}})"
                        )
                    t = getattr(b, f)
                    if tuple(t.shape) != (ctx.batch_size,):
                        raise PluginError(
                            f"plugin {name!r}: attack_budget's {f} has shape {tuple(t.shape)}, expected "
                            f"({ctx.batch_size},), one value per sample"
                        )
                    setattr(merged, f, t)
        return merged

    def _weights(self, ctx: StepContext, variants: list[Variant]) -> list[Weights | None]:
        """Every plugin's ``compute_weights`` result (``None``: abstained), each checked on the device for negative
        or non-finite values."""
        if self._weighers is None:
            self._weighers = per_plugin(self.pm, "compute_weights")
            self.faults = torch.zeros(len(self._weighers) + 1, dtype=torch.bool, device=self.runtime.device)
        out: list[Weights | None] = []
        for i, (_, call) in enumerate(self._weighers):
            results = call(ctx=ctx, variants=variants)
            for r in results:
                for t in (r.adv, r.nat, getattr(r, "local", None), getattr(r, "local_nat", None)):
                    if t is not None:
                        self.faults[i] |= ~(torch.isfinite(t) & (t >= 0)).all()
            out.extend(results or [None])
        return out

    def check(self, losses: Tensor, epoch: int) -> None:
        """The periodic host check: plugins' weights first (a NaN weight makes a NaN loss, and the
        plugin is the one to name), then the loss."""
        last = self.out / "last.pt"
        keep = f"; the last good checkpoint is {last}" if last.exists() else "; no checkpoint was written yet"
        if bool(self.faults.any()):
            bad = [name for name, f in zip(self.weighers, self.faults.tolist()) if f]
            if bad:
                raise PluginError(
                    f"plugin {bad[0]!r} returned negative or non-finite weights in epoch {epoch + 1} "
                    f"(weights must be finite and >= 0): stopped{keep}"
                )
            raise PluginError(
                f"the combined weights of a whole batch were zero in epoch {epoch + 1}: the step trained "
                f"on nothing (plugins {', '.join(self.weighers)}): stopped{keep}"
            )
        bad = ~torch.isfinite(losses)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise NonFiniteLossError(
                f"training loss is {losses[i].item()} at epoch {epoch + 1}, step {i + 1}: stopped{keep}"
            )


def weight_columns(ctx: StepContext, w: CombinedWeights) -> dict[str, Tensor]:
    """A step's per-sample columns of ``--dump-weights``: the combined weights and the first variant's probabilistic
    margin (kept on the device)."""
    p = ctx.probs(ctx.variants[0])
    cols = {"index": ctx.index, "label": ctx.y, "pred": p.argmax(1), "margin": probabilistic_margin(p, ctx.y)}
    if w.adv is not None:
        adv = w.adv if w.adv.dim() == 2 else w.adv.expand(len(ctx.variants), -1)
        cols.update({f"weight_{v.name}": adv[i] for i, v in enumerate(ctx.variants)})
    if w.nat is not None:
        cols["weight_natural"] = w.nat
    return cols
