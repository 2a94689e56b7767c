"""CFA's loss scale: ``--cfa-loss-scale code`` (default) is the authors' ``(CE + beta KL) / (1 + beta)``,
``trades`` the same class-wise calibration times ``(1 + beta)``, so that without CCR's class strengths it is
advplug's plain ``--objective trades`` loss to the bit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from advplug_cfa import CFA

from advplug import OptionError
from advplug.engine.trainer import Trainer
from advplug.plugins import enable
from advplug.testing import digits_subset, tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(tmp_path, name, plugins=("cfa",), options=None):
    opts = {"cfa-begin": "1", **(options or {})} if plugins else dict(options or {})
    opts = {k: v for k, v in opts.items() if plugins or not k.startswith("cfa-")}
    cfg = tiny_config(
        str(tmp_path / name), plugins=tuple(plugins), objective="trades", plugin_options=opts, steps=3, model="fc1"
    )
    return Trainer(cfg, data=digits_subset(96, 32), log=lambda s: None)


def finish_an_epoch(tr):
    """Class statistics of a finished epoch with unequal per-class accuracies (so CCR's strengths differ)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(20)
    hit = torch.rand(200, generator=g) < torch.linspace(0.1, 0.9, 10).repeat(20)
    tr.class_stats.add(y, hit)
    tr.class_stats.end_epoch(0)
    return 10 * torch.zeros(10).index_add_(0, y, hit.float()) / 200  # train.py's CW_log: m * cw_robust / N


def step(tr, epoch):
    x, y = tr.data.train[0][:32], tr.data.train[1][:32]
    before = copy.deepcopy(tr.model).train()
    torch.manual_seed(1)
    loss, ctx, _ = tr.step(x, y, torch.arange(32), epoch=epoch, global_step=1)
    return loss, ctx, before, x, y


def zhang_trades(model, x, x_adv, y, beta):
    """Zhang et al.'s TRADES loss, CE(nat) + beta * batchmean KL(p(x) || p(x')), written out by hand."""
    nat, adv = model(x), model(x_adv)
    kl = (F.softmax(nat, 1) * (F.log_softmax(nat, 1) - F.log_softmax(adv, 1))).sum(1)
    return F.cross_entropy(nat, y) + beta * kl.mean()


def code_trades(model, x, x_adv, y, class_beta):
    """attack.py's trades_loss with train.py's class beta'_y: sum_b ((1 - beta'_b) CE_b + beta'_b KL_b) / B."""
    nat, adv = model(x), model(x_adv)
    ce = F.cross_entropy(nat, y, reduction="none")
    kl = (F.softmax(nat, 1) * (F.log_softmax(nat, 1) - F.log_softmax(adv, 1))).sum(1)
    b = class_beta[y]
    return ((1 - b) * ce + b * kl).mean()


@pytest.mark.parametrize(
    "options, epoch",
    [
        ({}, 0),  # before --cfa-begin: no class statistics yet
        ({"cfa-ccr": "false", "cfa-ccm": "false"}, 1),  # CCR off, after --cfa-begin
        ({"cfa-ccr": "false", "cfa-ccm": "false", "trades-beta": "3"}, 1),
    ],
)
def test_trades_scale_without_ccr_is_plain_trades_to_the_bit(tmp_path, options, epoch):
    beta = float(options.get("trades-beta", 6.0))
    mine = make(tmp_path, "cfa", options={**options, "cfa-loss-scale": "trades"})
    plain = make(tmp_path, "plain", plugins=(), options=options)
    for tr in (mine, plain):
        finish_an_epoch(tr)
    got, ctx, before, x, y = step(mine, epoch)
    want, ctx_plain, _, _, _ = step(plain, epoch)
    assert torch.equal(ctx.variants[0].x, ctx_plain.variants[0].x)  # the same attack
    assert torch.equal(got, want)
    assert got.item() == pytest.approx(zhang_trades(before, x, ctx.variants[0].x, y, beta).item(), rel=1e-5)
    code = make(tmp_path, "code", options=options)  # the default: 1 / (1 + beta) of it
    finish_an_epoch(code)
    assert step(code, epoch)[0].item() == pytest.approx(want.item() / (1 + beta), rel=1e-6)


@pytest.mark.parametrize("beta", [6.0, 3.0])
def test_trades_scale_with_ccr_is_one_plus_beta_times_the_codes(tmp_path, beta):
    opts = {"trades-beta": str(beta)}
    code, mine = (
        make(tmp_path, "code", options=opts),
        make(tmp_path, "mine", options={**opts, "cfa-loss-scale": "trades"}),
    )
    t = finish_an_epoch(code)
    finish_an_epoch(mine)
    loss_code, ctx_code, _, _, _ = step(code, 1)
    loss, ctx, before, x, y = step(mine, 1)
    assert torch.equal(ctx.variants[0].x, ctx_code.variants[0].x)  # CCM's budgets do not depend on the scale
    s = (0.5 + t) * beta  # train.py's CCR: beta'_y = s_y / (1 + s_y)
    theirs = code_trades(before, x, ctx.variants[0].x, y, s / (1 + s))
    assert loss_code.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert loss.item() == pytest.approx((1 + beta) * theirs.item(), rel=1e-5)
    assert loss.item() == pytest.approx((1 + beta) * loss_code.item(), rel=1e-6)


def test_the_default_is_the_codes_scale_and_other_values_are_refused():
    assert CFA.Options().loss_scale == "code"
    with pytest.raises(OptionError, match="--cfa-loss-scale: 'zhang' is not one of code, trades"):
        enable(["cfa"], "trades", {"cfa-loss-scale": "zhang"})


def test_the_header_says_which_scale(tmp_path):
    for scale, words in [("code", "scaled by 1 / (1 + beta)"), ("trades", "Zhang et al.'s scale")]:
        lines = []
        cfg = tiny_config(
            str(tmp_path / scale),
            plugins=("cfa",),
            objective="trades",
            model="fc1",
            plugin_options={"cfa-loss-scale": scale},
        )
        Trainer(cfg, data=digits_subset(64, 16), log=lines.append).close()
        assert any(words in s for s in lines), lines
