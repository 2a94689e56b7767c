"""The benchmark's settings, one training config per method, and the training of every
(method, seed) in-process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advplug import plugins
from advplug.config import TrainConfig, milestones_for
from advplug.engine.trainer import Trainer
from benchmarks.groundtruth.injection import flags_for_config, save_npz, write_data

OBJECTIVES = ("at", "trades", "mart")


@dataclasses.dataclass
class Settings:
    """What the benchmark trains and scores (``python -m benchmarks.groundtruth --help``)."""

    out: str = "runs/groundtruth"
    methods: tuple[str, ...] = ()  # () = AT, TRADES, MART and every installed plugin (with AT)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    flip: float = 0.08
    atypical: float = 0.08
    duplicate: float = 0.08
    transform: str = "rotate"
    epochs: int = 20
    steps: int = 3
    alpha: float = 0.1
    eval_steps: int = 3
    score_epochs: tuple[int, ...] = ()  # () = the last epoch of burn-in + 1 ... see default_score_epochs
    selection: str = "validation"
    n_train: int | None = None  # a prefix of the digits training set (tests); None = all 1437
    final_attacks: tuple[str, ...] = ("natural", "pgd20", "cw20")
    plugin_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def default_methods() -> list[str]:
    return [*OBJECTIVES, *sorted(plugins.installed())]


def burn_in(epochs: int) -> int:
    """MAIL's burn-in, GAIRAT's first reweighted epoch and AWP's warm-up here: a quarter of the run."""
    return max(1, epochs // 4)


def default_score_epochs(epochs: int) -> tuple[int, ...]:
    """The first reweighted epoch of MAIL/GAIRAT (1-based) and the last epoch."""
    return tuple(sorted({min(epochs, burn_in(epochs) + 1), epochs}))


def method_config(method: str, seed: int, s: Settings, data_file: Path, out: Path):
    objective, plugins_ = (method, ()) if method in OBJECTIVES else ("at", (method,))
    opts: dict[str, Any] = {}
    if method == "mail":
        opts["mail-burn-in"] = burn_in(s.epochs)
    if method == "gairat":
        opts["gairat-begin-epoch"] = burn_in(s.epochs)
    if method == "awp":  # at its default warm-up 0 AWP never leaves the start's uniform-output plateau here
        opts["awp-warmup"] = burn_in(s.epochs)
    opts.update(s.plugin_options.get(method, {}))
    return TrainConfig(
        data=f"npz:{data_file}",
        model="digits-cnn",
        objective=objective,
        plugins=plugins_,
        plugin_options=opts,
        epochs=s.epochs,
        batch_size=64,
        lr=0.05,
        weight_decay=5e-4,
        milestones=milestones_for(s.epochs, (0.6, 0.85)),
        eps=0.2,
        alpha=s.alpha,
        steps=s.steps,
        eval_steps=s.eval_steps,
        seed=seed,
        selection=s.selection,
        final_attacks=s.final_attacks,
        out=str(out),
        progress=False,
        dump_weights=True,
        workers=0,
        device="cpu",
    )


def train_one(cfg: Any, log: Callable[[str], None] = lambda s: None) -> Path:
    """Train one run in-process, writing ``injection.npz`` before the first epoch and
    ``confidence.npz`` after the last."""
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
        data_file = write_data(
            out / "data" / f"seed{seed}.npz",
            flip=s.flip,
            atypical=s.atypical,
            duplicate=s.duplicate,
            seed=seed,
            transform=s.transform,
            n_train=s.n_train,
        ).resolve()
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
