"""An epoch's records: the inert-reweighting warning, the files written after each epoch in the order that keeps a
run directory consistent when killed at any point, and the epoch's log line."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from advplug.hookspecs import HintsStrength
from advplug.run import checkpoint
from advplug.run import directory as rundir
from advplug.run.dump import SampleDump
from advplug.run.metrics import MetricsWriter

INERT_ESS, INERT_EPOCHS = 0.995, 3  # weights this uniform for this many epochs: the method is effectively off


class InertWatch:
    """Warns (in the epoch's record) when a reweighting method's weights stay nearly uniform after its burn-in."""

    def __init__(self) -> None:
        self.streak = 0

    def check(self, rec: dict[str, Any], plugins: list[tuple[str, Any]]) -> None:
        """``plugins``: the weighers, ``(name, plugin)``, named in the warning with their ``strength_hint``."""
        ess = rec.get("weights", {}).get("ess")
        self.streak = self.streak + 1 if ess is not None and ess > INERT_ESS else 0
        if self.streak == INERT_EPOCHS:
            who = [n for n, _ in plugins]
            default = "see its options in `advplug plugins`"
            hints = [f"{n}: {p.strength_hint if isinstance(p, HintsStrength) else default}" for n, p in plugins]
            rec["warnings"] = [
                f"weights of {', '.join(who) or 'the plugins'} have been nearly uniform for "
                f"{INERT_EPOCHS} epochs (effective sample size {ess:.4f} > {INERT_ESS}): the "
                f"reweighting is effectively off ({'; '.join(hints)})"
            ]


def write_epoch(
    out: Any,
    epoch: int,
    payload: dict[str, Any],
    *,
    best: bool,
    best_ema: nn.Module | None,
    metrics: MetricsWriter,
    rec: dict[str, Any],
    weights: Tensor | None,
    dump: SampleDump | None,
) -> None:
    """``last.pt`` (which carries the metrics so far) first, then ``best.pt`` / ``best-ema.pt`` (``best_ema``: the
    EMA model when it is the best so far), then the metrics files and the weight dump: a kill between any two
    writes is resumed exactly (fault points for the tests between them)."""
    rundir.fault_point("before-last", epoch)
    checkpoint.save(out / "last.pt", payload)
    rundir.fault_point("after-last", epoch)
    if best:
        checkpoint.save(out / "best.pt", payload)
    if best_ema is not None:
        checkpoint.save(out / "best-ema.pt", {**payload, "model": best_ema.state_dict()})
    rundir.fault_point("after-best", epoch)
    metrics.write(rec, weights)
    rundir.fault_point("after-metrics", epoch)
    if dump is not None:
        dump.write(epoch)


def epoch_lines(rec: dict[str, Any], epoch: int, epochs: int, prefix: str) -> list[str]:
    """The console lines of an epoch: its numbers (``prefix``: where model selection evaluates), then warnings."""
    key = f"{prefix}_pgd_acc"
    msg = (
        f"epoch {epoch + 1:3d}/{epochs}  loss {rec['train_loss']:.4f}  train_acc {rec['train_acc']:.3f}  "
        f"lr {rec['lr']:.4g}  {rec['seconds']:.1f}s"
    )
    if key in rec:
        msg += f"  {prefix} clean {rec[f'{prefix}_clean_acc']:.3f}  pgd {rec[key]:.3f}"
    if "weights" in rec:
        msg += f"  w[{rec['weights']['min']:.2f}, {rec['weights']['max']:.2f}] ess {rec['weights']['ess']:.3f}"
    return [msg] + [f"warning: {w}" for w in rec.get("warnings", [])]
