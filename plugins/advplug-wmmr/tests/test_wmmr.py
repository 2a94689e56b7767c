"""WMMR: weights against hand computations, the weighted attack against an independent one-step
computation, the TRADES loss with WMMR's weights on the KL term."""

import math

import pytest
import torch
import torch.nn.functional as F
from advplug_wmmr import WMMR, WeightedPGD, wmmr_weights
from torch import nn

from advplug import FeatureTap, StepContext, TrainContext, Variant
from advplug.engine.trainer import Trainer
from advplug.plugins import enable
from advplug.testing import ScriptedTwoClass, TableModel, digits_subset, tiny_config


def test_weights_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    y = torch.tensor([0, 0, 2])
    # margins: 0.7 - 0.2 = 0.5; 0.2 - 0.5 = -0.3 (misclassified: weight > 1); 0.8 - 0.1 = 0.7
    assert wmmr_weights(probs, y, 2.0).tolist() == pytest.approx(
        [math.exp(-1.0), math.exp(0.6), math.exp(-1.4)], rel=1e-6
    )
    assert wmmr_weights(probs, y, 0.0).tolist() == [1.0, 1.0, 1.0]


def started(objective="at", **opts):
    w = WMMR(WMMR.Options(attack="plain", **opts))
    w.on_train_start(
        TrainContext(
            model=None,
            config=tiny_config("/tmp/unused"),
            num_train=8,
            num_classes=3,
            input_shape=(1,),
            device=torch.device("cpu"),
            epochs=2,
            milestones=(1,),
            objective=objective,
            make_attack=None,
            log=lambda s: None,
        )
    )
    return w


def table_ctx():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]))
    model = TableModel(logits)
    x = torch.arange(3.0)[:, None]
    ctx = StepContext(
        model=model,
        x=x + 100,
        y=torch.tensor([0, 0, 2]),
        index=torch.arange(3),
        epoch=0,
        step=0,
        num_classes=3,
        config=None,
        lr=0.1,
        tap=FeatureTap(model),
    )
    ctx.variants = [Variant("pgd", x)]  # the adversarial view looks up rows 0, 1, 2
    return ctx


def test_compute_weights_on_the_adversarial_view_and_defaults():
    assert started("at").options.alpha == 0.5 and started("trades").options.alpha == 2.0
    ctx = table_ctx()
    w = started("at").compute_weights(ctx, ctx.variants).adv
    by_hand = [math.exp(-0.5 * m) for m in (0.5, -0.3, 0.7)]
    assert w.tolist() == pytest.approx(by_hand, rel=1e-5)  # not rescaled: the scripts' mean(w l)
    wb = started("at", normalise="batch").compute_weights(ctx, ctx.variants).adv
    assert wb.tolist() == pytest.approx([3 * b / sum(by_hand) for b in by_hand], rel=1e-5)


def test_weighted_attack_one_step_against_an_independent_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.rand(16, 5), torch.randint(0, 3, (16,))
    eps, step, a = 0.1, 0.03, 2.0
    torch.manual_seed(1)
    adv = WeightedPGD(model, eps=eps, alpha=step, steps=1, weight_alpha=a)(x, y)
    torch.manual_seed(1)
    x0 = (x + torch.empty_like(x).uniform_(-eps, eps)).requires_grad_(True)  # the code's unclamped start
    logits = model(x0)
    p = logits.softmax(1)
    py = p.gather(1, y[:, None]).squeeze(1)
    other = p.masked_fill(F.one_hot(y, 3).bool(), -1.0).max(1).values
    loss = (torch.exp(-a * (py - other)) * F.cross_entropy(logits, y, reduction="none")).mean()  # weight not detached
    g = torch.autograd.grad(loss, x0)[0]
    expect = torch.clamp(x + torch.clamp(x0.detach() + step * g.sign() - x, -eps, eps), 0, 1)
    assert torch.allclose(adv, expect, atol=1e-7)


def test_trades_loss_weighs_the_kl_term(tmp_path):
    t = Trainer(
        tiny_config(str(tmp_path / "r"), plugins=("wmmr",), objective="trades", epochs=2),
        data=digits_subset(128, 64),
        log=lambda s: None,
    )
    x, y = t.data.train
    loss, ctx, w = t.step(x[:32], y[:32], torch.arange(32), 0, 0)
    assert [v.name for v in ctx.variants] == ["wmmr"]  # the weighted attack replaced TRADES' own
    nat, adv = ctx.logits("natural").detach(), ctx.logits(ctx.variants[0]).detach()
    weight = torch.exp(
        -2.0
        * (lambda p: p.gather(1, y[:32, None]).squeeze(1) - p.scatter(1, y[:32, None], -1.0).max(1).values)(
            adv.softmax(1)
        )
    )
    kl = (nat.softmax(1) * (nat.log_softmax(1) - adv.log_softmax(1))).sum(1)
    by_hand = F.cross_entropy(nat, y[:32]) + 6.0 * (weight * kl).mean()  # TRADES_base/trades.py, margin mode
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-4)


def test_plain_attack_keeps_the_runs_attack_and_trains(tmp_path):
    assert enable(["wmmr"], "at", {"wmmr-attack": "plain"}).plugin("wmmr").options.attack == "plain"
    t = Trainer(
        tiny_config(str(tmp_path / "r"), plugins=("wmmr",), epochs=2, plugin_options={"wmmr-attack": "plain"}),
        data=digits_subset(),
        log=lambda s: None,
    )
    res = t.fit()
    assert all(math.isfinite(v) for r in res.values() for v in r.values())


class Threshold(nn.Module):
    """Class 1 iff x > 0.6; the weighted CE pushes x up by alpha per step."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        z1 = 10 * (x[:, 0] - 0.6) + 0 * self.dummy
        return torch.stack([torch.zeros_like(z1), z1], 1)


def test_weighted_attack_records_kappa_for_gairat():
    eps, step, k = 0.05, 1 / 32, 6
    x, y = torch.tensor([[0.58], [0.57], [0.0]]), torch.zeros(3, dtype=torch.long)
    torch.manual_seed(3)
    atk = WeightedPGD(Threshold().eval(), eps=eps, alpha=step, steps=k, weight_alpha=0.5)
    atk(x, y)
    torch.manual_seed(3)
    x0 = x[:, 0] + torch.empty_like(x).uniform_(-eps, eps)[:, 0]  # the same start, drawn independently
    its, expect = x0.clone(), torch.zeros(3, dtype=torch.long)
    for _ in range(k):  # the prediction before each update: correct while x <= 0.6
        expect += (its <= 0.6).long()
        its = torch.clamp(torch.min(torch.max(its + step, x[:, 0] - eps), x[:, 0] + eps), 0, 1)
    assert atk.stats()["kappa"].tolist() == expect.tolist()
    assert expect.tolist()[2] == k and expect.tolist()[0] < k  # a robust sample and a fooled one
    assert enable(["wmmr", "gairat"], "at").composition is not None  # the start-up check finds kappa on wmmr


def test_weighted_kl_attack_against_an_independent_computation():
    """TRADES_base/trades.py, margin mode: sign ascent on sum_i w_i KL(p(x_i) || p(x'_i)) from x + 0.001 N(0, 1),
    w = exp(-a m(x')) on the current iterate and differentiated through. Three steps: at the start
    KL ~ 0, so only later steps see the weight's own gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.rand(16, 5), torch.randint(0, 3, (16,))
    eps, step, a, k = 0.1, 0.03, 2.0, 3

    def by_hand(a):
        torch.manual_seed(1)
        it = x + 0.001 * torch.randn_like(x)
        with torch.no_grad():
            p_nat = model(x).softmax(1)
        for _ in range(k):
            it = it.detach().requires_grad_(True)
            q = model(it).softmax(1)
            qy = q.gather(1, y[:, None]).squeeze(1)
            other = q.masked_fill(F.one_hot(y, 3).bool(), -1.0).max(1).values
            kl = (p_nat * (p_nat.log() - q.log())).sum(1)
            g = torch.autograd.grad((torch.exp(-a * (qy - other)) * kl).sum(), it)[0]
            it = torch.clamp(x + torch.clamp(it.detach() + step * g.sign() - x, -eps, eps), 0, 1)
        return it

    torch.manual_seed(1)
    adv = WeightedPGD(model, eps=eps, alpha=step, steps=k, weight_alpha=a, loss="kl")(x, y)
    expect = by_hand(a)
    assert torch.allclose(adv, expect, atol=1e-6)
    assert not torch.allclose(expect, by_hand(0.0), atol=1e-6)  # the weight's gradient moves some sample


def test_weighted_attack_records_mails_p_true_at_the_least_step():
    """p_y(x') at the first misclassified iterate (MAIL's least step); p_y at the last one if never fooled."""
    eps, step, k = 0.05, 1 / 32, 6
    x, y = torch.tensor([[0.58], [0.57], [0.0]]), torch.zeros(3, dtype=torch.long)
    torch.manual_seed(3)
    atk = WeightedPGD(Threshold().eval(), eps=eps, alpha=step, steps=k, weight_alpha=0.5)
    atk(x, y)
    torch.manual_seed(3)
    its = x[:, 0] + torch.empty_like(x).uniform_(-eps, eps)[:, 0]
    p_true, found = [None] * 3, [False] * 3
    for _ in range(k):
        for i in range(3):
            p_y = 1.0 / (1.0 + math.exp(10 * (its[i].item() - 0.6)))
            if not found[i]:
                p_true[i] = p_y
            found[i] = found[i] or its[i].item() > 0.6
        its = torch.clamp(torch.min(torch.max(its + step, x[:, 0] - eps), x[:, 0] + eps), 0, 1)
    assert found[0] and not found[2]
    assert atk.stats()["p_true_lps"].tolist() == pytest.approx(p_true, rel=1e-5)


def test_p_true_at_the_first_misclassified_iterate_when_the_attack_overshoots_back():
    """A bump: class 1 only within 0.01 of 0.61, so sign steps of 1/32 fool a sample and then leave
    the bump again. w CE grows with the class-1 logit z1, so the step is sign(dz1/dx) (written out)."""

    class Bump(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            z1 = 1 - 10000 * (x[:, 0] - 0.61) ** 2 + 0 * self.dummy
            return torch.stack([torch.zeros_like(z1), z1], 1)

    eps, step, k = 0.08, 1 / 32, 10
    x, y = torch.tensor([[0.58], [0.55], [0.6], [0.66]]), torch.zeros(4, dtype=torch.long)
    torch.manual_seed(4)
    atk = WeightedPGD(Bump().eval(), eps=eps, alpha=step, steps=k, weight_alpha=0.5)
    atk(x, y)
    torch.manual_seed(4)
    its = (x[:, 0] + torch.empty_like(x).uniform_(-eps, eps)[:, 0]).tolist()
    p_true, found, fooled_then_not = [None] * 4, [False] * 4, [False] * 4
    for _ in range(k):
        for i in range(4):
            z1 = 1 - 10000 * (its[i] - 0.61) ** 2
            if not found[i]:
                p_true[i] = 1.0 / (1.0 + math.exp(z1))
            fooled_then_not[i] |= found[i] and z1 <= 0
            found[i] = found[i] or z1 > 0
            d = 1.0 if its[i] < 0.61 else -1.0  # sign(dz1/dx)
            its[i] = min(max(its[i] + step * d, x[i, 0].item() - eps, 0.0), x[i, 0].item() + eps, 1.0)
    # a sample is fooled and then correct again; in 1-D the sign steps settle into a 2-cycle, so the
    # re-fooled iterate repeats the first one and this does not tell "found |= ~correct" from "found = ~correct"
    assert any(fooled_then_not)
    assert atk.stats()["p_true_lps"].tolist() == pytest.approx(p_true, rel=1e-4)


def test_default_settings():
    """alpha per objective from the scripts (mart: 0.5, our choice); the attack's defaults, CIFAR's 8/255, 2/255, 10."""
    assert started("mart").options.alpha == 0.5 and started("at", alpha=1.5).options.alpha == 1.5
    atk = WeightedPGD(nn.Linear(2, 2))
    assert (atk.eps, atk.alpha, atk.steps, atk.weight_alpha, atk.loss) == (8 / 255, 2 / 255, 10, 0.5, "ce")


def test_weighted_kl_attack_multiplies_the_kl_by_the_weight():
    """Once KL(p(x) || p(x')) is large, grad(w KL) = w grad KL + KL grad w and grad(KL / w) differ
    in the sign of the weight's own term: with a sharp kernel (alpha 5) and six steps the two
    attacks part; the attack must follow w KL (TRADES_base/trades.py, margin mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.rand(16, 5), torch.randint(0, 3, (16,))
    eps, step, a, k = 0.3, 0.05, 5.0, 6

    def by_hand(weigh):
        torch.manual_seed(1)
        it = x + 0.001 * torch.randn_like(x)
        p_nat = model(x).softmax(1).detach()
        for _ in range(k):
            it = it.detach().requires_grad_(True)
            q = model(it).softmax(1)
            margin = q.gather(1, y[:, None]).squeeze(1) - q.masked_fill(F.one_hot(y, 3).bool(), -1.0).max(1).values
            kl = (p_nat * (p_nat.log() - q.log())).sum(1)
            g = torch.autograd.grad(weigh(kl, torch.exp(-a * margin)).sum(), it)[0]
            it = torch.clamp(x + torch.clamp(it.detach() + step * g.sign() - x, -eps, eps), 0, 1)
        return it

    torch.manual_seed(1)
    adv = WeightedPGD(model, eps=eps, alpha=step, steps=k, weight_alpha=a, loss="kl")(x, y)
    assert torch.allclose(adv, by_hand(lambda kl, w: kl * w), atol=1e-6)
    assert not torch.allclose(adv, by_hand(lambda kl, w: kl / w), atol=1e-3)


def test_p_true_stays_at_the_first_misclassified_iterate_when_fooled_again():
    """A model whose prediction follows the iteration: correct, fooled (p_y 0.3), correct, fooled
    (p_y 0.2). MAIL's p_y at the least step is 0.3: being correct again must not reopen it."""
    atk = WeightedPGD(ScriptedTwoClass([0.2, 0.7, 0.1, 0.8]).eval(), eps=0.1, alpha=0.01, steps=4, weight_alpha=0.5)
    atk(torch.rand(2, 3), torch.zeros(2, dtype=torch.long))
    assert atk.stats()["p_true_lps"].tolist() == pytest.approx([0.3, 0.3], rel=1e-5)
    assert atk.stats()["kappa"].tolist() == [2, 2]
