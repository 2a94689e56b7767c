"""AWP: perturbation size and direction against an independent computation, exact restore,
gradient at the perturbed weights, BatchNorm statistics untouched, warm-up, combinations."""

import math

import pytest
import torch
import torch.nn.functional as F
from advplug_awp import AWP, layer_perturbation, perturbed_parameters
from torch import nn

from advplug import FeatureTap, PluginError, StepContext, TrainContext, Variant, hookimpl
from advplug.engine.trainer import Trainer
from advplug.models import build_model
from advplug.testing import digits_subset, tiny_config


def test_layer_perturbation_by_hand():
    w = [torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    g = [torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])]
    v = layer_perturbation(w, g, 0.01)
    # gamma * ||w|| * g / ||g||: ||w_1|| = 5, g_1 / ||g_1|| = (0, 1); ||w_2|| = sqrt(2), g_2 / ||g_2|| = 1/2
    assert v[0].flatten().tolist() == pytest.approx([0.0, 0.05])
    assert v[1].flatten().tolist() == pytest.approx([0.01 * math.sqrt(2) / 2] * 4)
    assert [float(d.norm() / p.norm()) for d, p in zip(v, w)] == pytest.approx([0.01, 0.01])
    assert layer_perturbation([w[0]], [None], 0.01)[0].abs().sum() == 0


def test_selection_is_conv_and_linear_weights_only():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    assert [n for n, _ in perturbed_parameters(m)] == ["0.weight", "3.weight"]


class Probe:
    """Records the weights and the loss's logits as compute_weights sees them (at w + v)."""

    def __init__(self):
        self.seen = None

    @hookimpl
    def compute_weights(self, ctx, variants):
        self.seen = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        return None


def trainer(tmp_path, name="run", **kw):
    cfg = tiny_config(str(tmp_path / name), **{"plugins": ("awp",), "epochs": 2, **kw})
    return Trainer(cfg, data=digits_subset(128, 64), log=lambda s: None)


def clone(t):
    m = build_model(t.cfg.model, t.data.num_classes, t.data.input_shape)
    m.load_state_dict(t.model.state_dict())
    return m


def one_step(t, probe=None, n=32, epoch=0):
    if probe is not None:
        t.pm.register(probe, name="probe")
    x, y = t.data.train
    torch.manual_seed(1)
    return t.step(x[:n].to(t.device), y[:n].to(t.device), torch.arange(n), epoch, 0)


def test_step_perturbs_by_gamma_along_the_loss_gradient_and_restores_exactly(tmp_path):
    t = trainer(tmp_path)
    for g in t.opt.param_groups:  # no update: the step must leave the weights exactly as they were
        g["lr"] = 0.0
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    reference = clone(t)
    probe = Probe()
    loss, ctx, _ = one_step(t, probe)
    # restored bit for bit (a saved copy, not w + v - v)
    assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
    x_adv = ctx.variants[0].x
    # independent computation of the authors' proxy direction: CE on x' at w (train mode)
    reference.train()
    ce = F.cross_entropy(reference(x_adv), ctx.y)
    names = ["features.0.weight", "features.2.weight", "features.6.weight", "head.weight"]
    assert [n for n, _ in perturbed_parameters(t.model)] == names
    params = dict(reference.named_parameters())
    grads = torch.autograd.grad(ce, [params[n] for n in names])
    for n, g in zip(names, grads):
        v = probe.seen[n] - before[n]
        assert float(v.norm() / before[n].norm()) == pytest.approx(0.01, rel=1e-4)  # ||v_l|| = gamma ||w_l||
        assert torch.allclose(v / v.norm(), g / g.norm(), atol=1e-5)  # ascent along the loss gradient
    for n in ("features.0.bias", "head.bias"):  # biases are not perturbed
        assert torch.equal(probe.seen[n], before[n])
    # the gradient of the step was taken at w + v: recompute it there independently
    perturbed = clone(t)
    perturbed.load_state_dict(probe.seen)
    ce_pert = F.cross_entropy(perturbed(x_adv), ctx.y)
    assert float(loss) == pytest.approx(float(ce_pert.detach()), rel=1e-5)
    g_pert = torch.autograd.grad(ce_pert, list(perturbed.parameters()))
    for (n, p), g in zip(t.model.named_parameters(), g_pert):
        assert torch.allclose(p.grad, g, atol=1e-6), n
    assert ctx.forward_count == 1  # the proxy's forward is not in the step's cache


def test_proxy_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)
    )
    model.train()
    awp = AWP(AWP.Options(gamma=0.01, warmup=0))

    def loss_fn(ctx, variants, weights):
        assert weights is None  # the proxy loss is unweighted
        return F.cross_entropy(ctx.logits(variants[0]), ctx.y)

    awp.on_train_start(
        TrainContext(
            model=model,
            config=None,
            num_train=8,
            num_classes=3,
            input_shape=(1, 4, 4),
            device=torch.device("cpu"),
            epochs=2,
            milestones=(1,),
            objective="at",
            make_attack=None,
            log=lambda s: None,
            loss_fn=loss_fn,
        )
    )
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    ctx = StepContext(
        model=model,
        x=x,
        y=y,
        index=torch.arange(8),
        epoch=0,
        step=0,
        num_classes=3,
        config=None,
        lr=0.1,
        tap=FeatureTap(model),
    )
    ctx.variants = [Variant("pgd", x + 0.01)]
    stats = {n: b.clone() for n, b in model.named_buffers()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    manager = awp.perturb_weights(ctx, ctx.variants)
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())  # proxy forward: statistics restored
    assert not ctx.has_logits(ctx.variants[0])  # and not cached in the step's context
    with manager:
        bn = dict(model.named_parameters())["1.weight"]
        assert torch.equal(bn, weights["1.weight"])  # BatchNorm's affine weight is 1-d: not perturbed
        assert not torch.equal(dict(model.named_parameters())["0.weight"], weights["0.weight"])
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_trades_warm_up_and_defaults(tmp_path):
    t = trainer(tmp_path / "short", objective="trades", epochs=20)
    assert t.enabled.plugin("awp").options.warmup == 1  # a 20-epoch run warms up for 9 % (our rule)
    t.close()
    t = trainer(tmp_path, objective="trades", epochs=100)
    awp = t.enabled.plugin("awp")
    assert (awp.options.gamma, awp.options.warmup) == (0.005, 9)  # TRADES-AWP: from the 10th epoch, as the script
    x, y = t.data.train
    ctx = StepContext(
        model=t.net,
        x=x[:8],
        y=y[:8],
        index=torch.arange(8),
        epoch=8,
        step=0,
        num_classes=10,
        config=t.cfg,
        lr=0.1,
        tap=t.tap,
    )
    assert awp.perturb_weights(ctx, [Variant("tpgd", x[:8])]) is None  # epoch 9 (1-based): still warming up
    assert not awp.active(8) and awp.active(9)


@pytest.mark.parametrize("objective", ["trades", "mart"])
def test_combines_with_mail_and_every_objective(tmp_path, objective):
    t = trainer(
        tmp_path, objective=objective, plugins=("awp", "mail"), plugin_options={"awp-warmup": 0, "mail-burn-in": 0}
    )
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    probe = Probe()
    loss, ctx, w = one_step(t, probe)
    assert torch.isfinite(loss) and w is not None  # MAIL weighed the loss at w + v
    assert ctx.forward_count == 2  # natural + adversarial, once each, at w + v
    assert any(not torch.equal(probe.seen[n], before[n]) for n in before)  # the loss saw w + v
    assert any(not torch.equal(p, before[n]) for n, p in t.model.named_parameters())  # and w was updated


def test_forward_cached_before_the_perturbation_is_an_error(tmp_path):
    class Peeks:
        @hookimpl
        def generate_adversaries(self, ctx):
            ctx.logits("natural")
            return None

    t = trainer(tmp_path)
    t.pm.register(Peeks(), name="peeks")
    with pytest.raises(PluginError, match="before the weights were perturbed"):
        one_step(t)


def test_runs_end_to_end(tmp_path):
    t = trainer(tmp_path)
    res = t.fit()
    assert res and all(math.isfinite(v) for r in res.values() for v in r.values())


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    """torchrun, 2 gloo CPU processes: the proxy pass runs under DDP's no_sync, its gradients are
    averaged over ranks (one perturbation for all), and training completes."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "advplug",
        "train",
        "--plugin",
        "awp",
        "--plugin",
        "mail",
        "--objective",
        "trades",
        "--awp-warmup",
        "0",
        "--mail-burn-in",
        "0",
        "--epochs",
        "1",
        "--steps",
        "2",
        "--eval-steps",
        "2",
        "--n-eval",
        "16",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "ddp"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "awp: gamma 0.005" in res.stdout


def start(objective, epochs=100, **options):
    """AWP after on_train_start on a tiny model (no Trainer)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    awp = AWP(AWP.Options(**options))
    awp.on_train_start(
        TrainContext(
            model=model,
            config=None,
            num_train=8,
            num_classes=3,
            input_shape=(1, 2, 2),
            device=torch.device("cpu"),
            epochs=epochs,
            milestones=(1,),
            objective=objective,
            make_attack=None,
            log=lambda s: None,
            loss_fn=lambda c, v, w: None,
        )
    )
    return awp


def test_defaults_per_objective_are_the_authors_scripts():
    # AT_AWP/train_cifar10.py: gamma 0.01, from epoch 1; trades_AWP/train_trades_cifar.py: 0.005, epoch >= 10
    # (1-based, so 9 epochs of warm-up); mart: 0.005 and no warm-up (the module's choice); unknown: 0.01, 0
    expected = {"at": (0.01, 0), "trades": (0.005, 9), "mart": (0.005, 0), "other": (0.01, 0)}
    for objective, (gamma, warmup) in expected.items():
        o = start(objective).options
        assert (o.gamma, o.warmup) == (gamma, warmup), objective
    # the 9 % share on shorter runs: int(9 * epochs / 100), never more than 9
    assert [start("trades", epochs=e).options.warmup for e in (10, 11, 12, 50, 99, 200)] == [0, 0, 1, 4, 8, 9]
    o = start("trades", gamma=0.02, warmup=3).options  # explicit options win
    assert (o.gamma, o.warmup) == (0.02, 3)


def test_options_bounds_and_gamma_zero_disables():
    from advplug import OptionError
    from advplug.plugins import enable

    o = enable(["awp"], "at", {"awp-gamma": 0.0, "awp-warmup": 0}).plugin("awp").options  # both bounds inclusive
    assert (o.gamma, o.warmup) == (0.0, 0)
    assert enable(["awp"], "at", {"awp-gamma": 0.5}).plugin("awp").options.gamma == 0.5
    for bad in ({"awp-gamma": -0.01}, {"awp-warmup": -1}):
        with pytest.raises(OptionError):
            enable(["awp"], "at", bad)
    awp = start("at", gamma=0.0)
    assert not awp.active(0) and not awp.active(50)  # gamma 0: never perturbs
    assert start("at", gamma=0.01, warmup=2).active(2) and not start("at", gamma=0.01, warmup=2).active(1)


def test_layer_perturbation_skips_a_layer_without_gradient_and_goes_on():
    w = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])]
    v = layer_perturbation(w, [None, torch.tensor([[-2.0, 0.0]])], 0.1)
    assert len(v) == 2 and v[0].tolist() == [[0.0, 0.0]]
    assert v[1].flatten().tolist() == pytest.approx([-0.5, 0.0])  # 0.1 * 5 * (-1, 0)


def test_layer_perturbation_eps_is_added_to_the_gradient_norm():
    # the authors' diff_in_weights: w_norm / (g_norm + 1e-20) * g; visible where ||g|| is of the order of EPS
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    g = torch.tensor([[1e-20, 0.0]], dtype=torch.float64)
    v = layer_perturbation([w], [g], 0.01)[0]
    assert v.flatten().tolist() == pytest.approx([0.01 * 5 * 1e-20 / (1e-20 + 1e-20), 0.0], rel=1e-9)  # 0.025


def test_selection_sees_through_a_ddp_style_wrapper():
    class Wrapper(nn.Module):  # DistributedDataParallel / DataParallel keep the model as .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    sel = perturbed_parameters(Wrapper(m))
    assert [n for n, _ in sel] == ["0.weight", "3.weight"]
    assert sel[0][1] is m[0].weight


def test_warm_up_covering_the_whole_run_is_an_error_only_with_awp_on():
    from advplug import OptionError

    with pytest.raises(OptionError, match="no epoch"):
        start("at", epochs=5, gamma=0.01, warmup=5)
    assert start("at", epochs=5, gamma=0.01, warmup=4).options.warmup == 4  # the last epoch perturbs
    assert start("at", epochs=5, gamma=0.0, warmup=5).options.warmup == 5  # gamma 0: AWP off, nothing to check
    with pytest.raises(OptionError, match="loss function"):
        AWP(AWP.Options()).on_train_start(
            TrainContext(
                model=nn.Linear(2, 2),
                config=None,
                num_train=8,
                num_classes=2,
                input_shape=(2,),
                device=torch.device("cpu"),
                epochs=3,
                milestones=(1,),
                objective="at",
                make_attack=None,
                log=lambda s: None,
                loss_fn=None,
            )
        )


def test_proxy_loss_sees_the_views_by_name_and_the_anchor_under_no_sync():
    """The proxy's scratch context: the step's variants (by name, and the declared anchor) and, under a
    DDP-style wrapper, the pass runs inside no_sync (no gradient all-reduce for the proxy)."""
    import contextlib

    class FakeDDP(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module, self.syncing_off = m, False

        def forward(self, x):
            return self.module(x)

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing_off = True
            try:
                yield
            finally:
                self.syncing_off = False

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    model = FakeDDP(inner)
    seen = {}

    def loss_fn(ctx, variants, weights):  # reads the views through the context, by name and as the anchor
        seen["no_sync"] = model.syncing_off
        seen["anchor"] = ctx.anchor.name
        return F.cross_entropy(ctx.logits("b"), ctx.y)

    awp = AWP(AWP.Options(gamma=0.1, warmup=0))
    awp.on_train_start(
        TrainContext(
            model=model,
            config=None,
            num_train=6,
            num_classes=3,
            input_shape=(1, 2, 2),
            device=torch.device("cpu"),
            epochs=2,
            milestones=(1,),
            objective="at",
            make_attack=None,
            log=lambda s: None,
            loss_fn=loss_fn,
        )
    )
    x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = StepContext(
        model=model,
        x=x,
        y=y,
        index=torch.arange(6),
        epoch=0,
        step=0,
        num_classes=3,
        config=None,
        lr=0.1,
        tap=FeatureTap(inner),
    )
    xb = torch.rand(6, 1, 2, 2)
    ctx.variants = [Variant("a", x + 0.01), Variant("b", xb)]
    ctx.anchor_name = "b"
    w = inner[1].weight.detach().clone()
    with awp.perturb_weights(ctx, ctx.variants):
        v = inner[1].weight.detach() - w
    assert seen == {"no_sync": True, "anchor": "b"}
    # independent: CE on view "b" at w, v = 0.1 ||w|| g / ||g||
    ref = nn.Linear(4, 3)
    ref.load_state_dict(inner[1].state_dict())
    g = torch.autograd.grad(F.cross_entropy(ref(xb.flatten(1)), y), ref.weight)[0]
    assert torch.allclose(v, 0.1 * w.norm() * g / g.norm(), atol=1e-6)


class HasSpare(nn.Module):
    """A linear model with a second weight the loss never uses (its proxy gradient is None)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.spare = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x.flatten(1))


def proxy_setup(world_size, gamma=0.1):
    torch.manual_seed(0)
    model = HasSpare()
    awp = AWP(AWP.Options(gamma=gamma, warmup=0))
    awp.on_train_start(
        TrainContext(
            model=model,
            config=None,
            num_train=6,
            num_classes=3,
            input_shape=(1, 2, 2),
            device=torch.device("cpu"),
            epochs=2,
            milestones=(1,),
            objective="at",
            make_attack=None,
            log=lambda s: None,
            world_size=world_size,
            loss_fn=lambda c, v, w: F.cross_entropy(c.logits(v[0]), c.y),
        )
    )
    x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = StepContext(
        model=model,
        x=x,
        y=y,
        index=torch.arange(6),
        epoch=0,
        step=0,
        num_classes=3,
        config=None,
        lr=0.1,
        tap=FeatureTap(model),
    )
    ctx.variants = [Variant("pgd", x + 0.05)]
    ref = nn.Linear(4, 3)
    ref.load_state_dict(model.lin.state_dict())
    g = torch.autograd.grad(F.cross_entropy(ref((x + 0.05).flatten(1)), y), ref.weight)[0]
    return model, awp, ctx, g


def test_unused_weight_gets_no_perturbation():
    model, awp, ctx, g = proxy_setup(1)
    w, s = model.lin.weight.detach().clone(), model.spare.weight.detach().clone()
    with awp.perturb_weights(ctx, ctx.variants):
        assert torch.equal(model.spare.weight, s)
        assert torch.allclose(model.lin.weight - w, 0.1 * w.norm() * g / g.norm(), atol=1e-6)


def test_proxy_gradient_is_averaged_over_ranks(monkeypatch):
    """world size 2 with a stand-in all_reduce (sum with a fixed 'other rank' gradient): v follows
    (g_local + g_other) / 2, the unused weight's None gradient entering as zeros."""
    import torch.distributed as dist

    model, awp, ctx, g = proxy_setup(2)
    torch.manual_seed(7)
    other = {(3, 4): torch.randn(3, 4), (3, 3): torch.randn(3, 3)}
    calls = []

    def all_reduce(t, *a, **k):
        calls.append(t.shape)
        t.add_(other[tuple(t.shape)])

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    w, s = model.lin.weight.detach().clone(), model.spare.weight.detach().clone()
    with awp.perturb_weights(ctx, ctx.variants):
        v_lin, v_spare = model.lin.weight - w, model.spare.weight - s
    assert len(calls) == 2
    g_lin, g_spare = (g + other[(3, 4)]) / 2, (0 + other[(3, 3)]) / 2
    assert torch.allclose(v_lin, 0.1 * w.norm() * g_lin / g_lin.norm(), atol=1e-6)
    assert torch.allclose(v_spare, 0.1 * s.norm() * g_spare / g_spare.norm(), atol=1e-6)


def test_backup_follows_a_change_of_shapes_and_epoch_metrics():
    model, awp, ctx, _ = proxy_setup(1)
    with awp.perturb_weights(ctx, ctx.variants):
        pass
    # the same number of weight tensors with other shapes: the saved copy must be reallocated
    model.lin, model.spare = nn.Linear(4, 3), nn.Linear(3, 5)
    s = model.spare.weight.detach().clone()
    with awp.perturb_weights(ctx, ctx.variants):
        pass
    assert torch.equal(model.spare.weight, s)
    assert [tuple(b.shape) for b in awp._backup] == [(3, 4), (5, 3)]
    assert awp.on_epoch_end(0) == {"gamma": 0.1, "active": True}
    assert start("trades").on_epoch_end(8) == {"gamma": 0.005, "active": False}
