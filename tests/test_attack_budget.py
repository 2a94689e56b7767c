"""Per-sample attack budgets and loss strengths (``advplug.Budget``, hook ``attack_budget``): the core's PGD and TRADES'
KL attack with ``[B]`` eps / step size (exactly torchattacks' with equal budgets, by hand with unequal ones), TRADES'
and MART's per-sample beta, the start-up checks of ``Declaration.sets`` and the step's merge of the hook's results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from advplug import Budget, Declaration, PluginError, Variant, hookimpl
from advplug.attacks import TrackedPGD, make_attack
from advplug.composition import check_composition
from advplug.engine.trainer import Trainer
from advplug.errors import CompositionError
from advplug.objectives import MART, TRADES, mart_terms, trades_kl
from advplug.plugins import enable
from advplug.testing import digits_subset, installed_plugins, tiny_config

HERE = __name__


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class LinearModel(nn.Module):
    """``logits = x_flat W^T + b``: the input gradient of CE is ``(softmax - onehot) W`` (by hand)."""

    def __init__(self, k: int = 2, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Linear(d, k)

    def forward(self, x):
        return self.head(x.flatten(1))


def batch(n: int = 16, lo: float = 0.0, hi: float = 1.0, k: int = 10, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(3)
    x = lo + (hi - lo) * torch.rand(n, *shape, generator=g)
    return x, torch.randint(0, k, (n,), generator=g)


# -- the attacks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps,alpha,steps", [(0.3, 0.1, 5), (8 / 255, 2 / 255, 10)])
def test_equal_budgets_are_torchattacks_pgd_bit_for_bit(eps, alpha, steps):
    model = SmallCNN().eval()
    x, y = batch()
    torch.manual_seed(7)
    ref = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps)(x, y)
    scalar = TrackedPGD(model, eps=eps, alpha=alpha, steps=steps)
    torch.manual_seed(7)
    plain = scalar(x, y)
    budget = TrackedPGD(model, eps=eps, alpha=alpha, steps=steps)
    budget.set_budget(torch.full((16,), eps), torch.full((16,), alpha))
    torch.manual_seed(7)
    per_sample = budget(x, y)
    assert torch.equal(plain, ref)
    assert torch.equal(per_sample, ref)
    assert torch.equal(budget.kappa, scalar.kappa)
    torch.manual_seed(7)  # eps alone per sample, alpha the scalar; and as call arguments
    assert torch.equal(TrackedPGD(model, eps=eps, alpha=alpha, steps=steps)(x, y, eps=torch.full((16,), eps)), ref)


def test_equal_budgets_are_torchattacks_tpgd_bit_for_bit():
    model = SmallCNN().eval()
    x, y = batch()
    torch.manual_seed(4)
    ref = torchattacks.TPGD(model, eps=0.2, alpha=0.05, steps=4)(x, y)
    atk = make_attack("tpgd", model, eps=0.2, alpha=0.05, steps=4, start="normal-clamped")
    atk.set_budget(torch.full((16,), 0.2), torch.full((16,), 0.05))
    torch.manual_seed(4)
    assert torch.equal(atk(x, y), ref)


def test_unequal_budgets_stay_in_each_ball_and_reach_it_when_the_sign_is_constant():
    """A two-class linear model: the input gradient of CE is ``(1 - p_y) (w_other - w_y)``, its sign constant, so
    enough steps end every pixel at ``x +- eps_b`` exactly (inputs in [0.4, 0.6]: no clipping to [0, 1])."""
    model = LinearModel()
    x, y = batch(6, 0.4, 0.6, k=2, shape=(1, 4, 4))
    eps = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.03, 0.07])
    atk = TrackedPGD(model, eps=0.05, alpha=0.02, steps=20)
    atk.set_budget(eps)
    torch.manual_seed(0)
    d = (atk(x, y) - x).flatten(1)
    w = model.head.weight.detach()
    sign = torch.sign(w[1 - y] - w[y])  # [B, D]: the ascent direction of each sample
    assert (d.abs() <= eps[:, None] + 1e-6).all()
    assert torch.allclose(d, sign * eps[:, None], atol=1e-6)


def test_one_step_by_hand_on_a_linear_model():
    """One step from x (no random start): ``clamp(x + clamp(alpha_b sign(g), -eps_b, eps_b), 0, 1)`` with
    ``g = (softmax(Wx + b) - onehot(y)) W``; samples whose step is larger than their ball are projected."""
    model = LinearModel(k=3)
    x, y = batch(5, 0.0, 1.0, k=3, shape=(1, 4, 4))
    eps = torch.tensor([0.1, 0.05, 0.2, 0.02, 0.3])
    alpha = torch.tensor([0.03, 0.1, 0.2, 0.01, 0.5])
    atk = TrackedPGD(model, eps=0.1, alpha=0.1, steps=1, random_start=False)
    out = atk(x, y, eps=eps, alpha=alpha)
    w, b = model.head.weight.detach(), model.head.bias.detach()
    p = torch.softmax(x.flatten(1) @ w.T + b, 1)
    g = (p - F.one_hot(y, 3).float()) @ w  # the gradient of the mean CE, up to the positive 1/B
    step = torch.minimum(torch.maximum(alpha[:, None] * g.sign(), -eps[:, None]), eps[:, None])
    hand = torch.clamp(x.flatten(1) + step, 0, 1).view_as(x)
    assert torch.allclose(out, hand, atol=1e-7)


def test_the_uniform_start_is_scaled_per_sample():
    """The random start draws torchattacks' ``U(-eps, eps)`` with the run's eps, scaled by ``eps_b / eps``: a sample at
    the run's eps starts exactly where torchattacks starts it, the others uniformly in their own ball."""
    model = LinearModel(k=10, d=64)
    x, y = batch(4)
    eps = torch.tensor([0.1, 0.05, 0.2, 0.1])
    atk = TrackedPGD(model, eps=0.1, alpha=0.0, steps=1)  # alpha 0: the start, projected, is the result
    torch.manual_seed(3)
    out = atk(x, y, eps=eps)
    torch.manual_seed(3)
    noise = torch.empty_like(x).uniform_(-0.1, 0.1)
    hand = torch.clamp(x + noise * (eps / 0.1).view(-1, 1, 1, 1), 0, 1)
    assert torch.allclose(out, hand, atol=1e-7)
    assert torch.equal(out[0], torch.clamp(x[0] + noise[0], 0, 1))
    assert (out - x).abs().flatten(1).amax(1)[2] > 0.11  # beyond the run's eps: the larger ball is used


# -- beta per sample -------------------------------------------------------------------------------------------------
class FixedCtx:
    """The parts of a step context a loss reads: fixed logits per view."""

    def __init__(self, logits: dict[str, torch.Tensor], y: torch.Tensor, beta: torch.Tensor | None) -> None:
        self._l, self.y, self.budget = logits, y, Budget(beta=beta)
        self.batch_size = len(y)

    def logits(self, view):
        return self._l[view if isinstance(view, str) else view.name]


def fixed_logits(n: int = 6, k: int = 4):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, k, generator=g), torch.randn(n, k, generator=g), torch.randint(0, k, (n,), generator=g)


def hand_kl(nat, adv):
    p = torch.softmax(nat.double(), 1)
    return (p * (p.log() - torch.log_softmax(adv.double(), 1))).sum(1)


def test_trades_uses_beta_per_sample_times_the_adversarial_weights():
    from advplug import Weights
    from advplug.weights import combine_weights

    nat, adv, y = fixed_logits()
    beta = torch.tensor([0.0, 1.0, 2.0, 6.0, 10.0, 3.5])
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25, 1.25])
    ctx = FixedCtx({"natural": nat, "tpgd": adv}, y, beta)
    obj = TRADES(TRADES.Options(beta=6.0))
    weights = combine_weights([Weights(adv=w)], 1, 6, lambda t: t.mean(-1, keepdim=True))
    loss = obj.combine_loss(ctx, [Variant("tpgd", adv)], weights)
    ce = F.cross_entropy(nat.double(), y, reduction="none")
    hand = ce.mean() + (w.double() * beta.double() * hand_kl(nat, adv)).mean()  # CE + mean_b w_b beta_b KL_b
    assert torch.allclose(loss.double(), hand, atol=1e-6)
    scalar = obj.combine_loss(FixedCtx(ctx._l, y, None), [Variant("tpgd", adv)], weights)
    assert torch.allclose(scalar.double(), ce.mean() + 6.0 * (w.double() * hand_kl(nat, adv)).mean(), atol=1e-6)


@pytest.mark.parametrize("weighted", ["bce", "both"])
def test_mart_uses_beta_per_sample_on_its_kl_term(weighted):
    from advplug import Weights
    from advplug.weights import combine_weights

    nat, adv, y = fixed_logits()
    beta = torch.tensor([1.0, 0.0, 4.0, 6.0, 2.0, 8.0])
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25, 1.25])
    ctx = FixedCtx({"natural": nat, "pgd": adv}, y, beta)
    obj = MART(MART.Options(beta=6.0, weighted=weighted))
    weights = combine_weights([Weights(adv=w)], 1, 6, lambda t: t.mean(-1, keepdim=True))
    loss = obj.combine_loss(ctx, [Variant("pgd", adv)], weights)
    # by hand, MART's code: BCE = CE(x') - log(1.0001 - p_{y'}(x')); KL (1.0000001 - p_y(x))
    q, p = torch.softmax(adv.double(), 1), torch.softmax(nat.double(), 1)
    top2 = q.argsort(1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(adv.double(), y, reduction="none") - torch.log(1.0001 - q.gather(1, wrong[:, None])[:, 0])
    kl = hand_kl(nat, adv) * (1.0000001 - p.gather(1, y[:, None])[:, 0])
    w_kl = w.double() if weighted == "both" else torch.ones(6, dtype=torch.double)
    hand = (w.double() * bce).mean() + (w_kl * beta.double() * kl).mean()
    assert torch.allclose(loss.double(), hand, atol=1e-5)
    assert mart_terms is not None and trades_kl is not None


# -- start-up checks ------------------------------------------------------------------------------------------------
def decl(**kw) -> Declaration:
    return Declaration(sets=frozenset(kw.pop("sets", ())), **kw)


def test_two_plugins_setting_the_same_quantity_are_refused_naming_both():
    with pytest.raises(CompositionError, match=r"'cfa' with 'dafa'.*both set eps"):
        check_composition(
            {"at": Declaration(), "cfa": decl(sets={"eps"}), "dafa": decl(sets={"eps", "beta"})}, "at", "at"
        )
    ok = check_composition(
        {
            "trades": Declaration(provides=frozenset({"natural-term"})),
            "a": decl(sets={"eps"}),
            "b": decl(sets={"beta"}),
        },
        "trades",
        "trades",
    )
    assert ok is not None


def test_beta_without_a_regulariser_is_refused():
    with pytest.raises(CompositionError, match=r"'cfa'.*beta.*'at' has no regulariser.*--objective trades or"):
        check_composition({"at": Declaration(), "cfa": decl(sets={"beta"})}, "at", "at")
    with pytest.raises(CompositionError, match=r"'cfa' with 'lrat'.*beta.*lrat"):
        check_composition(
            {"trades": Declaration(), "cfa": decl(sets={"beta"}), "lrat": Declaration()}, "trades", "lrat"
        )
    check_composition({"mart": Declaration(), "cfa": decl(sets={"beta"})}, "mart", "mart")


def test_an_unknown_quantity_is_refused():
    with pytest.raises(CompositionError, match=r"'cfa'.*'gamma'.*eps, alpha, beta"):
        check_composition({"at": Declaration(), "cfa": decl(sets={"gamma"})}, "at", "at")


# -- the hook in training -------------------------------------------------------------------------------------------
class ClassEps:
    """eps per sample from its class: class c gets ``(c + 1) / 10`` of the run's eps; records what the attack did."""

    seen: list = []

    @hookimpl
    def declare(self):
        return Declaration(sets=frozenset({"eps"}))

    @hookimpl
    def attack_budget(self, ctx):
        return Budget(eps=(ctx.y + 1).float() / 10 * ctx.config.eps)

    @hookimpl
    def compute_weights(self, ctx, variants):
        d = (variants[0].x - ctx.x).flatten(1).abs().amax(1)
        ClassEps.seen.append((d, ctx.budget.eps, ctx.y))


class ClassBeta:
    """beta per sample under TRADES (declared), and an undeclared eps from epoch 1 on when ``sneak`` is set."""

    sneak = False

    @hookimpl
    def declare(self):
        return Declaration(sets=frozenset({"beta"}))

    @hookimpl
    def attack_budget(self, ctx):
        eps = torch.full_like(ctx.y, 0.1, dtype=torch.float) if ClassBeta.sneak and ctx.epoch >= 1 else None
        return Budget(beta=torch.ones_like(ctx.y, dtype=torch.float), eps=eps)


class Undeclared:
    """Sets eps without declaring it."""

    @hookimpl
    def attack_budget(self, ctx):
        return Budget(eps=torch.full((ctx.batch_size,), 0.1))


PLUGINS = {"classeps": f"{HERE}:ClassEps", "classbeta": f"{HERE}:ClassBeta", "undeclared": f"{HERE}:Undeclared"}


@pytest.mark.parametrize("objective", ["at", "trades"])
def test_the_core_attack_uses_the_budget_of_the_hook(tmp_path, one_thread, objective):
    ClassEps.seen = []
    with installed_plugins(**PLUGINS):
        cfg = tiny_config(str(tmp_path), plugins=("classeps",), objective=objective, epochs=1, eps=0.2)
        Trainer(cfg, data=digits_subset(64, 16), log=lambda s: None).train_epoch(0)
    d, eps, y = ClassEps.seen[0]
    assert torch.equal(eps, (y + 1).float() / 10 * 0.2)
    assert (d <= eps + 1e-6).all() and (d > eps * 0.5).all()


def test_an_undeclared_budget_field_is_named_at_the_first_step(tmp_path, one_thread):
    with installed_plugins(**PLUGINS):
        cfg = tiny_config(str(tmp_path), plugins=("undeclared",), epochs=1)
        t = Trainer(cfg, data=digits_subset(64, 16), log=lambda s: None)
        with pytest.raises(PluginError, match=r"'undeclared'.*'eps'.*Declaration\(sets"):
            t.train_epoch(0)
        t.close()


def test_beta_under_at_is_refused_at_start_up():
    with installed_plugins(**PLUGINS):
        with pytest.raises(PluginError, match="'classbeta'.*use --objective trades or --objective mart"):
            enable(["classbeta"], "at")
        assert enable(["classbeta"], "trades").declarations["classbeta"].sets == {"beta"}


def test_a_field_declared_by_no_one_is_refused_when_it_first_appears(tmp_path, one_thread):
    ClassBeta.sneak = True
    try:
        with installed_plugins(**PLUGINS):
            cfg = tiny_config(str(tmp_path), plugins=("classbeta",), objective="trades", epochs=2)
            t = Trainer(cfg, data=digits_subset(64, 16), log=lambda s: None)
            t.train_epoch(0)
            with pytest.raises(PluginError, match=r"'classbeta'.*'eps'"):
                t.train_epoch(1)
            t.close()
    finally:
        ClassBeta.sneak = False


@pytest.mark.parametrize("objective", ["at", "trades"])
def test_no_host_sync_with_a_budget_and_no_budget_without_one(tmp_path, one_thread, monkeypatch, objective):
    """The budget path syncs no more than the scalar one (``.item()``, ``bool(t)``... counted on the CPU, as
    tests/test_syncs.py does); without a plugin that sets one, the context's budget stays all ``None``."""
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with installed_plugins(**PLUGINS):
        t = Trainer(
            tiny_config(str(tmp_path / "b"), plugins=("classeps",), objective=objective, epochs=1),
            data=digits_subset(192, 16),
            log=lambda s: None,
        )
        batches = iter(t.loader)
        t.step(*next(batches), 0, 0)
        calls.clear()
        _, ctx, _ = t.step(*next(batches), 0, 1)
        assert calls == [] and ctx.budget.eps is not None
        t.close()
    t = Trainer(tiny_config(str(tmp_path / "s"), objective=objective, epochs=1), data=digits_subset(64, 16))
    _, ctx, _ = t.step(*next(iter(t.loader)), 0, 0)
    assert ctx.budget == Budget() and t.step._budgeters == []
    t.close()
