"""Every pair of installed plugins, under each objective: a defined meaning (one step runs) or a
one-line start-up error naming both; the pair table in docs/pairs.md and `advplug hooks`' account of how
the weights combine."""

from pathlib import Path

import pytest
import torch

from advplug import OptionError, PluginError
from advplug.engine.trainer import Trainer
from advplug.plugins import enable, installed, pair_table
from advplug.testing import digits_subset, tiny_config

PAIR_TABLE = (Path(__file__).resolve().parents[1] / "docs" / "pairs.md").read_text()
PLUGINS = sorted(installed())
PAIRS = [(a, b) for i, a in enumerate(PLUGINS) for b in PLUGINS[i + 1 :]]
FAST = {"lrat": {"lrat-attacks": "cw"}, "bilaw": {"bilaw-val-batch": "8"}}  # LRAT: views cw and pgd (x*)
BURN_IN = ("burn_in", "begin_epoch", "warmup")  # set to 0 where a plugin has one: every step reweights


def fast_options(name):
    import dataclasses

    from advplug.plugins import load_class, options_class

    opts = dict(FAST.get(name, {}))
    ocls = options_class(load_class(name))
    for f in dataclasses.fields(ocls) if ocls else ():
        if f.name in BURN_IN:
            opts[f"{name}-{f.name.replace('_', '-')}"] = "0"
    return opts


pytestmark = pytest.mark.usefixtures("one_thread")


def quick_trainer(out, plugins, objective="at", options=None, data=None, **cfg):
    opts = {k: v for p in plugins for k, v in fast_options(p).items()}
    opts.update(options or {})
    kw = dict(plugins=tuple(plugins), objective=objective, plugin_options=opts, steps=2, batch_size=16, model="fc1")
    kw.update(cfg)
    return Trainer(tiny_config(str(out), **kw), data=data or digits_subset(48, 16), log=lambda s: None)


def step(tr, n=16, epoch=1):
    """One training step at ``epoch`` (1: past the default burn-ins of tiny_config, milestones (1,))."""
    x, y = tr.data.train[0][:n], tr.data.train[1][:n]
    return tr.step(x, y, torch.arange(n), epoch=epoch, global_step=1)


@pytest.mark.parametrize("objective", ["at", "trades", "mart"])
def test_every_pair_runs_one_step_or_fails_at_start_up(objective, tmp_path):
    data = digits_subset(48, 16)
    for a, b in PAIRS:
        try:
            enable([a, b], objective)
        except (PluginError, OptionError) as e:
            msg = str(e)
            assert "\n" not in msg
            assert sum(n in msg for n in {a, b, objective}) >= 2, f"{a} + {b} ({objective}): {msg}"
            continue
        torch.manual_seed(0)
        tr = quick_trainer(tmp_path / f"{a}-{b}-{objective}", [a, b], objective, data=data)
        loss, ctx, w = step(tr)
        assert torch.isfinite(loss), f"{a} + {b} ({objective})"
        if w is not None and w.adv is not None:
            assert w.adv.shape == (len(ctx.variants), 16) and torch.isfinite(w.adv).all()
        comp = tr.enabled.composition
        decl = comp.declarations
        if w is not None and w.local is not None and decl[comp.local].own_scale:
            assert (w.local.sum(0) + (w.local_nat if w.local_nat is not None else 0)).mean().item() == pytest.approx(
                1.0, rel=1e-5
            )
        if w is not None and w.instance is not None and not any(decl[n].own_scale for n in comp.globals):
            assert w.instance.mean().item() == pytest.approx(1.0, rel=1e-4), (
                f"{a} + {b} ({objective})"
            )  # mean-1 methods


def test_readme_has_the_pair_table_of_the_installed_plugins():
    table = pair_table()
    missing = [line for line in table.splitlines() if line not in PAIR_TABLE]
    assert not missing, (
        "docs/pairs.md is stale; regenerate it with `advplug hooks --pairs` "
        f"({len(missing)} rows differ, e.g. {missing[0]!r})"
    )


def test_hooks_command_shows_how_the_weights_combine():
    from click.testing import CliRunner

    from advplug.tools.cli import cli

    res = CliRunner().invoke(cli, ["hooks", "--plugin", "lrat", "--plugin", "mail"])
    assert res.exit_code == 0, res.output
    assert "anchor pgd (lrat's x*)" in res.output
    assert "mail: global, one weight per instance from view 'pgd'" in res.output
    assert "combined: w[v, b] = mail[b] x lrat[v, b]" in res.output
    res = CliRunner().invoke(cli, ["hooks", "--pairs"])
    assert res.exit_code == 0 and res.output.strip() == pair_table()
