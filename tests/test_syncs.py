"""No host synchronisation inside the training step: on the CPU the calls that would sync
a GPU (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()``/``int()``/``float()`` of
a tensor) are counted during steps; only the periodic check (every 20 steps and at the epoch's
end, outside ``step``) may make them. LRAT's SAA sizes its two waves from the data (two
``nonzero`` calls per step, counted separately)."""

import collections
import traceback

import pytest
import torch

from advplug.engine.trainer import Trainer
from advplug.testing import digits_subset, tiny_config

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def count_syncs(monkeypatch):
    counts: collections.Counter = collections.Counter()
    on = [False]
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            if on[0]:
                frame = traceback.extract_stack(limit=3)[-2]
                if frame.filename.endswith("torch/optim/optimizer.py"):
                    return _real(self, *a, **k)  # Adam's step counter: a host tensor by design, no device sync
                counts[f"{_name} at {frame.filename.split('site-packages/')[-1]}:{frame.lineno}"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counts, on


@pytest.mark.parametrize(
    "plugins,objective,options",
    [
        ((), "at", {}),
        ((), "trades", {}),
        ((), "mart", {}),
        (("mail",), "at", {"mail-burn-in": 0}),
        (("gairat",), "at", {"gairat-begin-epoch": 0}),
        (("meow",), "at", {}),
        (("bat",), "at", {}),
        (("awp",), "at", {}),
        (("fat",), "at", {}),
        (("wmmr",), "at", {}),
        (("lrat",), "at", {"lrat-saa-steps": 3}),
        (("bilaw",), "at", {}),
    ],
)
def test_no_host_sync_in_the_step(tmp_path, count_syncs, plugins, objective, options):
    counts, on = count_syncs
    t = Trainer(
        tiny_config(str(tmp_path), plugins=plugins, objective=objective, plugin_options=options, epochs=3),
        data=digits_subset(192, 16),
        log=lambda s: None,
    )
    batches = iter(t.loader)
    x, y, i = next(batches)
    t.step(x, y, i, 0, 0)  # first step: lazy set-up (plugins' buffers) may look at values once
    on[0] = True
    for k in range(2):
        x, y, i = next(batches)
        t.step(x, y, i, 1, k + 1)
    on[0] = False
    t.close()
    assert not counts, dict(counts)


def test_lrat_saa_sizes_its_waves_with_two_nonzero_calls(tmp_path, monkeypatch):
    """SAA attacks only the samples still to fool: one ``nonzero`` (a host sync on a GPU) per
    wave, two waves with the default three targets, nothing else."""
    calls = [0]
    real = torch.Tensor.nonzero

    def counted(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    t = Trainer(
        tiny_config(
            str(tmp_path),
            plugins=("lrat",),
            plugin_options={"lrat-attacks": "saa", "lrat-floor": "none", "lrat-saa-steps": 3},
            epochs=3,
        ),
        data=digits_subset(192, 16),
        log=lambda s: None,
    )
    x, y, i = next(iter(t.loader))
    t.step(x, y, i, 0, 0)
    monkeypatch.setattr(torch.Tensor, "nonzero", counted)
    t.step(x, y, i, 0, 1)
    t.close()
    assert 1 <= calls[0] <= 2


@pytest.mark.parametrize(
    "plugins,options,tracked",
    [
        ((), {}, False),
        (("meow",), {}, False),
        (("bat",), {}, False),
        (("gairat",), {}, True),
        (("mail",), {"mail-margin": "dif"}, True),
        (("mail",), {}, False),
        (("focal",), {}, True),  # no declare(): its needs are unknown, so the stats are kept
    ],
)
def test_core_pgd_keeps_kappa_only_when_a_plugin_may_read_it(tmp_path, plugins, options, tracked):
    t = Trainer(
        tiny_config(str(tmp_path), plugins=plugins, plugin_options=options),
        data=digits_subset(64, 16),
        log=lambda s: None,
    )
    x, y, i = next(iter(t.loader))
    _, ctx, _ = t.step(x, y, i, 0, 0)
    t.close()
    assert t.attack.track is tracked
    assert set(ctx.variants[0].stats) == ({"kappa", "p_true_lps"} if tracked else set())
