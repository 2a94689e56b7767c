"""CFA: CCM's class budgets, CCR's class strengths and loss, FAWA's averaging decisions against transcriptions of the
authors' code (PKU-ML/CFA: train.py, attack.py, utils.py) on fixed inputs; runs on digits alone and in its pairs."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from advplug_cfa import (
    CFA,
    TRADES_BETA,
    begin_default,
    ccm_class_eps,
    ccr_strength,
    code_class_acc,
    fawa_decay,
    trades_terms,
)

from advplug import OptionError, PluginError
from advplug.engine.trainer import Trainer
from advplug.plugins import enable
from advplug.testing import digits_subset, tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- transcriptions of the authors' code (written here, independently of the plugin) -----------------------------


class AuthorsCWLog:
    """train.py's CW_log, robust part: per-sample loop over the batch, result m * cw_robust / N."""

    def __init__(self, class_num=10):
        self.N, self.cw_robust, self.class_num = 0, torch.zeros(class_num), class_num

    def update(self, output, y):  # update_clean counts N, update_robust the class-wise hits
        self.N += len(output)
        correct = output.max(1)[1] == y
        for i, c in enumerate(y):
            if correct[i]:
                self.cw_robust[c] += 1

    def result(self):
        return self.class_num * self.cw_robust / self.N


def authors_class_eps(train_robust, eps, lambda_1, epoch, begin):
    """train.py's CCM block (then cw_pgd_loss's batch_eps = cw_eps[y])."""
    if epoch >= begin:
        return (torch.ones(10) * lambda_1 + train_robust) * eps
    return torch.ones(10) * eps


def authors_class_beta(train_robust, beta, lambda_2, epoch, begin, ccr=True):
    """train.py's CCR block."""
    class_beta = torch.ones(10) * (beta / (1 + beta))
    if ccr and epoch >= begin:
        for i in range(10):
            class_beta[i] = (lambda_2 + train_robust[i]) * beta / (1 + (lambda_2 + train_robust[i]) * beta)
    else:
        class_beta = torch.ones(10) * (beta / (1 + beta))
    return class_beta


def authors_trades_loss(model, x_natural, x_adv, y, cw_beta):
    """attack.py's trades_loss after the attack (model in train mode; the natural forward run twice, as the code)."""
    batch_size = len(x_natural)
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y, reduction="none") / batch_size
    cw_criterion = nn.KLDivLoss(reduction="none")
    robust_out = model(x_adv)
    loss_robust = (1.0 / batch_size) * cw_criterion(
        F.log_softmax(robust_out, dim=1), F.softmax(model(x_natural), dim=1)
    )
    batch_beta = cw_beta[y]
    loss_robust = loss_robust.sum(1)
    return ((1 - batch_beta) * loss_natural + batch_beta * loss_robust).sum()


def authors_weight_average(model, new_model, decay_rate, init=False):
    """utils.py's weight_average."""
    state_dict = model.state_dict()
    new_dict = new_model.state_dict()
    if init:
        decay_rate = 0
    for key in state_dict:
        new_dict[key] = (state_dict[key] * decay_rate + new_dict[key] * (1 - decay_rate)).clone().detach()
    model.load_state_dict(new_dict)


def authors_fawa(fawa_model, model, r_min, threshold, decay_rate, seat_init):
    """train.py's FAWA block; returns SEAT_init."""
    if r_min >= threshold:
        if not seat_init:
            seat_init = True
            authors_weight_average(fawa_model, model, decay_rate, True)
        else:
            authors_weight_average(fawa_model, model, decay_rate, False)
    else:
        authors_weight_average(fawa_model, model, 1.0, False)
    return seat_init


# -- fixed inputs ------------------------------------------------------------------------------------------------


def imbalanced_epoch(seed=0, n=300):
    """An epoch's adversarial logits and labels with unequal class counts (class 3 rare, class 7 frequent)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.ones(10)
    p[3], p[7] = 0.2, 3.0
    y = torch.multinomial(p / p.sum(), n, replacement=True, generator=g)
    logits = torch.randn(n, 10, generator=g)
    logits[torch.arange(n), y] += torch.rand(n, generator=g) * 2.5  # some right, some wrong
    return logits, y


def class_counts(logits, y, k=10):
    """What the core's class statistics hold for the epoch: correct and seen counts per class."""
    correct = torch.zeros(k).index_add_(0, y, (logits.argmax(1) == y).float())
    return correct, torch.bincount(y, minlength=k).float()


def test_class_accuracy_is_the_codes_m_cw_robust_over_n():
    logits, y = imbalanced_epoch()
    log = AuthorsCWLog()
    for i in range(0, len(y), 64):  # the code's batches
        log.update(logits[i : i + 64], y[i : i + 64])
    mine = code_class_acc(*class_counts(logits, y))
    assert mine.tolist() == pytest.approx(log.result().tolist(), abs=1e-6)
    correct, seen = class_counts(logits, y)
    assert not torch.allclose(mine, correct / seen, atol=1e-3)  # per-class accuracy differs on unequal classes


@pytest.mark.parametrize("lambda_1", [0.5, 0.3])
def test_ccm_class_eps_is_the_codes(lambda_1):
    logits, y = imbalanced_epoch(1)
    acc = code_class_acc(*class_counts(logits, y))
    eps = 8 / 255
    theirs = authors_class_eps(acc, eps, lambda_1, epoch=12, begin=10)
    assert ccm_class_eps(acc, eps, lambda_1).tolist() == pytest.approx(theirs.tolist(), rel=1e-6)
    batch = y[:32]
    assert ccm_class_eps(acc, eps, lambda_1)[batch].tolist() == pytest.approx(theirs[batch].tolist(), rel=1e-6)


@pytest.mark.parametrize("beta, lambda_2", [(6.0, 0.5), (3.0, 0.2)])
def test_ccr_class_beta_is_the_codes(beta, lambda_2):
    logits, y = imbalanced_epoch(2)
    acc = code_class_acc(*class_counts(logits, y))
    theirs = authors_class_beta(acc, beta, lambda_2, epoch=10, begin=10)
    s, w = trades_terms(ccr_strength(acc, beta, lambda_2))
    assert (s * w).tolist() == pytest.approx(theirs.tolist(), rel=1e-6)  # beta' = s / (1 + s)
    assert w.tolist() == pytest.approx((1 - theirs).tolist(), rel=1e-5)  # 1 - beta'
    before = authors_class_beta(acc, beta, lambda_2, epoch=9, begin=10)  # before begin: beta / (1 + beta)
    s0, w0 = trades_terms(torch.full((10,), beta))
    assert (s0 * w0).tolist() == pytest.approx(before.tolist(), rel=1e-6)


def test_contract_form_of_the_codes_trades_loss_on_fixed_logits():
    """mean(w CE) + mean(beta_b w KL) with (beta_b, w) = trades_terms(s) is attack.py's trades_loss."""
    torch.manual_seed(0)
    model = nn.Linear(6, 10)
    x, x_adv = torch.rand(16, 6), torch.rand(16, 6)
    y = torch.randint(0, 10, (16,))
    acc = torch.rand(10)
    s = ccr_strength(acc, 6.0, 0.5)
    theirs = authors_trades_loss(model, x, x_adv, y, s / (1 + s))
    nat, adv = model(x), model(x_adv)
    ce = F.cross_entropy(nat, y, reduction="none")
    kl = (F.softmax(nat, 1) * (F.log_softmax(nat, 1) - F.log_softmax(adv, 1))).sum(1)
    beta_b, w = trades_terms(s[y])
    assert ((w * ce).mean() + (beta_b * w * kl).mean()).item() == pytest.approx(theirs.item(), rel=1e-5)


def test_fawa_decisions_and_average_are_the_codes():
    """A run of worst-class accuracies below, at and above the threshold: the averaged weights after each epoch."""
    torch.manual_seed(0)
    model, theirs, mine = nn.Linear(4, 3), nn.Linear(4, 3), None
    mine = copy.deepcopy(theirs)
    seat_init, started = False, False
    for r_min in [0.1, 0.23, 0.24, 0.3, 0.2, 0.5, 0.6]:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # an epoch of training
        seat_init = authors_fawa(theirs, model, r_min, 0.24, 0.88, seat_init)
        d, started = fawa_decay(r_min, 0.24, started, 0.88)
        if d is not None:  # the core's average: avg = d * avg + (1 - d) * w
            with torch.no_grad():
                for a, w in zip(mine.parameters(), model.parameters()):
                    a.mul_(d).add_((1 - d) * w)
        for a, b in zip(mine.parameters(), theirs.parameters()):
            assert torch.allclose(a, b, atol=1e-6), r_min
    assert started and seat_init
    assert fawa_decay(None, 0.24, True, 0.88) == (None, True)  # no evaluation this epoch: no update


# -- the plugin in a run -----------------------------------------------------------------------------------------


def test_trades_beta_default_is_advplugs():
    from advplug.objectives import TRADES

    assert TRADES.Options().beta == TRADES_BETA


def test_begin_default_is_the_codes_fraction_of_the_run():
    assert [begin_default(e) for e in (1, 2, 20, 30, 70, 120, 200)] == [1, 1, 1, 2, 4, 6, 10]


def trainer(tmp_path, objective="trades", plugins=("cfa",), options=None, **cfg):
    opts = {"cfa-begin": "1", **(options or {})}
    kw = dict(plugins=tuple(plugins), objective=objective, plugin_options=opts, steps=3, batch_size=16, model="fc1")
    kw.update(cfg)
    return Trainer(tiny_config(str(tmp_path / "run"), **kw), data=digits_subset(96, 32), log=lambda s: None)


def finished_epoch(tr, seed=0):
    """The core's class statistics as after an epoch with unequal classes; returns the code's train_robust."""
    logits, y = imbalanced_epoch(seed)
    tr.class_stats.add(y, logits.argmax(1) == y)
    tr.class_stats.end_epoch(0)
    log = AuthorsCWLog()
    log.update(logits, y)
    return log.result()


def one_step(tr, epoch, n=32):
    x, y = tr.data.train[0][:n], tr.data.train[1][:n]
    before = copy.deepcopy(tr.model).train()
    torch.manual_seed(1)
    loss, ctx, w = tr.step(x, y, torch.arange(n), epoch=epoch, global_step=1)
    return before, x, y, loss, ctx, w


def linf(a, b):
    return (a - b).flatten(1).abs().amax(1)


def test_trades_run_loss_and_budget_are_the_codes_cw_trades_loss(tmp_path):
    """From --cfa-begin: the KL attack within each class's eps (cw_trades_loss), and the run's loss equal to
    trades_loss on the same adversarial batch with train.py's class_beta."""
    tr = trainer(tmp_path)
    robust = finished_epoch(tr)
    before, x, y, loss, ctx, w = one_step(tr, epoch=1)
    eps = tr.cfg.eps
    class_eps = authors_class_eps(robust, eps, 0.5, epoch=1, begin=1)
    assert ctx.budget.eps.tolist() == pytest.approx(class_eps[y].tolist(), rel=1e-6)
    assert (linf(ctx.variants[0].x, x) <= class_eps[y] + 1e-6).all()
    assert (linf(ctx.variants[0].x, x) > eps * 0.5 + 1e-3).any()  # some class's ball is larger than lambda_1 eps
    class_beta = authors_class_beta(robust, TRADES_BETA, 0.5, epoch=1, begin=1)
    theirs = authors_trades_loss(before, x, ctx.variants[0].x, y, class_beta)
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_trades_before_begin_is_the_codes_scaled_trades(tmp_path):
    tr = trainer(tmp_path, options={"trades-beta": "3"})
    assert tr.enabled.plugin("cfa").beta == 3.0  # the run's --trades-beta
    before, x, y, loss, ctx, w = one_step(tr, epoch=0)  # no statistics yet: the run's eps, beta / (1 + beta)
    assert ctx.budget.eps is None and ctx.budget.beta is None
    theirs = authors_trades_loss(before, x, ctx.variants[0].x, y, authors_class_beta(None, 3.0, 0.5, 0, 1))
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_ccr_off_keeps_the_codes_scale_and_ccm_off_the_runs_eps(tmp_path):
    tr = trainer(tmp_path, options={"cfa-ccr": "false", "cfa-ccm": "false"})
    robust = finished_epoch(tr)
    before, x, y, loss, ctx, w = one_step(tr, epoch=1)
    assert ctx.budget.eps is None and ctx.budget.beta is None
    class_beta = authors_class_beta(robust, TRADES_BETA, 0.5, epoch=1, begin=1, ccr=False)
    theirs = authors_trades_loss(before, x, ctx.variants[0].x, y, class_beta)
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_at_is_the_codes_cw_pgd_loss_and_ignores_ccr(tmp_path):
    lines = []
    tr = trainer(tmp_path, objective="at")
    robust = finished_epoch(tr)
    before, x, y, loss, ctx, w = one_step(tr, epoch=1)
    class_eps = authors_class_eps(robust, tr.cfg.eps, 0.5, epoch=1, begin=1)
    assert w is None and ctx.budget.beta is None
    assert ctx.budget.eps.tolist() == pytest.approx(class_eps[y].tolist(), rel=1e-6)
    assert (linf(ctx.variants[0].x, x) <= class_eps[y] + 1e-6).all()
    assert loss.item() == pytest.approx(F.cross_entropy(before(ctx.variants[0].x), y).item(), rel=1e-5)
    d = enable(["cfa"], "at").declarations["cfa"]
    assert d.sets == frozenset({"eps"}) and d.weights is None
    tr2 = Trainer(
        tiny_config(str(tmp_path / "r2"), plugins=("cfa",), model="fc1", steps=2),
        data=digits_subset(64, 16),
        log=lines.append,
    )
    tr2.close()
    assert any("CCR is defined for TRADES only, off under --objective at" in s for s in lines)


def test_fat_attack_takes_the_class_budget(tmp_path):
    tr = trainer(tmp_path, objective="at", plugins=("cfa", "fat"), options={"fat-tau": "3", "fat-dynamic": "false"})
    robust = finished_epoch(tr)
    before, x, y, loss, ctx, w = one_step(tr, epoch=1)
    class_eps = authors_class_eps(robust, tr.cfg.eps, 0.5, epoch=1, begin=1)
    assert [v.name for v in ctx.variants] == ["fat"]
    assert (linf(ctx.variants[0].x, x) <= class_eps[y] + 1e-6).all()
    assert (linf(ctx.variants[0].x, x) > 0.5 * tr.cfg.eps + 1e-3).any()


def test_fawa_in_a_run_is_the_codes_average(tmp_path):
    """Three epochs, the held-out worst-class accuracies of the run against train.py's FAWA block on the same models."""
    tr = trainer(tmp_path, options={"cfa-threshold": "0.0"}, epochs=3, milestones=(2,), selection="validation")
    theirs = copy.deepcopy(tr.model)
    seat_init = False
    for epoch in range(3):
        tr._epoch(epoch)
        rec = tr.progress.records[-1]
        seat_init = authors_fawa(theirs, tr.model, rec["val_pgd_worst_class_acc"], 0.0, 0.88, seat_init)
        assert rec["cfa"]["fawa"] == ("copy" if epoch == 0 else "average")
        assert "ema_val_pgd_acc" in rec
        for k, v in theirs.state_dict().items():
            assert torch.allclose(tr.runtime.ema.model.state_dict()[k], v, atol=1e-6), (epoch, k)
    tr.close()


def test_fawa_below_the_threshold_never_averages(tmp_path):
    tr = trainer(tmp_path, options={"cfa-threshold": "1.0"})  # --selection test: FAWA reads the test samples
    init = copy.deepcopy(tr.runtime.ema.model.state_dict())
    tr._epoch(0)
    rec = tr.progress.records[-1]
    assert rec["test_pgd_worst_class_acc"] < 1.0 and rec["cfa"]["fawa"] == "skip" and "ema_test_pgd_acc" not in rec
    assert all(torch.equal(init[k], v) for k, v in tr.runtime.ema.model.state_dict().items())
    tr.close()


def test_declarations_and_the_averaged_slot():
    d = enable(["cfa"], "trades").declarations["cfa"]
    assert d.sets == frozenset({"eps", "beta"}) and d.weights == "global" and d.natural_weights and d.own_scale
    assert d.provides == frozenset({"averaging"})
    off = enable(["cfa"], "trades", {"cfa-fawa": "false", "cfa-ccm": "false"})
    assert off.declarations["cfa"].provides == frozenset() and off.declarations["cfa"].sets == frozenset({"beta"})
    assert not off.pm.hook.average_weights.get_hookimpls()  # --cfa-fawa false: no averaging hook, --ema allowed
    assert enable(["cfa"], "mart").declarations["cfa"].sets == frozenset({"eps"})


def test_fawa_state_is_checkpointed():
    a = CFA(CFA.Options())
    a.fawa_started = True
    b = CFA(CFA.Options())
    b.load_state_dict(a.state_dict())
    assert b.average_weights(epoch=3, metrics={"val_pgd_worst_class_acc": 0.5}) == 0.88  # averages, no second copy


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(OptionError, match="--cfa-begin 2: CCM and CCR would never start in a run of 2 epochs"):
        trainer(tmp_path, options={"cfa-begin": "2"})
    trainer(tmp_path / "off", options={"cfa-begin": "2", "cfa-ccm": "false", "cfa-ccr": "false"}).close()
    with pytest.raises(OptionError, match="--cfa-begin: must be >= 1"):
        enable(["cfa"], "trades", {"cfa-begin": "0"})
    with pytest.raises(OptionError, match="--ema"):
        trainer(tmp_path / "ema", ema=0.99)
    with pytest.raises(PluginError, match="both set eps"):
        enable(["cfa", "dafa"], "trades")


@pytest.mark.parametrize(
    "objective, plugins", [("trades", ("cfa",)), ("at", ("cfa",)), ("at", ("cfa", "fat")), ("trades", ("cfa", "fat"))]
)
def test_two_epochs_on_digits(tmp_path, objective, plugins):
    tr = trainer(tmp_path, objective, plugins, {"cfa-threshold": "0.0"}, selection="validation", batch_size=32)
    tr.fit()
    rows = tr.progress.records
    assert rows[0]["cfa"]["fawa"] == "copy" and "eps_min" not in rows[0]["cfa"]
    assert 0.5 * tr.cfg.eps <= rows[1]["cfa"]["eps_min"] <= rows[1]["cfa"]["eps_max"]  # (lambda_1 + t_y) eps, t_y >= 0
    assert ("beta_min" in rows[1]["cfa"]) == (objective == "trades")
    assert (tmp_path / "run" / "best-ema.pt").exists()


def test_cli_refuses_a_begin_past_the_run_in_one_line(tmp_path):
    from click.testing import CliRunner

    from advplug.tools.cli import cli

    args = ["train", "--plugin", "cfa", "--epochs", "2", "--cfa-begin", "2", "--model", "fc1", "--out", str(tmp_path)]
    res = CliRunner().invoke(cli, args)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: --cfa-begin 2: CCM and CCR would never start in a run of 2 epochs")
