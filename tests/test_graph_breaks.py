"""Graph breaks under torch.compile (``torch._dynamo.explain``, no compiler, on the CPU).

The built-in objectives' loss on cached forward passes, the step's forward passes and the core's training-attack
iteration compile as one graph each; the one break left in the attack iteration is torch's (dynamo does not trace
``torch.autograd.grad`` unless ``torch._dynamo.config.trace_autograd_ops`` is on) and is named exactly, so that any
new break fails here. ``python benchmarks/graph_breaks.py --all`` prints the same for every plugin
(``docs/speed.md``)."""

import pytest
import torch
import torch._dynamo

from advplug.context import NATURAL, Weights
from advplug.engine.trainer import Trainer
from advplug.testing import digits_subset, graph_breaks, tiny_config
from advplug.weights import combine_weights

AUTOGRAD_GRAD = "using `torch.autograd.grad` with `torch._dynamo.config.trace_autograd_ops=False`"


def stepped(tmp_path, **cfg):
    """A tiny run after one step: its trainer, that step's context with fresh cached forward passes (the step's
    backward freed the first ones) of the views the step used, and its combined weights."""
    t = Trainer(tiny_config(str(tmp_path), batch_size=4, steps=2, **cfg), data=digits_subset(16, 8), log=lambda s: None)
    x, y, i = next(iter(t.loader))
    _, ctx, w = t.step(x, y, i, 0, 0)
    views = [v for v in (NATURAL, *ctx.variants) if ctx.has_logits(v)]
    ctx._logits.clear()
    ctx._features.clear()
    for v in views:
        ctx.logits(v)
    return t, ctx, w


def some_weights(ctx, natural: bool):
    b, v = ctx.batch_size, len(ctx.variants)
    w = torch.linspace(0.5, 1.5, b)
    return combine_weights([Weights(adv=w, nat=w.flip(0) if natural else None)], v, b)


@pytest.mark.parametrize(
    "objective,options",
    [
        ("at", {}),
        ("trades", {}),
        ("trades", {"trades-natural-forwards": 2}),
        ("mart", {}),
        ("mart", {"mart-weighted": "both"}),
    ],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_objective_loss_compiles_as_one_graph(tmp_path, one_thread, objective, options, weighted):
    t, ctx, _ = stepped(tmp_path, objective=objective, plugin_options=options)
    w = some_weights(ctx, natural=objective == "trades") if weighted else None
    report = graph_breaks(t.step.loss, ctx, ctx.variants, w)  # the run's loss as the step calls it (pluggy)
    t.close()
    assert (report.graphs, report.breaks) == (1, ())


@pytest.mark.parametrize("objective", ["at", "trades", "mart"])
def test_step_forward_passes_compile_as_one_graph(tmp_path, one_thread, objective):
    t, ctx, _ = stepped(tmp_path, objective=objective)
    views = [v for v in (NATURAL, *ctx.variants) if ctx.has_logits(v)]
    ctx._logits.clear()
    report = graph_breaks(lambda: [ctx.logits(v) for v in views])
    t.close()
    assert (report.graphs, report.breaks) == (1, ())


def attack_of(t):
    obj = t.pm.get_plugin(t.enabled.objective)
    return getattr(obj, "attack", None) or t.attack  # TRADES' TrackedTPGD, else the core's TrackedPGD


@pytest.mark.parametrize("objective", ["at", "trades", "mart"])
@pytest.mark.parametrize("budget", [False, True])
def test_attack_iteration_breaks_only_at_autograd_grad(tmp_path, one_thread, objective, budget):
    """Default dynamo: one break, at the input gradient (torch's; it splits the iteration in two graphs). With
    ``trace_autograd_ops`` the iteration is one graph. Per-sample budgets (``Budget``) change neither."""
    t, ctx, _ = stepped(tmp_path, objective=objective)
    atk = attack_of(t)
    x, y = ctx.x, ctx.y
    b = len(y)
    step, eps_b = (torch.full((b, 1, 1, 1), atk.alpha), torch.full((b, 1, 1, 1), atk.eps)) if budget else (None, None)

    def iteration():
        atk._reset(y)
        atk.prepare(x)
        return graph_breaks(atk.ascend, x, x.clone().requires_grad_(True), y, step, eps_b)

    default = iteration()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        traced = iteration()
    t.close()
    assert [b.reason for b in default.breaks] == [AUTOGRAD_GRAD]
    assert default.breaks[0].where.startswith("advplug/attacks.py:")
    assert default.graphs == 2
    assert (traced.graphs, traced.breaks) == (1, ())


def test_meow_codebook_upkeep_compiles_as_one_graph(tmp_path, one_thread):
    """MeoW's ``on_batch_end`` (EMA codebook update, code usage, feature ring) has no data-dependent shapes."""
    t, ctx, _ = stepped(tmp_path, plugins=("meow",))
    meow = t.enabled.plugin("meow")
    meow.compute_weights(ctx, ctx.variants)  # what on_batch_end reads
    report = graph_breaks(meow.on_batch_end, ctx)
    t.close()
    assert (report.graphs, report.breaks) == (1, ())
