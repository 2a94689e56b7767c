"""`advplug report`'s figures, rendered from a tiny real run: every PNG has a vector PDF beside it, titles name
the run, epoch ticks are whole numbers, and no text is clipped or overlaps other text or another plot."""

import shutil
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.text import Text

from advplug.engine.trainer import Trainer
from advplug.testing import digits_subset, tiny_config
from advplug.tools.cli import cli
from advplug.tools.report import figures

N_TRAIN = 128
STEMS = ("accuracy", "weights", "weight_vs_signal", "extremes", "roc", "per_class")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch MAIL run with weight and MAIL dumps and injection flags (every figure), and two copies
    that draw the other layouts: one signal panel only, no dumps at all (weights from the logged min/max)."""
    root = tmp_path_factory.mktemp("figures")
    full = root / "full"
    cfg = tiny_config(
        str(full), plugins=("mail",), dump_weights=True, plugin_options={"mail-burn-in": 0, "mail-dump": "true"}
    )
    Trainer(cfg, data=digits_subset(N_TRAIN, 32), log=lambda s: None).fit()
    rng = np.random.default_rng(0)
    group = rng.integers(0, 4, N_TRAIN)  # 0 clean, 1-3 the injected groups
    flags = {g: group == i + 1 for i, g in enumerate(("flipped", "atypical", "duplicate"))}
    np.savez(full / "injection.npz", index=np.arange(N_TRAIN), **flags)
    one = root / "one_panel"
    shutil.copytree(full, one)
    for p in (one / "dumps").glob("mail-*"):
        p.unlink()
    bare = root / "no_dumps"
    shutil.copytree(full, bare)
    shutil.rmtree(bare / "dumps")
    (bare / "injection.npz").unlink()
    return {"full": full, "one_panel": one, "no_dumps": bare}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_every_figure_is_written_as_png_and_pdf(runs):
    run = runs["full"]
    res = CliRunner().invoke(cli, ["report", str(run)])
    assert res.exit_code == 0, res.output
    listed = set(res.output.split())
    for stem in STEMS:
        png, pdf = run / "report" / f"{stem}.png", run / "report" / f"{stem}.pdf"
        assert {str(png), str(pdf)} <= listed
        w, h = png_size(png.read_bytes())
        assert 800 <= w <= 3000 and 500 <= h <= 2500, (stem, w, h)
        assert 10_000 < png.stat().st_size < 3_000_000
        assert pdf.read_bytes()[:5] == b"%PDF-" and 3_000 < pdf.stat().st_size < 3_000_000


def drawn_tick_labels(axis) -> list[Text]:
    """The tick labels the axis draws: visible, non-empty, at a tick inside the view."""
    if not (axis.axes.axison and axis.get_visible()):
        return []
    lo, hi = sorted(axis.get_view_interval())
    tol = 1e-9 * max(1.0, abs(hi - lo))
    out = []
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        if not lo - tol <= tick.get_loc() <= hi + tol:
            continue
        out += [t for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text().strip()]
    return out


def overlap(a, b, tol: float = 0.5) -> bool:
    return a.x0 < b.x1 - tol and b.x0 < a.x1 - tol and a.y0 < b.y1 - tol and b.y0 < a.y1 - tol


def drawn_texts(fig) -> list[tuple[object, Text]]:
    """(owner, text) for every drawn text: owner is the axes it belongs to, or the figure."""
    ticks = {
        id(t)
        for ax in fig.axes
        for a in (ax.xaxis, ax.yaxis)
        for tk in a.get_major_ticks() + a.get_minor_ticks()
        for t in (tk.label1, tk.label2)
    }
    out: list[tuple[object, Text]] = []
    seen: set[int] = set()
    for ax in fig.axes:
        for a in (ax.xaxis, ax.yaxis):
            out += [(ax, t) for t in drawn_tick_labels(a)]
        for t in ax.findobj(Text, include_self=False):
            if id(t) not in ticks and t.get_visible() and t.get_text().strip():
                out.append((ax, t))
        seen |= {id(t) for t in ax.findobj(Text)}
    out += [(fig, t) for t in fig.findobj(Text) if id(t) not in seen and t.get_visible() and t.get_text().strip()]
    return out


def check_layout(fig, name: str) -> None:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    page = fig.bbox
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [(t.get_text(), t.get_window_extent(r)) for t in drawn_tick_labels(axis)]
            for i, (ta, a) in enumerate(boxes):
                for tb, b in boxes[i + 1 :]:
                    assert not overlap(a, b), f"{name}: tick labels {ta!r} and {tb!r} overlap"
    texts = [(owner, t, t.get_window_extent(r)) for owner, t in drawn_texts(fig)]
    for _, t, bb in texts:
        inside = bb.x0 >= page.x0 - 1 and bb.y0 >= page.y0 - 1 and bb.x1 <= page.x1 + 1 and bb.y1 <= page.y1 + 1
        assert inside, f"{name}: {t.get_text()!r} is clipped at the figure's edge"
    for owner, t, bb in texts:
        for ax in fig.axes:
            if ax is not owner:
                assert not overlap(bb, ax.get_window_extent(r)), f"{name}: {t.get_text()!r} overlaps another plot"
    for i, (oa, ta, a) in enumerate(texts):
        for ob, tb, b in texts[i + 1 :]:
            if oa is not ob:
                assert not overlap(a, b), f"{name}: {ta.get_text()!r} overlaps {tb.get_text()!r}"


@pytest.mark.parametrize("variant", ["full", "one_panel", "no_dumps"])
def test_no_text_is_clipped_or_overlaps(runs, variant):
    import matplotlib.pyplot as plt

    figs = figures(runs[variant])
    expected = {"full": set(STEMS), "one_panel": set(STEMS), "no_dumps": {"accuracy", "weights", "per_class"}}[variant]
    assert set(figs) == expected
    try:
        for name, fig in figs.items():
            check_layout(fig, f"{variant}/{name}")
    finally:
        for fig in figs.values():
            plt.close(fig)


def test_titles_name_method_objective_data_eps_and_seed(runs):
    import matplotlib.pyplot as plt

    for name, fig in figures(runs["full"]).items():
        sup = fig.get_suptitle()
        title = " ".join([sup] + [ax.get_title() for ax in fig.axes])
        for part in ("mail", "AT", "digits", "ε = 0.2", "seed 0"):
            assert part in title, f"{name}: {part!r} missing from the title {title!r}"
        plt.close(fig)


@pytest.mark.parametrize("variant", ["full", "no_dumps"])
def test_epoch_ticks_are_whole_numbers(runs, variant):
    import matplotlib.pyplot as plt

    figs = figures(runs[variant])
    for name in ("accuracy", "weights"):
        fig = figs[name]
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [x for x in ax.get_xticks() if lo <= x <= hi]
        assert ticks and all(float(x).is_integer() for x in ticks), f"{variant}/{name}: epoch ticks {ticks}"
    for fig in figs.values():
        plt.close(fig)


def test_the_layout_check_sees_crowded_ticks_and_a_clipped_title():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks(np.linspace(0, 1, 30))
    with pytest.raises(AssertionError, match="tick labels"):
        check_layout(fig, "crowded")
    ax.set_xticks([0, 1])
    fig.suptitle("a title far too long for a figure two inches wide, clipped at both edges")
    with pytest.raises(AssertionError, match="clipped"):
        check_layout(fig, "clipped")
    plt.close(fig)


@pytest.mark.parametrize("first, last", [(1, 1), (1, 2), (3, 7), (1, 20), (6, 200)])
def test_epoch_axis_has_whole_visible_ticks_for_any_length(first, last):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from advplug.tools.report import epoch_axis

    fig, ax = plt.subplots()
    ax.plot([first, last], [0, 1])
    epoch_axis(ax, first, last)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    shown = [t for t in ax.get_xticks() if lo <= t <= hi]
    plt.close(fig)
    assert shown and all(float(t).is_integer() and first <= t <= last for t in shown), shown
