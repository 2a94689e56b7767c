"""A third-party plugin's hook wrappers (``@hookimpl(wrapper=True)``) are honoured: the core calls every hook through
pluggy, so a wrapper sees the results it wraps and may change them; a bad plugin is still named."""

import json
from typing import ClassVar

import pytest
import torch

from advplug import PluginError, Weights, hookimpl
from advplug.engine.trainer import Trainer
from advplug.testing import digits_subset, installed_plugins, tiny_config

HERE = __name__  # the plugins below, "installed" as HERE:Class


class Halves:
    """A weigher: every sample weighs 0.5."""

    @hookimpl
    def compute_weights(self, ctx):
        return Weights(adv=torch.full((ctx.batch_size,), 0.5))


class Quarters:
    """A second weigher: every sample weighs 0.25."""

    @hookimpl
    def compute_weights(self, ctx):
        return Weights(adv=torch.full((ctx.batch_size,), 0.25))


class Doubler:
    """Wraps ``compute_weights``: doubles the weights it wraps and records the result lists it saw."""

    seen: ClassVar[list] = []

    @hookimpl(wrapper=True)
    def compute_weights(self, ctx, variants):
        results = yield
        Doubler.seen.append([r.adv[0].item() for r in results])
        return [Weights(adv=r.adv * 2) for r in results]


class Reporter:
    """Records one number per epoch."""

    @hookimpl
    def on_epoch_end(self, epoch):
        return {"epoch_seen": epoch}


class Tagger:
    """Wraps ``on_epoch_end``: adds a key to each plugin's record."""

    @hookimpl(wrapper=True)
    def on_epoch_end(self, epoch, metrics):
        results = yield
        for r in results:
            r["tagged"] = True
        return results


class VariantSpy:
    """Wraps ``generate_adversaries``: records the variant names it saw."""

    seen: ClassVar[list] = []

    @hookimpl(wrapper=True)
    def generate_adversaries(self, ctx):
        results = yield
        VariantSpy.seen.append(sorted(v.name for r in results for v in r))
        return results


PLUGINS = {n: f"{HERE}:{n.title()}" for n in ("halves", "quarters", "reporter")}
PLUGINS.update(
    doubler=f"{HERE}:Doubler", tagger=f"{HERE}:Tagger", spy=f"{HERE}:VariantSpy", bad="advplug.testing:BadWeights"
)


def trainer(tmp_path, plugins, **kw):
    with installed_plugins(**PLUGINS):
        return Trainer(
            tiny_config(str(tmp_path), plugins=plugins, epochs=1, **kw), data=digits_subset(64, 16), log=lambda s: None
        )


def one_step(t):
    x, y, i = next(iter(t.loader))
    _, _, w = t.step(x, y, i, 0, 0)
    t.close()
    return w


def test_a_compute_weights_wrapper_sees_and_changes_a_weighers_weights(tmp_path):
    Doubler.seen = []
    assert torch.all(one_step(trainer(tmp_path / "plain", ("halves",))).adv == 0.5)
    assert torch.all(one_step(trainer(tmp_path / "wrapped", ("halves", "doubler"))).adv == 1.0)
    assert Doubler.seen == [[0.5]]


def test_a_compute_weights_wrapper_wraps_each_plugins_call(tmp_path):
    Doubler.seen = []
    t = trainer(tmp_path, ("halves", "quarters", "doubler"))
    w = one_step(t)
    assert Doubler.seen == [[0.25], [0.5]]  # one call per weigher, in pluggy's order (last registered first)
    assert t.step.weighers == ["quarters", "halves"]
    assert torch.allclose(w.adv, torch.full_like(w.adv, 0.5))  # 1.0 x 0.5: the doubled weights multiply


def test_a_bad_weigher_is_still_named_under_a_wrapper(tmp_path):
    t = trainer(tmp_path, ("bad", "doubler"))
    with pytest.raises(PluginError, match="plugin 'bad' returned negative or non-finite weights"):
        t.fit()


def test_an_on_epoch_end_wrapper_changes_a_plugins_record(tmp_path):
    trainer(tmp_path, ("reporter", "tagger")).fit()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["reporter"] == {"epoch_seen": 0, "tagged": True}
    assert "tagger" not in rec  # a wrapper alone records nothing of its own


def test_a_generate_adversaries_wrapper_sees_the_objectives_attack(tmp_path):
    VariantSpy.seen = []
    one_step(trainer(tmp_path, ("spy",), objective="trades"))
    assert ["tpgd"] in VariantSpy.seen  # TRADES' own KL attack, called through pluggy
