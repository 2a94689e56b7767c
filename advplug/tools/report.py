"""``advplug report RUN_DIR``: figures of a run with matplotlib (Agg, no display needed).

Files go to ``RUN_DIR/report/``, each as a PNG (200 dpi) and a vector PDF beside it, in one style fit
for a paper (fonts of 8-10 pt at the written size, constrained layout, TrueType fonts in the PDF);
every title names the run: plugins, objective, data set, eps, seed and the plugin options set.

* ``accuracy``: training, clean and PGD accuracy per epoch, learning-rate drops marked;
* ``weights``: the distribution of the per-sample weights per epoch (box plots from the
  ``--dump-weights`` files; from the logged min/mean/max when there are none);
* ``weight_vs_signal``: weight against the probabilistic margin of the sample (every
  plugin), and against each plugin's own signal where its dump records one (MAIL's PM,
  GAIRAT's kappa, LRAT's t, BAT's poisoning score q);
* ``extremes``: the training images with the highest and the lowest weights of the last
  dumped epoch (as MeoW Fig. 2 and BiLAW Fig. 3 show them);
* ``per_class``: robust accuracy per class on the test set, one panel per attack, one group of
  bars per checkpoint evaluated (best, last, EMA), each checkpoint's worst class named: only
  when ``results.json`` / ``eval.json`` record per-class accuracies;
* ``roc``: only for a run with injection flags (``RUN_DIR/injection.npz``, written by the
  ground-truth benchmark ``benchmarks/groundtruth``): ROC curves of "low weight means injected"
  and of the run's true-class confidence per injected group.

``figures(RUN_DIR)`` returns the matplotlib figures unsaved (to inspect or restyle them);
``report(RUN_DIR)`` writes them.
"""

from __future__ import annotations

import contextlib
import functools
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from advplug.config import read_run_config
from advplug.errors import DataError
from advplug.run import results
from advplug.run.dump import read_dumps, weight_column
from advplug.run.metrics import read_metrics

SIGNALS = {"mail": "pm", "gairat": "kappa", "bat": "q", "lrat": "t_"}
SIGNAL_NAMES = {"mail": "MAIL's PM", "gairat": "GAIRAT's κ", "bat": "BAT's poisoning score q", "lrat": "LRAT's t"}
DPI = 200  # PNG resolution; the PDF beside it is vector
WIDTH = 6.0  # inches: a figure spanning a paper's text width, read at this size
STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 9.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.constrained_layout.use": True,
    "savefig.dpi": DPI,
    "pdf.fonttype": 42,  # TrueType in the PDF: editable text, as publishers ask
    "ps.fonttype": 42,
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """The report's matplotlib settings, while figures are built and saved."""
    plt = _plt()
    with plt.rc_context(STYLE):
        yield


def styled(make: Callable[..., Any]) -> Callable[..., Any]:
    """``make`` (a function building a figure) run under :func:`paper_style`."""

    @functools.wraps(make)
    def inner(*args: Any, **kw: Any) -> Any:
        with paper_style():
            return make(*args, **kw)

    return inner


def eps_label(eps: Any) -> str:
    """``8/255`` for a budget on the 1/255 grid that is not a round decimal, else the number (``0.2``)."""
    if not isinstance(eps, int | float):
        return "?"
    k = round(eps * 255)
    if 0 < k < 255 and abs(eps * 255 - k) < 1e-4 and abs(eps - round(eps, 3)) > 1e-9:
        return f"{k}/255"
    return f"{eps:g}"


def run_parts(cfg: dict[str, Any]) -> list[str]:
    """What names a run in a title: plugins, objective, data set, eps, seed, then the plugin options set."""
    opts = {k: v for k, v in (cfg.get("plugin_options") or {}).items() if not k.endswith("-dump")}
    return [
        "+".join(sorted(cfg.get("plugins") or [])) or "no plugin",
        f"{str(cfg.get('objective') or 'at').upper()} objective",
        _data_label(cfg),
        f"ε = {eps_label(cfg.get('eps'))}",
        f"seed {cfg.get('seed', 0)}",
        *(f"{k}={v}" for k, v in sorted(opts.items())),
    ]


def _wrap(parts: list[str], width: int, sep: str) -> str:
    """``parts`` joined by ``sep``, broken into lines of at most ``width`` characters between parts."""
    lines = [""]
    for p in parts:
        if lines[-1] and len(lines[-1]) + len(sep) + len(p) > width:
            lines.append(p)
        else:
            lines[-1] = f"{lines[-1]}{sep}{p}" if lines[-1] else p
    return "\n".join(lines)


def set_title(fig, subject: str, cfg: dict[str, Any] | None = None) -> None:
    """The figure's title: what it shows, then the run, both wrapped to the figure's width; the figure
    grows by each line past two, so that a long title does not shrink the plots."""
    size = STYLE["figure.titlesize"]
    width = int(fig.get_figwidth() * 72 / (0.6 * size))  # characters of about 0.6 em fit on a line
    text = "\n".join(textwrap.wrap(subject, width))
    if cfg is not None:
        text += "\n" + _wrap(run_parts(cfg), width, " · ")
    fig.suptitle(text, fontsize=size)
    extra = text.count("\n") - 1
    if extra > 0:
        fig.set_figheight(fig.get_figheight() + extra * 1.25 * size / 72)


def epoch_axis(ax, first: int, last: int) -> None:
    """Epochs first..last on the x axis, whole numbers only."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    ax.set_xlim(first - 0.5, last + 0.5)
    if last - first < 10:  # every epoch (MaxNLocator falls back to fractions for a single epoch)
        ax.xaxis.set_major_locator(FixedLocator(list(range(first, last + 1))))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))


def epoch_offset(records: list[dict[str, Any]]) -> int:
    """metrics.jsonl numbers epochs from 1 (as the console and file names do); runs written before
    that numbered them from 0: +1 for those."""
    return 1 if any(r.get("epoch") == 0 for r in records) else 0


def selection_prefix(records: list[dict[str, Any]]) -> str:
    """``val`` (held-out selection split), ``test`` (``--selection test``) or ``""`` (older runs)."""
    for p in ("val", "test"):
        if any(f"{p}_pgd_acc" in r for r in records):
            return p
    return ""


def best_epoch(records: list[dict[str, Any]]) -> int | None:
    """The epoch (1-based, as the console and file names count) of the best checkpoint: the first
    highest PGD accuracy on the selection split, the trainer's rule."""
    key = f"{selection_prefix(records)}_pgd_acc".lstrip("_")
    best, at = -1.0, None
    for r in records:
        if key in r and r[key] > best:
            best, at = r[key], r["epoch"] + epoch_offset(records)
    return at


@styled
def figure_accuracy(records: list[dict[str, Any]], cfg: dict[str, Any]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6))
    ep = [r["epoch"] + epoch_offset(records) for r in records]
    pre = selection_prefix(records)
    where = {"val": "held-out", "test": "test"}.get(pre, "test")
    key = lambda k: f"{pre}_{k}" if pre else k  # noqa: E731
    for k, label in (
        ("train_acc", "train (adversarial)"),
        (key("clean_acc"), f"{where} natural"),
        (key("pgd_acc"), f"{where} PGD"),
    ):
        pts = [(e, 100 * r[k]) for e, r in zip(ep, records) if k in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    last = max(int(cfg.get("epochs") or 0), max(ep))
    drops = [m for m in cfg.get("milestones") or [] if m < last]  # only drops that happen in this run
    for i, m in enumerate(drops):
        ax.axvline(m + 0.5, color="grey", ls=":", lw=1, label="lr drop" if i == 0 else None)
    b = best_epoch(records)
    if b is not None:
        r = records[ep.index(b)]
        ax.plot(
            [b], [100 * r[key("pgd_acc")]], marker="*", ms=12, color="crimson", ls="none", label=f"best (epoch {b})"
        )
    epoch_axis(ax, 1, last)
    ax.set(xlabel="epoch", ylabel="accuracy (%)")
    handles = ax.get_legend_handles_labels()[0]
    fig.legend(loc="outside lower center", ncols=min(3, len(handles)), frameon=False)
    set_title(fig, "accuracy per epoch", cfg)
    return fig


def _data_label(cfg: dict[str, Any]) -> str:
    """The data set as titles name it: a long path shortened to its scheme and file name."""
    d = str(cfg.get("data"))
    if len(d) < 40:
        return d
    scheme = d.split(":", 1)[0] + ":" if ":" in d.split("/", 1)[0] else ""
    short = f"{scheme}…/{d.rstrip('/').rsplit('/', 1)[-1]}"
    return short if len(short) < 40 else "…" + d[-37:]


@styled
def figure_weights(run_dir: Path, records: list[dict[str, Any]], cfg: dict[str, Any]):
    plt = _plt()
    ds = read_dumps(run_dir, "weights")
    if ds:
        fig, ax = plt.subplots(figsize=(WIDTH, 3.4))
        epochs = sorted(ds)
        ax.boxplot(
            [weight_column(ds[e]) for e in epochs],
            positions=epochs,
            widths=0.6,
            manage_ticks=False,
            medianprops=dict(color="crimson"),
            flierprops=dict(ms=2, alpha=0.3),
        )
        first, last = epochs[0], epochs[-1]
    else:
        pts = [(r["epoch"] + epoch_offset(records), r["weights"]) for r in records if "weights" in r]
        if not pts:
            return None
        fig, ax = plt.subplots(figsize=(WIDTH, 3.4))
        e = [p[0] for p in pts]
        ax.fill_between(e, [p[1]["min"] for p in pts], [p[1]["max"] for p in pts], alpha=0.3, label="min-max")
        ax.plot(e, [p[1]["mean"] for p in pts], marker="o", ms=3, label="mean")
        ax.legend()
        first, last = e[0], e[-1]
    epoch_axis(ax, first, last)
    ax.set(xlabel="epoch", ylabel="per-sample weight")
    set_title(fig, "per-sample weights per epoch" + ("" if ds else " (logged min, mean, max)"), cfg)
    return fig


@styled
def figure_weight_vs_signal(run_dir: Path, cfg: dict[str, Any]):
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    panels: list[tuple[str, np.ndarray, np.ndarray]] = []
    ds = read_dumps(run_dir, "weights")
    epochs = []
    if ds:
        last = ds[max(ds)]
        epochs.append(max(ds))
        panels.append((r"probabilistic margin $p_y - \max_{j \neq y} p_j$", last["margin"], weight_column(last)))
    for plugin, key in SIGNALS.items():
        pd = read_dumps(run_dir, plugin)
        if not pd:
            continue
        cols = pd[max(pd)]
        epochs.append(max(pd))
        sig = sorted(k for k in cols if k.startswith(key))
        wkey = (f"weight_{sig[0][len(key) :]}" if key.endswith("_") else "weight") if sig else ""
        if sig and wkey in cols:  # LRAT dumps t_<variant> with weight_<variant>, the others one signal with weight
            variant = f" ({sig[0][len(key) :]})" if key.endswith("_") else ""
            panels.append((SIGNAL_NAMES[plugin] + variant, cols[sig[0]], cols[wkey]))
    if not panels:
        return None
    rows = -(-len(panels) // 3)  # at most 3 panels a row, the figure at the text width
    ncols = -(-len(panels) // rows)
    fig, axes = plt.subplots(rows, ncols, figsize=(WIDTH, 0.8 + 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (label, x, w) in zip(axes.flat, panels):
        ax.scatter(x, w, s=4, alpha=0.4, linewidths=0)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4 if ncols < 3 else 3))
        ax.set(xlabel=label, ylabel="weight")
    which = f"epoch {epochs[0]}" if len(set(epochs)) == 1 else "epochs " + ", ".join(map(str, epochs))
    set_title(fig, f"weight against signal, {which} (the last dumped)", cfg)
    return fig


@styled
def figure_extremes(run_dir: Path, cfg: dict[str, Any], n: int = 8, data: str | None = None):
    plt = _plt()
    ds = read_dumps(run_dir, "weights")
    if not ds:
        return None
    from advplug.data import PYTHON, check_data_import

    if cfg.get("data") == PYTHON:
        raise DataError("extremes.png skipped: the run's data was passed from Python, not named by a path")
    check_data_import(cfg.get("data"), data)  # module: data is code: imported only when the user repeats it
    cols = ds[max(ds)]
    w, idx = weight_column(cols), cols["index"]
    order = np.argsort(w, kind="stable")
    picks = [("lowest", order[:n]), ("highest", order[::-1][:n])]
    x, y = training_images(cfg, idx[np.concatenate([p[1] for p in picks])])
    fig, axes = plt.subplots(2, n, figsize=(WIDTH, 1.4 + 1.6 * WIDTH / n), squeeze=False)
    k = 0
    for row, (name, sel) in enumerate(picks):
        for col in range(n):
            ax = axes[row, col]
            if col >= len(sel):
                ax.set_visible(False)
                continue
            img = x[k].transpose(1, 2, 0)
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
            ax.set(xticks=[], yticks=[])
            ax.grid(False)
            ax.spines[:].set_visible(False)
            pred = f" pred {cols['pred'][sel[col]]}" if "pred" in cols else ""
            ax.set_title(f"y {y[k]}{pred}\nw {w[sel[col]]:.2f}", fontsize=7)
            k += 1
        axes[row, 0].set_ylabel(name)
    note = " (pred: the class predicted under the training attack)" if "pred" in cols else ""
    set_title(fig, f"training images with the lowest and highest weights w, epoch {max(ds)}{note}", cfg)
    return fig


def per_class_groups(run_dir: Path, cfg: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{attack column: {checkpoint label: entry}}``: the robust entries with per-class accuracies that ``compare``
    would show (``results.chosen_entries``); a best that is the last checkpoint (same epoch and numbers) is one
    group, ``best = last``."""
    robust = [e for e in results.read_run(run_dir, cfg) if e["attack"] != "natural" and e.get("per_class")]
    chosen = results.chosen_entries(robust, cfg.get("eps"))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for which in results.CHECKPOINTS:
        for (w, column), e in chosen.items():
            if w == which:
                out.setdefault(column, {})[which] = e
    for panel in out.values():
        for kind in ("", "-ema"):
            best, last = panel.get(f"best{kind}"), panel.get(f"last{kind}")
            if best and last and (best["epoch"], best["per_class"]) == (last["epoch"], last["per_class"]):
                del panel[f"best{kind}"]
                panel[f"best{kind} = last{kind}"] = panel.pop(f"last{kind}")
    return out


@styled
def figure_per_class(run_dir: Path, cfg: dict[str, Any]):
    """Robust accuracy per class: one panel per attack, a group of bars per checkpoint; ``None`` without per-class
    data."""
    from matplotlib.ticker import MaxNLocator

    panels = per_class_groups(run_dir, cfg)
    if not panels:
        return None
    plt = _plt()
    names = list(dict.fromkeys(n for groups in panels.values() for n in groups))  # one colour per checkpoint
    fig, axes = plt.subplots(len(panels), 1, figsize=(WIDTH, 0.9 + 2.1 * len(panels)), squeeze=False)
    legend: dict[str, Any] = {}
    for ax, (column, groups) in zip(axes[:, 0], panels.items()):
        width = 0.8 / len(groups)
        worst = []
        for i, (name, e) in enumerate(groups.items()):
            pts = [(k, 100 * a) for k, a in enumerate(e["per_class"]) if a is not None]
            x = [k - 0.4 + (i + 0.5) * width for k, _ in pts]
            bars = ax.bar(x, [a for _, a in pts], width, color=f"C{names.index(name)}")
            legend.setdefault(f"{name} (epoch {e['epoch']})", bars)
            w = min(pts, key=lambda p: (p[1], p[0]))
            worst.append(f"{w[0]} ({name}, {w[1]:.1f} %)")
        k = max(len(e["per_class"]) for e in groups.values())
        ax.set_xlim(-0.6, k - 0.4)
        if k <= 20:
            ax.set_xticks(range(k))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        ax.set_ylim(0, 100)
        ax.set(ylabel="accuracy (%)", title=f"{column}: worst class {', '.join(worst)}")
    axes[-1, 0].set_xlabel("class")
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=min(3, len(legend)), frameon=False)
    set_title(fig, "robust accuracy per class on the test set", cfg)
    return fig


def training_images(cfg: dict[str, Any], index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training images by training-set index, as the run numbered them (validation held out)."""
    from advplug.config import RECORD_ONLY, TrainConfig
    from advplug.engine.inputs import training_data

    tc = TrainConfig.from_json({k: v for k, v in cfg.items() if k not in RECORD_ONLY})
    data = training_data(tc.resolved(recorded=True))  # module: data checked by the caller (figure_extremes)
    train = data.train
    n = len(train[1]) if isinstance(train, tuple) else len(train)
    if len(index) and int(index.max()) >= n:
        raise DataError(
            f"the dumps name training sample {int(index.max())}, the run's training set has {n}: "
            "they are from another run or damaged"
        )
    if isinstance(train, tuple):
        x, y = train[0][index].numpy(), train[1][index].numpy()
    else:
        items = [train[int(i)] for i in index]
        x, y = np.stack([np.asarray(it[0]) for it in items]), np.array([int(it[1]) for it in items])
    return x, y


def save_figure(fig, path: Path) -> list[Path]:
    """``fig`` as ``path`` (a PNG) and as the PDF beside it, each replaced atomically (a symlink there is
    replaced, not written through; a symlinked ``report/`` is refused); closes ``fig``."""
    import io

    from advplug.run.directory import subdir, write_bytes

    folder = subdir(path.parent.parent, path.parent.name)
    made = []
    with paper_style():
        for fmt in ("png", "pdf"):
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=DPI, metadata={"Software": "advplug"} if fmt == "png" else None)
            out = folder / path.with_suffix(f".{fmt}").name
            write_bytes(out, buf.getvalue())
            made.append(out)
    _plt().close(fig)
    return made


# -- runs with injection flags (RUN_DIR/injection.npz, written by benchmarks/groundtruth) -------------
GROUPS = ("flipped", "atypical", "duplicate")  # the injected groups, each a boolean column of injection.npz
COLOURS = {"clean": "tab:blue", "flipped": "tab:red", "atypical": "tab:orange", "duplicate": "tab:green"}


def read_injection(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The columns of ``RUN_DIR/injection.npz`` (``None`` for a run without one)."""
    p = Path(run_dir) / "injection.npz"
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def epoch_weights(cols: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    """Per-sample weight of one dumped epoch in the run's numbering (NaN where not seen);
    ``None`` when the dump has no weight columns (the method gives none)."""
    keys = sorted(k for k in cols if k.startswith("weight_") and k != "weight_natural")
    if not keys:
        return None
    w = np.mean([cols[k] for k in keys], axis=0)
    out = np.full(n, np.nan)
    out[cols["index"]] = w  # a sample seen twice keeps its last weight
    return out


def auroc_low(flag: np.ndarray, clean: np.ndarray, value: np.ndarray) -> float:
    """AUROC of "low value means flagged": positives ``flag``, negatives ``clean``."""
    from sklearn.metrics import roc_auc_score

    keep = (flag | clean) & np.isfinite(value)
    if flag[keep].all() or not flag[keep].any():
        return float("nan")
    return float(roc_auc_score(flag[keep], -value[keep]))


@styled
def figure_roc(run_dir: str | Path):
    """``RUN_DIR/report/roc.png``: ROC curves of "low weight means injected" per group at the last
    dumped epoch with weights, and of the run's own final true-class confidence; ``None`` for a
    run without ``injection.npz``."""
    from sklearn.metrics import roc_curve

    run = Path(run_dir)
    flags = read_injection(run)
    if flags is None:
        return None
    n = len(flags["index"])
    clean = ~np.any([flags[g] for g in GROUPS], axis=0)
    signals = []
    ds = read_dumps(run, "weights")
    for ep in sorted(ds, reverse=True):
        w = epoch_weights(ds[ep], n)
        if w is not None:
            signals.append((f"weight (epoch {ep})", w, "-"))
            break
    conf = run / "confidence.npz"
    if conf.is_file():
        with np.load(conf) as f:
            c = np.full(n, np.nan)
            c[f["index"]] = f["confidence"]
        signals.append(("true-class confidence", c, ":"))
    if not signals:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 5.4))
    for label, v, ls in signals:
        for g in GROUPS:
            keep = (flags[g] | clean) & np.isfinite(v)
            if not flags[g][keep].any() or flags[g][keep].all():
                continue
            fpr, tpr, _ = roc_curve(flags[g][keep], -v[keep])
            ax.plot(
                fpr, tpr, ls=ls, color=COLOURS[g], label=f"{g}, low {label}: AUROC {auroc_low(flags[g], clean, v):.2f}"
            )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    # near square by its size: a fixed aspect makes constrained layout misplace the legend on the first draw
    ax.set(xlabel="false positive rate (clean samples)", ylabel="true positive rate (injected)")
    fig.legend(loc="outside lower center", fontsize=7, frameon=False)
    set_title(fig, "finding the injected samples", read_run_config(run, DataError))
    return fig


def figures(run_dir: str | Path, data: str | None = None, log=None) -> dict[str, Any]:
    """Every figure the run's files allow, by file stem (``accuracy``, ``weights``, ...), unsaved:
    matplotlib ``Figure`` objects to inspect, restyle or save; ``report`` writes them."""
    run = Path(run_dir)
    cfg = read_run_config(run, DataError)
    records = read_metrics(run)
    if not records:
        raise DataError(f"{str(run)!r} has no metrics.jsonl records yet")
    say = log or (lambda s: None)
    figs = {
        "accuracy": figure_accuracy(records, cfg),
        "weights": figure_weights(run, records, cfg),
        "weight_vs_signal": figure_weight_vs_signal(run, cfg),
    }
    try:
        figs["extremes"] = figure_extremes(run, cfg, data=data)
    except DataError as e:
        say(f"note: {e}")
    figs["roc"] = figure_roc(run)  # only for runs with injection flags
    try:  # only for runs whose results record per-class accuracies
        figs["per_class"] = figure_per_class(run, cfg)
    except DataError as e:  # a damaged results.json / eval.json: the other figures still
        say(f"note: per_class.png skipped: {e}")
    if not read_dumps(run, "weights"):
        shown = "weights.png shows the logged min/mean/max only, and " if figs["weights"] is not None else ""
        say(
            f"note: no per-sample dumps in this run: {shown}weight_vs_signal.png and extremes.png need them; "
            "train with --dump-weights"
        )
    return {k: f for k, f in figs.items() if f is not None}


def report(run_dir: str | Path, data: str | None = None, log=None) -> list[Path]:
    """Write every figure the run's files allow, as PNG and PDF; returns their paths. ``data``: the run's
    ``module:`` data source, repeated by the user (needed for ``extremes`` only)."""
    run = Path(run_dir)
    return [p for k, f in figures(run, data, log).items() for p in save_figure(f, run / "report" / f"{k}.png")]
