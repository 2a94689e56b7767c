"""LRAT's SAA (targeted APGD-DLR) against torchattacks' ``APGDT`` on the same inputs and seeds."""

import pytest
import torch
import torchattacks

from advplug.attacks import SAA, dlr_targeted
from advplug.data import load_digits_tensors
from advplug.models import build_model


@pytest.fixture(scope="module")
def model_and_data():
    """digits-cnn after three quick epochs: most samples correct, some robust at small eps."""
    torch.manual_seed(0)
    (x, y), _ = load_digits_tensors()
    m = build_model("digits-cnn", 10, (1, 8, 8))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    with torch.random.fork_rng():
        for _ in range(3):
            for i in range(0, len(x), 128):
                loss = torch.nn.functional.cross_entropy(m(x[i : i + 128]), y[i : i + 128])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return m.eval(), x[:160], y[:160]


def test_dlr_targeted_by_hand():
    z = torch.tensor([[4.0, 1.0, 3.0, 0.5, 2.0]])
    # sorted: 0.5 1 2 3 4 -> z_pi1 = 4, z_pi3 = 2, z_pi4 = 1; y = 0, target 2
    assert dlr_targeted(z, torch.tensor([0]), torch.tensor([2])).item() == pytest.approx(-(4 - 3) / (4 - 1.5))


@pytest.mark.parametrize("eps,steps", [(0.03, 5), (0.08, 20), (0.2, 20)])
def test_one_run_is_torchattacks_attack_single_run_bit_for_bit(model_and_data, eps, steps):
    m, x, y = model_and_data
    ref = torchattacks.APGDT(m, eps=eps, steps=steps, n_classes=10)
    ref.target_class = 2
    with torch.no_grad():
        y_target = m(x).sort(1)[1][:, -2]
    torch.manual_seed(3)
    theirs = ref.attack_single_run(x, y)
    torch.manual_seed(3)
    ours = SAA(m, eps=eps, steps=steps).run(x, y, y_target)
    for name, a, b in zip(("x_best", "acc", "loss_best", "x_best_adv"), theirs, ours):
        assert torch.equal(a.to(b.dtype), b), name
    assert 0 < ours[1].float().mean() < 1  # some fooled, some not: both branches of the selection ran


@pytest.mark.parametrize("eps", [0.03, 0.08])
def test_sequential_waves_are_apgdt_on_every_sample_it_fools(model_and_data, eps):
    """``waves = (1, 1, 1)``: APGDT's order, batches and random draws, so the same samples are
    fooled by the same iterates; where APGDT gives up (returns x), SAA still perturbs."""
    m, x, y = model_and_data
    ref = torchattacks.APGDT(m, eps=eps, steps=10, n_classes=10, seed=7)
    ref.n_target_classes = 3
    theirs = ref(x, y)
    torch.manual_seed(7)
    atk = SAA(m, eps=eps, steps=10, n_target_classes=3, waves=(1, 1, 1))
    ours = atk(x, y)
    with torch.no_grad():
        correct = m(x).argmax(1) == y
        fooled_theirs = correct & (m(theirs).argmax(1) != y)
        fooled_ours = correct & (m(ours).argmax(1) != y)
    assert fooled_theirs.any() and (correct & ~fooled_theirs).any()
    assert torch.equal(fooled_ours, fooled_theirs)
    assert torch.equal(ours[fooled_theirs], theirs[fooled_theirs])
    survivors = correct & ~fooled_theirs
    assert (ours[survivors] != x[survivors]).flatten(1).any(1).all()  # training attack: always perturbed
    assert torch.equal(ours[~correct], x[~correct])  # misclassified at x: returned as is, as APGDT does


@pytest.mark.slow
def test_default_waves_are_as_strong_as_apgdt(model_and_data):
    """Targets 2 and 3 at once on the survivors of target 1: the same per-sample attack from other
    random starts, so over several seeds it fools at least as many samples (within noise)."""
    m, x, y = model_and_data
    ours, theirs = [], []
    for seed in range(4):
        ref = torchattacks.APGDT(m, eps=0.05, steps=10, n_classes=10, seed=seed)
        ref.n_target_classes = 3
        torch.manual_seed(seed)
        a = SAA(m, eps=0.05, steps=10, n_target_classes=3)(x, y)
        b = ref(x, y)
        with torch.no_grad():
            ours.append((m(a).argmax(1) == y).float().mean().item())
            theirs.append((m(b).argmax(1) == y).float().mean().item())
    assert 0.05 < sum(theirs) / 4 < 0.95
    assert sum(ours) / 4 <= sum(theirs) / 4 + 0.02


def test_survivors_get_the_highest_loss_iterate_over_all_targets(model_and_data, monkeypatch):
    m, x, y = model_and_data
    runs = []
    real = SAA.run

    def spy(self, xs, ys, ts):
        out = real(self, xs, ys, ts)
        runs.append((ts, out))
        return out

    monkeypatch.setattr(SAA, "run", spy)
    torch.manual_seed(1)
    atk = SAA(m, eps=0.03, steps=5, n_target_classes=3)
    adv = atk(x, y)
    assert len(runs) == 2  # two waves
    with torch.no_grad():
        correct = m(x).argmax(1) == y
        fooled = m(adv).argmax(1) != y
    survivors = (correct & ~fooled).nonzero().squeeze(1)
    assert survivors.numel() > 0
    tried = (atk.targets >= 0).sum(1)
    assert (tried[survivors] == 3).all()
    # the returned iterate is one of the per-target best iterates, the one with the highest loss
    best_by_run = []
    idx1 = correct.nonzero().squeeze(1)
    pos1 = {int(i): j for j, i in enumerate(idx1)}
    x_best1, _, loss1, _ = runs[0][1]
    wave2 = runs[1][1]
    m2 = wave2[0].shape[0] // 2
    idx2 = (correct & (atk.targets[:, 1] >= 0)).nonzero().squeeze(1)
    pos2 = {int(i): j for j, i in enumerate(idx2)}
    for s in survivors.tolist():
        cands = [(loss1[pos1[s]], x_best1[pos1[s]])] + [
            (wave2[2][k * m2 + pos2[s]], wave2[0][k * m2 + pos2[s]]) for k in range(2)
        ]
        best_by_run.append(max(cands, key=lambda c: c[0].item())[1])
    assert torch.equal(adv[survivors], torch.stack(best_by_run))
