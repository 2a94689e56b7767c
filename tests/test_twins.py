"""The hand-written twins (``benchmarks/twins``) compute the same training loss as advplug's plugin or objective on
the same batches, from the same model, optimizer and random state, step after step (the twins carry the methods'
state: MeoW's codebook and temperature, BAT's confidence history, GAIRAT's kappa, BiLAW's omega); and a twin with one
changed constant does not."""

from __future__ import annotations

import pytest
import torch

from advplug.engine.trainer import Trainer
from advplug.testing import digits_subset, tiny_config
from benchmarks.twins import METHODS, TWINS, advplug_settings, make_twin

# (epochs, steps per epoch) compared; methods with state across steps and epochs get more of both
SCHEDULE = {"meow": (2, 3), "bat": (2, 3), "gairat": (2, 1)}
# one changed constant per twin, each of which changes the loss within the compared steps
MUTATIONS = {
    "trades": ("beta", 5.0),
    "mart": ("beta", 5.0),
    "meow": ("alpha", 0.3),
    "mail": ("gamma", 9.0),
    "gairat": ("lam", -0.5),
    "bat": ("beta", 0.3),
    "bilaw": ("meta_lr", 1e-2),
    "lrat": ("beta", 0.6),
    "awp": ("gamma", 0.02),
    "fat": ("omega", 0.01),
    "wmmr": ("weight_alpha", 0.6),
}


def pair(name: str, tmp_path, epochs: int) -> tuple[Trainer, object]:
    cfg = tiny_config(str(tmp_path / name), steps=2, batch_size=32, epochs=max(epochs, 2), **advplug_settings(name))
    data = digits_subset(96, 32)
    trainer = Trainer(cfg, data=data, log=lambda s: None)
    warm_up(trainer.model, *data.train)
    if name == "lrat":  # logits x 30: samples that survive both attacks with t near 1 reach Eq. 7's floor
        with torch.no_grad():
            trainer.model.head.weight.mul_(30)
            trainer.model.head.bias.mul_(30)
    return trainer, make_twin(name, trainer)


def warm_up(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 30) -> None:
    """A few natural SGD steps: a model that classifies some samples confidently and others not, so that weights,
    margins, kappa and early stops vary across the batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(steps):
        b = slice(32 * (i % 3), 32 * (i % 3 + 1))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()


def losses(name: str, tmp_path, twin_cls=None) -> tuple[list[float], list[float]]:
    """advplug's and the twin's loss at every compared step, each step from the same RNG state."""
    epochs, steps = SCHEDULE.get(name, (1, 2))
    trainer, twin = pair(name, tmp_path, epochs)
    if twin_cls is not None:
        twin = twin_cls(twin.model, twin.opt, twin.run)
    ours, theirs, n = [], [], 0
    try:
        for epoch in range(epochs):
            trainer.loader.set_epoch(epoch)
            trainer.model.train()
            for i, (x, y, index) in enumerate(trainer.loader):
                if i == steps:
                    break
                torch.manual_seed(100 + n)
                ours.append(float(trainer.step(x, y, index, epoch, n)[0]))
                torch.manual_seed(100 + n)
                theirs.append(float(twin.step(x, y, index, epoch)))
                n += 1
            torch.manual_seed(7)
            trainer.pm.hook.on_epoch_end(epoch=epoch, metrics={})
            torch.manual_seed(7)
            twin.end_epoch(epoch)
    finally:
        trainer.close()
    return ours, theirs


@pytest.mark.parametrize("name", METHODS)
def test_twin_loss_equals_advplug_loss(name, tmp_path, one_thread):
    ours, theirs = losses(name, tmp_path)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7), f"{name}: advplug {ours}, twin {theirs}"


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_twin_with_one_changed_constant_differs(name, tmp_path, one_thread):
    attr, value = MUTATIONS[name]
    wrong = type(f"Wrong{name}", (TWINS[name],), {attr: value})
    ours, theirs = losses(name, tmp_path, wrong)
    assert ours != pytest.approx(theirs, rel=1e-6, abs=1e-7), f"{name}: {attr} = {value} went unnoticed"


def test_settings_name_a_method_advplug_runs(tmp_path):
    for name in METHODS:
        s = advplug_settings(name)
        assert set(s) == {"objective", "plugins", "plugin_options"}
        assert s["plugins"] == (() if name in ("at", "trades", "mart") else (name,))
    with pytest.raises(KeyError, match="methods: at, trades"):
        advplug_settings("nope")


def test_overhead_twin_mode_ends_with_the_ratio_line(monkeypatch, capsys, one_thread):
    import re
    import sys

    from benchmarks import overhead

    argv = ["overhead.py", "--twin", "--plugin", "mail", "--epochs", "1", "--steps", "1", "--batch-size", "512"]
    monkeypatch.setattr(sys, "argv", argv)
    overhead.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"ratio mail \d+\.\d{3}", lines[-1]), lines[-3:]
    assert lines[-2].startswith("mail: load average ") and "s/epoch advplug/twin" in lines[-3]
