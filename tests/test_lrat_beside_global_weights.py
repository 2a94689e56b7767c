"""LRAT's local weights beside a global (one weight per instance) method: LRAT's floor (Eq. 7) and
Eq. 15 survive a global method beside it, the within-pair split stays LRAT's, MAIL's fixed scale
beside Eq. 15 is refused, and LRAT + GAIRAT / MAIL-dif either run their reweighted steps or fail
at start-up, never at the first reweighted step; the order of plugin flags does not change the step."""

import pytest
import torch

from advplug import OptionError, PluginError
from advplug.engine.trainer import Trainer
from advplug.plugins import enable
from advplug.signals import probabilistic_margin
from advplug.testing import digits_subset, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(tmp_path, plugins, **opts):
    """LRAT with CW and PGD (x*) variants on fc1 after one epoch, every plugin reweighting."""
    options = {"lrat-attacks": "cw", "mail-burn-in": "0", "gairat-begin-epoch": "0", **opts}
    options = {k: v for k, v in options.items() if k.split("-")[0] in plugins}
    cfg = tiny_config(
        str(tmp_path / "run"),
        plugins=tuple(plugins),
        plugin_options=options,
        steps=3,
        batch_size=48,
        model="fc1",
        lr=0.05,
    )
    torch.manual_seed(0)
    tr = Trainer(cfg, data=digits_subset(192, 16), log=lambda s: None)
    tr.train_epoch(0)
    return tr


def fixed_batch_step(tr, n=48):
    x, y = tr.data.train[0][:n], tr.data.train[1][:n]
    torch.manual_seed(1)
    return tr.step(x, y, torch.arange(n), epoch=1, global_step=10)


def lrat_part(w):
    """The weights LRAT's invariants are about: the local part (the whole product where there is none)."""
    part = getattr(w, "local", None)
    return w.adv if part is None else part


@pytest.mark.parametrize("c", ["0.1", "2"])
def test_lrat_floor_and_eq15_hold_after_combining_with_mail(tmp_path, c):
    tr = trained(tmp_path, ("lrat", "mail"), **{"lrat-c": c})
    _, ctx, w = fixed_batch_step(tr)
    lrat = tr.enabled.plugin("lrat")
    _, raw, _ = lrat.local_weights(ctx, ctx.variants)  # before Eq. 15
    scale = raw.sum(0).mean()
    alone = lrat_part(lrat.compute_weights(ctx, ctx.variants))
    part = lrat_part(w)
    totals = part.sum(0)
    assert (totals >= float(c) / scale * (1 - 1e-5)).all(), (
        f"{int((totals < float(c) / scale).sum())} of 48 below the floor"
    )
    assert totals.mean().item() == pytest.approx(1.0, rel=1e-5)  # Eq. 15
    assert torch.allclose(part, alone)
    # within each pair the split over variants is LRAT's: MAIL weighs the pair, not its variants
    share = w.adv / w.adv.sum(0, keepdim=True).clamp_min(1e-30)
    assert torch.allclose(share, alone / alone.sum(0, keepdim=True), atol=1e-5)


def test_mail_margin_under_lrat_is_read_on_x_star_once_per_instance(tmp_path):
    tr = trained(tmp_path, ("lrat", "mail"))
    _, ctx, w = fixed_batch_step(tr)
    pm = probabilistic_margin(ctx.probs("pgd"), ctx.y)  # LRAT's x* is its PGD variant
    ref = torch.sigmoid(-10.0 * (pm + 0.5))
    g = w.adv.sum(0) / lrat_part(w).sum(0)  # the pair's weight
    assert torch.allclose(g, ref / ref.mean(), rtol=1e-4)


def test_mail_fixed_scale_beside_lrat_eq15_is_refused_at_start_up():
    with pytest.raises(PluginError, match=r"'mail' with 'lrat'.*loss scale"):
        enable(["lrat", "mail"], "at", {"mail-normalise": "fixed"})
    enable(["lrat", "mail"], "at", {"mail-normalise": "fixed", "lrat-normalise": "none"})  # no Eq. 15: defined


@pytest.mark.parametrize("plugin, opts", [("gairat", {}), ("mail", {"mail-margin": "dif"})])
def test_lrat_with_gairat_or_mail_dif_runs_its_reweighted_steps(tmp_path, plugin, opts):
    tr = trained(tmp_path, ("lrat", plugin), **opts)
    loss, ctx, w = fixed_batch_step(tr)
    assert torch.isfinite(loss)
    g = w.adv.sum(0) / lrat_part(w).sum(0)
    assert not torch.allclose(g, torch.ones_like(g))  # the global method did weigh the pairs


@pytest.mark.parametrize(
    "plugin, opts, missing",
    [
        ("gairat", {"lrat-floor": "saa", "lrat-attacks": "saa,cw"}, "kappa"),
        ("gairat", {"lrat-floor": "nat"}, "kappa"),
        ("gairat", {"lrat-floor": "none"}, "kappa"),
        ("mail", {"mail-margin": "dif", "lrat-floor": "saa", "lrat-attacks": "saa,cw"}, "p_true_lps"),
    ],
)
def test_a_missing_stat_on_x_star_fails_at_start_up_naming_both(plugin, opts, missing):
    with pytest.raises((PluginError, OptionError), match=rf"'{plugin}' with 'lrat'.*{missing}"):
        enable(["lrat", plugin], "at", opts)


def test_order_of_plugin_flags_does_not_change_the_step(tmp_path):
    results = []
    for i, order in enumerate((("lrat", "mail", "bat"), ("bat", "mail", "lrat"))):
        tr = trained(tmp_path / str(i), order, **{"bat-burn-in": "0"})
        loss, ctx, w = fixed_batch_step(tr)
        results.append((loss, w.adv))
    assert torch.allclose(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1])
