"""The harder-class benchmark's methods: CFA at its code's loss scale and at TRADES' (``--cfa-loss-scale trades``),
each with its calibration starting at the switch epoch; one method can be run alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.groundtruth import harder_class as hc

pytestmark = pytest.mark.usefixtures("one_thread")  # main() sets torch's threads


@pytest.mark.parametrize(
    "method, plugins, options",
    [
        ("trades", (), {}),
        ("cfa", ("cfa",), {"cfa-begin": 4}),
        ("cfa-trades-scale", ("cfa",), {"cfa-begin": 4, "cfa-loss-scale": "trades"}),
        ("dafa", ("dafa",), {"dafa-warmup": 4}),
    ],
)
def test_each_method_trains_trades_with_its_plugins_and_options(method, plugins, options):
    cfg = hc.method_config(method, 0, hc.Settings(), Path("d.npz"), Path("out"))
    assert cfg.objective == "trades" and tuple(cfg.plugins) == plugins and dict(cfg.plugin_options) == options


def test_the_trades_scale_method_is_listed_after_cfa_and_runs_alone(monkeypatch, tmp_path):
    assert list(hc.METHODS)[:3] == ["trades", "cfa", "cfa-trades-scale"]
    seen = []
    monkeypatch.setattr(hc, "run", lambda s: seen.append(s) or [])
    monkeypatch.setattr(hc, "write_outputs", lambda rows, s: (tmp_path / "j", tmp_path / "m"))
    (tmp_path / "m").write_text("")
    assert hc.main(["--methods", "cfa-trades-scale", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert seen[0].methods == ("cfa-trades-scale",)
