"""BAT: Eq. 6-10 against hand computations, memorisation estimates, poisoning samples, composition, resume."""

import math

import numpy as np
import pytest
import torch
from advplug_bat import BAT, bat_weights, discrimination_loss, ensemble_disagreement, poisoning_score

from advplug import DataError, OptionError, TrainConfig, TrainContext
from advplug.data import DataBundle
from advplug.engine.trainer import Trainer
from advplug.models import build_model
from advplug.plugins import enable
from advplug.run import checkpoint
from advplug.testing import digits_subset, run_and_resume, same_tensors, tiny_config


def test_poisoning_score_and_weights_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    y = torch.tensor([0, 0, 2, 0])
    assert poisoning_score(probs, y).tolist() == pytest.approx([0.2, 0.6, 0.3, 0.4])  # Eq. 6
    atyp = torch.tensor([True, True, False, True])
    w = bat_weights(probs, y, atyp, alpha=1.0)
    # 0: atypical but correct -> 1; 1: atypical, wrong -> exp(-0.6); 2: typical -> 1; 3: atypical, wrong -> exp(-0.4)
    assert w.tolist() == pytest.approx([1.0, math.exp(-0.6), 1.0, math.exp(-0.4)])  # Eq. 7


def test_discrimination_loss_by_hand():
    h = torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 1])
    s = (h @ h.t()).tolist()  # tau = 1, raw dot products

    def term(i, j, negs):
        return -math.log(math.exp(s[i][j]) / sum(math.exp(s[i][k]) for k in negs))

    ref = (term(0, 1, [2, 3]) + term(1, 0, [2, 3]) + term(2, 3, [0, 1]) + term(3, 2, [0, 1])) / 4
    got = discrimination_loss(h, y, torch.ones(4, dtype=torch.bool), tau=1.0, cosine=False)
    assert got.item() == pytest.approx(ref, abs=1e-6)
    # sample 3 atypical: it is neither a positive nor a negative; anchor 2 has no positive left
    ref2 = (term(0, 1, [2]) + term(1, 0, [2])) / 2
    got2 = discrimination_loss(h, y, torch.tensor([True, True, True, False]), tau=1.0, cosine=False)
    assert got2.item() == pytest.approx(ref2, abs=1e-6)
    # cosine: the same on normalised features, with tau
    hn = h / h.norm(dim=1, keepdim=True)
    assert discrimination_loss(h, y, torch.ones(4, dtype=torch.bool), tau=0.5, cosine=True).item() == pytest.approx(
        discrimination_loss(hn / math.sqrt(0.5), y, torch.ones(4, dtype=torch.bool), tau=1.0, cosine=False).item(),
        rel=1e-5,
    )


def test_discrimination_loss_falls_when_same_class_features_move_together():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(16, 8, generator=g)
    y = torch.arange(16) % 4
    typical = torch.ones(16, dtype=torch.bool)
    before = discrimination_loss(h, y, typical, tau=1.0)
    centres = torch.stack([h[y == c].mean(0) for c in range(4)])
    after = discrimination_loss(0.5 * h + 0.5 * centres[y], y, typical, tau=1.0)
    assert after < before
    assert discrimination_loss(0.5 * h + 0.5 * centres[y], y, typical, tau=1.0, cosine=True) < discrimination_loss(
        h, y, typical, tau=1.0, cosine=True
    )
    assert discrimination_loss(h, y, torch.zeros(16, dtype=torch.bool), tau=1.0).item() == 0.0  # no typical pair


def started(num_train=10, train_data=None, model="fc1", **opts):
    b = BAT(BAT.Options(**opts))
    b.on_train_start(
        TrainContext(
            model=None,
            config=TrainConfig(model=model, out="/tmp/unused-bat"),
            num_train=num_train,
            num_classes=10,
            input_shape=(1, 8, 8),
            device=torch.device("cpu"),
            epochs=5,
            milestones=(3,),
            objective="at",
            make_attack=None,
            log=lambda s: None,
            train_data=train_data,
        )
    )
    return b


def test_memorisation_file_and_its_errors(tmp_path):
    p = tmp_path / "mem.npz"
    np.savez(p, indices=np.arange(10)[::-1], values=np.linspace(0, 0.9, 10))
    b = started(mem="file", mem_file=str(p))
    assert b.atyp.tolist() == [v > 0.15 for v in np.linspace(0, 0.9, 10)[::-1]]  # mem > sigma, by index
    np.savez(p, indices=np.arange(9), values=np.zeros(9))
    with pytest.raises(DataError, match="1 of 10 training samples have no value"):
        started(mem="file", mem_file=str(p))
    np.savez(p, idx=np.arange(10), values=np.zeros(10))
    with pytest.raises(DataError, match="arrays 'indices' and 'values'"):
        started(mem="file", mem_file=str(p))
    with pytest.raises(DataError, match="no file"):
        started(mem="file", mem_file=str(tmp_path / "nope.npz"))
    with pytest.raises(OptionError, match="needs --bat-mem-file"):
        started(mem="file")


def test_ensemble_disagreement_against_scipy(tmp_path):
    from scipy.spatial.distance import jensenshannon

    x = torch.rand(12, 1, 8, 8)
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = build_model("fc1", 10, (1, 8, 8))
        checkpoint.save(tmp_path / f"m{seed}.pt", {"model": m.state_dict(), "model_name": "fc1"})
        paths.append(str(tmp_path / f"m{seed}.pt"))
    b = started(
        num_train=12, train_data=(x, torch.zeros(12, dtype=torch.long)), mem="ensemble", mem_checkpoints=",".join(paths)
    )
    probs = []
    for p in paths:
        m = build_model("fc1", 10, (1, 8, 8))
        m.load_state_dict(checkpoint.load(p)["model"])
        probs.append(m(x).softmax(1).detach().double().numpy())
    ref = [np.mean([jensenshannon(pj[i], pp[i]) ** 2 for pj in probs for pp in probs]) / math.log(2) for i in range(12)]
    assert b.mem.tolist() == pytest.approx(ref, rel=1e-4, abs=1e-7)
    assert b.atyp.tolist() == [r > np.quantile(ref, 0.8) for r in ref]  # default: the top 20%
    assert torch.allclose(ensemble_disagreement(torch.stack([torch.eye(3)[:2], torch.eye(3)[:2]])), torch.zeros(2))
    with pytest.raises(OptionError, match="two or more checkpoints"):
        started(mem="ensemble", mem_checkpoints=paths[0])


def blobs_with_poison(n_per_class=100, n_poison=12, seed=0) -> tuple[DataBundle, torch.Tensor]:
    """Three well separated Gaussian classes (16-d, shaped 1x4x4) and ``n_poison`` atypical samples
    drawn from class 1's distribution but labelled 0: "poisoning" samples near a wrong class (Sec. 3.2)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(3, 16)
    centres[0, :5], centres[1, 5:10], centres[2, 10:] = 0.8, 0.8, 0.8
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = centres[y] + 0.08 * torch.randn(len(y), 16, generator=g)
    xp = centres[1] + 0.08 * torch.randn(n_poison, 16, generator=g)
    x, y = torch.cat([x, xp]).clamp(0, 1), torch.cat([y, torch.zeros(n_poison, dtype=torch.long)])
    perm = torch.randperm(len(y), generator=g)
    poison = torch.zeros(len(y), dtype=torch.bool)
    poison[3 * n_per_class :] = True
    x, y, poison = x[perm].view(-1, 1, 4, 4), y[perm], poison[perm]
    return DataBundle((x, y), (x[:64], y[:64]), 3, (1, 4, 4)), poison


def test_poisoning_samples_get_the_smallest_weights(tmp_path):
    data, poison = blobs_with_poison()
    cfg = tiny_config(
        str(tmp_path),
        model="fc1",
        plugins=("bat",),
        epochs=5,
        milestones=(4,),
        eps=0.05,
        alpha=0.02,
        steps=3,
        lr=0.1,
        plugin_options={"bat-dump": "true"},
    )
    Trainer(cfg, data=data, log=lambda s: None).fit()
    d = np.load(tmp_path / "dumps" / "bat-epoch005.npz")
    w = np.empty(len(poison))
    w[d["index"]] = d["weight"]
    atyp = np.zeros(len(poison), dtype=bool)
    atyp[d["index"]] = d["atypical"]
    assert atyp[poison.numpy()].all()  # the confidence estimate finds every poisoning sample
    assert (w[poison.numpy()] < 0.6).all()  # exp(-q) with q > 0.5: confidently predicted as class 1
    lowest = np.argsort(w)[: int(poison.sum())]
    assert poison.numpy()[lowest].all()  # the smallest weights are exactly the poisoning samples
    assert (w[~atyp] == 1.0).all()  # typical samples are never down-weighted


def test_wrapper_adds_beta_dl_to_trades(tmp_path):
    cfg = tiny_config(str(tmp_path), plugins=("bat",), objective="trades", plugin_options={"bat-beta": "0.5"})
    torch.manual_seed(0)
    tr = Trainer(cfg, data=digits_subset(64, 16), log=lambda s: None)
    x, y = tr.data.train[0][:32], tr.data.train[1][:32]
    loss, ctx, _ = tr.step(x, y, torch.arange(32), epoch=0, global_step=0)
    trades = tr.enabled.plugin("trades").combine_loss(ctx, ctx.variants, None)
    dl = discrimination_loss(ctx.features(ctx.variants[0]), y, torch.ones(32, dtype=torch.bool), tau=10.0)
    assert loss.item() == pytest.approx((trades + 0.5 * dl).item(), rel=1e-5)
    assert ctx.forward_count == 2  # natural + tpgd: the features come from the loss's own forwards


def test_options_and_resume(tmp_path):
    with pytest.raises(OptionError, match="--bat-atypical-fraction: must be <= 1.0"):
        enable(["bat"], "at", {"bat-atypical-fraction": "2"})
    with pytest.raises(OptionError, match="takes no --bat-mem-file"):
        started(mem_file="x.npz")
    full, part = run_and_resume(tmp_path, digits_subset(128, 32), plugins=("bat",))
    assert same_tensors(full["model"], part["model"])
    assert torch.equal(full["plugins"]["bat"]["conf_count"], torch.full((128,), 3.0))
    assert same_tensors(full["plugins"]["bat"], part["plugins"]["bat"])


def test_eq7_exponent_is_minus_alpha_q():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    y = torch.tensor([0, 0])
    w = bat_weights(probs, y, torch.tensor([True, True]), alpha=2.5)
    assert w.tolist() == pytest.approx([math.exp(-2.5 * 0.7), 1.0])  # exp(-alpha q), not exp(-q / alpha)


class Feat(torch.nn.Module):
    """x [B, 3] -> features x, logits W x: penultimate features are the input itself."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]))

    def forward(self, x):
        return self.head(x)


def bat_ctx(x_nat, x_adv, y, epoch=3):
    from advplug import FeatureTap, StepContext, Variant

    model = Feat()
    ctx = StepContext(
        model=model,
        x=x_nat,
        y=y,
        index=torch.arange(len(y)),
        epoch=epoch,
        step=0,
        num_classes=3,
        config=None,
        lr=0.1,
        tap=FeatureTap(model),
    )
    ctx.variants = [Variant("pgd", x_adv)]
    return ctx


X_NAT = torch.tensor(
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.2, 0.0], [0.0, 1.0, 0.1], [0.9, 0.0, 0.1]]
)
X_ADV = torch.tensor(
    [[0.2, 1.0, 0.0], [0.0, 1.0, 0.3], [0.5, 0.0, 0.6], [0.1, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.1, 0.0]]
)
Y6 = torch.tensor([0, 1, 2, 0, 1, 0])


def preset(atyp, **opts):
    b = BAT(BAT.Options(**opts))
    b.atyp = torch.tensor(atyp)
    return b


def test_eq8_loss_is_the_weighted_mean_over_the_sum_of_weights():
    from advplug.objectives import AdversarialCE
    from advplug.weights import combine_weights

    b = preset([True, False, True, True, False, False], alpha=2.0, beta=0.0)
    ctx = bat_ctx(X_NAT, X_ADV, Y6)
    w = combine_weights([b.compute_weights(ctx, ctx.variants)], 1, 6)
    loss = AdversarialCE().combine_loss(ctx, ctx.variants, w)
    z = (X_ADV * 2.0).tolist()
    num = den = 0.0
    for i in range(6):
        p = [math.exp(v) / sum(math.exp(u) for u in z[i]) for v in z[i]]
        wrong = max(range(3), key=lambda k: p[k]) != Y6[i].item()
        q = max(p[k] for k in range(3) if k != Y6[i].item())
        wi = math.exp(-2.0 * q) if (b.atyp[i] and wrong) else 1.0  # Eq. 7
        num += wi * -math.log(p[Y6[i].item()])
        den += wi
    assert loss.item() == pytest.approx(num / den, rel=1e-5)  # Eq. 8: sum w l / sum w
    assert w.adv.min() < 0.9  # some sample was down-weighted


def test_discrimination_loss_is_on_the_typical_samples():
    atyp = [False, False, False, True, True, False]
    b = preset(atyp, alpha=0.0, beta=0.5, tau=1.0)
    ctx = bat_ctx(X_NAT, X_ADV, Y6)
    gen = b.combine_loss(ctx, ctx.variants)
    next(gen)
    with pytest.raises(StopIteration) as stop:
        gen.send(torch.tensor(1.0))
    h = X_ADV.tolist()  # the features of the adversarial variant
    s = [[sum(a * c for a, c in zip(h[i], h[j])) for j in range(6)] for i in range(6)]
    typ = [i for i in range(6) if not atyp[i]]
    terms = []
    for i in typ:
        for j in typ:
            if i != j and Y6[i] == Y6[j]:
                negs = [k for k in typ if Y6[k] != Y6[i]]
                terms.append(-math.log(math.exp(s[i][j]) / sum(math.exp(s[i][k]) for k in negs)))  # Eq. 9
    assert terms
    assert stop.value.value.item() == pytest.approx(1.0 + 0.5 * sum(terms) / len(terms), rel=1e-5)  # Eq. 10


def test_confidence_snapshot_reads_clean_logits_where_the_step_has_them():
    b = started(num_train=6)
    ctx = bat_ctx(X_NAT, X_ADV, Y6, epoch=0)
    ctx.logits("natural"), ctx.logits(ctx.variants[0])  # as TRADES / MART compute them
    b.on_batch_end(ctx)
    assert torch.allclose(b.conf_epoch, torch.softmax(2 * X_NAT, 1).gather(1, Y6[:, None]).squeeze(1))
    b2 = started(num_train=6)
    ctx2 = bat_ctx(X_NAT, X_ADV, Y6, epoch=0)
    ctx2.logits(ctx2.variants[0])  # AT: only the adversarial forward
    b2.on_batch_end(ctx2)
    assert torch.allclose(b2.conf_epoch, torch.softmax(2 * X_ADV, 1).gather(1, Y6[:, None]).squeeze(1))


def test_memorisation_estimator_by_hand():
    from advplug_bat.memorisation import memorisation_scores

    member = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1]], dtype=torch.bool)
    correct = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    mem, n_in, n_out = memorisation_scores(correct, member)
    # sample 0: in models 0, 1 (both right), out in 2 (wrong): 1 - 0;
    # sample 1: in 0, 2 (right, wrong), out 1 (wrong): 0.5 - 0
    # sample 2: never in -> 0; sample 3: in all, never out -> 0
    assert mem.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert n_in.tolist() == [2, 2, 0, 3] and n_out.tolist() == [1, 1, 3, 0]


def test_memorisation_command_writes_the_file_bat_reads(tmp_path, capsys):
    from advplug_bat.memorisation import main

    out = tmp_path / "mem.npz"
    assert main(["--data", "digits", "--models", "3", "--epochs", "1", "--subset", "0.5", "--out", str(out)]) == 0
    d = np.load(out)
    n = int(d["num_train"])
    assert d["values"].shape == (n,) and (d["n_in"] + d["n_out"] == 3).all()
    assert np.all(np.abs(d["values"]) <= 1)
    from advplug.engine.inputs import training_data

    cfg = TrainConfig(plugins=("bat",)).resolved()
    assert training_data(cfg, None, None).num_train == n  # numbered as the trainer numbers the run's data
    b = started(num_train=n, mem="file", mem_file=str(out))
    assert b.atyp.tolist() == (d["values"] > 0.15).tolist()
    with pytest.raises(DataError, match="written for"):
        started(num_train=n + 1, mem="file", mem_file=str(out))
    assert main(["--data", "digits", "--models", "1", "--out", str(out)]) == 2
