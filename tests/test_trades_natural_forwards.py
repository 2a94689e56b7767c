"""TRADES' natural forward: once (advplug's default) or twice as the authors' ``trades.py`` runs it
(``--trades-natural-forwards 2``: ``model(x_natural)`` for the CE, ``model(x_adv)``, ``model(x_natural)`` again for the
KL's target, all in train mode, so BatchNorm's running statistics are updated three times)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advplug import OptionError, Weights
from advplug.context import NATURAL, FeatureTap, StepContext, Variant
from advplug.objectives import TRADES
from advplug.plugins import enable
from advplug.weights import adv_matrix, nat_vector

BETA = 6.0


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 6, generator=g)
    return x, (x + 0.1 * torch.randn(16, 6, generator=g)).clamp(0, 1), torch.randint(0, 3, (16,), generator=g)


def ctx_for(model, x, x_adv, y):
    ctx = StepContext(
        model=model,
        x=x,
        y=y,
        index=torch.arange(len(y)),
        epoch=0,
        step=0,
        num_classes=3,
        config=None,
        lr=0.1,
        tap=FeatureTap(model),
    )
    ctx.variants = [Variant("tpgd", x_adv)]
    return ctx


def authors_trades_loss(model, x_natural, x_adv, y, beta):
    """The training part of ``trades.py`` (``trades_loss`` after the attack), written out again."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x_natural)) * criterion_kl(
        F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1)
    )
    return loss_natural + beta * loss_robust


def bn(model):
    m = model[1]
    return m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_two_natural_forwards_are_the_authors_computation():
    x, x_adv, y = batch()
    ours, theirs = net(), net()
    ctx = ctx_for(ours, x, x_adv, y)
    loss = TRADES(TRADES.Options(beta=BETA, natural_forwards=2)).combine_loss(ctx, ctx.variants, None)
    ref = authors_trades_loss(theirs, x, x_adv, y, BETA)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (mean, var, n), (mean_r, var_r, n_r) = bn(ours), bn(theirs)
    assert n == n_r == 3 and torch.equal(mean, mean_r) and torch.equal(var, var_r)  # nat, adv, nat: same order
    assert ctx.forward_count == 3
    loss.backward(), ref.backward()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads(ours), grads(theirs)))


def todays_trades_loss(ctx, variants, weights, beta):
    """advplug's TRADES loss as it was before the option (one natural forward), for the bit-for-bit check."""
    nat = ctx.logits(NATURAL)
    ce = F.cross_entropy(nat, ctx.y, reduction="none")
    from advplug.objectives import trades_kl

    kl = torch.stack([trades_kl(nat, ctx.logits(v)) for v in variants])
    w_adv = adv_matrix(weights, len(variants), ctx.batch_size, kl)
    return (nat_vector(weights, ctx.batch_size, ce) * ce).mean() + beta * (w_adv * kl).mean()


@pytest.mark.parametrize("weights", [None, Weights(adv=torch.linspace(0.5, 1.5, 16), nat=torch.linspace(2, 0, 16))])
def test_one_natural_forward_stays_todays_bit_for_bit(weights):
    x, x_adv, y = batch()
    ours, today = net(), net()
    ctx = ctx_for(ours, x, x_adv, y)
    loss = TRADES(TRADES.Options(beta=BETA)).combine_loss(ctx, ctx.variants, weights)
    ctx_t = ctx_for(today, x, x_adv, y)
    ref = todays_trades_loss(ctx_t, ctx_t.variants, weights, BETA)
    assert torch.equal(loss, ref) and ctx.forward_count == 2 and bn(ours)[2] == 2
    assert all(torch.equal(a, b) for a, b in zip(bn(ours)[:2], bn(today)[:2]))
    loss.backward(), ref.backward()
    assert all(torch.equal(a, b) for a, b in zip(grads(ours), grads(today)))


def test_two_forwards_keep_the_weights_and_the_loss_value():
    # the second forward is of the same batch in train mode (BatchNorm on batch statistics): same logits, so the
    # same loss for any weights; only the running statistics differ
    x, x_adv, y = batch()
    w = Weights(adv=torch.linspace(0.5, 1.5, 16), nat=torch.linspace(2, 0, 16))
    one, two = net(), net()
    c1, c2 = ctx_for(one, x, x_adv, y), ctx_for(two, x, x_adv, y)
    l1 = TRADES(TRADES.Options(natural_forwards=1)).combine_loss(c1, c1.variants, w)
    l2 = TRADES(TRADES.Options(natural_forwards=2)).combine_loss(c2, c2.variants, w)
    assert l2.item() == pytest.approx(l1.item(), rel=1e-6)
    assert not torch.equal(bn(one)[0], bn(two)[0])


def test_the_option_from_the_command_line():
    assert enable([], "trades", {}).plugin("trades").options.natural_forwards == 1
    assert enable([], "trades", {"trades-natural-forwards": "2"}).plugin("trades").options.natural_forwards == 2
    with pytest.raises(OptionError, match="--trades-natural-forwards: must be <= 2, got 3"):
        enable([], "trades", {"trades-natural-forwards": "3"})


@pytest.mark.parametrize("forwards, plugins", [(1, ()), (2, ()), (2, ("awp",))])
def test_a_training_step_updates_batchnorm_once_per_training_forward(tmp_path, forwards, plugins):
    # the KL attack runs in eval mode (--attack-bn eval, the authors' model.eval()): it leaves the running
    # statistics alone, so a step counts the training forwards only: natural once or twice, plus the adversarial;
    # AWP's proxy loss (the same TRADES loss, its own forwards) restores them
    from advplug.engine.trainer import Trainer
    from advplug.testing import digits_subset, tiny_config

    opts = {"trades-natural-forwards": str(forwards), **({"awp-warmup": "0"} if plugins else {})}
    cfg = tiny_config(
        str(tmp_path / "r"), objective="trades", model="small-cnn", steps=2, plugins=plugins, plugin_options=opts
    )
    lines = []
    t = Trainer(cfg, data=digits_subset(64, 16), log=lines.append)
    assert any("natural forward twice" in line for line in lines) == (forwards == 2)
    x, y = t.data.train
    counts = [m.num_batches_tracked for m in t.runtime.attack_model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = int(counts[0])
    _, ctx, _ = t.step(x[:16], y[:16], torch.arange(16), 0, 0)
    assert int(counts[0]) - before == forwards + 1 and ctx.forward_count == forwards + 1
