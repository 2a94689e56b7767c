"""Weight averaging as a hook (``average_weights``, ``provides={"averaging"}``, e.g. CFA's FAWA): the averaged model
in ``--ema``'s slot, updated once per epoch by the plugin's decay, evaluated with the ``ema_`` prefix, selected as
``best-ema``, checkpointed and resumed exactly; the start-up checks."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch

from advplug import Declaration, OptionError, PluginError, hookimpl
from advplug.composition import check_composition
from advplug.engine.trainer import Trainer
from advplug.errors import CompositionError
from advplug.run import checkpoint
from advplug.testing import digits_subset, installed_plugins, run_and_resume, tiny_config

HERE = __name__
DATA = digits_subset(96, 32)


class HalfLate:
    """Averages with d = 0.5 at the 2nd and 3rd epochs only; keeps every epoch's weights for the hand computation."""

    seen: ClassVar[dict] = {}

    @hookimpl
    def declare(self):
        return Declaration(provides=frozenset({"averaging"}))

    @hookimpl
    def on_train_start(self, ctx):
        self.model = ctx.model
        HalfLate.seen = {"init": self.state(), "epochs": [], "metrics": []}

    def state(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @hookimpl
    def average_weights(self, epoch, metrics):
        HalfLate.seen["epochs"].append(self.state())
        HalfLate.seen["metrics"].append(dict(metrics))
        return 0.5 if epoch >= 1 else None


class Bad:
    """Returns a decay outside [0, 1]."""

    @hookimpl
    def declare(self):
        return Declaration(provides=frozenset({"averaging"}))

    @hookimpl
    def average_weights(self):
        return 1.5


class Undeclared:
    """Implements average_weights without declaring that it averages."""

    @hookimpl
    def average_weights(self):
        return 0.0


PLUGINS = {"halflate": f"{HERE}:HalfLate", "bad": f"{HERE}:Bad", "undeclared": f"{HERE}:Undeclared"}


def test_the_average_is_the_hand_computed_one(tmp_path, one_thread):
    with installed_plugins(**PLUGINS):
        Trainer(tiny_config(str(tmp_path), plugins=("halflate",), epochs=3), data=DATA, log=lambda s: None).fit()
    s = HalfLate.seen
    w0, (w1, w2, w3) = s["init"], s["epochs"]
    last = checkpoint.load(tmp_path, "last")
    assert last["ema"]["steps"] == 2 and last["ema"]["decay"] is None
    for k, v in last["ema"]["model"].items():
        if v.is_floating_point():  # avg = 0.5 (0.5 w0 + 0.5 w2) + 0.5 w3: epoch 1 kept nothing, 2 and 3 halve
            assert torch.allclose(v, 0.5 * (0.5 * w0[k] + 0.5 * w2[k]) + 0.5 * w3[k], atol=1e-6), k
        else:
            assert torch.equal(v, w3[k]), k  # integer buffers: copied
    assert all(torch.equal(last["model"][k], w3[k]) for k in w3)  # the hook saw the epoch's trained weights
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "ema_test_pgd_acc" not in recs[0]  # no average before the first update
    assert all("ema_test_pgd_acc" in r and "ema_test_pgd_worst_class_acc" in r for r in recs[1:])
    assert "test_pgd_worst_class_acc" in s["metrics"][0]  # the hook sees the model's held-out numbers
    assert not any(k.startswith("ema_") for m in s["metrics"] for k in m)
    assert (tmp_path / "best-ema.pt").exists()
    entries = json.loads((tmp_path / "results.json").read_text())
    assert any("last-ema" in json.dumps(e) for e in (entries if isinstance(entries, list) else [entries]))


def test_a_resumed_averaging_run_is_bit_identical(tmp_path, one_thread):
    with installed_plugins(**PLUGINS):
        full, part = run_and_resume(tmp_path, DATA, plugins=("halflate",))
    for key in ("model",):
        assert all(torch.equal(full[key][k], part[key][k]) for k in full[key])
    assert all(torch.equal(full["ema"]["model"][k], part["ema"]["model"][k]) for k in full["ema"]["model"])
    assert full["ema"]["steps"] == part["ema"]["steps"] == 2


def test_ema_beside_an_averaging_plugin_is_refused(tmp_path):
    with installed_plugins(**PLUGINS):
        with pytest.raises(OptionError, match="--ema: plugin 'halflate' keeps the run's averaged model"):
            Trainer(tiny_config(str(tmp_path), plugins=("halflate",), ema=0.9), data=DATA, log=lambda s: None)
    assert not any(tmp_path.iterdir())  # refused before the run directory is touched


def test_two_averaging_plugins_are_refused_naming_both():
    avg = Declaration(provides=frozenset({"averaging"}))
    with pytest.raises(CompositionError, match="'cfa' with 'swa': both keep the run's averaged model"):
        check_composition({"at": Declaration(), "cfa": avg, "swa": avg}, "at", "at")


def test_undeclared_averaging_and_a_bad_decay_are_named(tmp_path, one_thread):
    with installed_plugins(**PLUGINS):
        with pytest.raises(PluginError, match="'undeclared' implements average_weights but does not declare"):
            Trainer(tiny_config(str(tmp_path / "u"), plugins=("undeclared",)), data=DATA, log=lambda s: None)
        with pytest.raises(PluginError, match=r"'bad': average_weights must return a decay in \[0, 1\].*1.5"):
            Trainer(tiny_config(str(tmp_path / "b"), plugins=("bad",), epochs=1), data=DATA, log=lambda s: None).fit()


def test_the_cli_says_so_in_one_line(tmp_path):
    from click.testing import CliRunner

    from advplug.tools.cli import cli

    with installed_plugins(**PLUGINS):
        res = CliRunner().invoke(cli, ["train", "--plugin", "halflate", "--ema", "0.9", "--out", str(tmp_path / "r")])
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --ema: plugin 'halflate'"), res.stderr


def test_blend_by_hand():
    """``avg = d avg + (1 - d) w``: d = 0.25 keeps a quarter of the average; 0 takes the weights, 1 keeps it."""
    from torch import nn

    from advplug.engine.ema import EMA

    torch.manual_seed(0)
    model, shadow = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, shadow, None)
    avg = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].num_batches_tracked += 3
    w = model.state_dict()
    ema.blend(0.25)
    for k, v in ema.model.state_dict().items():
        want = 0.25 * avg[k] + 0.75 * w[k] if v.is_floating_point() else w[k]
        assert torch.allclose(v, want, atol=1e-7), k
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    ema.blend(1.0)
    assert all(torch.equal(before[k], v) for k, v in ema.model.state_dict().items() if v.is_floating_point())
    ema.blend(0.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ema.model.state_dict().items())
    assert ema.steps == 3 and not ema.per_step
