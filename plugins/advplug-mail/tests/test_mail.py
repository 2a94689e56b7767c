"""MAIL: Eq. 5-8 against hand computations, normalisation, burn-in, presets, composition."""

import json
import math

import pytest
import torch
from advplug_mail import MAIL, mail_weights, probabilistic_margin

from advplug import FeatureTap, OptionError, StepContext, TrainContext, Variant, Weights
from advplug.plugins import enable
from advplug.testing import TableModel, digits_subset, tiny_config
from advplug.weights import combine_weights


def test_probabilistic_margin_by_hand():
    probs = torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    y = torch.tensor([0, 0, 2])
    # 0.6 - 0.4; 0.2 - 0.5; 0.8 - 0.1 (the paper's examples: PM > 0 right side, < 0 wrong side)
    assert probabilistic_margin(probs, y).tolist() == pytest.approx([0.2, -0.3, 0.7])


def test_weight_by_hand_and_monotone():
    pm = torch.tensor([-0.5, 0.0, 0.5])
    w = mail_weights(pm, gamma=10.0, beta=-0.5)
    by_hand = [1 / (1 + math.exp(10 * (p + 0.5))) for p in (-0.5, 0.0, 0.5)]  # sigmoid(-gamma (PM - beta))
    assert w.tolist() == pytest.approx(by_hand, rel=1e-5)
    assert w[0] > w[1] > w[2]  # smaller margin -> larger weight


def ctx_for(nat_logits, adv_logits, y, epoch=5, stats=None):
    b = len(y)
    model = TableModel(torch.cat([nat_logits, adv_logits]))
    ctx = StepContext(
        model=model,
        x=torch.arange(b)[:, None].float(),
        y=y,
        index=torch.arange(b),
        epoch=epoch,
        step=0,
        num_classes=nat_logits.shape[1],
        config=None,
        lr=0.1,
        tap=FeatureTap(model),
    )
    ctx.variants = [Variant("pgd", torch.arange(b, 2 * b)[:, None].float(), stats or {})]
    return ctx


def started(objective="at", epochs=10, milestones=(4,), **opts):
    m = MAIL(MAIL.Options(**opts))
    cfg = tiny_config("/tmp/unused")
    m.on_train_start(
        TrainContext(
            model=None,
            config=cfg,
            num_train=100,
            num_classes=3,
            input_shape=(1,),
            device=torch.device("cpu"),
            epochs=epochs,
            milestones=milestones,
            objective=objective,
            make_attack=None,
            log=lambda s: None,
        )
    )
    return m


LOGITS_NAT = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]]))
LOGITS_ADV = torch.log(torch.tensor([[0.4, 0.5, 0.1], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1]]))
Y = torch.tensor([0, 2, 1])


@pytest.mark.parametrize(
    "margin,pm",
    [
        ("adv", [0.4 - 0.5, 0.6 - 0.2, 0.6 - 0.3]),
        ("nat", [0.7 - 0.2, 0.4 - 0.3, 0.8 - 0.1]),
        ("dif", [0.7 - 0.45, 0.4 - 0.3, 0.8 - 0.5]),
    ],
)
def test_batch_normalised_weights_by_hand(margin, pm):
    m = started(margin=margin)
    ctx = ctx_for(LOGITS_NAT, LOGITS_ADV, Y, stats={"p_true_lps": torch.tensor([0.45, 0.3, 0.5])})
    w = m.compute_weights(ctx, ctx.variants).adv  # [B]: one global weight per instance
    unn = [1 / (1 + math.exp(10 * (p + 0.5))) for p in pm]
    ref = [3 * u / sum(unn) for u in unn]  # omega_i = M w_i / sum_j w_j
    assert w.tolist() == pytest.approx(ref, rel=1e-4)


def test_fixed_normalisation_is_the_authors_times_three():
    m = started(normalise="fixed", gamma=2.0, beta=0.0)
    ctx = ctx_for(LOGITS_NAT, LOGITS_ADV, Y)
    w = m.compute_weights(ctx, ctx.variants).adv
    pm = torch.tensor([-0.1, 0.4, 0.3])
    assert torch.allclose(w, 3 * torch.sigmoid(-2.0 * pm), atol=1e-5)


def test_burn_in_abstains_until_the_first_lr_drop():
    m = started(milestones=(4, 7))
    assert m.options.burn_in == 4
    assert m.compute_weights(ctx_for(LOGITS_NAT, LOGITS_ADV, Y, epoch=3), []) is None
    assert (
        m.compute_weights(ctx_for(LOGITS_NAT, LOGITS_ADV, Y, epoch=4), ctx_for(LOGITS_NAT, LOGITS_ADV, Y).variants)
        is not None
    )


def test_presets_per_objective_and_overrides():
    assert (started("at").options.gamma, started("at").options.beta) == (10.0, -0.5)
    assert (started("trades").options.gamma, started("trades").options.beta) == (2.0, 0.0)
    assert started("mart", gamma=5.0).options.gamma == 5.0


def test_bad_input():
    with pytest.raises(OptionError, match="not before the last epoch"):
        started(burn_in=10)
    with pytest.raises(OptionError, match="--mail-gamma: must be >= 0.0"):
        enable(["mail"], "at", {"mail-gamma": "-1"})
    with pytest.raises(OptionError, match="--mail-margin: 'lps' is not one of adv, nat, dif"):
        enable(["mail"], "at", {"mail-margin": "lps"})


def test_combined_with_another_plugin_weights_multiply_at_the_others_scale():
    m = started()
    ctx = ctx_for(LOGITS_NAT, LOGITS_ADV, Y)
    wm = m.compute_weights(ctx, ctx.variants)
    other = Weights(adv=torch.tensor([2.0, 1.0, 1.0]))
    out = combine_weights([wm, other], 1, 3)
    prod = wm.adv * torch.tensor([2.0, 1.0, 1.0])
    assert torch.allclose(wm.adv.mean(), torch.tensor(1.0))
    assert torch.allclose(out.adv[0], prod / prod.mean() * (4 / 3))  # MAIL's mean 1 times the other's 4/3


def test_end_to_end_with_trades_and_resume(tmp_path):
    from advplug.testing import run_and_resume, same_tensors

    opts = {"mail-burn-in": 1, "mail-dump": "true"}
    full, part = run_and_resume(
        tmp_path, digits_subset(), plugins=("mail",), objective="trades", milestones=(2,), plugin_options=opts
    )
    assert same_tensors(full["model"], part["model"])
    cfgj = json.loads((tmp_path / "part" / "config.json").read_text())
    assert cfgj["resolved_plugin_options"]["mail"]["gamma"] == 2.0  # TRADES preset recorded
    recs = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert "weights" not in recs[0] and "weights" in recs[1]  # burn-in, then reweighting
    import numpy as np

    d = np.load(tmp_path / "full" / "dumps" / "mail-epoch002.npz")
    assert set(d.files) == {"index", "pm", "weight"} and len(d["index"]) == 256


def test_pm_dif_reads_p_y_at_the_least_misclassifying_pgd_step():
    """Eq. 7's x^(t_i): the attack's record is p_y at the first iterate that is misclassified, not
    at the last one; checked against a replayed PGD loop."""
    from torch import nn

    from advplug.attacks import make_attack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))
    torch.manual_seed(3)
    atk = make_attack("pgd", model, eps=0.5, alpha=0.1, steps=6)
    atk(x, y)
    torch.manual_seed(3)
    adv = torch.clamp(x + torch.empty_like(x).uniform_(-0.5, 0.5), 0, 1)
    first, last = torch.full((64,), float("nan")), None
    for _ in range(6):
        adv.requires_grad_(True)
        z = model(adv)
        p = torch.softmax(z.detach(), 1).gather(1, y[:, None]).squeeze(1)
        wrong = z.argmax(1) != y
        first = torch.where(first.isnan() & wrong, p, first)
        last = p
        g = torch.autograd.grad(nn.functional.cross_entropy(z, y), adv)[0]
        adv = torch.clamp(x + torch.clamp(adv.detach() + 0.1 * g.sign() - x, -0.5, 0.5), 0, 1)
    ref = torch.where(first.isnan(), last, first)
    assert torch.allclose(atk.p_true_lps, ref, atol=1e-6)
    assert not torch.allclose(ref, last)  # the test tells the two apart


def test_mail_trades_weights_the_kl_term_as_the_authors_code():
    """MAIL-TRADES against ``mail_loss.py`` (method 'trades'), with the code's fixed 3 w."""
    import torch.nn.functional as F
    from torch import nn

    from advplug.objectives import TRADES

    m = started("trades", normalise="fixed")
    ctx = ctx_for(LOGITS_NAT, LOGITS_ADV, Y)
    w = m.compute_weights(ctx, ctx.variants)
    assert w.nat is None
    loss = TRADES(TRADES.Options(beta=6.0)).combine_loss(ctx, ctx.variants, combine_weights([w], 1, 3))
    # the code: PM = p_2nd - p_GT, weight = sigmoid((PM + bias) * slope) * 3, bias 0, slope 2
    probs = LOGITS_ADV.softmax(1)
    p_gt = probs.gather(1, Y[:, None]).squeeze(1)
    p_2nd = probs.scatter(1, Y[:, None], -1.0).max(1).values
    code_w = torch.sigmoid((p_2nd - p_gt + 0.0) * 2.0) * 3
    kl = nn.KLDivLoss(reduction="none")(F.log_softmax(LOGITS_ADV, 1), F.softmax(LOGITS_NAT, 1)).sum(1)
    ref = F.cross_entropy(LOGITS_NAT, Y) + 6.0 * (1.0 / 3) * torch.sum(kl * code_w)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_mail_mart_default_is_the_authors_code():
    """MAIL-MART against ``mail_loss.py`` (method 'mart'): only the BCE term is weighted."""
    import torch.nn.functional as F
    from torch import nn

    from advplug.objectives import MART

    m = started("mart", normalise="fixed")
    ctx = ctx_for(LOGITS_NAT, LOGITS_ADV, Y)
    w = combine_weights([m.compute_weights(ctx, ctx.variants)], 1, 3)
    opts = enable([], "mart", {}).plugin("mart").options  # the objective's defaults
    loss = MART(opts).combine_loss(ctx, ctx.variants, w)
    probs = LOGITS_ADV.softmax(1)
    p_gt = probs.gather(1, Y[:, None]).squeeze(1)
    p_2nd = probs.scatter(1, Y[:, None], -1.0).max(1).values
    code_w = torch.sigmoid((p_2nd - p_gt) * 2.0) * 3
    tmp1 = torch.argsort(probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == Y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(LOGITS_ADV, Y, reduction="none") + F.nll_loss(
        torch.log(1.0001 - probs + 1e-12), new_y, reduction="none"
    )
    nat_probs = F.softmax(LOGITS_NAT, 1)
    true_probs = nat_probs.gather(1, Y[:, None]).squeeze(1)
    robust = (1.0 / 3) * torch.sum(
        nn.KLDivLoss(reduction="none")(torch.log(probs + 1e-12), nat_probs).sum(1) * (1.0000001 - true_probs)
    )
    ref = (loss_adv * code_w).mean() + 6.0 * robust
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_mail_starts_the_attack_as_its_code():
    assert MAIL(MAIL.Options()).attack_start("at") == "normal"
