"""What an evaluation of a run's checkpoint starts from: the checkpoint by name, the run's settings and model it
holds, and its data set's test points. One way for ``advplug eval`` (``evaluation``) and RobustBench's export and
suite (``robustbench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advplug.config import TrainConfig
from advplug.data import check_data_import, load_dataset
from advplug.errors import CheckpointError
from advplug.evaluate import gather_tensors
from advplug.models import build_model, check_model_import
from advplug.run import checkpoint


def load_checkpoint(target: str | Path, which: str | None) -> dict[str, Any]:
    """Checkpoint ``which`` of run directory ``target``: ``best`` / ``best-ema`` as recorded
    (``checkpoint.load_best``), ``last`` / ``last-ema`` from ``last.pt``, another name from ``<which>.pt``;
    ``None``: ``target`` is a checkpoint file."""
    if which in ("best", "best-ema"):
        return checkpoint.load_best(target, ema=which == "best-ema")
    if which in ("last", "last-ema"):
        return checkpoint.last_as(checkpoint.load(target, "last", need="eval"), ema=which == "last-ema")
    return checkpoint.load(target, which or "last", need="eval")


def checkpoint_model(
    ck: dict[str, Any], model: str | None, device: torch.device | None = None
) -> tuple[TrainConfig, nn.Module]:
    """The run's settings (as recorded) and its model with the checkpoint's weights, in eval mode on ``device`` (the
    CPU if ``None``). A ``module:callable`` model is built only if ``model`` repeats it."""
    try:
        cfg = TrainConfig.from_json(checkpoint.saved_config(ck)).resolved(recorded=True)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{ck['path']!r} is damaged: its config is not readable ({e})") from None
    check_model_import(cfg.model, model)
    k, shape = int(ck["num_classes"]), tuple(ck["input_shape"])
    try:
        net = build_model(cfg.model, k, shape, allow_import=True)
    except RuntimeError as e:  # e.g. a damaged input shape that asks for terabytes
        raise CheckpointError(
            f"{ck['path']!r}: model {cfg.model!r} cannot be built for {k} classes of shape {shape} "
            f"({checkpoint._first_line(e)})"
        ) from None
    checkpoint.load_model_state(net, ck, cfg.model)
    return cfg, net.eval().to(device or "cpu")


def checkpoint_test_set(
    cfg: TrainConfig, ck: dict[str, Any], data: str | None, n: int | None, device: torch.device
) -> tuple[Tensor, Tensor, int]:
    """The first ``n`` test samples (all if ``None``) of the run's data set (``cfg.data`` under ``cfg.data_root``) on
    ``device``, and the size of its test set. ``module:`` data is imported only if ``data`` repeats it; a data set
    whose classes or image shape are not the checkpoint's is refused."""
    check_data_import(cfg.data, data)
    bundle = load_dataset(
        cfg.data, cfg.data_root, False, image_size=cfg.image_size, test_fraction=cfg.test_fraction, allow_import=True
    )
    k, shape = int(ck["num_classes"]), tuple(ck["input_shape"])
    if (bundle.num_classes, tuple(bundle.input_shape)) != (k, shape):
        raise CheckpointError(
            f"{ck['path']!r} was trained for {k} classes of shape {shape}, but its data set {cfg.data!r} has "
            f"{bundle.num_classes} classes of shape {tuple(bundle.input_shape)}"
        )
    total = len(bundle.test[1]) if isinstance(bundle.test, tuple) else len(bundle.test)
    x, y = gather_tensors(bundle.test, n, device)
    return x, y, total
