"""FAT's early-stopped attack under a per-sample budget (``ctx.budget``, ``advplug.Budget``): each sample's own eps
and step size by hand, the scalar attack bit for bit when every budget equals the run's, and the plugin reading the
step's budget."""

import pytest
import torch
from advplug_fat import FAT, EarlyStoppedPGD
from torch import nn

from advplug import Budget, FeatureTap, StepContext, TrainContext
from advplug.testing import tiny_config


class Threshold(nn.Module):
    """Two classes; class 1 wins iff x > c: the CE gradient of class 0 pushes x up, one step of +alpha per update."""

    def __init__(self, c=0.6, s=10.0):
        super().__init__()
        self.c, self.s = c, s
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        z1 = self.s * (x[:, 0] - self.c) + 0 * self.dummy
        return torch.stack([torch.zeros_like(z1), z1], dim=1)


def test_each_sample_moves_by_its_step_and_stops_at_its_radius():
    atk = EarlyStoppedPGD(Threshold().eval(), eps=0.3, alpha=1 / 32, steps=10, tau=10, start="none")
    x = torch.full((4, 1), 0.1)
    y = torch.zeros(4, dtype=torch.long)
    eps = torch.tensor([0.05, 0.1, 0.2, 0.5])
    alpha = torch.tensor([1 / 64, 1 / 32, 1 / 64, 1 / 32])
    atk.set_budget(eps, alpha)
    adv = atk(x, y)
    by_hand = [0.1 + min(10 * a, e) for a, e in zip(alpha.tolist(), eps.tolist())]  # 10 updates: tau 10 never stops
    assert adv[:, 0].tolist() == pytest.approx(by_hand, abs=1e-6)
    assert atk.stats()["stop_step"].tolist() == [10, 10, 10, 10]


@pytest.mark.parametrize("start, omega, noise", [("uniform", 0.001, "active"), ("normal", 0.0, "continuing")])
def test_budgets_equal_to_the_run_give_the_scalar_attack_bit_for_bit(start, omega, noise):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(40, 6), torch.randint(0, 3, (40,))
    kw = dict(eps=0.3, alpha=0.05, steps=8, tau=1, start=start, omega=omega, noise=noise)
    torch.manual_seed(1)
    scalar = EarlyStoppedPGD(model, **kw)(x, y)
    torch.manual_seed(1)
    atk = EarlyStoppedPGD(model, **kw).set_budget(torch.full((40,), 0.3), torch.full((40,), 0.05))
    assert torch.equal(atk(x, y), scalar)


def test_uniform_start_lies_in_each_samples_ball():
    atk = EarlyStoppedPGD(Threshold().eval(), eps=0.3, alpha=0.01, steps=0, tau=0, start="uniform")
    eps = torch.tensor([0.01, 0.3, 0.05, 0.2]).repeat(50)
    x = torch.full((200, 1), 0.5)
    adv = atk.set_budget(eps)(x, torch.zeros(200, dtype=torch.long))
    dist = (adv - x)[:, 0].abs()
    assert (dist <= eps + 1e-7).all()
    assert (dist > 0.6 * eps).any() and (dist[eps == 0.3] > 0.05).any()  # drawn in each ball, not the smallest


def test_the_plugin_reads_the_steps_budget():
    fat = FAT(FAT.Options(tau=10, dynamic=False, start="none", omega=0.0))
    model = Threshold().eval()
    cfg = tiny_config("/tmp/unused", eps=0.3, alpha=1 / 32, steps=10)
    fat.on_train_start(
        TrainContext(
            model=model,
            config=cfg,
            num_train=4,
            num_classes=2,
            input_shape=(1,),
            device=torch.device("cpu"),
            epochs=2,
            milestones=(1,),
            objective="at",
            make_attack=None,
            log=lambda s: None,
        )
    )
    x = torch.full((4, 1), 0.1)
    ctx = StepContext(
        model=model,
        x=x,
        y=torch.zeros(4, dtype=torch.long),
        index=torch.arange(4),
        epoch=0,
        step=0,
        num_classes=2,
        config=cfg,
        lr=0.1,
        tap=FeatureTap(model, []),
    )
    ctx.budget = Budget(eps=torch.tensor([0.05, 0.1, 0.2, 0.5]))
    adv = fat.generate_adversaries(ctx)[0].x
    assert adv[:, 0].tolist() == pytest.approx([0.15, 0.2, 0.3, 0.1 + 10 / 32], abs=1e-6)
    ctx.budget = Budget()  # no budget this step: the run's eps again
    adv = fat.generate_adversaries(ctx)[0].x
    assert adv[:, 0].tolist() == pytest.approx([0.1 + 0.3] * 4, abs=1e-6)
