"""The CW-Linf margin loss, the CW-Linf attack, and the kappa signal of the training PGD."""
import pytest
import torch
from torch import nn

from advplug import OptionError
from advplug.attacks import CWLinf, TrackedPGD, cw_margin_loss, make_attack, parse_eval_attack


def test_cw_margin_loss_by_hand():
    logits = torch.tensor([[2.0, 5.0, 1.0], [-3.0, -1.0, -2.0], [10.0, 0.0, 0.0]])
    y = torch.tensor([1, 0, 0])
    # row 0: z_y=5, best other 2 -> -(5-2+50); row 1 (all negative): z_y=-3, best other -1 -> -(-3+1+50)
    # row 2: margin 10 + 50 = 60 -> -60
    assert cw_margin_loss(logits, y).tolist() == pytest.approx([-53.0, -48.0, -60.0])
    # clamp at zero when the true class loses by more than the confidence
    assert cw_margin_loss(torch.tensor([[0.0, 100.0]]), torch.tensor([0])).tolist() == [0.0]


def test_cw_margin_masks_true_class_when_all_logits_negative():
    # A mask that multiplies by (1 - onehot) without -1e4 would pick 0 for the true class here.
    logits = torch.tensor([[-1.0, -5.0, -6.0]])
    assert cw_margin_loss(logits, torch.tensor([0]), confidence=0.0).item() == pytest.approx(-4.0)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(x.flatten(1))


def test_cw_linf_stays_in_the_eps_ball_and_lowers_the_margin():
    model = Linear()
    x = torch.rand(32, 1, 4, 4)
    y = model(x).argmax(1)
    x_adv = CWLinf(model, eps=0.1, alpha=0.02, steps=10)(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert cw_margin_loss(model(x_adv), y).mean() > cw_margin_loss(model(x), y).mean()


class ConstantClass(nn.Module):
    """Predicts class 0 whatever the input (gradients still flow)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(x.flatten(1)) * 0 + torch.tensor([5.0, 0.0, 0.0])


def test_kappa_counts_iterations_still_correct():
    atk = TrackedPGD(ConstantClass(), eps=0.1, alpha=0.02, steps=7)
    y = torch.tensor([0, 1, 0, 2])
    atk(torch.rand(4, 1, 4, 4), y)
    assert atk.kappa.tolist() == [7, 0, 7, 0]


def test_kappa_matches_a_replayed_pgd_loop():
    model = Linear()
    x = torch.rand(16, 1, 4, 4)
    y = torch.randint(0, 4, (16,))
    torch.manual_seed(1)
    atk = TrackedPGD(model, eps=0.3, alpha=0.1, steps=5)
    x_adv = atk(x, y)
    torch.manual_seed(1)  # replay: same random start
    adv = torch.clamp(x + torch.empty_like(x).uniform_(-0.3, 0.3), 0, 1)
    kappa = torch.zeros(16, dtype=torch.long)
    for _ in range(5):
        adv.requires_grad_(True)
        out = model(adv)
        kappa += out.argmax(1) == y
        g = torch.autograd.grad(nn.functional.cross_entropy(out, y), adv)[0]
        adv = torch.clamp(x + torch.clamp(adv.detach() + 0.1 * g.sign() - x, -0.3, 0.3), 0, 1)
    assert torch.equal(atk.kappa, kappa)
    assert torch.allclose(x_adv, adv)


def test_bad_attack_settings():
    with pytest.raises(OptionError, match="eps"):
        make_attack("pgd", Linear(), eps=0, alpha=0.1, steps=3)
    with pytest.raises(OptionError, match="steps"):
        make_attack("pgd", Linear(), eps=0.1, alpha=0.1, steps=0)
    with pytest.raises(OptionError, match="unknown attack"):
        make_attack("deepfool", Linear(), eps=0.1, alpha=0.1, steps=3)
    with pytest.raises(OptionError, match="unknown attack"):
        parse_eval_attack("pgdx")
    assert parse_eval_attack("pgd100") == ("pgd", 100)
