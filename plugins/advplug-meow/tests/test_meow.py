"""MeoW: Eq. 3-5 against hand computations, codebook upkeep, typicality, end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from advplug_meow import MeoW, memorization_weights, nearest_code
from torch import nn

from advplug import FeatureTap, StepContext, TrainContext, Variant
from advplug.data import DataBundle
from advplug.engine.trainer import Trainer
from advplug.testing import tiny_config


def test_distance_and_weights_by_hand():
    codebook = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    feats = torch.tensor([[0.0, 1.0], [3.0, 1.0], [6.0, 8.0]])
    dist, idx = nearest_code(feats, codebook)
    # (0,1): 1 to code 0; (3,1): 3 to code 1 (vs sqrt(10)); (6,8): 5 to code 1
    assert idx.tolist() == [0, 1, 1]
    assert dist.tolist() == pytest.approx([1.0, 3.0, 5.0], abs=1e-5)
    w_minus, w_plus = memorization_weights(dist, 10.0)
    assert w_minus.tolist() == pytest.approx([math.exp(-0.1), math.exp(-0.3), math.exp(-0.5)], rel=1e-5)
    assert w_plus.tolist() == pytest.approx([math.exp(0.1), math.exp(0.3), math.exp(0.5)], rel=1e-5)


class Embed(nn.Module):
    """features = x itself (2-d), head a fixed linear map: we choose the features by hand."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Identity()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.pre(x))


def step_ctx(model, x_nat, x_adv, y):
    ctx = StepContext(
        model=model,
        x=x_nat,
        y=y,
        index=torch.arange(len(y)),
        epoch=0,
        step=0,
        num_classes=2,
        config=None,
        lr=0.1,
        tap=FeatureTap(model),
    )
    ctx.variants = [Variant("pgd", x_adv)]
    return ctx


def started(**opts):
    m = MeoW(MeoW.Options(**opts))
    m.on_train_start(
        TrainContext(
            model=None,
            config=None,
            num_train=10**6,
            num_classes=2,
            input_shape=(2,),
            device=torch.device("cpu"),
            epochs=1,
            milestones=(),
            objective="at",
            make_attack=None,
            log=lambda s: None,
        )
    )
    return m


def test_weights_from_the_steps_features_and_eq5_loss():
    model = Embed()
    m = started(codebook_size=2, temperature=2.0)
    m._set_codebook(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
    x_nat = torch.tensor([[1.0, 0.0], [4.0, 3.0]])
    x_adv = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    y = torch.tensor([0, 1])
    ctx = step_ctx(model, x_nat, x_adv, y)
    w = m.compute_weights(ctx, ctx.variants)
    # natural distances 1 and 3 -> w+ = exp(d/2); adversarial distances 2 and 0 -> w- = exp(-d/2)
    assert w.nat.tolist() == pytest.approx([math.exp(0.5), math.exp(1.5)], rel=1e-5)
    assert w.adv.tolist() == pytest.approx([math.exp(-1.0), 1.0], rel=1e-5)  # [B]: global, per instance
    loss = m.combine_loss(ctx, ctx.variants, w)
    ce_nat = F.cross_entropy(x_nat, y, reduction="none")  # logits = features here
    ce_adv = F.cross_entropy(x_adv, y, reduction="none")
    ref = 0.2 * (w.nat * ce_nat).mean() + 0.8 * (w.adv * ce_adv).mean()  # Eq. 5, alpha = 0.2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ctx.forward_count == 2  # natural + adversarial, shared by weights and loss


def test_codebook_moves_toward_wrong_embeddings_only_and_network_gets_no_gradient():
    model = Embed()
    m = started(codebook_size=2, codebook_lr=0.1)
    m._set_codebook(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    # sample 0 is classified correctly (class 0 logit 2 > 0) on both views; sample 1 wrongly
    x_nat = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    x_adv = torch.tensor([[2.0, 0.5], [1.0, 0.5]])
    y = torch.tensor([0, 1])
    ctx = step_ctx(model, x_nat, x_adv, y)
    m.compute_weights(ctx, ctx.variants)
    before = m.codebook.detach().clone()
    d_before = (before[0] - torch.tensor([1.0, 0.25])).norm()
    m.on_batch_end(ctx)
    after = m.codebook.detach()
    assert torch.equal(after[1], before[1])  # nearest to nothing: unchanged
    assert (after[0] - torch.tensor([1.0, 0.25])).norm() < d_before  # toward the wrong embeddings' mean
    assert all(p.grad is None for p in model.parameters())  # Eq. 3 sends no gradient into the network


def test_only_correct_samples_leave_the_codebook_alone():
    model = Embed()
    m = started(codebook_size=1)
    m._set_codebook(torch.tensor([[5.0, 5.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    ctx = step_ctx(model, x, x.clone(), torch.tensor([0, 1]))
    m.compute_weights(ctx, ctx.variants)
    m.on_batch_end(ctx)
    assert m.codebook.detach().tolist() == [[5.0, 5.0]]
    m2 = started(codebook_size=1, select="all")
    m2._set_codebook(torch.tensor([[5.0, 5.0]]))
    ctx = step_ctx(model, x, x.clone(), torch.tensor([0, 1]))
    m2.compute_weights(ctx, ctx.variants)
    m2.on_batch_end(ctx)
    assert m2.codebook.detach().tolist() != [[5.0, 5.0]]


def test_dead_codes_are_reseeded_at_epoch_end():
    model = Embed()
    m = started(codebook_size=2)
    m._set_codebook(torch.tensor([[0.0, 0.0], [100.0, 100.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ctx = step_ctx(model, x, x.clone(), torch.tensor([1, 0]))
    m.compute_weights(ctx, ctx.variants)
    m.on_batch_end(ctx)
    out = m.on_epoch_end()
    assert out["dead_codes"] == 1 and out["reset"]
    assert m.codebook.detach()[1].norm() < 2.0  # re-seeded from recent embeddings


def gaussian_mixture(n_per_class=120, n_atypical=24, seed=0):
    """Two tight clusters of typical samples; atypical ones are isolated points scattered over the
    input space (each unlike any other), labelled by the nearer cluster."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.75]])
    xs, ys = [], []
    for c in (0, 1):
        xs.append(centres[c] + 0.04 * torch.randn(n_per_class, 2, generator=g))
        ys.append(torch.full((n_per_class,), c))
    scattered = torch.rand(n_atypical, 2, generator=g)
    xs.append(scattered)
    ys.append((scattered.sum(1) > 1.0).long())
    x = torch.cat(xs).clamp(0, 1).view(-1, 1, 1, 2)
    y = torch.cat(ys)
    atypical = torch.zeros(len(y), dtype=torch.bool)
    atypical[2 * n_per_class :] = True
    return x, y, atypical


class MLP(nn.Module):
    def __init__(self, num_classes=2, input_shape=(1, 1, 2)):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def train_on_mixture(tmp_path, monkeypatch, select):
    x, y, atypical = gaussian_mixture(n_atypical=24)
    data = DataBundle((x, y), (x, y), 2, (1, 1, 2))
    cfg = tiny_config(
        str(tmp_path),
        plugins=("meow",),
        model=f"{__name__}:MLP",
        epochs=15,
        batch_size=32,
        lr=0.1,
        milestones=(),
        eps=0.05,
        alpha=0.02,
        steps=3,
        plugin_options={"meow-codebook-size": 4, "meow-scale-codebook": "false", "meow-select": select},
    )
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    t = Trainer(cfg, data=data, log=lambda s: None)
    for e in range(cfg.epochs):
        t.train_epoch(e)
    t.model.eval()
    with torch.no_grad():
        t.tap.last = None
        wrong = t.model(x).argmax(1) != y
        dist, _ = nearest_code(t.tap.last, t.enabled.plugin("meow").codebook.detach())
    return dist, atypical, wrong


def test_atypical_samples_get_lower_adversarial_weights(tmp_path, monkeypatch):
    """The memory bank holds the popular embeddings: isolated samples are far from every code."""
    dist, atypical, _ = train_on_mixture(tmp_path, monkeypatch, "all")
    w_minus, _ = memorization_weights(dist, 10.0)
    assert w_minus[atypical].mean() < w_minus[~atypical].mean()


def test_embedding_selection_pulls_codes_toward_misclassified_samples(tmp_path, monkeypatch):
    """Sec. 3.4: with only wrong embeddings updating it, the codebook sits near misclassified
    samples, which then get the larger w- (the paper's 'focus on misclassified samples')."""
    dist, atypical, wrong = train_on_mixture(tmp_path, monkeypatch, "wrong")
    assert wrong.any() and dist[wrong].mean() < dist[~wrong].mean()
    # and so the selection does not down-weight the known atypical samples: the typical ones get the smaller w-
    w_minus, _ = memorization_weights(dist, dist.mean().item())
    assert w_minus[atypical].mean() > w_minus[~atypical].mean()


@pytest.mark.slow
def test_end_to_end_resume_keeps_the_codebook(tmp_path):
    from advplug.testing import digits_subset, run_and_resume, same_tensors

    full, part = run_and_resume(tmp_path, digits_subset(), plugins=("meow",), milestones=(2,))
    assert torch.allclose(full["plugins"]["meow"]["codebook"], part["plugins"]["meow"]["codebook"], atol=1e-5)
    assert same_tensors(full["model"], part["model"])


def test_overflow_guard_keeps_weights_finite():
    d = torch.tensor([0.5, 10.0, 1000.0])
    w_minus, w_plus = memorization_weights(d, 1.0, max_log_weight=3.0)
    assert torch.isfinite(w_plus).all() and w_plus.tolist() == pytest.approx(
        [math.exp(0.5), math.exp(3.0), math.exp(3.0)]
    )
    assert w_minus.tolist() == pytest.approx([math.exp(-0.5), math.exp(-3.0), math.exp(-3.0)])
    assert torch.isinf(memorization_weights(d, 1.0)[1]).any()  # unguarded exp(d / T) overflows


def with_config(data, model, **opts):
    from advplug import TrainConfig

    m = MeoW(MeoW.Options(**opts))
    m.on_train_start(
        TrainContext(
            model=None,
            config=TrainConfig(data=data, model=model),
            num_train=10**6,
            num_classes=2,
            input_shape=(2,),
            device=torch.device("cpu"),
            epochs=1,
            milestones=(),
            objective="at",
            make_attack=None,
            log=lambda s: None,
        )
    )
    return m


def test_temperature_is_the_papers_on_its_configurations_and_the_scale_rule_elsewhere():
    assert with_config("cifar10", "preactresnet18").fixed_t == 10.0
    assert with_config("svhn", "wrn-34-10").fixed_t == 10.0
    assert with_config("digits", "digits-cnn").fixed_t is None
    assert with_config("digits", "digits-cnn", temperature=3.0).fixed_t == 3.0


def test_scale_rule_by_hand():
    """Step 1 seeds the codebook: weights 1. Then T = scale x EMA(0.9) of the batch-mean natural
    distance before the step (started at the first such mean)."""
    model = Embed()
    m = with_config("digits", "digits-cnn", codebook_size=1, temperature_scale=2.0, max_log_weight=10.0)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ctx = step_ctx(model, x, x.clone(), torch.tensor([0, 1]))
    w = m.compute_weights(ctx, ctx.variants)
    assert w.nat.tolist() == [1.0, 1.0] and torch.equal(w.adv.flatten(), torch.ones(2))
    m._set_codebook(torch.tensor([[0.0, 0.0]]))
    steps = [
        torch.tensor([[3.0, 4.0], [0.0, 1.0]]),
        torch.tensor([[6.0, 8.0], [0.0, 2.0]]),
        torch.tensor([[12.0, 16.0], [0.0, 4.0]]),
    ]  # distances (5, 1), (10, 2), (20, 4)
    means, ema = [3.0, 6.0, 12.0], None
    for xs, mean in zip(steps, means):
        ctx = step_ctx(model, xs, xs.clone(), torch.tensor([0, 1]))
        w = m.compute_weights(ctx, ctx.variants)
        ema = mean if ema is None else ema
        t = 2.0 * ema
        d = xs.norm(dim=1)
        assert w.nat.tolist() == pytest.approx(torch.exp(d / t).tolist(), rel=1e-5)
        assert w.adv.flatten().tolist() == pytest.approx(torch.exp(-d / t).tolist(), rel=1e-5)
        ema = 0.9 * ema + 0.1 * mean


def test_ema_codebook_update_by_hand():
    """One EMA step (decay g = 0.5) on a one-code book: count' = g + (1 - g) n, sum' = g e + (1 - g)
    sum of the *selected* (misclassified, natural and adversarial) embeddings; e' = sum' / count'."""
    model = Embed()
    m = started(codebook_size=1, decay=0.5)
    m._set_codebook(torch.tensor([[0.0, 0.0]]))
    x_nat = torch.tensor([[0.0, 3.0], [0.0, 2.0]])  # sample 0 wrong (label 0, logit 1 wins), sample 1 right
    x_adv = torch.tensor([[4.0, 0.0], [5.0, 1.0]])  # sample 0 right, sample 1 wrong
    ctx = step_ctx(model, x_nat, x_adv, torch.tensor([0, 1]))
    m.compute_weights(ctx, ctx.variants)
    m.on_batch_end(ctx)
    selected = torch.tensor([[0.0, 3.0], [5.0, 1.0]])  # the wrong natural of 0, the wrong adversarial of 1
    count = 0.5 * 1 + 0.5 * 2
    code = (0.5 * torch.zeros(2) + 0.5 * selected.sum(0)) / count
    assert m.codebook.detach()[0].tolist() == pytest.approx(code.tolist(), rel=1e-4)


def test_adam_codebook_update_descends_eq3():
    """Adam's first step is lr * sign(grad of Eq. 3): the code moves toward the selected embedding."""
    model = Embed()
    m = started(codebook_size=1, update="adam", codebook_lr=0.1)
    m._set_codebook(torch.tensor([[1.0, 1.0]]))
    x = torch.tensor([[0.0, 3.0], [0.0, 2.0]])  # only sample 0 (at (0, 3)) is misclassified
    ctx = step_ctx(model, x, x.clone(), torch.tensor([0, 1]))
    m.compute_weights(ctx, ctx.variants)
    m.on_batch_end(ctx)
    assert m.codebook.detach()[0].tolist() == pytest.approx([0.9, 1.1], abs=1e-4)
