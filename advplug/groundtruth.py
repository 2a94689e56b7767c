"""Ground-truth benchmark (#18): does a method's reweighting find the samples its paper says it
weighs down or up? Training sets with *known* injected samples on the embedded digits, every
method trained on them, and the per-sample weights of the ``--dump-weights`` files scored against
the injection flags.

Injections (fractions of the 1437 original training samples, drawn disjointly by ``seed``):

* ``flipped``: the label replaced by a uniformly drawn *wrong* class (the image unchanged);
* ``atypical``: the image transformed, the label kept correct. ``rotate`` (default): rotated
  by an angle drawn uniformly from +-[60, 120] degrees about the centre (bilinear, zero fill);
  ``shift``: moved by 2 pixels in x and in y, each direction drawn at random (zero fill);
  ``thicken``: strokes dilated by a 3x3 max filter;
* ``duplicate``: untouched samples (neither flipped nor atypical) appended once more to the
  training set; the original *and* its copy carry the flag (they are the same sample).

Files: the injected training set (with the digits test split unchanged) is written as
``OUT/data/seed<S>.npz`` (arrays ``x_train, y_train, x_test, y_test`` read by ``--data npz:``, plus
the flags in the injected set's numbering). Each run trains on ``--data npz:<that file>``, so its
``config.json`` names the exact data and ``advplug report`` finds its images. The flags in the
run's own numbering (the trainer holds the model-selection split, and BiLAW's validation split,
out of the training set and renumbers what is left: :func:`flags_for_config` applies the same
``advplug.engine.trainer.training_data``) go to ``RUN_DIR/injection.npz`` (columns ``index``, ``flipped``,
``atypical``, ``duplicate``, ``true_label``, ``source``); the final model's true-class
probability on every (natural) training sample goes to ``RUN_DIR/confidence.npz``.

Scores. The weight of a sample in an epoch is the mean of the dump's ``weight_<variant>`` columns
(the adversarial variants; ``weight_natural`` is not used): for a global method every column holds
the same instance weight, for LRAT it is the pair's mean local weight. AUROC (sklearn's
``roc_auc_score``) is computed for "low weight means injected", i.e. of ``-weight``, with the
flagged samples as positives and the *unflagged* samples as negatives (samples of the other
injected groups are left out); 1 = every injected sample weighs less than every clean one,
0.5 = no separation, 0 = every injected sample weighs more. Methods that give no weights (AT,
TRADES, MART, AWP, FAT) weigh everything 1 and have no AUROC. Mean weights per group are relative:
the group's mean divided by the mean over all samples of that epoch (MeoW's weights are not mean 1).
The baseline is the AT model's true-class confidence on the natural training image ("low
confidence means injected", AUROC of ``-confidence``), from the AT runs of the same seeds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from advplug import hookimpl

GROUPS = ("flipped", "atypical", "duplicate")
OBJECTIVES = ("at", "trades", "mart")
TRANSFORMS = ("rotate", "shift", "thicken")
NO_WEIGHTS = "no weights"


# -- injection -------------------------------------------------------------------------------
def atypical_transform(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """``x`` [N, C, H, W] in [0, 1] transformed as documented in the module docstring."""
    import torch.nn.functional as F

    n = len(x)
    if n == 0:
        return x
    if kind == "rotate":
        mag = math.pi / 3 + torch.rand(n, generator=gen) * math.pi / 3  # 60..120 degrees
        ang = mag * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
    if kind == "shift":
        out = torch.zeros_like(x)
        for i in range(n):
            dy, dx = (int(v) * 4 - 2 for v in torch.randint(0, 2, (2,), generator=gen))
            out[i] = torch.roll(x[i], shifts=(dy, dx), dims=(-2, -1))
            if dy > 0:
                out[i, :, :dy] = 0
            else:
                out[i, :, dy:] = 0
            if dx > 0:
                out[i, :, :, :dx] = 0
            else:
                out[i, :, :, dx:] = 0
        return out
    if kind == "thicken":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    raise ValueError(f"unknown atypical transform {kind!r} (choose from {', '.join(TRANSFORMS)})")


def inject(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, flip: float, atypical: float, duplicate: float,
           seed: int, transform: str = "rotate") -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """The injected training set and its flags (in its own numbering: the originals, then the copies)."""
    n = len(y)
    gen = torch.Generator().manual_seed(10_000 + seed)
    counts = [int(round(f * n)) for f in (flip, atypical, duplicate)]
    if any(f < 0 for f in (flip, atypical, duplicate)) or sum(counts) > n:
        raise ValueError(f"fractions {flip}, {atypical}, {duplicate} must be >= 0 and leave samples untouched")
    perm = torch.randperm(n, generator=gen)
    i_flip, i_aty, i_dup = perm[:counts[0]], perm[counts[0]:counts[0] + counts[1]], perm[counts[0] + counts[1]:sum(counts)]
    y_orig = y.clone()
    x, y = x.clone(), y.clone()
    y[i_flip] = (y[i_flip] + torch.randint(1, num_classes, (len(i_flip),), generator=gen)) % num_classes
    x[i_aty] = atypical_transform(x[i_aty], transform, gen)
    x, y_new = torch.cat([x, x[i_dup]]), torch.cat([y, y[i_dup]])
    m = n + len(i_dup)
    flags = {g: np.zeros(m, dtype=bool) for g in GROUPS}
    flags["flipped"][i_flip.numpy()] = True
    flags["atypical"][i_aty.numpy()] = True
    flags["duplicate"][i_dup.numpy()] = True
    flags["duplicate"][n:] = True
    source = np.concatenate([np.arange(n), i_dup.numpy()])
    return x, y_new, {**flags, "source": source, "true_label": y_orig.numpy()[source]}


def write_data(path: Path, *, flip: float, atypical: float, duplicate: float, seed: int, transform: str,
               n_train: int | None = None) -> Path:
    """The injected digits set as an ``npz:`` data file (plus flag arrays), written atomically;
    ``n_train``: only the first samples of the digits training split (tests)."""
    from advplug.data import load_digits_tensors

    (xt, yt), (xe, ye) = load_digits_tensors()
    xt, yt = xt[:n_train], yt[:n_train]
    x, y, flags = inject(xt, yt, 10, flip=flip, atypical=atypical, duplicate=duplicate, seed=seed, transform=transform)
    save_npz(path, x_train=x.numpy(), y_train=y.numpy(), x_test=xe.numpy(), y_test=ye.numpy(),
             **{f"flag_{k}": v for k, v in flags.items()},
             injection=np.array(json.dumps(dict(flip=flip, atypical=atypical, duplicate=duplicate, seed=seed,
                                                transform=transform))))
    return path


def save_npz(path: Path, **arrays: Any) -> None:
    """``np.savez`` to a temp file, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        from advplug.run.directory import create_new

        with os.fdopen(create_new(tmp), "wb") as f:  # never through a symlink planted at the temp name
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def flags_for_config(cfg: Any) -> dict[str, np.ndarray]:
    """The flags of a run trained on an injected ``npz:`` file, in the run's numbering: the
    positions ``advplug.engine.trainer.training_data`` keeps after holding out the selection (and any
    validation) split, applied to the file's flags. ``cfg``: a resolved ``TrainConfig``."""
    from advplug.data import DataBundle
    from advplug.engine.trainer import training_data

    path = cfg.data[len("npz:"):]
    with np.load(path, allow_pickle=False) as f:
        flags = {k[len("flag_"):]: f[k] for k in f.files if k.startswith("flag_")}
        n = len(f["y_train"])
    if not flags:
        raise ValueError(f"{path}: not an injected data file (no flag_ arrays)")
    pos = torch.arange(n)
    probe = DataBundle((pos.float().view(n, 1), pos), (pos[:1].float().view(1, 1), pos[:1]), 10, (1,))
    kept = training_data(cfg, probe, log=lambda s: None).train[1].numpy()
    out = {k: v[kept] for k, v in flags.items()}
    out["index"], out["injected_index"] = np.arange(len(kept)), kept
    return out


def read_injection(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    p = Path(run_dir) / "injection.npz"
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# -- scoring ---------------------------------------------------------------------------------
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


def score_values(flags: dict[str, np.ndarray], value: np.ndarray) -> dict[str, Any]:
    clean = ~np.any([flags[g] for g in GROUPS], axis=0)
    mean = np.nanmean(value)
    out: dict[str, Any] = {"auroc": {g: auroc_low(flags[g], clean, value) for g in GROUPS}}
    out["rel_mean"] = {g: float(np.nanmean(value[m]) / mean) if m.any() else float("nan")
                       for g, m in (("clean", clean), *((g, flags[g]) for g in GROUPS))}
    return out


def score_run(run_dir: str | Path) -> dict[str, Any]:
    """Per dumped epoch: AUROC per group and relative mean weight per group (or "no weights"),
    plus the same for the run's final true-class confidence."""
    from advplug.tools.report import dumps

    run = Path(run_dir)
    flags = read_injection(run)
    if flags is None:
        raise FileNotFoundError(f"{run}: no injection.npz (not a ground-truth run)")
    n = len(flags["index"])
    per_epoch: dict[int, Any] = {}
    for ep, cols in dumps(run, "weights").items():
        w = epoch_weights(cols, n)
        per_epoch[ep] = NO_WEIGHTS if w is None else score_values(flags, w)
    out: dict[str, Any] = {"epochs": per_epoch}
    conf = run / "confidence.npz"
    if conf.is_file():
        with np.load(conf) as f:
            c = np.full(n, np.nan)
            c[f["index"]] = f["confidence"]
        out["confidence"] = score_values(flags, c)
    return out


def weights_by_group(run_dir: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """``{epoch: {group: weights}}`` of one run (relative to the epoch's mean), for the plots."""
    from advplug.tools.report import dumps

    run = Path(run_dir)
    flags = read_injection(run)
    n = len(flags["index"])
    clean = ~np.any([flags[g] for g in GROUPS], axis=0)
    out = {}
    for ep, cols in dumps(run, "weights").items():
        w = epoch_weights(cols, n)
        if w is None:
            continue
        w = w / np.nanmean(w)
        out[ep] = {g: w[m & np.isfinite(w)] for g, m in (("clean", clean), *((g, flags[g]) for g in GROUPS))}
    return out


# -- plots -----------------------------------------------------------------------------------
COLOURS = {"clean": "tab:blue", "flipped": "tab:red", "atypical": "tab:orange", "duplicate": "tab:green"}


def plot_groups(runs: list[Path], title: str, path: Path) -> Path | None:
    """Weight distribution per group over epochs (median and 10-90 % band, seeds pooled)."""
    from advplug.tools.report import _plt, _save

    pooled: dict[int, dict[str, list[np.ndarray]]] = {}
    for r in runs:
        for ep, groups in weights_by_group(r).items():
            for g, w in groups.items():
                pooled.setdefault(ep, {}).setdefault(g, []).append(w)
    if not pooled:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
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
    ax.set(xlabel="epoch", ylabel="weight / epoch mean (median, 10-90 %)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_roc(run_dir: str | Path) -> Path | None:
    """``RUN_DIR/report/roc.png``: ROC curves of "low weight means injected" per group at the last
    dumped epoch with weights, and of the run's own final true-class confidence; ``None`` for a
    run without ``injection.npz``."""
    from sklearn.metrics import roc_curve

    from advplug.tools.report import _plt, _save, dumps

    run = Path(run_dir)
    flags = read_injection(run)
    if flags is None:
        return None
    n = len(flags["index"])
    clean = ~np.any([flags[g] for g in GROUPS], axis=0)
    signals = []
    ds = dumps(run, "weights")
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
            ax.plot(fpr, tpr, ls=ls, color=COLOURS[g], label=f"{g}, low {label}: AUROC {auroc_low(flags[g], clean, v):.2f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set(xlabel="false positive rate (clean samples)", ylabel="true positive rate (injected samples)",
           title="finding the injected samples")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, run / "report" / "roc.png")


# -- the benchmark ---------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    out: str = "runs/groundtruth"
    methods: tuple[str, ...] = ()  # () = AT, TRADES, MART and every installed plugin (with AT)
    seeds: tuple[int, ...] = (0, 1, 2)
    flip: float = 0.08
    atypical: float = 0.08
    duplicate: float = 0.08
    transform: str = "rotate"
    epochs: int = 5
    steps: int = 3
    alpha: float = 0.1
    eval_steps: int = 3
    score_epochs: tuple[int, ...] = ()  # () = the last epoch of burn-in + 1 ... see default_score_epochs
    selection: str = "validation"
    n_train: int | None = None  # a prefix of the digits training set (tests); None = all 1437
    final_attacks: tuple[str, ...] = ("natural", "pgd20", "cw20")
    plugin_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def default_methods() -> list[str]:
    from advplug import plugins

    return [*OBJECTIVES, *sorted(plugins.installed())]


def burn_in(epochs: int) -> int:
    """MAIL's burn-in and GAIRAT's first reweighted epoch here: a quarter of the run."""
    return max(1, epochs // 4)


def default_score_epochs(epochs: int) -> tuple[int, ...]:
    """The first reweighted epoch of MAIL/GAIRAT (1-based) and the last epoch."""
    return tuple(sorted({min(epochs, burn_in(epochs) + 1), epochs}))


def method_config(method: str, seed: int, s: Settings, data_file: Path, out: Path):
    from advplug.config import TrainConfig, milestones_for

    objective, plugins_ = (method, ()) if method in OBJECTIVES else ("at", (method,))
    opts: dict[str, Any] = {}
    if method == "mail":
        opts["mail-burn-in"] = burn_in(s.epochs)
    if method == "gairat":
        opts["gairat-begin-epoch"] = burn_in(s.epochs)
    opts.update(s.plugin_options.get(method, {}))
    return TrainConfig(data=f"npz:{data_file}", model="digits-cnn", objective=objective, plugins=plugins_,
                       plugin_options=opts, epochs=s.epochs, batch_size=64, lr=0.05, weight_decay=5e-4,
                       milestones=milestones_for(s.epochs, (0.6, 0.85)), eps=0.2, alpha=s.alpha, steps=s.steps,
                       eval_steps=s.eval_steps, seed=seed, selection=s.selection, final_attacks=s.final_attacks,
                       out=str(out), progress=False, dump_weights=True, workers=0, device="cpu")


def train_one(cfg: Any, log: Callable[[str], None] = lambda s: None) -> Path:
    """Train one run in-process, writing ``injection.npz`` before the first epoch and
    ``confidence.npz`` after the last."""
    from advplug.engine.trainer import Trainer

    tr = Trainer(cfg, overwrite=True, log=log)
    save_npz(tr.out / "injection.npz", **flags_for_config(tr.cfg))
    tr.fit()
    model = tr.model.eval()
    x, y = tr.data.train
    with torch.no_grad():
        p = torch.cat([torch.softmax(model(xb.to(tr.device)), 1).cpu() for xb in x.split(512)])
    save_npz(tr.out / "confidence.npz", index=np.arange(len(y)), confidence=p[torch.arange(len(y)), y].numpy())
    return tr.out


def run(s: Settings, log: Callable[[str], None] = print, keep_going: bool = False) -> dict[str, list[Path]]:
    """Train every (method, seed), seeds outermost; returns ``{method: [run dirs]}`` (a failed
    run is logged and left out with ``keep_going``)."""
    import time

    out = Path(s.out)
    methods = list(s.methods) or default_methods()
    runs: dict[str, list[Path]] = {m: [] for m in methods}
    for seed in s.seeds:
        data_file = write_data(out / "data" / f"seed{seed}.npz", flip=s.flip, atypical=s.atypical,
                               duplicate=s.duplicate, seed=seed, transform=s.transform, n_train=s.n_train).resolve()
        for m in methods:
            t0 = time.perf_counter()
            cfg = method_config(m, seed, s, data_file, out / "runs" / f"{m}-seed{seed}")
            try:
                runs[m].append(train_one(cfg))
            except Exception as e:  # one failing method must not cost the others' runs
                if not keep_going:
                    raise
                log(f"{m} seed {seed}: FAILED: {type(e).__name__}: {e}")
                continue
            log(f"{m} seed {seed}: {time.perf_counter() - t0:.1f} s")
    return runs


class PlantedFlipped:
    """A test double with a known answer: weight 0.1 for exactly the flipped samples, 1 for every
    other one (read from the run's injected data file in ``on_train_start``). The benchmark must
    give it AUROC 1 for ``flipped``; register it with ``advplug.testing.installed_plugins(
    planted="advplug.groundtruth:PlantedFlipped")``."""

    def __init__(self) -> None:
        self.down: torch.Tensor | None = None

    @hookimpl
    def on_train_start(self, ctx: Any) -> None:
        self.down = torch.as_tensor(flags_for_config(ctx.config)["flipped"], device=ctx.device)

    @hookimpl
    def compute_weights(self, ctx: Any, variants: list) -> Any:
        from advplug.context import Weights

        return Weights(adv=torch.where(self.down[ctx.index], 0.1, 1.0).float())


# -- the table -------------------------------------------------------------------------------
def _ms(vals: Iterable[float]) -> tuple[float, float, int] | None:
    v = [x for x in vals if isinstance(x, float) and not math.isnan(x)]
    if not v:
        return None
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)


def summarise(runs: dict[str, list[Path]], score_epochs: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per method (and the baseline): AUROC per group at each scored epoch, relative mean
    weight per group at the last scored epoch, test accuracies (mean, std, n over seeds)."""
    from advplug.tools.compare import load_run, table

    rows = []
    last = max(score_epochs)
    for method, dirs in runs.items():
        scores = [score_run(d) for d in dirs]
        row: dict[str, Any] = {"method": method.upper() if method in OBJECTIVES else method, "runs": [str(d) for d in dirs], "auroc": {}, "rel_mean": {}}
        weighted = any(isinstance(sc["epochs"].get(e), dict) for sc in scores for e in score_epochs)
        for e in score_epochs:
            for g in GROUPS:
                row["auroc"][f"{g} e{e}"] = _ms(sc["epochs"][e]["auroc"][g] for sc in scores
                                                if isinstance(sc["epochs"].get(e), dict))
        for g in ("clean", *GROUPS):
            row["rel_mean"][g] = _ms(sc["epochs"][last]["rel_mean"][g] for sc in scores
                                     if isinstance(sc["epochs"].get(last), dict))
        row["weighted"] = weighted
        acc = table([load_run(d) for d in dirs])[0]["cells"]
        row["accuracy"] = {f"{a} {w}": c for (a, w), c in acc.items()}
        rows.append(row)
        if method == "at":
            base = {"method": "baseline: AT true-class confidence", "runs": row["runs"], "weighted": True,
                    "auroc": {}, "rel_mean": {}, "accuracy": {}}
            for e in score_epochs:
                for g in GROUPS:
                    base["auroc"][f"{g} e{e}"] = _ms(sc["confidence"]["auroc"][g] for sc in scores if "confidence" in sc) \
                        if e == last else None
            for g in ("clean", *GROUPS):
                base["rel_mean"][g] = _ms(sc["confidence"]["rel_mean"][g] for sc in scores if "confidence" in sc)
            rows.append(base)
    return rows


def _cell(c: tuple[float, float, int] | None, scale: float = 1.0, digits: int = 2) -> str:
    if c is None:
        return "-"
    return f"{c[0] * scale:.{digits}f}" if c[2] == 1 else f"{c[0] * scale:.{digits}f} ± {c[1] * scale:.{digits}f}"


def render(rows: list[dict[str, Any]], fmt: str = "markdown", settings: Settings | None = None) -> str:
    if fmt == "json":
        def cells(d):
            return {k: (None if c is None else {"mean": c[0], "std": c[1], "n": c[2]}) for k, c in d.items()}
        return json.dumps({"settings": dataclasses.asdict(settings) if settings else None,
                           "rows": [{"method": r["method"], "runs": r["runs"], "gives_weights": r["weighted"],
                                     "auroc_low_weight_means_injected": cells(r["auroc"]),
                                     "relative_mean_weight": cells(r["rel_mean"]),
                                     "test_accuracy_percent": cells(r["accuracy"])} for r in rows]}, indent=2)
    au = list(dict.fromkeys(k for r in rows for k in r["auroc"]))
    acc = list(dict.fromkeys(k for r in rows for k in r["accuracy"] if k.endswith(" last") or k.endswith(" best")))
    grp = ["clean", *GROUPS]
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "quantity", "column", "mean", "std", "n"])
        for r in rows:
            for q, d in (("auroc", r["auroc"]), ("relative mean weight", r["rel_mean"]), ("test accuracy %", r["accuracy"])):
                for k, c in d.items():
                    if c is not None:
                        w.writerow([r["method"], q, k, f"{c[0]:.4f}", f"{c[1]:.4f}", c[2]])
        return buf.getvalue()
    head = ["method", "runs", *[f"AUROC {k}" for k in au], *[f"w {g}" for g in grp], *acc]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        if r["weighted"]:
            cells = [_cell(r["auroc"].get(k)) for k in au] + [_cell(r["rel_mean"].get(g)) for g in grp]
        else:
            cells = [NO_WEIGHTS] * len(au) + ["1"] * len(grp)
        lines.append("| " + " | ".join([r["method"], str(len(r["runs"])), *cells, *[_cell(r["accuracy"].get(k)) for k in acc]]) + " |")
    text = "\n".join(lines)
    text += ("\n\nAUROC <group> e<E>: how well a LOW weight at epoch E singles out the injected group against the "
             "unflagged samples (1: every injected sample weighs less, 0.5: no separation, 0: every one weighs more); "
             "the baseline row is the AT model's final true-class confidence (low = injected). w <group>: the group's "
             "mean weight over the epoch's mean weight at the last scored epoch. Accuracies: test %, natural / PGD-20 / "
             "CW-20, last and best (best chosen on the held-out selection split). Mean ± std over seeds.")
    return text


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=Settings.out, help="output folder (runs/, data/, plots/, groundtruth.{md,csv,json})")
    p.add_argument("--methods", default="", help="comma-separated: at,trades,mart and plugin names (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--flip", type=float, default=Settings.flip)
    p.add_argument("--atypical", type=float, default=Settings.atypical)
    p.add_argument("--duplicate", type=float, default=Settings.duplicate)
    p.add_argument("--transform", choices=TRANSFORMS, default=Settings.transform)
    p.add_argument("--epochs", type=int, default=Settings.epochs)
    p.add_argument("--steps", type=int, default=Settings.steps, help="PGD steps of the training attack (step 0.1, eps 0.2)")
    p.add_argument("--score-epochs", default="", help="comma-separated 1-based epochs (default: first reweighted and last)")
    p.add_argument("--score-only", action="store_true", help="re-score existing runs under --out; train nothing")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = Settings(out=a.out, methods=tuple(m for m in a.methods.split(",") if m), seeds=tuple(range(a.seeds)),
                 flip=a.flip, atypical=a.atypical, duplicate=a.duplicate, transform=a.transform, epochs=a.epochs,
                 steps=a.steps, score_epochs=tuple(int(e) for e in a.score_epochs.split(",") if e))
    if a.score_only:
        runs = {m: [Path(s.out) / "runs" / f"{m}-seed{k}" for k in s.seeds] for m in (s.methods or default_methods())}
        runs = {m: [d for d in ds if (d / "results.json").is_file()] for m, ds in runs.items()}
        runs = {m: ds for m, ds in runs.items() if ds}
    else:
        runs = {m: ds for m, ds in run(s, keep_going=True).items() if ds}
    write_outputs(runs, s)
    print((Path(s.out) / "groundtruth.md").read_text())
    return 0


def write_outputs(runs: dict[str, list[Path]], s: Settings) -> dict[str, Path]:
    """``OUT/groundtruth.{md,csv,json}`` and ``OUT/plots/<method>.png``."""
    from advplug.run.directory import write_text

    out = Path(s.out)
    rows = summarise(runs, s.score_epochs or default_score_epochs(s.epochs))
    files = {}
    for fmt, ext in (("markdown", "md"), ("csv", "csv"), ("json", "json")):
        files[ext] = out / f"groundtruth.{ext}"
        write_text(files[ext], render(rows, fmt, s) + "\n")
    for m, dirs in runs.items():
        p = plot_groups(dirs, f"{m}: weight per group (seeds {len(dirs)}, {s.transform})", out / "plots" / f"{m}.png")
        if p is not None:
            files[f"plot {m}"] = p
    return files
