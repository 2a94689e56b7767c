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
    ctx = StepContext(
        model=model,
        x=torch.arange(b)[:, None].float(),
        y=y,
        index=torch.arange(b),
        epoch=0,
        step=0,
        num_classes=nat.shape[1],
        config=None,
        lr=0.1,
        tap=FeatureTap(model),
    )
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
        torch.sum(nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs), dim=1)
        * (1.0000001 - true_probs)
    )
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
    loss_adv = F.cross_entropy(adv, y, reduction="none") + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), new_y, reduction="none"
    )
    nat_probs = F.softmax(nat, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl = torch.sum(nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs), dim=1)
    return (loss_adv * w).mean(), (1.0 / b) * torch.sum(kl * (1.0000001 - true_probs)), kl * (1.0000001 - true_probs)


def test_weighted_mart_follows_mails_code_by_default_and_weights_both_terms_on_request():
    ctx = make_ctx(NAT, ADV, Y)
    bce_w, reg, kl_i = mail_mart_reference(NAT, ADV, Y, W, 6.0)
    loss = MART(MART.Options(beta=6.0)).combine_loss(ctx, ctx.variants, Weights(adv=W))
    assert loss.item() == pytest.approx((bce_w + 6.0 * reg).item(), rel=1e-5)
    both = MART(MART.Options(beta=6.0, weighted="both")).combine_loss(
        make_ctx(NAT, ADV, Y), ctx.variants, Weights(adv=W)
    )
    assert both.item() == pytest.approx((bce_w + 6.0 * (W * kl_i).mean()).item(), rel=1e-5)
    assert abs(both.item() - loss.item()) > 1e-3  # the two readings differ on this batch


# -- pure-Python transcriptions (no torch), float64 end to end -------------------------------------
# Written from the papers' definitions, not from the module: softmax by hand, the wrong class of
# MART's boosted term as "the most probable class other than y", KL as sum_k p_k log(p_k / q_k).
def _softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _ce(z, y):
    m = max(z)
    return m + math.log(sum(math.exp(v - m) for v in z)) - z[y]


def mart_by_hand(nat, adv, y, beta, w=None, weighted="bce"):
    """MART (Wang et al., 2020, Eq. 9; ``mart.py``'s constants 1.0001, 1e-12, 1.0000001), per sample."""
    b = len(y)
    w = w or [1.0] * b
    bce_sum = kl_sum = 0.0
    for i in range(b):
        q, p = _softmax(adv[i]), _softmax(nat[i])
        wrong = max((k for k in range(len(q)) if k != y[i]), key=lambda k: q[k])
        bce = _ce(adv[i], y[i]) - math.log(1.0001 - q[wrong] + 1e-12)
        kl = sum(p[k] * math.log(p[k]) - p[k] * math.log(q[k] + 1e-12) for k in range(len(p)) if p[k] > 0)
        kl *= 1.0000001 - p[y[i]]
        bce_sum += w[i] * bce
        kl_sum += (w[i] if weighted == "both" else 1.0) * kl
    return bce_sum / b + beta * kl_sum / b


def trades_by_hand(nat, adv, y, beta, w_adv=None, w_nat=None):
    b = len(y)
    w_adv, w_nat = w_adv or [1.0] * b, w_nat or [1.0] * b
    ce = sum(w_nat[i] * _ce(nat[i], y[i]) for i in range(b)) / b
    kl = 0.0
    for i in range(b):
        p, q = _softmax(nat[i]), _softmax(adv[i])
        kl += w_adv[i] * sum(p[k] * math.log(p[k] / q[k]) for k in range(len(p)))
    return ce + beta * kl / b


# Rows chosen so that every branch of MART's "most probable wrong class" is taken: the true class
# first, second and last on the adversarial view; a near-one-hot adversarial row (1 - p_{y'} close
# to 0, where the 1.0001 matters) and a tiny probability (where the 1e-12 matters in float64).
NAT64 = torch.tensor(
    [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-3.0, 1.0, 0.5, 2.5], [1.0, 1.0, -2.0, 0.5], [0.0, 4.0, 1.0, -1.0]],
    dtype=torch.float64,
)
ADV64 = torch.tensor(
    [
        [1.5, 0.2, -0.5, 0.1],
        [0.9, 0.3, -0.2, 2.0],
        [1.2, 0.4, -0.3, 0.8],
        [-30.0, 9.0, -1.0, -4.0],
        [-1.0, 0.5, 1.0, 0.0],
    ],
    dtype=torch.float64,
)
Y64 = torch.tensor([0, 0, 3, 0, 1])
W64 = torch.tensor([0.5, 1.5, 2.0, 0.25, 1.0], dtype=torch.float64)


def test_the_mart_rows_cover_every_wrong_class_case():
    rank_of_y = [sorted(range(4), key=lambda k: -ADV64[i, k].item()).index(Y64[i].item()) for i in range(5)]
    assert set(rank_of_y) >= {0, 1, 3}
    assert F.softmax(ADV64, 1)[3, 0].item() < 1e-15  # p_y(x') tiny: the 1e-12 of the log is visible in float64


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_mart_against_a_pure_python_transcription_in_float64(beta):
    ctx = make_ctx(NAT64, ADV64, Y64)
    loss = MART(MART.Options(beta=beta)).combine_loss(ctx, ctx.variants, None)
    ref = mart_by_hand(NAT64.tolist(), ADV64.tolist(), Y64.tolist(), beta)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("weighted", ["bce", "both"])
def test_weighted_mart_against_a_pure_python_transcription_in_float64(weighted):
    ctx = make_ctx(NAT64, ADV64, Y64)
    loss = MART(MART.Options(beta=6.0, weighted=weighted)).combine_loss(ctx, ctx.variants, Weights(adv=W64))
    ref = mart_by_hand(NAT64.tolist(), ADV64.tolist(), Y64.tolist(), 6.0, W64.tolist(), weighted)
    assert loss.item() == pytest.approx(ref, rel=1e-12)


def test_trades_against_a_pure_python_transcription_in_float64():
    ctx = make_ctx(NAT64, ADV64, Y64)
    wn = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    loss = TRADES(TRADES.Options(beta=3.0)).combine_loss(ctx, ctx.variants, Weights(adv=W64, nat=wn))
    ref = trades_by_hand(NAT64.tolist(), ADV64.tolist(), Y64.tolist(), 3.0, W64.tolist(), wn.tolist())
    assert loss.item() == pytest.approx(ref, rel=1e-12)


def test_at_averages_over_variants_and_samples():
    """Two adversarial variants: (1/(V B)) sum_v sum_b w_b CE(x'_vb)."""
    b = 4
    table = torch.cat([NAT, ADV, -ADV])
    ctx = make_ctx(NAT, ADV, Y)
    ctx.model.table = nn.Parameter(table)
    variants = [
        Variant("a", torch.arange(b, 2 * b)[:, None].float()),
        Variant("b", torch.arange(2 * b, 3 * b)[:, None].float()),
    ]
    loss = AdversarialCE().combine_loss(ctx, variants, Weights(adv=W))
    ref = sum(
        W[i].item() * (_ce(ADV[i].tolist(), Y[i].item()) + _ce((-ADV[i]).tolist(), Y[i].item())) for i in range(b)
    ) / (2 * b)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_mart_rejects_natural_weights():
    ctx = make_ctx(NAT, ADV, Y)
    with pytest.raises(Exception, match="'mart' has no natural term"):
        MART(MART.Options()).combine_loss(ctx, ctx.variants, Weights(nat=W))
    with pytest.raises(Exception, match="'at' has no natural term"):
        AdversarialCE().combine_loss(ctx, ctx.variants, Weights(nat=W))


def test_defaults_are_the_papers():
    """TRADES' beta = 6 (Zhang et al., CIFAR-10), MART's beta = 6 (Wang et al.), MART weights the BCE term (MAIL)."""
    assert TRADES.Options().beta == 6.0
    assert MART.Options().beta == 6.0 and MART.Options().weighted == "bce"


@pytest.mark.parametrize("objective", ["trades", "mart"])
def test_beta_zero_is_accepted(objective):
    from advplug.plugins import enable

    e = enable([], objective, {f"{objective}-beta": "0"})
    assert e.plugin(objective).options.beta == 0.0
    with pytest.raises(Exception, match="beta"):
        enable([], objective, {f"{objective}-beta": "-0.5"})


def test_at_yields_the_loss_to_any_other_owner_whatever_the_registration_order():
    """AT's combine_loss is trylast: an owner registered *before* it (pluggy calls the last
    registered first) is still the one that answers."""
    from advplug import hookimpl
    from advplug.plugins import get_plugin_manager

    class Owner:
        @hookimpl
        def combine_loss(self, ctx, variants, weights):
            return torch.tensor(-7.0)

    pm = get_plugin_manager()
    pm.register(Owner(), name="owner")
    pm.register(AdversarialCE(), name="at")
    ctx = make_ctx(NAT, ADV, Y)
    assert pm.hook.combine_loss(ctx=ctx, variants=ctx.variants, weights=None).item() == -7.0


def test_trades_attack_is_tpgd_and_its_variant_carries_its_output_and_stats():
    from advplug.context import TrainContext

    made = []

    class FakeAttack:
        def __call__(self, x, y):
            return x + 1.0

        def stats(self):
            return {"kappa": torch.zeros(2)}

    def make_attack(name, **kw):
        made.append(name)
        return FakeAttack()

    t = TRADES(TRADES.Options())
    t.on_train_start(
        TrainContext(
            model=None,
            config=None,
            num_train=2,
            num_classes=3,
            input_shape=(1,),
            device=torch.device("cpu"),
            epochs=1,
            milestones=(),
            objective="trades",
            make_attack=make_attack,
            log=lambda s: None,
        )
    )
    assert made == ["tpgd"]
    ctx = make_ctx(NAT[:2], ADV[:2], Y[:2])
    [v] = t.generate_adversaries(ctx)
    assert v.name == "tpgd" and torch.equal(v.x, ctx.x + 1.0) and set(v.stats) == {"kappa"}


# -- properties that hold for any logits ----------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

_logit = st.floats(-8.0, 8.0, allow_nan=False, width=64)


@st.composite
def batches(draw):
    b, k = draw(st.integers(1, 5)), draw(st.integers(2, 5))
    nat = draw(arrays("float64", (b, k), elements=_logit))
    adv = draw(arrays("float64", (b, k), elements=_logit))
    y = draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b))
    w = draw(arrays("float64", (b,), elements=st.floats(0.0, 3.0, width=64)))
    return torch.from_numpy(nat), torch.from_numpy(adv), torch.tensor(y), torch.from_numpy(w)


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(0.0, 10.0))
def test_properties_of_trades(batch, beta):
    nat, adv, y, w = batch
    b = len(y)
    ce = sum(_ce(nat[i].tolist(), y[i].item()) for i in range(b)) / b
    loss = (
        TRADES(TRADES.Options(beta=beta))
        .combine_loss(make_ctx(nat, adv, y), make_ctx(nat, adv, y).variants, None)
        .item()
    )
    assert loss >= ce - 1e-9  # KL >= 0
    assert loss == pytest.approx(trades_by_hand(nat.tolist(), adv.tolist(), y.tolist(), beta), rel=1e-9, abs=1e-9)
    zero = (
        TRADES(TRADES.Options(beta=0.0))
        .combine_loss(make_ctx(nat, adv, y), make_ctx(nat, adv, y).variants, None)
        .item()
    )
    assert zero == pytest.approx(ce, rel=1e-9, abs=1e-12)  # beta = 0: natural CE only
    same = (
        TRADES(TRADES.Options(beta=beta))
        .combine_loss(make_ctx(nat, nat, y), make_ctx(nat, nat, y).variants, None)
        .item()
    )
    assert same == pytest.approx(ce, rel=1e-9, abs=1e-12)  # x' = x: KL(p || p) = 0
    ones = make_ctx(nat, adv, y)
    assert TRADES(TRADES.Options(beta=beta)).combine_loss(
        ones, ones.variants, Weights(adv=torch.ones(b, dtype=torch.float64), nat=torch.ones(b, dtype=torch.float64))
    ).item() == pytest.approx(loss, rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(0.0, 10.0), st.sampled_from(["bce", "both"]))
def test_properties_of_mart(batch, beta, weighted):
    nat, adv, y, w = batch
    b = len(y)
    ctx = make_ctx(nat, adv, y)
    loss = MART(MART.Options(beta=beta, weighted=weighted)).combine_loss(ctx, ctx.variants, Weights(adv=w)).item()
    # not >= 0: -log(1.0001 - p_{y'}) is about -log(1.0001) < 0 when p_{y'} -> 0 (mart.py's constant), so the
    # bound is -log(1.0001) times the mean weight (CE is >= 0; the KL term too, up to the 1e-12 inside its log)
    assert loss >= -math.log(1.0001 + 1e-12) * w.mean().item() - 1e-11 * (1.0 + beta * max(1.0, w.max().item()))
    assert loss == pytest.approx(
        mart_by_hand(nat.tolist(), adv.tolist(), y.tolist(), beta, w.tolist(), weighted), rel=1e-9, abs=1e-9
    )
    ctx0 = make_ctx(nat, adv, y)
    zero = MART(MART.Options(beta=0.0)).combine_loss(ctx0, ctx0.variants, None).item()
    q = [_softmax(r) for r in adv.tolist()]
    bce = [
        _ce(adv[i].tolist(), y[i].item()) - math.log(1.0001 - max(p for k, p in enumerate(q[i]) if k != y[i]) + 1e-12)
        for i in range(b)
    ]
    assert zero == pytest.approx(sum(bce) / b, rel=1e-9, abs=1e-9)  # beta = 0: the boosted CE only


@settings(max_examples=60, deadline=None)
@given(batches())
def test_properties_of_at(batch):
    nat, adv, y, w = batch
    b = len(y)
    ctx = make_ctx(nat, adv, y)
    loss = AdversarialCE().combine_loss(ctx, ctx.variants, Weights(adv=w)).item()
    assert loss >= 0.0
    assert loss == pytest.approx(
        sum(w[i].item() * _ce(adv[i].tolist(), y[i].item()) for i in range(b)) / b, rel=1e-9, abs=1e-12
    )
    ctx1 = make_ctx(nat, adv, y)
    plain = AdversarialCE().combine_loss(ctx1, ctx1.variants, None).item()
    ctx2 = make_ctx(nat, adv, y)
    assert AdversarialCE().combine_loss(
        ctx2, ctx2.variants, Weights(adv=torch.ones(b, dtype=torch.float64))
    ).item() == pytest.approx(plain, rel=1e-12)


def test_mart_can_be_slightly_negative_as_in_the_authors_code():
    """A confident correct adversarial view: CE ~ 0 and -log(1.0001 - p_{y'}) ~ -log(1.0001)."""
    nat = adv = torch.tensor([[20.0, -20.0, -20.0]], dtype=torch.float64)
    ctx = make_ctx(nat, adv, torch.tensor([0]))
    loss = MART(MART.Options(beta=6.0)).combine_loss(ctx, ctx.variants, None).item()
    assert loss == pytest.approx(mart_by_hand(nat.tolist(), adv.tolist(), [0], 6.0), rel=1e-9)
    assert -math.log(1.0001 + 1e-12) - 1e-15 <= loss < 0


@pytest.mark.parametrize("objective", ["at", "trades", "mart"])
def test_each_objective_answers_the_loss_hook_when_enabled(objective):
    """Through the plugin manager (the hooks are registered), against the by-hand values."""
    from advplug.plugins import enable

    e = enable([], objective, {} if objective == "at" else {f"{objective}-beta": "2"})
    ctx = make_ctx(NAT64, ADV64, Y64)
    loss = e.pm.hook.combine_loss(ctx=ctx, variants=ctx.variants, weights=None).item()
    n, a, y = NAT64.tolist(), ADV64.tolist(), Y64.tolist()
    ref = {
        "at": sum(_ce(a[i], y[i]) for i in range(5)) / 5,
        "trades": trades_by_hand(n, a, y, 2.0),
        "mart": mart_by_hand(n, a, y, 2.0),
    }[objective]
    assert loss == pytest.approx(ref, rel=1e-12)
    if objective == "trades":  # TRADES brings its own KL attack
        assert "trades" in [i.plugin_name for i in e.pm.hook.on_train_start.get_hookimpls()]
        assert "trades" in [i.plugin_name for i in e.pm.hook.generate_adversaries.get_hookimpls()]


def test_objective_options_are_frozen():
    from dataclasses import FrozenInstanceError

    for opts in (TRADES.Options(), MART.Options()):
        with pytest.raises(FrozenInstanceError):
            opts.beta = 1.0


def test_mart_weighted_choices_from_the_command_line():
    from advplug.plugins import enable

    assert enable([], "mart", {"mart-weighted": "both"}).plugin("mart").options.weighted == "both"
    assert enable([], "mart", {"mart-weighted": "bce"}).plugin("mart").options.weighted == "bce"
    with pytest.raises(Exception, match="weighted"):
        enable([], "mart", {"mart-weighted": "kl"})
