"""Ground truth with one harder class: do the class-wise fairness methods (CFA, DAFA) raise the worst class's
robust accuracy over plain TRADES?

The embedded digits with one class made harder: a quarter of its training labels (``--flip 0.25``, of class
``--hard-class``, 3 by default) replaced by a uniformly drawn other class, fixed by the seed; the test split
unchanged. Each seed's set is written as ``OUT/data/seed<S>.npz`` and every run trains on ``--data npz:<it>``.
Methods: ``--objective trades`` alone, ``--plugin cfa``, ``cfa-trades-scale`` (``--plugin cfa --cfa-loss-scale
trades``: CFA's calibration at plain TRADES' loss scale, not its code's 1 / (1 + beta)) and ``--plugin dafa`` (all
with TRADES), at their defaults except the epoch their class-wise part starts: ``--cfa-begin`` and ``--dafa-warmup``
are ``--switch`` (a third of the run by default), so that both switch within the run. Scores on the 360 test images,
of the last epoch's model: natural accuracy, PGD-20 accuracy (eps 0.2, step eps/4, as ``advplug eval``) and, from the
same predictions, the PGD-20 accuracy of each class, its minimum (the worst class, and which one) and the hard
class's; for CFA also its FAWA model (the averaged model, when it took weights). From the repository root::

    python -m benchmarks.groundtruth.harder_class --out runs/harder-class          # 3 seeds x 4 methods x 12 epochs
    python -m benchmarks.groundtruth.harder_class --out DIR --methods cfa-trades-scale   # one method alone

Writes ``OUT/harder-class.json`` (every run's numbers, per class) and ``OUT/harder-class.md`` (the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from advplug.config import TrainConfig, milestones_for
from advplug.data import load_digits_tensors
from advplug.engine.trainer import Trainer
from advplug.evaluate import evaluate, worst_class
from benchmarks.groundtruth.injection import save_npz

METHODS = {"trades": (), "cfa": ("cfa",), "cfa-trades-scale": ("cfa",), "dafa": ("dafa",)}  # name: plugins
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"cfa-trades-scale": {"cfa-loss-scale": "trades"}}


@dataclasses.dataclass
class Settings:
    """What the harder-class benchmark trains and scores."""

    out: str = "runs/harder-class"
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    hard_class: int = 3
    flip: float = 0.25  # 0.5 leaves the hard class at 0-3 % PGD-20 for every method (docs/ground-truth.md)
    epochs: int = 12
    switch: int | None = None  # None: a third of the run
    steps: int = 3
    alpha: float = 0.1
    eps: float = 0.2
    n_train: int | None = None  # a prefix of the digits training split (tests)


def switch_epoch(s: Settings) -> int:
    """The epochs trained before CFA's calibration and DAFA's class weights start (a third of the run)."""
    return s.switch if s.switch is not None else max(1, s.epochs // 3)


def harder(y: torch.Tensor, hard_class: int, flip: float, seed: int, num_classes: int = 10) -> torch.Tensor:
    """``y`` with ``round(flip * n_hard)`` labels of ``hard_class`` (drawn by ``seed``) replaced by a uniformly drawn
    other class."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    members = (y == hard_class).nonzero().squeeze(1)
    chosen = members[torch.randperm(len(members), generator=gen)[: int(round(flip * len(members)))]]
    out = y.clone()
    out[chosen] = (hard_class + torch.randint(1, num_classes, (len(chosen),), generator=gen)) % num_classes
    return out


def write_data(path: Path, s: Settings, seed: int) -> Path:
    """The digits with the harder class as an ``npz:`` data file (and the true labels), written atomically."""
    (xt, yt), (xe, ye) = load_digits_tensors()
    xt, yt = xt[: s.n_train], yt[: s.n_train]
    y = harder(yt, s.hard_class, s.flip, seed)
    save_npz(path, x_train=xt.numpy(), y_train=y.numpy(), x_test=xe.numpy(), y_test=ye.numpy(), true_train=yt.numpy())
    return path


def method_config(method: str, seed: int, s: Settings, data_file: Path, out: Path) -> TrainConfig:
    opts: dict[str, Any] = {}
    if "cfa" in METHODS[method]:
        opts["cfa-begin"] = switch_epoch(s)
    if "dafa" in METHODS[method]:
        opts["dafa-warmup"] = switch_epoch(s)
    opts.update(METHOD_OPTIONS.get(method, {}))
    return TrainConfig(
        data=f"npz:{data_file}",
        model="digits-cnn",
        objective="trades",
        plugins=METHODS[method],
        plugin_options=opts,
        epochs=s.epochs,
        batch_size=64,
        lr=0.05,
        weight_decay=5e-4,
        milestones=milestones_for(s.epochs, (0.6, 0.85)),
        eps=s.eps,
        alpha=s.alpha,
        steps=s.steps,
        eval_steps=s.steps,
        seed=seed,
        final_attacks=("natural",),
        out=str(out),
        progress=False,
        workers=0,
        device="cpu",
    )


def score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, s: Settings) -> dict[str, Any]:
    """Natural and PGD-20 accuracy on the test split, PGD-20 per class, the worst class and the hard class."""
    per_class: dict[str, list[float | None]] = {}
    acc = evaluate(model, x, y, ["natural", "pgd20"], eps=s.eps, num_classes=10, per_class=per_class)
    k, worst = worst_class(per_class["pgd20"])
    return {
        "natural": acc["natural"],
        "pgd20": acc["pgd20"],
        "pgd20_per_class": per_class["pgd20"],
        "worst_class": k,
        "worst_pgd20": worst,
        "hard_pgd20": per_class["pgd20"][s.hard_class],
    }


def train_and_score(cfg: TrainConfig, s: Settings) -> dict[str, Any]:
    tr = Trainer(cfg, overwrite=True, log=lambda line: None)
    tr.fit()
    x, y = tr.test
    out = {"last": score(tr.model, x, y, s)}
    ema = tr.runtime.ema
    if ema is not None and tr.progress.best_ema_epoch >= 0:  # CFA's FAWA model, once it took weights
        out["averaged"] = score(ema.model, x, y, s)
    return out


def run(s: Settings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train and score every (seed, method), seeds outermost."""
    out, rows = Path(s.out), []
    for seed in s.seeds:
        data_file = write_data(out / "data" / f"seed{seed}.npz", s, seed).resolve()
        for m in s.methods:
            t0 = time.perf_counter()
            res = train_and_score(method_config(m, seed, s, data_file, out / "runs" / f"{m}-seed{seed}"), s)
            for model, r in res.items():
                rows.append({"method": m, "model": model, "seed": seed, **r})
            last = res["last"]
            log(
                f"{m} seed {seed}: worst class {last['worst_class']} {100 * last['worst_pgd20']:.1f} %, "
                f"PGD-20 {100 * last['pgd20']:.1f} %, natural {100 * last['natural']:.1f} % "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    return rows


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _mean(vals: list[float]) -> str:
    if len(vals) == 1:
        return _pct(vals[0])
    return f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"


def table(rows: list[dict[str, Any]], s: Settings) -> str:
    """Markdown: per (method, model) one line per seed and the mean ± std over seeds."""
    head = (
        f"| method | seed | worst-class PGD-20 (class) | class {s.hard_class} PGD-20 | mean PGD-20 | natural |\n"
        "|---|---|---|---|---|---|"
    )
    lines = [head]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["model"]), []).append(r)
    order = sorted(groups, key=lambda g: (list(METHODS).index(g[0]) if g[0] in METHODS else 99, g[1] != "last"))
    for m, model in order:
        rs = groups[(m, model)]
        name = m if model == "last" else f"{m} (FAWA model)"
        for r in rs:
            lines.append(
                f"| {name} | {r['seed']} | {_pct(r['worst_pgd20'])} ({r['worst_class']}) | {_pct(r['hard_pgd20'])} | "
                f"{_pct(r['pgd20'])} | {_pct(r['natural'])} |"
            )
        classes = ", ".join(str(r["worst_class"]) for r in rs)
        n = f"mean of {len(rs)} of {len(s.seeds)}" if len(rs) < len(s.seeds) else "mean"
        lines.append(
            f"| **{name}** | {n} | {_mean([r['worst_pgd20'] for r in rs])} ({classes}) | "
            f"{_mean([r['hard_pgd20'] for r in rs])} | {_mean([r['pgd20'] for r in rs])} | "
            f"{_mean([r['natural'] for r in rs])} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict[str, Any]], s: Settings) -> tuple[Path, Path]:
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "harder-class.json", out / "harder-class.md"
    js.write_text(json.dumps({"settings": dataclasses.asdict(s), "runs": rows}, indent=1) + "\n")
    md.write_text(table(rows, s))
    return js, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.groundtruth.harder_class", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", default=Settings.out, help="output folder (data/, runs/, harder-class.{json,md})")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--hard-class", type=int, default=Settings.hard_class)
    p.add_argument("--flip", type=float, default=Settings.flip, help="share of the hard class's labels flipped")
    p.add_argument("--epochs", type=int, default=Settings.epochs)
    p.add_argument("--switch", type=int, default=None, help="--cfa-begin and --dafa-warmup (default: epochs // 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = p.parse_args(argv)
    unknown = [m for m in a.methods.split(",") if m and m not in METHODS]
    if unknown or not 0 <= a.hard_class < 10 or not 0 <= a.flip <= 1:
        p.error(f"methods of {', '.join(METHODS)}, --hard-class 0..9, --flip in [0, 1]")
    torch.set_num_threads(a.threads)
    s = Settings(
        out=a.out,
        methods=tuple(m for m in a.methods.split(",") if m),
        seeds=tuple(range(a.seeds)),
        hard_class=a.hard_class,
        flip=a.flip,
        epochs=a.epochs,
        switch=a.switch,
    )
    rows = run(s)
    js, md = write_outputs(rows, s)
    print(md.read_text() + f"\nwritten: {md}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
