"""The CW-Linf margin loss, the CW-Linf attack, and the kappa signal of the training PGD."""

import pytest
import torch
from torch import nn

from advplug import OptionError
from advplug.attacks import CWLinf, TrackedPGD, cw_margin_loss, make_attack, parse_eval_attack
from advplug.testing import ScriptedTwoClass


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


class Recorder(nn.Module):
    """A linear model that records every input it sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(16, 4)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.head(x.flatten(1))


@pytest.mark.parametrize("name", ["pgd", "tpgd"])
def test_attack_start_is_explicit_and_replayable(name):
    from advplug.attacks import random_start

    x = torch.zeros(64, 1, 4, 4)  # saturated pixels: where the starts differ
    x[:, :, :2] = 1.0
    y = torch.zeros(64, dtype=torch.long)
    for start in ("uniform", "normal", "normal-clamped", "none"):
        model = Recorder()
        atk = make_attack(name, model, eps=0.3, alpha=0.1, steps=2, start=start)
        torch.manual_seed(5)
        atk(x, y)
        first = model.seen[1 if name == "tpgd" else 0]  # TPGD first sees x for p(x)
        torch.manual_seed(5)
        assert torch.equal(first, random_start(x, start, 0.3))
        d = first - x
        if start == "uniform":
            assert d.abs().max() > 0.2 and first.min() >= 0 and first.max() <= 1
        elif start == "normal":  # x + 0.001 N(0, 1), not clamped: TRADES', MART's, MAIL's code
            assert 0 < d.abs().max() < 0.01 and first.min() < 0 and first.max() > 1
        elif start == "normal-clamped":  # torchattacks TPGD
            assert 0 < d.abs().max() < 0.01 and first.min() >= 0 and first.max() <= 1
        else:
            assert torch.equal(first, x)


def test_tpgd_replays_the_trades_loop():
    model = Linear()
    x, y = torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)
    torch.manual_seed(2)
    x_adv = make_attack("tpgd", model, eps=0.1, alpha=0.03, steps=3)(x, y)
    torch.manual_seed(2)  # TRADES' trades.py, written out again
    adv = x + 0.001 * torch.randn_like(x)
    p_nat = torch.softmax(model(x), 1).detach()
    for _ in range(3):
        adv.requires_grad_(True)
        kl = nn.KLDivLoss(reduction="sum")(torch.log_softmax(model(adv), 1), p_nat)
        g = torch.autograd.grad(kl, adv)[0]
        adv = torch.clamp(torch.min(torch.max(adv.detach() + 0.03 * g.sign(), x - 0.1), x + 0.1), 0, 1)
    assert torch.allclose(x_adv, adv)


def test_objective_and_plugin_defaults_for_the_start():
    from advplug_mail import MAIL

    from advplug.attacks import resolve_attack_start

    assert resolve_attack_start(None, "at", []) == ("uniform", "at default")
    assert resolve_attack_start(None, "trades", [])[0] == "normal"
    assert resolve_attack_start(None, "mart", [])[0] == "normal"
    assert resolve_attack_start(None, "at", [("mail", MAIL(MAIL.Options()))]) == ("normal", "mail default")
    assert resolve_attack_start("uniform", "mart", [("mail", MAIL(MAIL.Options()))])[0] == "uniform"
    with pytest.raises(OptionError, match="attack-start"):
        resolve_attack_start("gauss", "at", [])


def test_the_run_header_and_config_record_the_start(tmp_path):
    import json

    from advplug.engine.trainer import Trainer
    from advplug.testing import digits_subset, tiny_config

    lines = []
    Trainer(tiny_config(str(tmp_path), objective="trades", epochs=1), data=digits_subset(64, 16), log=lines.append)
    assert any("attack start normal (trades default)" in s for s in lines)
    assert json.loads((tmp_path / "config.json").read_text())["attack_start"] == "normal"


def test_p_true_lps_stays_at_the_first_misclassified_iterate_when_fooled_again():
    """MAIL's p_y at the least PGD step (Eq. 7): a scripted model predicts correct, fooled (p_y 0.3),
    correct, fooled (p_y 0.2) over the attack's four iterations; the record is 0.3, and kappa
    (iterations still correct, GAIRAT) is 2."""
    atk = TrackedPGD(ScriptedTwoClass([0.2, 0.7, 0.1, 0.8]).eval(), eps=0.1, alpha=0.01, steps=4)
    atk(torch.rand(2, 3), torch.zeros(2, dtype=torch.long))
    assert atk.p_true_lps.tolist() == pytest.approx([0.3, 0.3], rel=1e-5)
    assert atk.kappa.tolist() == [2, 2]
