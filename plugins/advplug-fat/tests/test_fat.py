"""FAT: the early stop on a hand-built model, against a transcription of the authors' loop, the tau
schedule, FAT-TRADES replacing TRADES' attack, stats for other plugins."""

import json

import pytest
import torch
import torch.nn.functional as F
from advplug_fat import EarlyStoppedPGD, parse_epochs, tau_at
from torch import nn

from advplug import OptionError
from advplug.engine.trainer import Trainer
from advplug.plugins import enable
from advplug.testing import ScriptedTwoClass, digits_subset, tiny_config


class Threshold(nn.Module):
    """Two classes; class 1 wins iff x > c. The CE gradient of class 0 always pushes x up, so PGD
    moves each sample by +alpha per update and the step of first misclassification is known."""

    def __init__(self, c=0.6, s=10.0):
        super().__init__()
        self.c, self.s = c, s
        self.dummy = nn.Parameter(torch.zeros(()))  # torchattacks reads the device from a parameter

    def forward(self, x):
        z1 = self.s * (x[:, 0] - self.c) + 0 * self.dummy
        return torch.stack([torch.zeros_like(z1), z1], dim=1)


X0 = [0.5, 0.55, 0.7, 0.0]  # first misclassified after 4, 2, 0 updates; never within K = 10
ALPHA = 1 / 32


def attack(tau, **kw):
    return EarlyStoppedPGD(Threshold().eval(), eps=0.5, alpha=ALPHA, steps=10, tau=tau, start="none", **kw)


@pytest.mark.parametrize(
    "tau, stops", [(0, [4, 2, 0, 10]), (1, [5, 3, 1, 10]), (2, [6, 4, 2, 10]), (10, [10, 10, 10, 10])]
)
def test_stops_tau_steps_after_the_first_misclassification(tau, stops):
    atk = attack(tau)
    x = torch.tensor(X0)[:, None]
    y = torch.zeros(4, dtype=torch.long)
    adv = atk(x, y)
    st = atk.stats()
    assert st["stop_step"].tolist() == stops
    assert adv[:, 0].tolist() == pytest.approx(
        [min(1.0, x0 + s * ALPHA) for x0, s in zip(X0, stops)]
    )  # clamped to [0, 1]
    assert st["first_wrong"].tolist() == [4, 2, 0, 10]
    assert st["kappa"].tolist() == [4, 2, 0, 10]  # correct at every iteration before the first wrong one
    # MAIL's p_true at the first misclassified iteration: sigmoid(-s (x - c)) there
    x_first = torch.tensor([0.5 + 4 * ALPHA, 0.55 + 2 * ALPHA, 0.7, 0.0 + 9 * ALPHA])
    assert st["p_true_lps"].tolist() == pytest.approx(torch.sigmoid(-10 * (x_first - 0.6)).tolist(), rel=1e-5)


def authors_earlystop(model, data, target, step_size, epsilon, steps, tau, loss_fn="cent", start=None):
    """A transcription of the authors' earlystop.py (omega 0): the batch shrinks as samples stop;
    returns the examples in the original order and the updates each received. ``loss_fn``
    "cent": CE from ``data`` (no random start); "kl" (FAT_for_TRADES): from ``start``, ascent on
    KLDivLoss(size_average=False)(log_softmax(model(x')), softmax(model(x))), p(x) from the clean
    batch ``data``; projection around ``data``."""
    if loss_fn == "kl":
        with torch.no_grad():
            p_nat_all = torch.exp(model(data)) / torch.exp(model(data)).sum(1, keepdim=True)
    control = [tau] * len(target)
    idx = list(range(len(target)))
    iter_adv, updates = (data if start is None else start).clone(), [0] * len(target)
    for _ in range(steps):
        x = iter_adv[idx].clone().requires_grad_(True)
        output = model(x)
        pred = output.argmax(1)
        keep = []
        for j, i in enumerate(idx):
            if pred[j] != target[i]:
                if control[i] == 0:
                    continue  # stopped: iter_adv[i] is never updated again
                control[i] -= 1
            keep.append(j)
        if loss_fn == "kl":
            p = p_nat_all[idx]
            log_q = output - torch.logsumexp(output, 1, keepdim=True)
            loss = (p * (torch.log(p) - log_q)).sum()
        else:
            loss = F.cross_entropy(output, target[idx])
        grad = torch.autograd.grad(loss, x)[0]
        for j in keep:
            i = idx[j]
            nxt = iter_adv[i] + step_size * grad[j].sign()
            iter_adv[i] = torch.min(torch.max(nxt, data[i] - epsilon), data[i] + epsilon).clamp(0, 1).detach()
            updates[i] += 1
        idx = [idx[j] for j in keep]
        if not idx:
            break
    return iter_adv, updates


@pytest.mark.parametrize("tau", [0, 1, 3])
def test_matches_a_transcription_of_the_authors_loop(tau):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(40, 6), torch.randint(0, 3, (40,))
    atk = EarlyStoppedPGD(model, eps=0.3, alpha=0.05, steps=8, tau=tau, start="none")
    adv = atk(x, y)
    ref, updates = authors_earlystop(model, x, y, 0.05, 0.3, 8, tau)
    assert atk.stats()["stop_step"].tolist() == updates
    assert torch.allclose(adv, ref, atol=1e-6)
    assert 0 < sum(updates) < 8 * 40 or tau == 3  # some samples stopped early


def test_tau_schedule_is_the_authors_adjust_tau():
    def fat_py(e):  # FAT.py, epochs from 1
        return 0 if e <= 50 else 1 if e <= 90 else 2

    def trades_py(e):  # FAT_for_TRADES.py
        return 0 if e <= 30 else 1 if e <= 50 else 2 if e <= 70 else 3

    def mart_py(e):  # FAT_for_MART.py
        return 0 if e <= 20 else 1 if e <= 40 else 2 if e <= 60 else 3 if e <= 80 else 4

    for ref, sched in ((fat_py, "50,90"), (trades_py, "30,50,70"), (mart_py, "20,40,60,80")):
        assert [tau_at(ep, 0, parse_epochs(sched)) for ep in range(120)] == [ref(ep + 1) for ep in range(120)]
    assert tau_at(100, 2, (50, 90), dynamic=False) == 2
    with pytest.raises(OptionError, match="increasing"):
        parse_epochs("90,50")


def test_defaults_per_objective():
    for objective, (loss, start, omega, sched) in {
        "at": ("ce", "uniform", 0.001, "50,90"),
        "trades": ("kl", "normal", 0.0, "30,50,70"),
        "mart": ("ce", "normal", 0.0, "20,40,60,80"),
    }.items():
        fat = enable(["fat"], objective).plugin("fat")
        from advplug import TrainContext

        fat.on_train_start(
            TrainContext(
                model=Threshold(),
                config=tiny_config("/tmp/unused"),
                num_train=8,
                num_classes=2,
                input_shape=(1,),
                device=torch.device("cpu"),
                epochs=120,
                milestones=(60,),
                objective=objective,
                make_attack=None,
                log=lambda s: None,
            )
        )
        o = fat.options
        assert (o.loss, o.start, o.omega, o.tau_epochs) == (loss, start, omega, sched)


def test_fat_trades_replaces_the_trades_attack(tmp_path):
    t = Trainer(
        tiny_config(
            str(tmp_path / "r"),
            plugins=("fat", "mail"),
            objective="trades",
            epochs=2,
            plugin_options={"mail-burn-in": 0},
        ),
        data=digits_subset(128, 64),
        log=lambda s: None,
    )
    x, y = t.data.train
    loss, ctx, w = t.step(x[:32], y[:32], torch.arange(32), 0, 0)
    assert [v.name for v in ctx.variants] == ["fat"]  # TRADES' own tpgd did not run
    assert t.enabled.plugin("fat").attack.loss == "kl"
    st = ctx.variants[0].stats
    assert set(st) >= {"stop_step", "first_wrong", "kappa", "p_true_lps"}
    assert int(st["stop_step"].max()) <= 3 and torch.isfinite(loss) and w is not None  # MAIL used p_true_lps


def test_end_to_end(tmp_path):
    out = tmp_path / "run"
    Trainer(
        tiny_config(str(out), plugins=("fat",), epochs=2, milestones=(1,), plugin_options={"fat-tau-epochs": "1"}),
        data=digits_subset(),
        log=lambda s: None,
    ).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["fat"]["tau"] for r in rows] == [0, 1]
    assert all(0 <= r["fat"]["mean_stop_step"] <= 3 for r in rows)


def test_records_stay_at_the_first_misclassified_iterate_when_fooled_again():
    """tau 10 (no stop): a scripted model predicts correct, fooled (p_y 0.3), correct, fooled (p_y 0.2);
    MAIL's p_true stays 0.3 and first_wrong 1, being correct again must not reopen them."""
    atk = EarlyStoppedPGD(
        ScriptedTwoClass([0.2, 0.7, 0.1, 0.8]).eval(), eps=0.1, alpha=0.01, steps=4, tau=10, start="none"
    )
    atk(torch.rand(2, 3), torch.zeros(2, dtype=torch.long))
    st = atk.stats()
    assert st["p_true_lps"].tolist() == pytest.approx([0.3, 0.3], rel=1e-5)
    assert st["first_wrong"].tolist() == [1, 1] and st["kappa"].tolist() == [2, 2]


def test_attack_constructor_defaults():
    # the docstring's (and torchattacks' PGD's) defaults: eps 8/255, alpha 2/255, K 10, tau 0, ce, uniform start
    atk = EarlyStoppedPGD(Threshold().eval())
    assert atk.stats() == {}  # before the first call
    assert (atk.eps, atk.alpha, atk.steps, atk.tau) == (8 / 255, 2 / 255, 10, 0)
    assert (atk.loss, atk.start, atk.omega, atk.random_start) == ("ce", "uniform", 0.0, True)
    assert EarlyStoppedPGD(Threshold().eval(), start="none").random_start is False
    x = torch.full((64, 1), 0.5)
    d = atk.first_iterate(x) - x  # uniform in [-8/255, 8/255]
    assert float(d.abs().max()) <= 8 / 255 + 1e-7 and float(d.abs().max()) > 4 / 255 and float(d.std()) > 2 / 255


def test_first_iterate_per_start_against_the_same_draws():
    # earlystop.py: uniform_randominit x + U(-eps, eps), normal_distribution_randominit x + 0.001 N(0, 1), both clamped
    # to [0, 1]; the same random draws are replayed here with the same seed
    x = torch.rand(32, 3)
    x[:4] = 1.0
    x[4:8] = 0.0
    eps = 0.1
    for start in ("uniform", "normal", "none"):
        atk = EarlyStoppedPGD(Threshold().eval(), eps=eps, alpha=0.01, steps=2, start=start)
        torch.manual_seed(3)
        got = atk.first_iterate(x)
        torch.manual_seed(3)
        if start == "uniform":
            noise = torch.empty_like(x).uniform_(-eps, eps)
        elif start == "normal":
            noise = 0.001 * torch.randn_like(x)
        else:
            noise = torch.zeros_like(x)
        ref = torch.minimum(torch.maximum(x + noise, torch.zeros_like(x)), torch.ones_like(x))
        assert torch.allclose(got, ref, atol=1e-7, rtol=0), start
        if start != "none":
            assert not torch.equal(got, x)


@pytest.mark.parametrize("tau", [0, 2])
def test_kl_attack_matches_a_transcription_of_the_authors_loop(tau):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(40, 6), torch.randint(0, 3, (40,))
    # the KL attack starts at x + 0.001 N(0, 1) (a start exactly at x has a zero KL gradient): replay the draw
    torch.manual_seed(5)
    x0 = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    ref, updates = authors_earlystop(model, x, y, 0.05, 0.3, 6, tau, loss_fn="kl", start=x0)
    atk = EarlyStoppedPGD(model, eps=0.3, alpha=0.05, steps=6, tau=tau, loss="kl", start="normal")
    torch.manual_seed(5)
    adv = atk(x, y)
    assert atk.stats()["stop_step"].tolist() == updates
    assert 0 < sum(updates) < 6 * 40
    assert torch.allclose(adv, ref, atol=1e-6)


def test_omega_noise_is_added_at_every_update():
    # earlystop.py: iter_adv = iter_adv + step_size * sign(grad) + omega * N(0, 1), then the projection; the
    # Threshold model's gradient sign is +1, no random start, tau 10 (no stop): replay the draws
    x0 = torch.tensor([[0.1], [0.2], [0.3]])
    atk = EarlyStoppedPGD(Threshold().eval(), eps=0.5, alpha=ALPHA, steps=3, tau=10, start="none", omega=0.01)
    torch.manual_seed(11)
    adv = atk(x0, torch.zeros(3, dtype=torch.long))
    torch.manual_seed(11)
    ref = x0.clone()
    for _ in range(3):
        ref = ref + ALPHA + 0.01 * torch.randn(3, 1)
        ref = (x0 + (ref - x0).clamp(-0.5, 0.5)).clamp(0, 1)
    assert torch.allclose(adv, ref, atol=1e-7, rtol=0)
    assert not torch.allclose(adv, x0 + 3 * ALPHA, atol=1e-3)  # the noise is visible


def test_zero_gradient_means_no_move():
    # a flat model (Threshold with slope 0: logits (0, 0) for every x) has an exactly zero input gradient;
    # sign(0) = 0, so the sign step leaves every iterate at x
    x = torch.tensor([[0.2], [0.5], [0.9]])
    atk = EarlyStoppedPGD(Threshold(s=0.0).eval(), eps=0.3, alpha=0.05, steps=3, tau=10, start="none")
    assert torch.equal(atk(x, torch.zeros(3, dtype=torch.long)), x)


def test_defaults_for_an_objective_without_a_script():
    # an objective the authors did not script (e.g. a plugin's own): FAT.py's settings, ce, uniform start,
    # no noise (OMEGA's fallback 0) and the at schedule
    from advplug import TrainContext

    fat = enable(["fat"], "at").plugin("fat")
    fat.on_train_start(
        TrainContext(
            model=Threshold(),
            config=tiny_config("/tmp/unused"),
            num_train=8,
            num_classes=2,
            input_shape=(1,),
            device=torch.device("cpu"),
            epochs=120,
            milestones=(60,),
            objective="other",
            make_attack=None,
            log=lambda s: None,
        )
    )
    o = fat.options
    assert (o.loss, o.start, o.omega, o.tau_epochs) == ("ce", "uniform", 0.0, "50,90")
    assert fat.epochs == (50, 90) and (fat.attack.loss, fat.attack.start) == ("ce", "uniform")
    assert [fat.tau(e) for e in (49, 50, 89, 90)] == [0, 1, 1, 2]


def test_mean_stop_step_per_epoch():
    # Threshold, tau 0: stops 4, 2, 0, 10 (mean 4); two batches in epoch 0, one in epoch 1: each epoch's mean
    # is over its own samples only
    from types import SimpleNamespace

    from advplug_fat import FAT

    fat = FAT(FAT.Options(tau=0, dynamic=False))
    fat.attack = attack(0)
    x, y = torch.tensor(X0)[:, None], torch.zeros(4, dtype=torch.long)
    for epoch, batches in ((0, [x, x[:2]]), (1, [x[2:]])):
        for xb in batches:
            fat.generate_adversaries(SimpleNamespace(epoch=epoch, x=xb, y=y[: len(xb)], batch_size=len(xb)))
        out = fat.on_epoch_end(epoch)
        assert out["tau"] == 0
        assert out["mean_stop_step"] == pytest.approx([(4 + 2 + 0 + 10 + 4 + 2) / 6, (0 + 10) / 2][epoch])
    assert fat.on_epoch_end(2)["mean_stop_step"] is None  # no batch seen


def test_parse_epochs_bounds_and_declared_stats():
    assert parse_epochs("50, 90") == (50, 90) and parse_epochs("0,5") == (0, 5)  # spaces; 0 is allowed
    assert tau_at(0, 0, parse_epochs("0,5")) == 1  # "after epoch 0": tau + 1 from the first epoch
    with pytest.raises(OptionError, match="non-negative"):
        parse_epochs("-1,5")
    with pytest.raises(OptionError, match="comma-separated"):
        parse_epochs("5;9")
    # the stats declared for the composition check are the ones the attack records
    from advplug_fat import FAT

    fat = FAT(FAT.Options())
    if hasattr(fat, "declare"):
        assert set(fat.declare("at").variants["fat"]) == set(attack_stats_keys())


def attack_stats_keys():
    atk = attack(0)
    atk(torch.tensor(X0)[:, None], torch.zeros(4, dtype=torch.long))
    return atk.stats().keys()
