"""DAFA: the class-similarity memory and the class weights against a transcription of the authors'
``calculate_class_weights``, the class budgets and the losses against a transcription of their ``losses.py``,
and whole runs on digits."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from advplug_dafa import DAFA, MadryLossPGD, class_similarity, class_weights, default_warmup, memory_add
from click.testing import CliRunner
from torch import nn

from advplug import OptionError, PluginError, hookimpl
from advplug.engine.trainer import Trainer
from advplug.testing import digits_subset, enabled_plugin, tiny_config
from advplug.tools.cli import cli


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CLASS_WEIGHTS = torch.tensor([1.3, 0.6, 1.0, 1.7, 0.9, 1.1, 0.5, 1.4, 0.8, 1.2])  # after a warm-up, none equal


def authors_calculate_class_weights(memory_dict, lamb=1.0):
    """A transcription of ``utils.py``'s ``calculate_class_weights`` (rucy74/DAFA)."""
    probs, labels = memory_dict["probs"], memory_dict["labels"]
    num_classes = len(np.unique(labels))
    class_similarity = np.zeros((num_classes, num_classes))
    class_weights = np.ones(num_classes)
    for i in range(num_classes):
        cur_indices = np.where(labels == i)[0]
        class_similarity[i] = np.mean(probs[cur_indices], axis=0)
    for i in range(num_classes):
        for j in range(num_classes):
            if i == j:
                continue
            if class_similarity[i, i] < class_similarity[j, j]:
                class_weights[i] += lamb * class_similarity[i, j] * class_similarity[j, j]
            else:
                class_weights[i] -= lamb * class_similarity[j, i] * class_similarity[i, i]
    return class_weights


def skewed_probs(n=60, k=4, seed=0):
    """Softmax outputs whose confusions are far from symmetric (class 2 is drawn towards 3, 3 barely towards 2),
    and unequal class counts, so that a transposed similarity or a swapped index changes the weights."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0] * 9 + [1] * 21 + [2] * 12 + [3] * (n - 42))[torch.randperm(n, generator=g)]
    bias = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.5, 1.5, 0.0, 1.0], [0.0, 0.0, 0.8, 2.0], [0.2, 0.0, 0.1, 2.5]])
    logits = bias[y] + torch.randn(n, k, generator=g)
    return torch.softmax(logits, 1).double(), y


def device_memory(probs, y, k, batch=16):
    """The plugin's memory, filled batch by batch as the warm-up epoch's steps fill it."""
    total, count = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    for idx in order.split(batch):
        memory_add(total, count, probs[idx].float(), y[idx])
    return total, count


@pytest.mark.parametrize("lamb", [1.0, 1.5, 0.3])
def test_class_weights_match_the_authors_calculate_class_weights(lamb):
    probs, y = skewed_probs()
    total, count = device_memory(probs, y, 4)
    # the authors' memory: softmax rows written at each sample's index, labels beside them
    memory = {"probs": probs.float().double().numpy(), "labels": y.double().numpy()}
    ref = authors_calculate_class_weights(memory, lamb)
    sim = class_similarity(total, count)
    got = class_weights(sim, lamb)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)
    # the weights are not symmetric in the classes: a transposed similarity gives other numbers
    assert not np.allclose(class_weights(sim.T.contiguous(), lamb).numpy(), ref, atol=1e-3)
    assert len(set(np.round(ref, 6))) == 4 and ref.min() < 1 < ref.max()


def test_similarity_is_the_class_mean_of_the_recorded_probabilities():
    probs, y = skewed_probs(seed=3)
    total, count = device_memory(probs, y, 4)
    ref = np.stack([probs[y == i].float().double().mean(0).numpy() for i in range(4)])
    np.testing.assert_allclose(class_similarity(total, count).numpy(), ref, rtol=0, atol=1e-12)
    assert count.tolist() == [9, 21, 12, 18]


def test_a_tie_on_the_diagonal_goes_to_the_subtracting_branch():
    # classes 0 and 1 are equally easy (p_00 = p_11 = 0.5): the code's ``<`` is false both ways, so both lose weight
    probs = torch.tensor(
        [[0.5, 0.3, 0.2], [0.5, 0.1, 0.4], [0.2, 0.5, 0.3], [0.4, 0.5, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]],
        dtype=torch.float64,
    )
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    total, count = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    memory_add(total, count, probs, y)
    ref = authors_calculate_class_weights({"probs": probs.numpy(), "labels": y.double().numpy()})
    got = class_weights(class_similarity(total, count), 1.0)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)
    s = class_similarity(total, count).numpy()
    assert s[0, 0] == s[1, 1]
    # by hand: class 0 loses s[1,0] s[0,0] (tie with 1) and gains s[0,2] s[2,2] (2 is easier)
    assert got[0].item() == pytest.approx(1 - s[1, 0] * s[0, 0] + s[0, 2] * s[2, 2])


def test_lambda_is_spelt_out_on_the_command_line_and_in_config_files():
    from advplug.plugins import describe_plugin, load_class

    assert enabled_plugin("dafa", {"dafa-lambda": "1.5"}, "trades").options.lambda_ == 1.5
    flags = [o["flag"] for o in describe_plugin("dafa", load_class("dafa"), None)["options"]]
    assert "--dafa-lambda" in flags and "--dafa-warmup" in flags
    with pytest.raises(OptionError, match="--dafa-lambda: must be >= 0"):
        enabled_plugin("dafa", {"dafa-lambda": "-1"}, "trades")


# -- the losses and the attacks against losses.py ----------------------------------------------------------------------
def class_mask(y, weights):
    """losses.py's ``class_weights_mask``: each sample's class weight, by a loop over the classes."""
    mask = torch.zeros(len(y))
    for i in range(len(weights)):
        mask[np.where(y.numpy() == i)[0]] = weights[i]
    return mask


def authors_trades_loss(model, x_natural, y, class_weights, step_size, epsilon, perturb_steps, beta):
    """A transcription of ``losses.py``'s ``trades_loss`` (no memory): (x_adv, loss)."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    batch_size = len(x_natural)
    m = class_mask(y, class_weights)
    x_adv = x_natural.detach() + 0.0
    x_adv += 0.001 * torch.randn(x_natural.shape).detach()
    logits_nat = model(x_natural)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(logits_nat, dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + (m * step_size).view(-1, 1, 1, 1) * torch.sign(grad.detach())
        x_adv = torch.min(
            torch.max(x_adv, x_natural - (m * epsilon).view(-1, 1, 1, 1)), x_natural + (m * epsilon).view(-1, 1, 1, 1)
        )
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    logits = model(x_adv)
    logits_nat = model(x_natural)
    loss_natural = (nn.CrossEntropyLoss(reduction="none")(logits_nat, y) * m).mean()
    loss_robust = criterion_kl(F.log_softmax(logits, dim=1), F.softmax(logits_nat, dim=1)) / batch_size
    return x_adv, loss_natural + beta * loss_robust


def authors_madry_loss(model, x_natural, y, class_weights, step_size, epsilon, perturb_steps):
    """A transcription of ``losses.py``'s ``madry_loss`` (no memory), its second unscaled step included."""
    criterion_ce = nn.CrossEntropyLoss()
    model.eval()
    m = class_mask(y, class_weights)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = criterion_ce(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + (m * step_size).view(-1, 1, 1, 1) * torch.sign(grad.detach())
        x_adv = torch.min(
            torch.max(x_adv, x_natural - (m * epsilon).view(-1, 1, 1, 1)), x_natural + (m * epsilon).view(-1, 1, 1, 1)
        )
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    loss = (nn.CrossEntropyLoss(reduction="none")(model(x_adv), y) * m).mean()
    return x_adv, loss


def trainer(tmp_path, objective="trades", options=None, data=None, **kw):
    cfg = tiny_config(str(tmp_path / "run"), plugins=("dafa",), objective=objective, plugin_options=options or {}, **kw)
    return Trainer(cfg, data=data or digits_subset(128, 32), log=lambda s: None)


def step_after_warmup(tr, n=48, seed=5):
    """One step with the class weights set (as at the end of a warm-up); returns the model before the step, the
    batch, the step's loss and context."""
    tr.enabled.plugin("dafa").weights = CLASS_WEIGHTS.clone()
    x, y = tr.data.train[0][:n], tr.data.train[1][:n]
    before = copy.deepcopy(tr.model)
    torch.manual_seed(seed)
    loss, ctx, w = tr.step(x, y, torch.arange(n), epoch=1, global_step=1)
    return before, x, y, loss, ctx, w


def test_trades_step_is_the_authors_trades_loss(tmp_path, one_thread):
    tr = trainer(tmp_path, "trades", steps=5)  # 5 steps of 0.05 reach every class's radius w * 0.2
    before, x, y, loss, ctx, w = step_after_warmup(tr)
    cfg = tr.cfg
    torch.manual_seed(5)
    x_ref, loss_ref = authors_trades_loss(before, x, y, CLASS_WEIGHTS.tolist(), cfg.alpha, cfg.eps, cfg.steps, 6.0)
    assert [v.name for v in ctx.variants] == ["tpgd"]
    assert torch.allclose(ctx.variants[0].x, x_ref, atol=1e-6, rtol=0)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    # the class budgets: each sample's eps and step are its class weight times the run's
    assert torch.allclose(ctx.budget.eps, CLASS_WEIGHTS[y] * cfg.eps) and torch.allclose(
        ctx.budget.alpha, CLASS_WEIGHTS[y] * cfg.alpha
    )
    d = (ctx.variants[0].x - x).flatten(1).abs().amax(1)
    assert (d <= CLASS_WEIGHTS[y] * cfg.eps + 1e-6).all() and (
        d > 0.99 * CLASS_WEIGHTS[y] * cfg.eps
    ).float().mean() > 0.9
    # the weights: the natural CE only, as computed (not mean 1), the KL term unweighted
    assert torch.equal(w.nat, CLASS_WEIGHTS[y]) and w.adv is None


def test_at_step_code_attack_is_the_authors_madry_loss(tmp_path, one_thread):
    tr = trainer(tmp_path, "at", {"dafa-at-attack": "code"})
    before, x, y, loss, ctx, w = step_after_warmup(tr)
    cfg = tr.cfg
    torch.manual_seed(5)
    x_ref, loss_ref = authors_madry_loss(before, x, y, CLASS_WEIGHTS.tolist(), cfg.alpha, cfg.eps, cfg.steps)
    assert [v.name for v in ctx.variants] == ["dafa"]
    assert torch.equal(ctx.variants[0].x, x_ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    assert torch.equal(w.adv[0], CLASS_WEIGHTS[y]) and w.nat is None


def test_madry_loss_attack_before_the_weights_is_the_authors_with_weights_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(12, 1, 4, 4), torch.randint(0, 3, (12,))
    torch.manual_seed(2)
    got = MadryLossPGD(model, eps=0.1, alpha=0.03, steps=4)(x, y)
    torch.manual_seed(2)
    ref, _ = authors_madry_loss(model, x, y, [1.0, 1.0, 1.0], 0.03, 0.1, 4)
    assert torch.equal(got, ref)


def test_at_step_budget_attack_scales_pgd_per_class(tmp_path, one_thread):
    tr = trainer(tmp_path, "at", steps=5)
    before, x, y, loss, ctx, w = step_after_warmup(tr)
    cfg = tr.cfg
    assert [v.name for v in ctx.variants] == ["pgd"]
    x_adv = ctx.variants[0].x
    d = (x_adv - x).flatten(1).abs().amax(1)
    assert (d <= CLASS_WEIGHTS[y] * cfg.eps + 1e-6).all()
    assert (d > 0.99 * CLASS_WEIGHTS[y] * cfg.eps).float().mean() > 0.9  # PGD reaches each class's own radius
    ref = (F.cross_entropy(before(x_adv), y, reduction="none") * CLASS_WEIGHTS[y]).mean()  # madry_loss's loss
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_the_memory_epoch_records_the_adversarial_training_probabilities(tmp_path, one_thread):
    """Epochs 2, warm-up 1: the weights after the run are the authors' function of the softmax of the adversarial
    logits of every training step of epoch 1 (recorded beside the plugin from the step's own logits)."""
    tr = Trainer(
        tiny_config(str(tmp_path / "r"), plugins=("dafa",), objective="trades", epochs=2, batch_size=32),
        data=digits_subset(160, 32),
        log=lambda s: None,
    )
    rec = Recorder()
    tr.pm.register(rec, "rec")  # an observer beside the run's plugins: reads, changes nothing
    tr.fit()
    probs = torch.cat(rec.probs).double().numpy()
    labels = torch.cat(rec.labels).double().numpy()
    assert len(labels) == 160 and rec.views == {"tpgd"}  # every training sample once, from the adversarial view
    ref = authors_calculate_class_weights({"probs": probs, "labels": labels}, 1.0)
    got = tr.enabled.plugin("dafa").weights
    np.testing.assert_allclose(got.double().numpy(), np.maximum(ref, 0).astype(np.float32), rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(rows[0]["dafa"]["raw_weights"], ref, rtol=0, atol=1e-9)
    assert "dafa" not in rows[1]


class Recorder:
    """Keeps, in the first epoch, the softmax of the logits the step already computed for its adversarial view."""

    def __init__(self):
        self.probs, self.labels, self.views = [], [], set()

    @hookimpl
    def on_batch_end(self, ctx, loss):
        if ctx.epoch == 0:
            v = ctx.variants[0]
            self.views.add(v.name)
            self.probs.append(ctx.probs(v).clone())
            self.labels.append(ctx.y.clone())


# -- warm-up, clamping, options ----------------------------------------------------------------------------------------
def test_default_warmup_is_the_codes_share_of_the_run():
    # arguments.py: 70 of 110 epochs; at least 1, and an epoch left after it
    assert [default_warmup(e) for e in (110, 15, 30, 3, 2, 1)] == [70, 10, 19, 2, 1, 0]


def fake_step(epoch, y, probs_by_view):
    from types import SimpleNamespace

    return SimpleNamespace(epoch=epoch, y=y, anchor="tpgd", probs=lambda v: probs_by_view[v])


def test_memory_reads_the_anchor_and_negative_weights_are_clamped():
    """A class (2) that every other class is confused with, and that is the easiest: the code's weight for it is
    negative; it is clamped at --dafa-min-weight, the others are the code's."""
    dafa = DAFA(DAFA.Options(warmup=2, lambda_=1.0))
    dafa.objective, dafa.warmup, dafa._log = "trades", 2, lambda s: None
    dafa._total, dafa._count = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    adv = torch.tensor([[0.2, 0.1, 0.7], [0.1, 0.2, 0.7], [0.0, 0.1, 0.9], [0.3, 0.0, 0.7]])
    nat = torch.full((4, 3), 1 / 3)
    y = torch.tensor([0, 1, 2, 0])
    assert dafa.compute_weights(fake_step(0, y, {"tpgd": adv, "natural": nat}), []) is None  # not the memory epoch
    assert dafa._count.sum() == 0
    assert dafa.compute_weights(fake_step(1, y, {"tpgd": adv, "natural": nat}), []) is None  # memory, weights 1
    out = dafa.on_epoch_end(1)
    ref = authors_calculate_class_weights({"probs": adv.double().numpy(), "labels": y.double().numpy()})
    assert ref[2] < 0 < ref[0] and ref[1] > 0
    np.testing.assert_allclose(out["raw_weights"], ref, atol=1e-6)
    np.testing.assert_allclose(dafa.weights.numpy(), np.maximum(ref, 0), atol=1e-6)
    w = dafa.compute_weights(fake_step(2, y, {"tpgd": adv, "natural": nat}), [])
    assert torch.equal(w.nat, dafa.weights[y]) and w.adv is None
    assert dafa.on_epoch_end(2) is None  # computed once


def test_warmup_must_leave_an_epoch_and_mart_is_refused(tmp_path):
    def one_line(args, pattern):
        res = CliRunner().invoke(
            cli, ["train", "--plugin", "dafa", "--epochs", "2", "--out", str(tmp_path / "x"), *args]
        )
        assert res.exit_code == 2, res.output
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and pattern in lines[0], res.stderr

    one_line(["--dafa-warmup", "2"], "--dafa-warmup 2 leaves no epoch with class weights (2 epochs)")
    one_line(["--objective", "mart"], "dafa with --objective mart")
    one_line(["--dafa-min-weight", "-1"], "--dafa-min-weight: must be >= 0.0")
    one_line(["--dafa-at-attack", "pgd"], "--dafa-at-attack: 'pgd' is not one of budget, code")


def test_code_attack_beside_another_attack_plugin_is_refused(tmp_path, one_thread):
    tr = Trainer(
        tiny_config(
            str(tmp_path / "r"), plugins=("dafa", "fat"), objective="at", plugin_options={"dafa-at-attack": "code"}
        ),
        data=digits_subset(64, 16),
        log=lambda s: None,
    )
    x, y = tr.data.train[0][:8], tr.data.train[1][:8]
    with pytest.raises(PluginError, match="use --dafa-at-attack budget"):
        tr.step(x, y, torch.arange(8), epoch=0, global_step=0)


# -- whole runs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective,options", [("trades", []), ("at", []), ("at", ["--dafa-at-attack", "code"])])
def test_two_epochs_on_digits_from_the_command_line(tmp_path, objective, options, one_thread):
    (xt, yt), (xs, ys) = digits_subset(160, 32).train, digits_subset(160, 32).test
    data = tmp_path / "d.npz"
    np.savez(data, x_train=xt.numpy(), y_train=yt.numpy(), x_test=xs.numpy(), y_test=ys.numpy())
    out = tmp_path / "run"
    args = ["train", "--plugin", "dafa", "--objective", objective, "--epochs", "2", "--data", f"npz:{data}"]
    args += ["--steps", "2", "--batch-size", "32", "--selection", "test", "--no-progress", "--out", str(out), *options]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "dafa: warm-up of 1 epoch (memory in epoch 1)" in res.output and "dafa: class weights 0: " in res.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    w = rows[0]["dafa"]["class_weights"]
    assert len(w) == 10 and len(set(w)) > 1 and "dafa" not in rows[1]
    assert (rows[1]["weights"]["min"], rows[1]["weights"]["max"]) == pytest.approx((min(w), max(w)), rel=1e-6)
    assert json.loads((out / "config.json").read_text())["resolved_plugin_options"]["dafa"]["warmup"] is None


def test_resume_after_the_warmup_continues_exactly(tmp_path, one_thread):
    data = digits_subset(96, 16)
    opts = {"dafa-warmup": 1}
    full = Trainer(
        tiny_config(str(tmp_path / "a"), plugins=("dafa",), objective="trades", epochs=3, plugin_options=opts),
        data=data,
        log=lambda s: None,
    )
    full.fit()
    Trainer(
        tiny_config(str(tmp_path / "b"), plugins=("dafa",), objective="trades", epochs=2, plugin_options=opts),
        data=data,
        log=lambda s: None,
    ).fit()
    cfg = tiny_config(str(tmp_path / "b"), plugins=("dafa",), objective="trades", epochs=2, plugin_options=opts)
    resumed = Trainer(cfg, data=data, resume=True, epochs=3, log=lambda s: None)
    assert torch.equal(resumed.enabled.plugin("dafa").weights, full.enabled.plugin("dafa").weights)
    resumed.fit()
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("objective,options", [("trades", {}), ("at", {}), ("at", {"dafa-at-attack": "code"})])
def test_no_host_sync_in_the_memory_epoch_or_after_it(tmp_path, monkeypatch, objective, options, one_thread):
    """The calls that would sync a GPU, counted during steps of the memory epoch and of the weighted epoch after
    it (the class weights are computed once, at the memory epoch's end, outside the steps)."""
    counts, on = {}, [False]
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            if on[0]:
                counts[_name] = counts.get(_name, 0) + 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    opts = {"dafa-warmup": 1, **options}
    tr = trainer(tmp_path, objective, opts, data=digits_subset(192, 16), epochs=3, batch_size=32)
    batches = iter(tr.loader)
    x, y, i = next(batches)
    tr.step(x, y, i, 0, 0)  # the first step's lazy set-up
    for epoch in (0, 1):
        on[0] = True
        for k in range(2):
            x, y, i = next(batches)
            tr.step(x, y, i, epoch, k + 1)
        on[0] = False
        tr.enabled.plugin("dafa").on_epoch_end(epoch)
    tr.close()
    assert tr.enabled.plugin("dafa").weights is not None
    assert not counts, counts
