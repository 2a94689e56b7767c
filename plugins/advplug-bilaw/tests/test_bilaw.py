"""BiLAW: Def. 3 by hand, the meta-gradient (Eq. 5-6) against finite differences, the
non-parametric weights against explicit per-sample gradients, the validation split, resume."""

import pytest
import torch
from advplug_bilaw import BiLAW, WeightNet, mean_one, multiclass_margin
from torch import nn

from advplug import FeatureTap, OptionError, StepContext, Variant
from advplug.engine.trainer import Trainer
from advplug.objectives import AdversarialCE
from advplug.plugins import enable
from advplug.testing import digits_subset, run_and_resume, same_tensors, tiny_config


def test_multiclass_margin_by_hand():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    y = torch.tensor([0, 2])
    assert multiclass_margin(probs, y).tolist() == [pytest.approx([0.0, 0.3, 0.5]), pytest.approx([0.1, -0.2, 0.0])]


def tiny_problem(seed=0, lr=0.5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.rand(8, 1, 2, 2, dtype=torch.double), torch.randint(0, 3, (8,))
    xv, yv = torch.rand(5, 1, 2, 2, dtype=torch.double), torch.randint(0, 3, (5,))
    tap = FeatureTap(model)

    def ctx():
        c = StepContext(
            model=model, x=x, y=y, index=torch.arange(8), epoch=0, step=0, num_classes=3, config=None, lr=lr, tap=tap
        )
        c.variants = [Variant("pgd", (x + 0.05).clamp(0, 1))]
        return c

    b = BiLAW(BiLAW.Options(hidden="5"))
    b.model, b.loss_fn = model, AdversarialCE().combine_loss
    b.net = WeightNet(3, (5,)).double()
    return b, ctx, xv, yv, model


def test_meta_gradient_matches_finite_differences():
    b, ctx, xv, yv, _ = tiny_problem()
    c = ctx()
    inp = b.net_input(c, c.variants)
    loss = b.meta_loss(c, c.variants, mean_one(b.net(inp)), xv, yv)
    analytic = torch.autograd.grad(loss, list(b.net.parameters()))
    h = 1e-6
    checked = 0
    for p, g in zip(b.net.parameters(), analytic):
        flat, gflat = p.data.view(-1), g.view(-1)
        for k in range(0, flat.numel(), max(1, flat.numel() // 4)):
            old = flat[k].item()
            vals = []
            for sign in (1, -1):
                flat[k] = old + sign * h
                c2 = ctx()
                vals.append(b.meta_loss(c2, c2.variants, mean_one(b.net(b.net_input(c2, c2.variants))), xv, yv).item())
            flat[k] = old
            fd = (vals[0] - vals[1]) / (2 * h)
            assert gflat[k].item() == pytest.approx(fd, rel=1e-4, abs=1e-9)
            checked += 1
    assert checked >= 8
    assert max(g.abs().max().item() for g in analytic) > 1e-6  # the meta-gradient is not trivially zero


def test_nonparametric_weights_are_gradient_alignments():
    b, ctx, xv, yv, model = tiny_problem(seed=1)
    b.options = BiLAW.Options(method="nonparametric")
    b.validation_batch = lambda: (xv, yv)
    c = ctx()
    w = b.compute_weights(c, c.variants).adv[0]
    # independent reference: theta~ = theta - lr grad mean(l), g_val at theta~, per-sample grads at theta
    params = list(model.parameters())
    xa, y = c.variants[0].x, c.y
    ce = nn.functional.cross_entropy
    grads = torch.autograd.grad(ce(model(xa), y), params)
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    tilde = {n: p - 0.5 * g for n, p, g in zip(names, params, grads)}
    g_val = torch.autograd.grad(ce(functional_call(model, tilde, (xv,)), yv), list(tilde.values()))
    g_val = torch.cat([g.flatten() for g in g_val])
    align = []
    for j in range(8):
        gj = torch.autograd.grad(ce(model(xa[j : j + 1]), y[j : j + 1]), params)
        align.append(torch.dot(g_val, torch.cat([g.flatten() for g in gj])).clamp_min(0))
    ref = torch.stack(align)
    assert (ref > 0).any() and (ref == 0).any()
    assert torch.allclose(w, ref / ref.mean(), atol=1e-6)


def test_validation_split_is_held_out_and_never_trained_on(tmp_path):
    data = digits_subset(200, 32)
    tr = Trainer(tiny_config(str(tmp_path), plugins=("bilaw",)), data=data, log=lambda s: None)
    assert tr.data.num_train == 180 and len(tr.data.validation[1]) == 20  # min(1000, 10%)
    train_rows = {tuple(r.flatten().tolist()) for r in tr.data.train[0]}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in tr.data.validation[0])


def test_options_and_trades_variant(tmp_path):
    with pytest.raises(OptionError, match="--bilaw-hidden 'wide'"):
        enable(["bilaw"], "at", {"bilaw-hidden": "wide"})
    tr = Trainer(
        tiny_config(str(tmp_path), plugins=("bilaw",), objective="trades", plugin_options={"bilaw-input": "loss"}),
        data=digits_subset(128, 16),
        log=lambda s: None,
    )
    before = [p.detach().clone() for p in tr.enabled.plugin("bilaw").net.parameters()]
    x, y = tr.data.train[0][:32], tr.data.train[1][:32]
    _, ctx, w = tr.step(x, y, torch.arange(32), epoch=0, global_step=0)
    assert [v.name for v in ctx.variants] == ["tpgd"] and w.adv.shape == (1, 32)
    assert w.adv.mean().item() == pytest.approx(1.0)
    after = list(tr.enabled.plugin("bilaw").net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # omega took a meta step
    assert ctx.forward_count == 2  # natural + tpgd; the meta step reuses them


def test_resume_is_exact(tmp_path):
    full, part = run_and_resume(tmp_path, digits_subset(128, 32), plugins=("bilaw",))
    assert same_tensors(full["model"], part["model"])
    assert same_tensors(full["plugins"]["bilaw"]["net"], part["plugins"]["bilaw"]["net"])


def test_start_up_leaves_the_global_rng_alone():
    from advplug import TrainContext

    b = BiLAW(BiLAW.Options())
    ctx = TrainContext(
        model=nn.Linear(2, 3),
        config=tiny_config("/tmp/unused-bilaw"),
        num_train=10,
        num_classes=3,
        input_shape=(2,),
        device=torch.device("cpu"),
        epochs=2,
        milestones=(1,),
        objective="at",
        make_attack=lambda name: None,
        log=lambda s: None,
        validation=(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)),
        loss_fn=lambda *a: None,
    )
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    b.on_train_start(ctx)
    assert torch.equal(state, torch.random.get_rng_state())
    first = [p.detach().clone() for p in b.net.parameters()]
    b.on_train_start(ctx)
    assert all(torch.equal(a, c) for a, c in zip(first, b.net.parameters()))  # omega's init is seeded


def test_meta_step_against_an_independent_computation_of_eq_5_6():
    """Alg. 1 on a tiny problem, recomputed without the plugin's pseudo-update: with
    theta~ = theta - lr (1/B) sum_j w_j grad l_j(theta) (Eq. 5), the meta-gradient is
    dL_val/dw_j = -lr/B g_val(theta~)^T grad l_j(theta) chained through w = mean_one(omega_mu(Delta))
    (Eq. 6), Delta on the clean sample (Def. 3), L_val the unweighted CE on *adversarial*
    validation examples; mu then takes a plain descent step and the weights come from the new mu."""
    from torch.func import functional_call

    b, ctx, xv, yv, model = tiny_problem(seed=2)
    eta = 50.0
    b.opt = torch.optim.SGD(b.net.parameters(), lr=eta)
    b.val_x, b.val_y, b.device = xv, yv, torch.device("cpu")
    b.gen = torch.Generator().manual_seed(11)
    b.val_attack = lambda x, y: (x + 0.2 * torch.sign(x - 0.5)).clamp(0, 1)  # deterministic "adversarial" view
    mu0 = [p.detach().clone() for p in b.net.parameters()]
    c = ctx()
    w_out = b.compute_weights(c, c.variants).adv

    # -- the reference --
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(len(yv), (min(128, len(yv)),), generator=g)
    xv_adv, yv_b = b.val_attack(xv[idx], yv), yv[idx]
    x, y, xa = c.x, c.y, c.variants[0].x
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    delta = (torch.softmax(model(x), 1).gather(1, y[:, None]) - torch.softmax(model(x), 1)).detach()  # Def. 3, clean
    net0 = WeightNet(3, (5,)).double()
    for p, v in zip(net0.parameters(), mu0):
        p.data.copy_(v)
    w = mean_one(net0(delta[None]))  # [1, B], a function of mu
    per_sample = [
        torch.autograd.grad(nn.functional.cross_entropy(model(xa[j : j + 1]), y[j : j + 1]), params) for j in range(8)
    ]
    wv = w.detach()[0]
    tilde = {
        n: p - 0.5 * sum(wv[j] * per_sample[j][k] for j in range(8)) / 8 for k, (n, p) in enumerate(zip(names, params))
    }
    g_val = torch.autograd.grad(
        nn.functional.cross_entropy(functional_call(model, tilde, (xv_adv,)), yv_b), list(tilde.values())
    )
    dl_dw = torch.stack([-0.5 / 8 * sum((gv * gj).sum() for gv, gj in zip(g_val, per_sample[j])) for j in range(8)])
    grad_mu = torch.autograd.grad((dl_dw.detach() * w[0]).sum(), list(net0.parameters()))
    with torch.no_grad():
        for p, gm in zip(net0.parameters(), grad_mu):
            p -= eta * gm  # descent
        ref = mean_one(net0(delta[None]))

    assert all(torch.allclose(p, q, atol=1e-10) for p, q in zip(b.net.parameters(), net0.parameters()))
    assert torch.allclose(w_out, ref, atol=1e-8)
    assert (ref - w.detach()).abs().max() > 1e-4  # the step moved the weights: before/after are told apart


def test_validation_batch_is_adversarial():
    b, _, xv, yv, _ = tiny_problem()
    b.val_x, b.val_y, b.device = xv, yv, torch.device("cpu")
    b.gen = torch.Generator().manual_seed(0)
    b.val_attack = lambda x, y: x + 1.0
    x_b, y_b = b.validation_batch()
    idx = torch.randint(len(yv), (5,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_b, xv[idx] + 1.0) and torch.equal(y_b, yv[idx])


def test_margin_on_the_clean_sample_by_default_and_the_adversarial_one_on_request():
    b, ctx, _, _, model = tiny_problem()
    c = ctx()
    p_nat, p_adv = torch.softmax(model(c.x), 1), torch.softmax(model(c.variants[0].x), 1)
    assert torch.allclose(b.net_input(c, c.variants)[0], multiclass_margin(p_nat, c.y))
    b.options = BiLAW.Options(margin_on="adv")
    assert torch.allclose(b.net_input(c, c.variants)[0], multiclass_margin(p_adv, c.y))
    assert not torch.allclose(p_nat, p_adv)
