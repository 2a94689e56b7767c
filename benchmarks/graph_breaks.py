"""Graph breaks under ``torch.compile``, per method and per part of the training step.

Counts with ``torch._dynamo.explain`` (no compiler: runs on the CPU) what dynamo makes of each piece of one training
step, on the tiny digits CNN and a batch of 8 (PGD-2), after a warm-up step and its epoch's end (lazy set-up such
as MeoW's codebook, per-epoch estimates such as BAT's):

* ``forward``: the step's cached forward passes as advplug runs them (``ctx.logits`` of every view the step used:
  autocast, the feature tap, the fp32 cast);
* ``attack``, ``attack iteration``: the core's training attack (``TrackedPGD``; TRADES' ``TrackedTPGD``) as one call,
  and one of its iterations (``ascend``: loss, input gradient, sign step, projection), where no plugin brings its own;
* each plugin's per-step hooks, called as the core calls them, on the step's context: ``attack_budget``,
  ``generate_adversaries`` (a plugin's own attack, whole), ``perturb_weights`` (AWP's proxy step; the context
  manager it returns is not entered), ``compute_weights``, ``combine_loss`` (the run's whole loss: the owner and
  every wrapper), ``on_batch_end``.

    python benchmarks/graph_breaks.py                       # the objectives: at, trades, mart
    python benchmarks/graph_breaks.py --plugin mail --objective trades
    python benchmarks/graph_breaks.py --all                 # the objectives and every installed shipped plugin
    python benchmarks/graph_breaks.py --all --trace-autograd  # with dynamo tracing torch.autograd.grad

The run itself compiles only the model (``--compile``: ``Runtime.net`` and ``attack_model``), so a break here is
where a compiled step would split, not a cost the run pays today. Each break is printed with its place and dynamo's
reason; "(frame skipped)" means the rest of that function runs eagerly (a break inside a loop).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from advplug.context import NATURAL, StepContext
from advplug.engine.trainer import Trainer
from advplug.errors import AdvplugError
from advplug.plugins import SHIPPED_PLUGINS, builtin_objectives, installed
from advplug.testing import CompileReport, digits_subset, graph_breaks, tiny_config

OBJECTIVES = ("at", "trades", "mart")
# reweighting from the first step (as benchmarks/overhead.py): count the method's work, not its burn-in
REWEIGHT_NOW = {
    "mail": {"mail-burn-in": 0},
    "gairat": {"gairat-begin-epoch": 0},
    "bat": {"bat-burn-in": 0},
    "awp": {"awp-warmup": 0},
}
HOOKS = ("attack_budget", "generate_adversaries", "perturb_weights", "compute_weights", "on_batch_end")


def trainer(method: str, objective: str, out: Path) -> Trainer:
    """A tiny run of ``method`` (an objective, or a plugin under ``objective``): digits, batch 8, PGD-2."""
    plugins = () if method in builtin_objectives() else (method,)
    cfg = tiny_config(
        str(out / method),
        plugins=plugins,
        objective=method if not plugins else objective,
        plugin_options=REWEIGHT_NOW.get(method, {}),
        batch_size=8,
        steps=2,
        epochs=3,
    )
    return Trainer(cfg, data=digits_subset(64, 16), log=lambda s: None, overwrite=True)


def step_context(t: Trainer) -> tuple[StepContext, Any, torch.Tensor]:
    """A warm-up step and the end of its epoch (per-epoch estimates such as BAT's), then one more step, in the next
    epoch, whose context (views, budget, anchor), combined weights and loss are kept."""
    batches = iter(t.loader)
    x, y, i = next(batches)
    t.step(x, y, i, 0, 0)
    t.pm.hook.on_epoch_end(epoch=0, metrics={"epoch": 1})
    x, y, i = next(batches)
    loss, ctx, w = t.step(x, y, i, 1, 1)
    return ctx, w, loss


def refresh(ctx: StepContext) -> list[Any]:
    """Forget the context's cached forward passes (their graphs were freed by backward); the views they were of."""
    views = [v for v in (NATURAL, *ctx.variants) if ctx.has_logits(v)]
    ctx._logits.clear()
    ctx._features.clear()
    return views


def forwards(ctx: StepContext, views: list[Any]) -> list[torch.Tensor]:
    return [ctx.logits(v) for v in views]


def impl_of(t: Trainer, hook: str, plugin: str) -> Callable[..., Any] | None:
    """``plugin``'s own implementation of ``hook`` as a call with the hook's keyword arguments (``None``: it has none;
    a wrapper is left to ``combine_loss``, which runs the whole chain)."""
    for impl in getattr(t.pm.hook, hook).get_hookimpls():
        if impl.plugin_name == plugin and not (impl.wrapper or impl.hookwrapper):
            return lambda **kw: impl.function(**{a: kw[a] for a in impl.argnames})
    return None


def attack_iteration(atk: Any, x: torch.Tensor, y: torch.Tensor) -> CompileReport:
    """One iteration of the core's PGD (``TrackedPGD.ascend``) from the clean input, as its loop runs it."""
    atk._reset(y)
    atk.prepare(x)
    adv = x.clone().requires_grad_(True)
    return graph_breaks(atk.ascend, x, adv, y)


def method_parts(method: str, objective: str, out: Path) -> list[tuple[str, CompileReport]]:
    """``(part, report)`` for every per-step part of ``method``."""
    t = trainer(method, objective, out)
    try:
        ctx, weights, loss = step_context(t)
        variants = ctx.variants
        parts = [("forward", graph_breaks(forwards, ctx, refresh(ctx)))]
        own = method if method not in builtin_objectives() else None
        gen = impl_of(t, "generate_adversaries", own) if own else None
        if gen is None:  # the core's or the objective's attack
            obj = t.pm.get_plugin(t.enabled.objective)
            atk = getattr(obj, "attack", None) or t.attack
            if hasattr(atk, "ascend"):
                parts.append(("attack", graph_breaks(atk, ctx.x, ctx.y)))
                parts.append(("attack iteration", attack_iteration(atk, ctx.x, ctx.y)))
        kw = {"ctx": ctx, "variants": variants, "weights": weights, "loss": loss}
        for hook in HOOKS:
            call = impl_of(t, hook, own) if own else None
            if call is None:
                continue
            if hook == "on_batch_end":  # after the loss, as in the step (MeoW's codebook reads compute_weights')
                parts.append(("combine_loss", loss_report(t, ctx, variants, weights)))
            else:
                refresh(ctx)
            parts.append((hook, graph_breaks(call, **kw)))
        if not any(p == "combine_loss" for p, _ in parts):
            parts.append(("combine_loss", loss_report(t, ctx, variants, weights)))
        return parts
    finally:
        t.close()


def loss_report(t: Trainer, ctx: StepContext, variants: list[Any], weights: Any) -> CompileReport:
    """The run's whole loss (owner and wrappers, through pluggy) on cached forward passes."""
    forwards(ctx, refresh(ctx))
    return graph_breaks(t.step.loss, ctx, variants, weights)


def short(reason: str) -> str:
    """Dynamo's reason, shortened for the table."""
    return (
        reason.replace(
            "using `torch.autograd.grad` with `torch._dynamo.config.trace_autograd_ops=False`", "autograd.grad"
        )
        .replace("`", "")
        .replace("torch._dynamo.config.", "")
    )


def reasons(r: CompileReport) -> str:
    """Each distinct break once, with its count: ``2x reason [file:line]``."""
    seen: dict[tuple[str, str], int] = {}
    for b in r.breaks:
        seen[(short(b.reason), b.where)] = seen.get((short(b.reason), b.where), 0) + 1
    return "; ".join(f"{n}x {why} [{where}]" if n > 1 else f"{why} [{where}]" for (why, where), n in seen.items())


def table(rows: list[tuple[str, str, CompileReport]]) -> str:
    lines = [f"{'method':<14} {'part':<22} {'graphs':>6} {'breaks':>6}  reasons"]
    for method, part, r in rows:
        why = reasons(r)
        lines.append(f"{method:<14} {part:<22} {r.graphs:>6} {len(r.breaks):>6}  {why}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", action="append", default=[], help="a plugin (or an objective) to examine")
    ap.add_argument("--all", action="store_true", help="the objectives and every installed shipped plugin")
    ap.add_argument("--objective", choices=OBJECTIVES, default="at", help="the plugins' objective")
    ap.add_argument(
        "--trace-autograd",
        action="store_true",
        help="let dynamo trace torch.autograd.grad (torch._dynamo.config.trace_autograd_ops; off by default)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch._dynamo.config.trace_autograd_ops = args.trace_autograd
    methods = args.plugin or list(OBJECTIVES)
    if args.all:
        methods = [*OBJECTIVES, *(p for p in SHIPPED_PLUGINS if p in installed() and p != "focal")]
    rows, refused = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            torch.manual_seed(0)
            try:
                rows += [(method, part, r) for part, r in method_parts(method, args.objective, Path(tmp))]
            except AdvplugError as e:  # e.g. a second loss owner beside --objective trades
                refused.append(f"{method}: {e}")
    print(
        f"torch {torch.__version__}, dynamo trace_autograd_ops={args.trace_autograd}; plugins under "
        f"--objective {args.objective}; digits-cnn, batch 8, PGD-2"
    )
    print(table(rows))
    for line in refused:
        print(f"refused at start-up, {line}")


if __name__ == "__main__":
    main()
