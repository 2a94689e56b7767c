"""GAIRAT: weight functions against hand computations, kappa from the attack, burn-in, schedule."""

import math

import pytest
import torch
from advplug_gairat import GAIRAT, gair_weights, lambda_at

from advplug import FeatureTap, OptionError, StepContext, TrainContext, Variant
from advplug.engine.trainer import Trainer
from advplug.plugins import enable
from advplug.testing import digits_subset, tiny_config


def test_tanh_weight_by_hand_and_lrat_eq10_form():
    kappa = torch.tensor([0, 3, 5, 10])
    w = gair_weights(kappa, 10, lam=-1.0)
    by_hand = [(1 + math.tanh(-1.0 + 5 * (1 - 2 * k / 10))) / 2 for k in (0, 3, 5, 10)]  # LRAT paper Eq. 10
    assert w.tolist() == pytest.approx(by_hand, rel=1e-5, abs=1e-7)
    assert all(a > b for a, b in zip(w.tolist(), w.tolist()[1:]))  # smaller kappa -> larger weight


def test_sigmoid_and_discrete_by_hand():
    kappa = torch.tensor([0, 4, 10])
    assert gair_weights(kappa, 10, 0.5, "sigmoid").tolist() == pytest.approx(
        [1 / (1 + math.exp(-(0.5 + 5 * (5 - k) / 5))) for k in (0, 4, 10)], rel=1e-5
    )
    assert gair_weights(kappa, 10, 0.0, "discrete").tolist() == pytest.approx([11 / 11, 7 / 11, 1 / 11])


def test_lambda_schedules():
    assert lambda_at(10, 120, 60, -1.0, math.inf, "fixed") == math.inf
    assert lambda_at(60, 120, 60, -1.0, math.inf, "fixed") == -1.0
    assert lambda_at(60, 120, 60, -1.0, 3.0, "linear") == pytest.approx(3.0 - 0.5 * 4.0)
    assert [lambda_at(e, 120, 60, -1.0, math.inf, "piecewise") for e in (60, 90, 110)] == [-1.0, -2.0, -2.5]


def started(epochs=10, milestones=(4,), **opts):
    g = GAIRAT(GAIRAT.Options(**opts))
    g.on_train_start(
        TrainContext(
            model=None,
            config=tiny_config("/tmp/unused", steps=10),
            num_train=100,
            num_classes=3,
            input_shape=(1,),
            device=torch.device("cpu"),
            epochs=epochs,
            milestones=milestones,
            objective="at",
            make_attack=None,
            log=lambda s: None,
        )
    )
    return g


def ctx_with(kappa, epoch):
    model = torch.nn.Linear(1, 1)
    b = len(kappa)
    ctx = StepContext(
        model=model,
        x=torch.zeros(b, 1),
        y=torch.zeros(b, dtype=torch.long),
        index=torch.arange(b),
        epoch=epoch,
        step=0,
        num_classes=2,
        config=None,
        lr=0.1,
        tap=FeatureTap(model),
    )
    ctx.variants = [Variant("pgd", torch.zeros(b, 1), {"kappa": torch.tensor(kappa)})]
    return ctx


def test_weights_sum_to_batch_size_after_burn_in():
    g = started()
    assert g.compute_weights(ctx_with([0, 5, 10], 3), ctx_with([0, 5, 10], 3).variants) is None
    ctx = ctx_with([0, 5, 10], 4)
    w = g.compute_weights(ctx, ctx.variants).adv  # [B]: one global weight per instance
    raw = [(1 + math.tanh(-1.0 + 5 * (5 - k) / 5)) / 2 for k in (0, 5, 10)]
    assert w.tolist() == pytest.approx([3 * r / sum(raw) for r in raw], rel=1e-5, abs=1e-7)


def test_bad_input():
    with pytest.raises(OptionError, match="not before the last epoch"):
        started(begin_epoch=10)
    with pytest.raises(OptionError, match="finite --gairat-lambda-max"):
        started(schedule="linear")
    with pytest.raises(OptionError, match="is not one of tanh, sigmoid, discrete"):
        enable(["gairat"], "at", {"gairat-func": "relu"})


def test_end_to_end_kappa_from_the_training_attack(tmp_path):
    Trainer(
        tiny_config(str(tmp_path), plugins=("gairat",), epochs=2, milestones=(1,), plugin_options={"gairat-dump": "1"}),
        data=digits_subset(),
        log=lambda s: None,
    ).fit()
    import numpy as np

    d = np.load(tmp_path / "dumps" / "gairat-epoch002.npz")
    assert d["kappa"].min() >= 0 and d["kappa"].max() <= 3  # PGD-3 in the tiny config
    assert d["weight"].mean() == pytest.approx(1.0, abs=1e-4)


def authors_gair(num_steps, kappa, lam, func):
    """GAIRAT's GAIR.py, written out again (int(num_steps / 2), normalised to sum len(kappa))."""
    kappa = kappa.float()
    h = int(num_steps / 2)
    if func == "tanh":
        reweight = ((lam + (h - kappa) * 5 / h).tanh() + 1) / 2
    elif func == "sigmoid":
        reweight = (lam + (h - kappa) * 5 / h).sigmoid()
    else:
        reweight = ((num_steps + 1) - kappa) / (num_steps + 1)
    return reweight * len(reweight) / reweight.sum()


@pytest.mark.parametrize("steps", [3, 5, 7, 10])
@pytest.mark.parametrize("func", ["tanh", "sigmoid", "discrete"])
def test_weights_match_the_authors_gair_for_odd_and_even_k(steps, func):
    kappa = torch.arange(steps + 1)
    w = gair_weights(kappa, steps, -0.5, func)
    assert (w * len(w) / w.sum()).tolist() == pytest.approx(authors_gair(steps, kappa, -0.5, func).tolist(), rel=1e-5)
    if steps % 2 and func != "discrete":  # K / 2 instead of int(K / 2) is told apart
        h = steps / 2
        wrong = (
            ((-0.5 + (h - kappa.float()) * 5 / h).tanh() + 1) / 2
            if func == "tanh"
            else (-0.5 + (h - kappa.float()) * 5 / h).sigmoid()
        )
        assert not torch.allclose(w, wrong, rtol=1e-3)


class FlipsAt(torch.nn.Module):
    """Predicts class 0 on its first ``m`` forward passes with gradients, class 1 afterwards."""

    def __init__(self, m):
        super().__init__()
        self.m, self.calls = m, 0
        self.head = torch.nn.Linear(2, 2)

    def forward(self, x):
        out = self.head(x.flatten(1)) * 0
        if torch.is_grad_enabled() and x.requires_grad:
            self.calls += 1
            bump = torch.tensor([5.0, 0.0]) if self.calls <= self.m else torch.tensor([0.0, 5.0])
            return out + bump
        return out + torch.tensor([5.0, 0.0])


@pytest.mark.parametrize("m", [0, 1, 3, 5])
def test_kappa_is_the_number_of_iterations_still_correct_before_each_update(m):
    """GAIRAT's GA_PGD: kappa += 1 for each of the K iterations whose prediction (at x^(t), before the
    update) is the label; so a prediction that turns wrong at iteration m gives kappa = m, in [0, K]."""
    from advplug.attacks import make_attack

    atk = make_attack("pgd", FlipsAt(m), eps=0.1, alpha=0.02, steps=5)
    atk(torch.rand(3, 1, 1, 2), torch.zeros(3, dtype=torch.long))
    assert atk.kappa.tolist() == [m] * 3
