"""Feldman & Zhang memorisation estimates for ``--bat-mem file`` (BAT's mem(x), Sec. 4).

    advplug-bat-memorisation --data digits --models 10 --subset 0.7 --out mem.npz
    python -m advplug_bat.memorisation --config run.toml --out mem.npz

Feldman & Zhang (NeurIPS 2020, "What neural networks memorize and why") define

    mem(x_i) = P[h(x_i) = y_i | i in S] - P[h(x_i) = y_i | i not in S],

the probability over models ``h`` trained on random subsets ``S`` of the training set. The
subsampled estimator trains ``--models`` models, each on a uniformly random ``--subset`` fraction
of the training set (F&Z: 0.7, 2000-4000 models on CIFAR), and averages the 0/1 correctness of
each model on every training sample separately over the models that saw it and the models that
did not. Models are trained with clean (standard) training, as F&Z do: SGD with the run's
learning rate, momentum and weight decay, the rate divided by 10 at 50% and 75% of ``--epochs``.

Samples are numbered exactly as ``advplug train`` numbers them for the same settings (data set,
plugins, held-out splits), because this command builds the training set and the models with the
trainer's own set-up (``advplug.prepare``). The file holds ``indices``, ``values`` (what
``--bat-mem-file`` reads), ``n_in`` / ``n_out`` (models per sample on each side), ``num_train``
(checked by BAT) and the settings. A sample that no model left out (or
none saw) has no estimate on that side: with m models and fraction p, a fraction
``p^m + (1 - p)^m`` of the samples; its value is written as 0 (no evidence of memorisation) and
the count is printed. Use more models to shrink it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advplug import AdvplugError, TrainConfig, batches, load_config_file, prepare


def memorisation_scores(correct: Tensor, member: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """F&Z's subsampled estimator from ``correct`` and ``member`` ``[m, N]`` (bool): model t
    classifies sample i correctly / was trained on it. Returns ``(mem, n_in, n_out)``; ``mem`` is
    0 where one side has no model."""
    c, s = correct.double(), member.double()
    n_in, n_out = s.sum(0), (1 - s).sum(0)
    p_in = (c * s).sum(0) / n_in.clamp_min(1)
    p_out = (c * (1 - s)).sum(0) / n_out.clamp_min(1)
    mem = torch.where((n_in > 0) & (n_out > 0), p_in - p_out, torch.zeros_like(p_in))
    return mem.float(), n_in.long(), n_out.long()


def _subset(train: Any, idx: Tensor) -> Any:
    if isinstance(train, tuple):
        return train[0][idx], train[1][idx]
    from torch.utils.data import Subset

    return Subset(train, idx.tolist())


def train_one(
    model: nn.Module,
    data: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    device: torch.device,
    seed: int,
) -> nn.Module:
    """Standard (clean) training, SGD, lr / 10 at 50% and 75% of the epochs."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    loader = batches(data, batch_size, True, device, seed, workers=0)
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y, _ in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def correct_on(model: nn.Module, train: Any, n: int, device: torch.device) -> Tensor:
    """``[N]`` bool: the model's prediction on each training sample (by position) is right."""
    out = torch.zeros(n, dtype=torch.bool)
    for x, y, idx in batches(train, 512, False, device, workers=0):
        out[idx.cpu()] = (model(x).argmax(1) == y).cpu()
    return out


def estimate(
    cfg: TrainConfig,
    *,
    models: int,
    subset: float,
    epochs: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
    allow_import: bool = False,
) -> dict[str, Any]:
    """Train ``models`` models on random ``subset`` fractions of the run's training set (as the
    trainer numbers it) and return the arrays of the output file."""
    if models < 2:
        raise ValueError("--models must be >= 2 (each side of the estimator needs models)")
    if not 0 < subset < 1:
        raise ValueError("--subset must lie in (0, 1)")
    if epochs < 1:
        raise ValueError("--epochs must be >= 1")
    run = prepare(cfg)
    cfg, data, device = run.config, run.data, run.device
    n = data.num_train
    k = max(1, round(subset * n))
    gen = torch.Generator().manual_seed(seed)
    member = torch.zeros(models, n, dtype=torch.bool)
    correct = torch.zeros(models, n, dtype=torch.bool)
    log(
        f"advplug-bat-memorisation: {cfg.data}, {n} training samples, model {cfg.model}, "
        f"{models} models on random {subset:.0%} subsets ({k} samples), {epochs} epochs each, device {device}"
    )
    for t in range(models):
        idx = torch.randperm(n, generator=gen)[:k]
        member[t, idx] = True
        torch.manual_seed(seed * 100003 + t)
        model = run.new_model(allow_import=allow_import)
        train_one(
            model,
            _subset(data.train, idx),
            epochs=epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            device=device,
            seed=seed + t,
        )
        correct[t] = correct_on(model, data.train, n, device)
        log(
            f"  model {t + 1}/{models}: accuracy {correct[t][member[t]].float().mean():.3f} on its subset, "
            f"{correct[t][~member[t]].float().mean():.3f} on the held-out rest"
        )
    mem, n_in, n_out = memorisation_scores(correct, member)
    missing = int(((n_in == 0) | (n_out == 0)).sum())
    if missing:
        log(
            f"  {missing} of {n} samples lack models on one side (value 0); expected fraction "
            f"{subset**models + (1 - subset) ** models:.3g}: use more --models"
        )
    log(f"  mem > 0.15 (BAT's sigma): {int((mem > 0.15).sum())} of {n} samples")
    return {
        "indices": np.arange(n),
        "values": mem.numpy(),
        "n_in": n_in.numpy(),
        "n_out": n_out.numpy(),
        "num_train": np.array(n),
        "settings": np.array(
            json.dumps(
                {
                    "data": cfg.data,
                    "model": cfg.model,
                    "plugins": list(cfg.plugins),
                    "models": models,
                    "subset": subset,
                    "epochs": epochs,
                    "seed": seed,
                }
            )
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="advplug-bat-memorisation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="npz to write (read by --bat-mem file --bat-mem-file OUT)")
    ap.add_argument(
        "--models", type=int, default=10, help="models trained on random subsets (default 10; F&Z: thousands)"
    )
    ap.add_argument(
        "--subset", type=float, default=0.7, help="fraction of the training set per model (default 0.7, F&Z)"
    )
    ap.add_argument("--epochs", type=int, default=None, help="epochs per model (default: the data set's default)")
    ap.add_argument(
        "--config", default=None, help="the run's JSON/TOML config (as advplug train --config): same numbering"
    )
    ap.add_argument("--data", default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--model", default=None, help="model name or module:callable (default per data set)")
    ap.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=None,
        help="the run's plugins (repeatable; they decide held-out splits; default: bat)",
    )
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    try:
        settings: dict[str, Any] = load_config_file(a.config) if a.config else {}
        for k in ("data", "data_root", "model", "batch_size", "lr", "device"):
            if getattr(a, k) is not None:
                settings[k] = getattr(a, k)
        if a.plugins:
            settings["plugins"] = tuple(a.plugins)
        settings.setdefault("plugins", ("bat",))
        settings["plugins"] = tuple(settings["plugins"])
        settings.pop("plugin_options", None)  # options do not change the numbering; keep unknown ones out
        cfg = TrainConfig(**settings)
        epochs = a.epochs if a.epochs is not None else cfg.resolved().epochs
        arrays = estimate(
            cfg, models=a.models, subset=a.subset, epochs=epochs, seed=a.seed, allow_import=a.model is not None
        )
    except (AdvplugError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    np.savez(a.out, **arrays)
    print(f"wrote {a.out}: use --plugin bat --bat-mem file --bat-mem-file {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
