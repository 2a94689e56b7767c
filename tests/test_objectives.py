"""Each built-in objective against an independent computation (the authors' formulation)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advplug import Weights
from advplug.context import FeatureTap, StepContext, Variant
from advplug.objectives import MART, TRADES, AdversarialCE


class Table(nn.Module):
    """Returns fixed logits per input row: x holds an index into a logits table."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        return self.table[x[:, 0].long()]


def make_ctx(nat, adv, y):
    table = torch.cat([nat, adv])
    model = Table(table)
    b = nat.shape[0]
    ctx = StepContext(model=model, x=torch.arange(b)[:, None].float(), y=y, index=torch.arange(b), epoch=0, step=0,
                      num_classes=nat.shape[1], config=None, lr=0.1, tap=FeatureTap(model))
    ctx.variants = [Variant("pgd", torch.arange(b, 2 * b)[:, None].float())]
    return ctx


torch.manual_seed(0)
NAT, ADV, Y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
W = torch.tensor([0.5, 1.0, 2.0, 0.5])


def test_at_is_weighted_mean_cross_entropy_by_hand():
    ctx = make_ctx(NAT, ADV, Y)
    loss = AdversarialCE().combine_loss(ctx, ctx.variants, Weights(adv=W))
    by_hand = 0.0
    for i in range(4):
        z = ADV[i].tolist()
        lse = math.log(sum(math.exp(v) for v in z))
        by_hand += W[i].item() * (lse - z[Y[i]])
    assert loss.item() == pytest.approx(by_hand / 4, rel=1e-5)


def test_trades_matches_the_authors_formulation():
    ctx = make_ctx(NAT, ADV, Y)
    loss = TRADES(TRADES.Options(beta=6.0)).combine_loss(ctx, ctx.variants, None)
    kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(ADV, 1), F.softmax(NAT, 1)) / 4  # TRADES code
    ref = F.cross_entropy(NAT, Y) + 6.0 * kl
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_trades_weights_go_to_ce_and_kl():
    ctx = make_ctx(NAT, ADV, Y)
    wn = torch.tensor([1.0, 2.0, 1.0, 0.0])
    loss = TRADES(TRADES.Options(beta=2.0)).combine_loss(ctx, ctx.variants, Weights(adv=W, nat=wn))
    kl_i = nn.KLDivLoss(reduction="none")(F.log_softmax(ADV, 1), F.softmax(NAT, 1)).sum(1)
    ref = (wn * F.cross_entropy(NAT, Y, reduction="none")).mean() + 2.0 * (W * kl_i).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_mart_matches_the_authors_formulation():
    ctx = make_ctx(NAT, ADV, Y)
    loss = MART(MART.Options(beta=6.0)).combine_loss(ctx, ctx.variants, None)
    # MART's official train loop (Wang et al., 2020), written out again here
    adv_probs = F.softmax(ADV, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == Y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(ADV, Y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(NAT, dim=1)
    true_probs = torch.gather(nat_probs, 1, Y.unsqueeze(1).long()).squeeze()
    loss_robust = (1.0 / 4) * torch.sum(
        torch.sum(nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    assert loss.item() == pytest.approx((loss_adv + 6.0 * loss_robust).item(), rel=1e-5)


def test_at_rejects_natural_weights():
    ctx = make_ctx(NAT, ADV, Y)
    with pytest.raises(Exception, match="no natural term"):
        AdversarialCE().combine_loss(ctx, ctx.variants, Weights(nat=W))


def test_logits_are_computed_once_per_view():
    ctx = make_ctx(NAT, ADV, Y)
    TRADES(TRADES.Options()).combine_loss(ctx, ctx.variants, None)
    ctx.probs("natural"), ctx.logits(ctx.variants[0]), ctx.probs("pgd")
    assert ctx.forward_count == 2


def mail_mart_reference(nat, adv, y, w, beta):
    """MAIL's ``mail_loss.py`` (method 'mart'), written out again: only the BCE term is weighted."""
    b = len(y)
    adv_probs = F.softmax(adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(adv, y, reduction="none") + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y,
                                                                       reduction="none")
    nat_probs = F.softmax(nat, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl = torch.sum(nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs), dim=1)
    return (loss_adv * w).mean(), (1.0 / b) * torch.sum(kl * (1.0000001 - true_probs)), kl * (1.0000001 - true_probs)


def test_weighted_mart_follows_mails_code_by_default_and_weights_both_terms_on_request():
    ctx = make_ctx(NAT, ADV, Y)
    bce_w, reg, kl_i = mail_mart_reference(NAT, ADV, Y, W, 6.0)
    loss = MART(MART.Options(beta=6.0)).combine_loss(ctx, ctx.variants, Weights(adv=W))
    assert loss.item() == pytest.approx((bce_w + 6.0 * reg).item(), rel=1e-5)
    both = MART(MART.Options(beta=6.0, weighted="both")).combine_loss(make_ctx(NAT, ADV, Y), ctx.variants, Weights(adv=W))
    assert both.item() == pytest.approx((bce_w + 6.0 * (W * kl_i).mean()).item(), rel=1e-5)
    assert abs(both.item() - loss.item()) > 1e-3  # the two readings differ on this batch
