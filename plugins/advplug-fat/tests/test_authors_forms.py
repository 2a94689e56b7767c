"""FAT's two choices where advplug and the authors' code give different numbers, each as an option: which samples
draw omega's noise (``--fat-noise``) and whether the dynamic schedule adds ``--fat-tau`` (``--fat-schedule-base``).
The authors' form is checked against a transcription of ``earlystop.py`` / ``adjust_tau``, the default against a
transcription of advplug's own draws, bit for bit."""

import pytest
import torch
from advplug_fat import FAT, EarlyStoppedPGD, parse_epochs, tau_at
from torch import nn

from advplug import OptionError, TrainContext
from advplug.plugins import enable
from advplug.testing import tiny_config

EPS, STEP, STEPS, TAU, OMEGA = 0.3, 0.05, 6, 1, 0.02


def batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    return model, torch.rand(40, 6), torch.randint(0, 3, (40,))


def transcribed_earlystop(model, data, target, continuing_only, omega=OMEGA):
    """``earlystop.py`` (CE, no random start, omega > 0) written out again: at each iteration the prediction is
    checked before the update, a wrong one with no budget left stops, a wrong one with budget spends one unit.
    ``continuing_only``: the noise ``omega * randn(iter_adv.shape)`` is drawn after the batch has shrunk to the
    samples that go on (the authors' code); otherwise it is drawn for every sample still in the batch and the
    stopped ones' draws are dropped (advplug's default; no draw at omega 0, where the authors' code still draws).
    Returns the examples in their original order."""
    control = torch.full((len(target),), TAU)
    idx = torch.arange(len(target))
    out = data.clone()
    for _ in range(STEPS):
        x = out[idx].clone().requires_grad_(True)
        output = model(x)
        wrong = output.argmax(1) != target[idx]
        stop = wrong & (control[idx] == 0)
        control[idx[wrong & ~stop]] -= 1
        grad = torch.autograd.grad(nn.functional.cross_entropy(output, target[idx], reduction="sum"), x)[0]
        go = ~stop
        if continuing_only:
            nxt = x.detach()[go] + STEP * grad[go].sign()
            nxt = nxt + omega * torch.randn(nxt.shape)
        else:
            nxt = x.detach() + STEP * grad.sign()
            nxt = (nxt + omega * torch.randn(nxt.shape) if omega else nxt)[go]
        x0 = data[idx[go]]
        out[idx[go]] = torch.clamp(x0 + torch.clamp(nxt - x0, -EPS, EPS), 0, 1)
        idx = idx[go]
        if idx.numel() == 0:
            break
    return out


def run_attack(noise, omega=OMEGA):
    model, x, y = batch()
    kw = {} if noise is None else {"noise": noise}
    atk = EarlyStoppedPGD(model, eps=EPS, alpha=STEP, steps=STEPS, tau=TAU, start="none", omega=omega, **kw)
    torch.manual_seed(7)
    adv = atk(x, y)
    return adv, atk.stats()["stop_step"], torch.rand(())  # the generator's state after the attack


@pytest.mark.parametrize("omega", [OMEGA, 0.0])
@pytest.mark.parametrize("noise, continuing_only", [(None, False), ("active", False), ("continuing", True)])
def test_noise_draws_follow_the_chosen_form(noise, continuing_only, omega):
    model, x, y = batch()
    adv, stops, after = run_attack(noise, omega)
    assert 0 < int(stops.sum()) < STEPS * len(y) and int((stops < STEPS).sum()) > 3  # samples stopped early
    torch.manual_seed(7)
    ref = transcribed_earlystop(model, x, y, continuing_only, omega)
    after_ref = torch.rand(())
    if continuing_only:
        assert torch.allclose(adv, ref, atol=1e-7, rtol=0)
    else:
        assert torch.equal(adv, ref)  # the default is today's computation, bit for bit
    assert torch.equal(after, after_ref)  # as many draws as the transcription took


def test_the_two_noise_forms_differ_only_in_the_random_numbers():
    a, stops_a, after_a = run_attack("active")
    c, stops_c, after_c = run_attack("continuing")
    assert not torch.equal(a, c) and not torch.equal(after_a, after_c)
    assert (a - c).abs().max() < 10 * OMEGA  # same steps, different noise


def adjust_tau(epoch, dynamictau, tau_arg, schedule):
    """The authors' ``adjust_tau`` (FAT.py, FAT_for_TRADES.py, FAT_for_MART.py), epochs from 1: ``args.tau`` only
    when the schedule is off."""
    if not dynamictau:
        return tau_arg
    return sum(1 for m in schedule if epoch > m)


def fat_plugin(options):
    fat = enable(["fat"], "at", options).plugin("fat")
    ctx = TrainContext(
        model=nn.Linear(1, 2),
        config=tiny_config("/tmp/unused"),
        num_train=8,
        num_classes=2,
        input_shape=(1,),
        device=torch.device("cpu"),
        epochs=120,
        milestones=(60,),
        objective="at",
        make_attack=None,
        log=lambda s: None,
    )
    fat.on_train_start(ctx)
    return fat


@pytest.mark.parametrize("dynamic", [True, False])
def test_schedule_base_zero_is_the_authors_adjust_tau(dynamic):
    tau_arg = 0 if dynamic else 2  # the authors' form refuses a --fat-tau it would ignore
    fat = fat_plugin({"fat-schedule-base": "zero", "fat-dynamic": str(dynamic), "fat-tau": str(tau_arg)})
    assert [fat.tau(e) for e in range(120)] == [adjust_tau(e + 1, dynamic, tau_arg, (50, 90)) for e in range(120)]


def test_schedule_base_tau_adds_fat_tau_by_default():
    fat = fat_plugin({"fat-tau": "2"})
    assert fat.options.schedule_base == "tau"
    assert [fat.tau(e) for e in (0, 49, 50, 89, 90)] == [2, 2, 3, 3, 4]
    assert [fat.tau(e) for e in range(120)] == [tau_at(e, 2, parse_epochs("50,90")) for e in range(120)]


def test_the_authors_schedule_refuses_a_tau_it_would_ignore():
    with pytest.raises(OptionError, match="--fat-tau 2 has no effect"):
        enable(["fat"], "at", {"fat-tau": "2", "fat-schedule-base": "zero"})


def test_the_options_are_checked_and_listed():
    assert FAT.Options().noise == "active" and FAT.Options().schedule_base == "tau"
    assert enable(["fat"], "at", {"fat-noise": "continuing"}).plugin("fat").options.noise == "continuing"
    with pytest.raises(OptionError, match="--fat-noise: 'some' is not one of active, continuing"):
        enable(["fat"], "at", {"fat-noise": "some"})
    with pytest.raises(OptionError, match="--fat-schedule-base: 'one' is not one of tau, zero"):
        enable(["fat"], "at", {"fat-schedule-base": "one"})
    with pytest.raises(OptionError, match="noise"):
        EarlyStoppedPGD(nn.Linear(1, 2), noise="all")


def test_the_attack_gets_the_noise_form(tmp_path):
    fat = fat_plugin({"fat-noise": "continuing"})
    assert fat.attack.noise == "continuing"
