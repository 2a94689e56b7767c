"""LRAT: Eq. 7, 11, 12, 15 against hand computations, SAA targets, composition with MAIL, conflicts."""
import math

import pytest
import torch

from advplug import PluginError, Weights
from advplug.context import FeatureTap, StepContext, Variant
from advplug.plugins import enable
from advplug.testing import TableModel, digits_subset, run_and_resume, same_tensors, tiny_config
from advplug.trainer import Trainer
from advplug_lrat import LRAT, floor_weight, local_weight, parse_attacks, variable_factor


def test_variable_factor_and_weight_by_hand():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.05, 0.05, 0.9]])
    y = torch.tensor([0, 0, 2])
    t = variable_factor(probs, y)
    assert t.tolist() == pytest.approx([0.3, -0.3, 0.85])  # Eq. 11
    w = local_weight(t, alpha=2.0, beta=0.5)
    assert w.tolist() == pytest.approx([2 * math.sqrt(0.7), 2 * math.sqrt(1.3), 2 * math.sqrt(0.15)], rel=1e-6)  # Eq. 12
    assert w[1] > w[0] > w[2]  # higher t, lower weight


def test_floor_by_hand():
    w = torch.tensor([[0.02, 0.5], [0.03, 0.0]])  # [m=2, B=2]
    assert floor_weight(w, 0.1).tolist() == pytest.approx([0.05, 0.0])  # [0.1 - 0.05]_+, [0.1 - 0.5]_+


def ctx_for(prob_rows, names, y):
    """A StepContext whose view ``names[v]`` has probabilities ``prob_rows[v]`` ([V][B][K]);
    the natural view has the last block of ``prob_rows``."""
    b = len(y)
    table = torch.log(torch.tensor(prob_rows, dtype=torch.float).reshape(-1, len(prob_rows[0][0])))
    model = TableModel(table)
    nat = len(prob_rows) - 1
    ctx = StepContext(model=model, x=torch.arange(nat * b, (nat + 1) * b)[:, None].float(), y=y, index=torch.arange(b),
                      epoch=0, step=0, num_classes=table.shape[1], config=None, lr=0.1, tap=FeatureTap(model))
    ctx.variants = [Variant(n, torch.arange(i * b, (i + 1) * b)[:, None].float()) for i, n in enumerate(names)]
    return ctx


def plugin(**opts):
    p = LRAT(LRAT.Options(**opts))
    return p


# two instances, classes 3; views cw, pgd, saa (sorted), then natural
P = [
    [[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]],   # cw
    [[0.5, 0.4, 0.1], [0.1, 0.2, 0.7]],   # pgd
    [[0.3, 0.6, 0.1], [0.02, 0.01, 0.97]],  # saa
    [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]],   # natural
]
Y = torch.tensor([0, 2])


def by_hand_pair(view_rows, alpha=2.0, beta=0.5):
    out = []
    for rows in view_rows:
        out.append([alpha * (1 - (r[y] - max(p for j, p in enumerate(r) if j != y))) ** beta for r, y in zip(rows, (0, 2))])
    return out


def test_weights_with_pgd_floor_by_hand():
    ctx = ctx_for(P, ["cw", "pgd", "saa"], Y)
    w = plugin(attacks="saa,cw", floor="pgd", c=2.0).compute_weights(ctx, ctx.variants)
    cw, saa = by_hand_pair([P[0], P[2]])
    floor = [max(2.0 - cw[i] - saa[i], 0.0) for i in range(2)]  # Eq. 7 with C = 2 so that it bites
    assert floor[1] > 0 and floor[0] == 0
    total = [cw[i] + saa[i] + floor[i] for i in range(2)]
    scale = sum(total) / 2  # Eq. 15
    ref = [[cw[i] / scale for i in range(2)], [floor[i] / scale for i in range(2)], [saa[i] / scale for i in range(2)]]
    assert w.local.tolist() == [pytest.approx(r, rel=1e-5) for r in ref]  # local: inside the pair
    assert w.adv is None and w.local_nat is None
    assert w.local.sum(0).mean().item() == pytest.approx(1.0)  # Eq. 15 holds


def test_natural_floor_and_floor_on_a_reweighted_variant():
    ctx = ctx_for(P, ["cw", "saa"], Y)  # views cw, saa: blocks 0, 1 of P
    w = plugin(attacks="saa,cw", floor="nat", c=2.0, normalise="none").compute_weights(ctx, ctx.variants)
    cw, saa = by_hand_pair([P[0], P[1]])  # rows 0, 1 of the table for views cw, saa
    assert w.local_nat.tolist() == pytest.approx([max(2.0 - cw[i] - saa[i], 0.0) for i in range(2)], rel=1e-5)
    w2 = plugin(attacks="saa,cw", floor="saa", c=2.0, normalise="none").compute_weights(ctx, ctx.variants)
    assert w2.local_nat is None
    assert w2.local[1].tolist() == pytest.approx([saa[i] + max(2.0 - cw[i] - saa[i], 0.0) for i in range(2)], rel=1e-5)
    w3 = plugin(attacks="saa,cw", floor="none", c=2.0, normalise="none").compute_weights(ctx, ctx.variants)
    assert w3.local.tolist() == [pytest.approx(cw, rel=1e-5), pytest.approx(saa, rel=1e-5)]


def test_lsat_is_the_mean_over_variants():
    ctx = ctx_for(P, ["cw", "pgd", "saa"], Y)
    w = plugin(attacks="pgd,cw,saa", floor="none", lsat=True).compute_weights(ctx, ctx.variants)
    assert torch.allclose(w.local, torch.full((3, 2), 1 / 3))


def test_loss_is_eq7_with_the_combined_weights():
    ctx = ctx_for(P, ["cw", "pgd", "saa"], Y)
    p = plugin()
    weights = Weights(adv=torch.tensor([[0.1, 0.2], [0.3, 0.0], [0.5, 0.9]]), nat=torch.tensor([0.4, 0.0]))
    loss = p.combine_loss(ctx, ctx.variants, weights)
    logp = torch.log(torch.tensor(P))
    ref = 0.0
    for i, y in enumerate((0, 2)):
        ref += sum(weights.adv[v, i] * -logp[v, i, y] for v in range(3)) + weights.nat[i] * -logp[3, i, y]
    assert loss.item() == pytest.approx(ref.item() / 2, rel=1e-5)


def test_options_are_checked():
    assert parse_attacks("SAA, cw,saa") == ("saa", "cw")
    with pytest.raises(Exception, match="choose one or more of pgd, cw, saa"):
        enable(["lrat"], "at", {"lrat-attacks": "pgd,fab"})
    with pytest.raises(Exception, match="--lrat-alpha: must be > 0.0"):
        enable(["lrat"], "at", {"lrat-alpha": "0"})


@pytest.mark.parametrize("objective", ["trades", "mart"])
def test_two_loss_owners_name_both(objective):
    with pytest.raises(PluginError, match=rf"lrat.*{objective}|{objective}.*lrat"):
        Trainer(tiny_config("/tmp/unused-lrat", plugins=("lrat",), objective=objective), data=digits_subset(64, 16),
                log=lambda s: None)
    with pytest.raises(PluginError, match="lrat.*meow|meow.*lrat"):
        Trainer(tiny_config("/tmp/unused-lrat", plugins=("lrat", "meow")), data=digits_subset(64, 16), log=lambda s: None)


def trained_trainer(tmp_path, **kw):
    """A trainer after one quick epoch (so the model classifies most samples correctly)."""
    opts = {"lrat-saa-steps": 5, **kw.pop("plugin_options", {})}
    cfg = tiny_config(str(tmp_path), plugins=kw.pop("plugins", ("lrat",)), plugin_options=opts, steps=3, **kw)
    torch.manual_seed(0)
    tr = Trainer(cfg, data=digits_subset(256, 32), log=lambda s: None)
    tr.train_epoch(0)
    return tr


def test_saa_targets_the_three_highest_non_true_classes_and_variants_stay_in_the_ball(tmp_path):
    tr = trained_trainer(tmp_path, plugin_options={"lrat-attacks": "pgd,cw,saa", "lrat-floor": "saa"})
    x = tr.data.train[0][:64]
    lrat = tr.enabled.plugin("lrat")
    saa = lrat.runners["saa"]
    tr.model.eval()
    with torch.no_grad():
        z = tr.model(x)
    y = torch.where(torch.arange(64) < 48, z.argmax(1), (z.argmax(1) + 1) % 10)  # 48 correct, 16 wrong
    correct = z.argmax(1) == y
    top3 = z.scatter(1, y[:, None], float("-inf")).topk(3, dim=1).indices
    variants = lrat.generate_adversaries(StepContext(model=tr.model, x=x, y=y, index=torch.arange(64), epoch=1, step=0,
                                                     num_classes=10, config=tr.cfg, lr=0.1, tap=tr.tap))
    assert [v.name for v in variants] == ["pgd", "cw", "saa"]
    targets = saa.targets
    assert torch.equal(targets[~correct], torch.full_like(targets[~correct], -1))  # misclassified: not attacked
    assert torch.equal(targets[correct, 0], top3[correct, 0])  # everyone correct starts with the top non-true class
    tried = targets >= 0
    assert torch.equal(targets[tried], top3[tried])  # later targets in score order
    for v in variants:
        assert v.x.shape == x.shape
        assert (v.x - x).abs().max() <= tr.cfg.eps + 1e-6 and v.x.min() >= 0 and v.x.max() <= 1
    moved = (variants[2].x != x).flatten(1).any(1)
    assert moved[correct].all()  # every attacked sample is perturbed, fooled or not
    stopped = correct & (targets[:, -1] < 0)  # no later target: fooled before the last one
    assert stopped.any()
    with torch.no_grad():
        assert (tr.model(variants[2].x[stopped]).argmax(1) != y[stopped]).all()


def test_saa_keeps_the_global_rng_stream(tmp_path):
    tr = trained_trainer(tmp_path, plugin_options={"lrat-attacks": "saa", "lrat-floor": "none"})
    x, y = tr.data.train[0][:32], tr.data.train[1][:32]
    torch.manual_seed(5)
    tr.enabled.plugin("lrat").runners["saa"](x, y)
    a = torch.rand(3)
    torch.manual_seed(5)
    tr.enabled.plugin("lrat").runners["saa"](x, y)
    assert torch.equal(a, torch.rand(3))  # reproducible from the run's seed ...
    torch.manual_seed(5)
    assert not torch.equal(a, torch.rand(3))  # ... and the attack consumed draws, no reseed to a constant


def test_lrat_with_mail_mail_weighs_the_pair_lrat_splits_it(tmp_path):
    tr = trained_trainer(tmp_path, plugins=("lrat", "mail"), plugin_options={"mail-burn-in": 0})
    x, y = tr.data.train[0][:64], tr.data.train[1][:64]
    _, ctx, combined = tr.step(x, y, torch.arange(64), epoch=1, global_step=99)
    assert [v.name for v in ctx.variants] == ["cw", "pgd", "saa"]
    assert ctx.anchor.name == "pgd"  # LRAT's x*
    w_lrat = tr.enabled.plugin("lrat").compute_weights(ctx, ctx.variants).local  # from the step's cached logits
    w_mail = tr.enabled.plugin("mail").compute_weights(ctx, ctx.variants).adv
    assert w_mail.shape == (64,)  # one weight per instance: PM of x*
    assert torch.equal(combined.local, w_lrat)  # LRAT's part as LRAT returned it
    assert torch.allclose(combined.adv, w_mail[None] * w_lrat, atol=1e-6)
    assert combined.local.sum(0).mean().item() == pytest.approx(1.0, rel=1e-5)  # Eq. 15 on LRAT's part
    assert combined.instance.mean().item() == pytest.approx(1.0, rel=1e-5)  # MAIL's batch normalisation
    assert ctx.forward_count == 3  # one forward per variant, shared by both plugins and the loss


def test_end_to_end_resume_is_exact(tmp_path):
    opts = {"lrat-saa-steps": 3, "lrat-dump": "true"}
    full, part = run_and_resume(tmp_path, digits_subset(128, 32), plugins=("lrat",), plugin_options=opts)
    assert same_tensors(full["model"], part["model"])
    import numpy as np

    d = np.load(tmp_path / "full" / "dumps" / "lrat-epoch001.npz")
    assert {"index", "t_cw", "t_pgd", "t_saa", "weight_cw", "weight_pgd", "weight_saa"} == set(d.files)
    assert len(d["index"]) == 128


def test_eq15_total_includes_the_natural_floor():
    ctx = ctx_for(P, ["cw", "saa"], Y)
    w = plugin(attacks="saa,cw", floor="nat", c=6.0).compute_weights(ctx, ctx.variants)
    cw, saa = by_hand_pair([P[0], P[1]])
    floor = [max(6.0 - cw[i] - saa[i], 0.0) for i in range(2)]
    assert min(floor) > 0
    scale = sum(cw[i] + saa[i] + floor[i] for i in range(2)) / 2  # Eq. 15: (1/n) sum_i (floor_i + sum_j w_ij) = 1
    assert w.local_nat.tolist() == pytest.approx([f / scale for f in floor], rel=1e-5)
    assert w.local.tolist() == [pytest.approx([v / scale for v in cw], rel=1e-5), pytest.approx([v / scale for v in saa], rel=1e-5)]
    assert (w.local.sum(0) + w.local_nat).mean().item() == pytest.approx(1.0)


def test_alpha_and_beta_of_eq12_are_used():
    ctx = ctx_for(P, ["cw", "saa"], Y)
    w = plugin(attacks="saa,cw", floor="none", alpha=3.0, beta=2.0, normalise="none").compute_weights(ctx, ctx.variants)
    assert w.local.tolist() == [pytest.approx(r, rel=1e-5) for r in by_hand_pair([P[0], P[1]], alpha=3.0, beta=2.0)]
    # alpha also moves the floor, so it matters under Eq. 15 too
    c3 = ctx_for(P, ["cw", "pgd", "saa"], Y)
    a = plugin(attacks="saa,cw", floor="pgd", c=1.5).compute_weights(c3, c3.variants)
    b = plugin(attacks="saa,cw", floor="pgd", c=1.5, alpha=0.5).compute_weights(c3, c3.variants)
    assert not torch.allclose(a.local, b.local)


def test_saa_steps_and_targets_reach_the_attack():
    from advplug.attacks import make_attack
    from advplug.context import TrainContext

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10))
    p = plugin(attacks="saa", floor="none", saa_steps=7, saa_targets=2)
    p.on_train_start(TrainContext(model=model, config=tiny_config("/tmp/unused-lrat"), num_train=8, num_classes=10,
                                  input_shape=(1, 2, 2), device=torch.device("cpu"), epochs=2, milestones=(1,),
                                  objective="at", log=lambda s: None,
                                  make_attack=lambda name, **kw: make_attack(name, model, **{**dict(eps=0.1, alpha=0.02, steps=3, num_classes=10), **kw})))
    atk = p.runners["saa"]
    assert atk.steps == 7 and atk.n_target_classes == 2
    atk(torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    assert atk.targets.shape == (4, 2)
