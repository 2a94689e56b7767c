"""The benchmark's plot: each injected group's weights over epochs, seeds pooled."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advplug.tools.report import COLOURS, WIDTH, _plt, epoch_axis, save_figure, set_title, styled
from benchmarks.groundtruth.scoring import weights_by_group


def plot_groups(runs: list[Path], title: str, path: Path) -> Path | None:
    """Weight distribution per group over epochs (median and 10-90 % band, seeds pooled), as ``path`` (PNG)
    and the PDF beside it."""
    fig = figure_groups(runs, title)
    return None if fig is None else save_figure(fig, path)[0]


@styled
def figure_groups(runs: list[Path], title: str):
    pooled: dict[int, dict[str, list[np.ndarray]]] = {}
    for r in runs:
        for ep, groups in weights_by_group(r).items():
            for g, w in groups.items():
                pooled.setdefault(ep, {}).setdefault(g, []).append(w)
    if not pooled:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6))
    epochs = sorted(pooled)
    for g, colour in COLOURS.items():
        vals = [np.concatenate(pooled[e].get(g, [np.array([])])) for e in epochs]
        pts = [(e, np.percentile(v, 10), np.median(v), np.percentile(v, 90)) for e, v in zip(epochs, vals) if len(v)]
        if not pts:
            continue
        e, lo, med, hi = map(np.array, zip(*pts))
        off = (list(COLOURS).index(g) - 1.5) * 0.08
        ax.plot(e + off, med, marker="o", ms=3, color=colour, label=g)
        ax.fill_between(e + off, lo, hi, color=colour, alpha=0.15)
    epoch_axis(ax, epochs[0], epochs[-1])
    ax.set(xlabel="epoch", ylabel="weight / epoch mean\n(median, 10-90 %)")
    ax.legend()
    set_title(fig, title)
    return fig
