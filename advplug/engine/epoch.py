"""One pass over the training data: the steps, the epoch's record (loss, accuracy, weights' summary), the
``--dump-weights`` columns, and the periodic host check (every 20 steps under the progress bar, and at the end)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from advplug.context import ClassStats
from advplug.engine import distributed
from advplug.engine.step import Step, weight_columns
from advplug.evaluate import worst_class
from advplug.run.dump import SampleDump
from advplug.weights import summary


def train_epoch(
    step: Step, loader: Any, epoch: int, epochs: int, *, bar: bool, dump: SampleDump | None
) -> tuple[dict[str, Any], Tensor | None]:
    """(the epoch's record, every step's combined weights of the first variant, or ``None``); ``bar``: show a
    progress bar (rank 0 with ``--progress``)."""
    device = step.runtime.device
    loader.set_epoch(epoch)
    step.runtime.net.train()
    n_steps = len(loader)
    losses = torch.zeros(n_steps, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    weights_seen: list[Tensor] = []
    it, progress = loader, None
    if bar:
        from tqdm import tqdm

        it = progress = tqdm(loader, total=n_steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
    t0 = time.perf_counter()
    for i, (x, y, idx) in enumerate(it):
        loss, ctx, w = step(x, y, idx, epoch, epoch * n_steps + i)
        losses[i] = loss
        first = ctx.variants[0]
        hit = (ctx.logits(first).detach().argmax(1) == y) if ctx.has_logits(first) else None
        if hit is not None:
            correct += hit.sum()
        if step.class_stats is not None:  # per class, the same logits (ClassStats; index_add_, no host sync)
            step.class_stats.add(y, hit)
        seen += y.shape[0]
        if w is not None:
            weights_seen.append((w.adv[0] if w.adv is not None else w.nat).float())
            if dump is not None:
                dump.add(**weight_columns(ctx, w))
        if progress is not None and (i + 1) % 20 == 0:  # one host sync every 20 steps
            step.check(losses[: i + 1], epoch)
            progress.set_postfix(loss=f"{losses[max(0, i - 19) : i + 1].mean().item():.3f}")
    step.check(losses, epoch)
    stats = distributed.all_sum(
        torch.stack(
            [
                losses.sum(),
                correct.float(),
                torch.tensor(float(seen), device=device),
                torch.tensor(float(n_steps), device=device),
            ]
        )
    )
    rec: dict[str, Any] = {
        "epoch": epoch + 1,  # 1-based, as the console, dump file names and TensorBoard count
        "lr": step.opt.param_groups[0]["lr"],
        "train_loss": (stats[0] / stats[3]).item(),
        "train_acc": (stats[1] / stats[2]).item(),
    }
    if step.class_stats is not None:
        rec.update(train_worst_class(step.class_stats, epoch))
    weights = torch.cat(weights_seen) if weights_seen else None
    if weights is not None:
        rec["weights"] = summary(weights)
    rec["seconds"] = time.perf_counter() - t0
    return rec, weights


def train_worst_class(stats: ClassStats, epoch: int) -> dict[str, Any]:
    """The epoch's per-class training counts snapshotted (``ClassStats.end_epoch``, summed over ranks), and its
    worst class by robust training accuracy: ``train_worst_class_acc``, ``train_worst_class`` (classes not seen left
    out)."""
    stats.end_epoch(epoch, distributed.all_sum)
    correct, seen = stats.train_correct.tolist(), stats.train_seen.tolist()
    worst = worst_class([c / n if n else None for c, n in zip(correct, seen)])
    return {} if worst is None else {"train_worst_class_acc": worst[1], "train_worst_class": worst[0]}
