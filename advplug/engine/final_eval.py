"""The final evaluation: the last and best models attacked on the whole test split, written to ``results.json``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from torch import Tensor, device, nn

from advplug.config import TrainConfig
from advplug.data import DataBundle
from advplug.engine.ema import EMA
from advplug.engine.resume import Progress
from advplug.evaluate import evaluate
from advplug.models import build_model
from advplug.run import checkpoint, results


def evaluate_model(
    model: nn.Module,
    which: str,
    epoch: int,
    test: tuple[Tensor, Tensor],
    cfg: TrainConfig,
    num_classes: int,
    low_precision: Callable[[], AbstractContextManager[Any]] | None,
) -> list[dict[str, Any]]:
    """The final attacks in fp32; after low-precision training (``low_precision``: the run's autocast), the robust
    ones also under it ("PGD-20 (bf16 eval)"), so that a gap (gradient masking) shows. One result entry each, with
    its per-class accuracy."""
    kw = dict(eps=cfg.eps, num_classes=num_classes, seed=cfg.seed, progress=cfg.progress)
    per_class: dict[str, dict[str, list[float | None]]] = {"fp32": {}, cfg.precision: {}}
    runs = [("fp32", evaluate(model, *test, cfg.final_attacks, per_class=per_class["fp32"], **kw))]
    robust = [a for a in cfg.final_attacks if a != "natural"]
    if low_precision is not None and robust:
        with low_precision():
            runs.append((cfg.precision, evaluate(model, *test, robust, per_class=per_class[cfg.precision], **kw)))
    n = len(test[1])
    return [
        results.entry(
            which,
            epoch,
            spec,
            acc,
            precision=precision,
            eps=cfg.eps,
            alpha=cfg.eps / 4,
            n_test=n,
            n_total=n,
            data=cfg.data,
            seed=cfg.seed,
            per_class=per_class[precision][spec],
        )
        for precision, res in runs
        for spec, acc in res.items()
    ]


def final_eval(
    cfg: TrainConfig,
    out: Path,
    test: tuple[Tensor, Tensor],
    *,
    model: nn.Module,
    ema: EMA | None,
    progress: Progress,
    data: DataBundle,
    device: device,
    low_precision: Callable[[], AbstractContextManager[Any]] | None,
    selection_label: str,
    log: Callable[[str], None],
    cost: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Final accuracies on the whole test split: last and best checkpoints (best as chosen on the selection split),
    written to ``out/results.json`` with the training's ``cost`` and logged as a table; returned as that table
    (``{"last (epoch 20)": {"Natural": 0.9, ...}, ...}``)."""
    ema_model = ema.model if ema is not None else None
    best_epoch, best_ema_epoch = progress.best_epoch, progress.best_ema_epoch
    num_classes, input_shape = data.num_classes, data.input_shape
    entries = evaluate_model(model, "last", cfg.epochs, test, cfg, num_classes, low_precision)
    tracks = [("", best_epoch, False)] + ([("-ema", best_ema_epoch, True)] if ema_model is not None else [])
    for suffix, best, ema in tracks:
        if ema:
            entries += evaluate_model(ema_model, "last-ema", cfg.epochs, test, cfg, num_classes, low_precision)
        if 0 <= best != cfg.epochs - 1:  # best is not the last epoch: its own checkpoint
            saved = build_model(cfg.model, num_classes, input_shape, allow_import=True).to(device)
            checkpoint.load_model_state(saved, checkpoint.load_best(out, ema=ema), cfg.model)
            entries += evaluate_model(saved, f"best{suffix}", best + 1, test, cfg, num_classes, low_precision)
    results.write_results(out / "results.json", entries, cost=cost)
    log(
        results.results_table(
            entries, f"test accuracy (%), {len(test[1])} samples, eps {cfg.eps:.4g}; best chosen on {selection_label}"
        )
    )
    log(f"run directory: {out}")
    return results.by_row(entries)
