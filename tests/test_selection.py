"""Model selection on held-out training data: the "best" checkpoint is never chosen on the
test set unless the user asks for it, explicitly and labelled."""

import json

import pytest
import torch

from advplug.engine.inputs import SPLIT_SEED, training_data
from advplug.engine.trainer import Trainer
from advplug.run import checkpoint
from advplug.testing import ConstantWeights, digits_subset, installed_plugins, tiny_config


def quiet(_):
    pass


def rows(x):
    return {tuple(r.flatten().tolist()) for r in x}


@pytest.mark.slow
def test_selection_split_is_held_out_disjoint_and_recorded(tmp_path):
    data = digits_subset(400, 64)
    logs = []
    t = Trainer(
        tiny_config(str(tmp_path), epochs=3, milestones=(2,), selection="validation"), data=data, log=logs.append
    )
    sx, sy = t.data.selection
    tx, _ = t.data.train
    assert len(sy) == 40 and t.data.num_train == 360  # min(1000, 10 %)
    assert not rows(sx) & rows(tx) and rows(sx) | rows(tx) == rows(data.train[0])
    assert not rows(sx) & rows(data.test[0])
    t.fit()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["selection"], cfg["num_selection"], cfg["split_seed"], cfg["num_train"]) == (
        "validation",
        40,
        SPLIT_SEED,
        360,
    )
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("val_pgd_acc" in r and "test_pgd_acc" not in r and "pgd_acc" not in r for r in recs)
    best = max(range(3), key=lambda e: (recs[e]["val_pgd_acc"], -e))  # first epoch with the highest held-out PGD
    assert checkpoint.load(tmp_path, need="training")["best_epoch"] == best
    assert checkpoint.load_best(tmp_path)["epoch"] == best
    assert any("best chosen by PGD-3 on 40 held-out training samples" in m for m in logs)


def test_plugins_validation_split_is_disjoint_from_the_selection_split():
    from advplug.config import TrainConfig

    data = digits_subset(500, 32)
    cfg = TrainConfig(data="digits", selection_size=50, val_size=0.2)
    d = training_data(cfg, data, validation=True)
    (sx, _), (vx, _), (tx, _) = d.selection, d.validation, d.train
    assert (len(sx), len(vx), len(tx)) == (50, 90, 360)  # 20 % of what is left after the selection split
    assert not rows(sx) & rows(vx) and not rows(sx) & rows(tx) and not rows(vx) & rows(tx)
    again = training_data(cfg, data, validation=True)  # fixed by the seed: the same split every time
    assert torch.equal(again.selection[0], sx) and torch.equal(again.validation[0], vx)


def test_selection_on_test_is_explicit_and_labelled(tmp_path):
    logs = []
    Trainer(tiny_config(str(tmp_path), selection="test"), data=digits_subset(200, 48), log=logs.append).fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "test_pgd_acc" in recs[0] and "val_pgd_acc" not in recs[0]
    assert any("TEST samples (--selection test: not a held-out choice)" in m for m in logs)
    from advplug.tools.compare import compare

    md, _ = compare([str(tmp_path)])
    assert "| AT | 1 | test |" in md


def test_an_inert_reweighting_is_reported(tmp_path):
    """Weights that stay uniform (ESS 1 > 0.995) for 3 epochs: a warning naming the plugin."""
    ConstantWeights.value = None
    with installed_plugins(const="advplug.testing:ConstantWeights"):
        cfg = tiny_config(str(tmp_path), plugins=("const",), epochs=4, milestones=(3,))
        t = Trainer(cfg, data=digits_subset(128, 32), log=quiet)
        t.enabled.plugin("const").value = torch.ones(64)
        t.fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["warnings" in r for r in recs] == [False, False, True, False]  # once, after the 3rd such epoch
    assert "weights of const have been nearly uniform for 3 epochs" in recs[2]["warnings"][0]


@pytest.mark.parametrize("value,warned", [(torch.linspace(0.1, 1.9, 64), False)])
def test_an_active_reweighting_is_not_reported(tmp_path, value, warned):
    with installed_plugins(const="advplug.testing:ConstantWeights"):
        t = Trainer(tiny_config(str(tmp_path), plugins=("const",), epochs=3), data=digits_subset(128, 32), log=quiet)
        t.enabled.plugin("const").value = value
        t.fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("warnings" in r for r in recs) == warned


def test_the_inert_warning_names_the_option_that_controls_the_plugin(tmp_path):
    """MAIL with gamma 0 weighs every sample sigmoid(0) = 1/2, i.e. uniformly after Eq. 8."""
    cfg = tiny_config(
        str(tmp_path),
        plugins=("mail",),
        epochs=3,
        milestones=(2,),
        plugin_options={"mail-burn-in": 0, "mail-gamma": 0.0},
    )
    Trainer(cfg, data=digits_subset(128, 32), log=quiet).fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "mail: --mail-gamma" in recs[2]["warnings"][0]
