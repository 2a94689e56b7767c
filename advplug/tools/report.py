"""``advplug report RUN_DIR``: PNG plots of a run with matplotlib (Agg, no display needed).

Files go to ``RUN_DIR/report/``:

* ``accuracy.png``: training, clean and PGD accuracy per epoch, learning-rate drops marked;
* ``weights.png``: the distribution of the per-sample weights per epoch (box plots from the
  ``--dump-weights`` files; from the logged min/mean/max when there are none);
* ``weight_vs_signal.png``: weight against the probabilistic margin of the sample (every
  plugin), and against each plugin's own signal where its dump records one (MAIL's PM,
  GAIRAT's kappa, LRAT's t, BAT's poisoning score q);
* ``extremes.png``: the training images with the highest and the lowest weights of the last
  dumped epoch (as MeoW Fig. 2 and BiLAW Fig. 3 show them);
* ``roc.png``: only for a run with injection flags (``RUN_DIR/injection.npz``, written by the
  ground-truth benchmark ``benchmarks/groundtruth``): ROC curves of "low weight means injected"
  and of the run's true-class confidence per injected group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from advplug.config import read_run_config
from advplug.errors import DataError
from advplug.run.dump import read_dumps, weight_column
from advplug.run.metrics import read_metrics
from advplug.tools.compare import method_label

SIGNALS = {"mail": "pm", "gairat": "kappa", "bat": "q", "lrat": "t_"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def plot_accuracy(run_dir: Path, records: list[dict[str, Any]], cfg: dict[str, Any]) -> Path:
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
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
            [b], [100 * r[key("pgd_acc")]], marker="*", ms=14, color="crimson", ls="none", label=f"best (epoch {b})"
        )
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{method_label(cfg)} on {_data_label(cfg)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, run_dir / "report" / "accuracy.png")


def _data_label(cfg: dict[str, Any]) -> str:
    d = str(cfg.get("data"))
    return d if len(d) < 40 else "..." + d[-37:]


def plot_weights(run_dir: Path, records: list[dict[str, Any]], cfg: dict[str, Any]) -> Path | None:
    plt = _plt()
    ds = read_dumps(run_dir, "weights")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if ds:
        epochs = sorted(ds)
        ax.boxplot(
            [weight_column(ds[e]) for e in epochs],
            positions=epochs,
            widths=0.6,
            showfliers=True,
            flierprops=dict(ms=2, alpha=0.3),
        )
        ax.set_xticks(epochs[:: max(1, len(epochs) // 10)])
    else:
        pts = [(r["epoch"] + epoch_offset(records), r["weights"]) for r in records if "weights" in r]
        if not pts:
            plt.close(fig)
            return None
        e = [p[0] for p in pts]
        ax.fill_between(e, [p[1]["min"] for p in pts], [p[1]["max"] for p in pts], alpha=0.3, label="min-max")
        ax.plot(e, [p[1]["mean"] for p in pts], marker="o", ms=3, label="mean")
        ax.legend()
    ax.set(xlabel="epoch", ylabel="per-sample weight", title=f"weights per epoch, {method_label(cfg)}")
    ax.grid(alpha=0.3)
    return _save(fig, run_dir / "report" / "weights.png")


def plot_weight_vs_signal(run_dir: Path, cfg: dict[str, Any]) -> Path | None:
    plt = _plt()
    panels: list[tuple[str, np.ndarray, np.ndarray]] = []
    ds = read_dumps(run_dir, "weights")
    epochs = []
    if ds:
        last = ds[max(ds)]
        epochs.append(max(ds))
        panels.append(("probabilistic margin p_y - max p_j", last["margin"], weight_column(last)))
    for plugin, key in SIGNALS.items():
        pd = read_dumps(run_dir, plugin)
        if not pd:
            continue
        cols = pd[max(pd)]
        epochs.append(max(pd))
        sig = sorted(k for k in cols if k.startswith(key))
        wkey = (f"weight_{sig[0][len(key) :]}" if key.endswith("_") else "weight") if sig else ""
        if sig and wkey in cols:  # LRAT dumps t_<variant> with weight_<variant>, the others one signal with weight
            panels.append((f"{plugin}: {sig[0]}", cols[sig[0]], cols[wkey]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (label, x, w) in zip(axes[0], panels):
        ax.scatter(x, w, s=4, alpha=0.4)
        ax.set(xlabel=label, ylabel="weight")
        ax.grid(alpha=0.3)
    which = f"epoch {epochs[0]}" if len(set(epochs)) == 1 else "epochs " + ", ".join(map(str, epochs))
    fig.suptitle(f"weight against signal, {which} (the last dumped), {method_label(cfg)}")
    return _save(fig, run_dir / "report" / "weight_vs_signal.png")


def plot_extremes(run_dir: Path, cfg: dict[str, Any], n: int = 8, data: str | None = None) -> Path | None:
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
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.4))
    k = 0
    for row, (name, sel) in enumerate(picks):
        for col in range(n):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(sel):
                img = x[k].transpose(1, 2, 0)
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
                pred = f" pred={cols['pred'][sel[col]]}" if "pred" in cols else ""
                ax.set_title(f"y={y[k]}{pred}\nw={w[sel[col]]:.2f}", fontsize=7)
                k += 1
        axes[row, 0].text(-0.3, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle(
        f"training images with the lowest and highest weights (epoch {max(ds)}), {method_label(cfg)}"
        + ("; pred: the class the model predicted on the training attack" if "pred" in cols else ""),
        fontsize=9,
    )
    return _save(fig, run_dir / "report" / "extremes.png")


def training_images(cfg: dict[str, Any], index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training images by training-set index, as the run numbered them (validation held out)."""
    from advplug.config import RECORD_ONLY, TrainConfig
    from advplug.engine.inputs import training_data

    tc = TrainConfig.from_json({k: v for k, v in cfg.items() if k not in RECORD_ONLY})
    data = training_data(tc.resolved())  # module: data checked by the caller (plot_extremes)
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


def _save(fig, path: Path) -> Path:
    """``fig`` as ``RUN/report/<name>.png``, replaced atomically (a symlink there is replaced, not
    written through; a symlinked ``report/`` is refused)."""
    import io

    from advplug.run.directory import subdir, write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    _plt().close(fig)
    path = subdir(path.parent.parent, path.parent.name) / path.name
    write_bytes(path, buf.getvalue())
    return path


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


def plot_roc(run_dir: str | Path) -> Path | None:
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
    fig, ax = plt.subplots(figsize=(5.2, 5))
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
    ax.set(
        xlabel="false positive rate (clean samples)",
        ylabel="true positive rate (injected samples)",
        title="finding the injected samples",
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, run / "report" / "roc.png")


def report(run_dir: str | Path, data: str | None = None, log=None) -> list[Path]:
    """Write every plot the run's files allow; returns their paths. ``data``: the run's
    ``module:`` data source, repeated by the user (needed for ``extremes.png`` only)."""
    run = Path(run_dir)
    cfg = read_run_config(run, DataError)
    records = read_metrics(run)
    if not records:
        raise DataError(f"{str(run)!r} has no metrics.jsonl records yet")
    say = log or (lambda s: None)
    made = [plot_accuracy(run, records, cfg), plot_weights(run, records, cfg), plot_weight_vs_signal(run, cfg)]
    try:
        made.append(plot_extremes(run, cfg, data=data))
    except DataError as e:
        say(f"note: {e}")
    made.append(plot_roc(run))  # roc.png: only for runs with injection flags
    if not read_dumps(run, "weights"):
        say(
            "note: no per-sample dumps in this run: weights.png shows the logged min/mean/max only, and "
            "weight_vs_signal.png and extremes.png need them; train with --dump-weights"
        )
    return [p for p in made if p is not None]
