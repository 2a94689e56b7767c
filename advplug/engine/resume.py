"""The training state a checkpoint holds: the payload saved after every epoch, and ``--resume``'s checks and restore
(``last.pt`` continued exactly: model, optimizer, scheduler, per-process RNG, plugin states, EMA, metrics)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advplug.config import (
    NUMBERS_FREE,
    TrainConfig,
    data_defaults,
    extended_milestones,
    milestones_for,
    read_run_config,
)
from advplug.context import ClassStats
from advplug.engine.runtime import Runtime
from advplug.errors import CheckpointError, OptionError
from advplug.hookspecs import Stateful
from advplug.plugins import Enabled
from advplug.run import checkpoint, metrics


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best selection accuracy so far and its epoch (of the EMA weights
    too; -1: none yet), one metrics record per epoch done, and every process's cost counts so far
    (``CostMeter.state``)."""

    start_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    best_ema_acc: float = -1.0
    best_ema_epoch: int = -1
    records: list[dict[str, Any]] = field(default_factory=list)
    cost: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Checkpointing:
    """The run's parts a checkpoint saves and ``--resume`` restores."""

    cfg: TrainConfig
    out: Path
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    runtime: Runtime
    enabled: Enabled
    num_classes: int
    input_shape: tuple[int, ...]
    rank: int
    world: int
    log: Callable[[str], None]
    # milestones last.pt may hold instead of the config's: those before each extension (``config.json``'s
    # ``extended_from``), until the extended run's first checkpoint
    earlier_milestones: tuple[tuple[int, ...], ...] = ()
    class_stats: ClassStats | None = None  # per-class accuracies plugins read (a resumed run reads the same)

    def stateful(self) -> dict[str, Stateful]:
        return {n: p for n, p in self.enabled.items() if isinstance(p, Stateful)}

    def payload(self, epoch: int, rng: list[dict[str, Any]], progress: Progress) -> dict[str, Any]:
        """What ``last.pt`` / ``best.pt`` hold after ``epoch`` (0-based); ``rng``: every process's RNG state."""
        ema = self.runtime.ema
        return {
            "model": self.model.state_dict(),
            "model_name": self.cfg.model,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": epoch,
            "rng": rng,
            "world_size": self.world,
            "plugins": {n: p.state_dict() for n, p in self.stateful().items()},
            "best_acc": progress.best_acc,
            "best_epoch": progress.best_epoch,
            "selection": self.cfg.selection,
            "config": json.dumps(self.cfg.to_json()),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "metrics": metrics.to_jsonl(progress.records),
            "scaler": self.runtime.scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else {},
            "best_ema_acc": progress.best_ema_acc,
            "best_ema_epoch": progress.best_ema_epoch,
            "cost": progress.cost,
            "class_stats": self.class_stats.state_dict() if self.class_stats is not None else {},
        }

    def restore(self, ck: dict[str, Any] | None = None) -> Progress:
        """Load ``last.pt`` (``ck``: already loaded) into the run after its four checks (config, epoch counters,
        process count, optimizer state); returns where the run stands."""
        ck = ck if ck is not None else checkpoint.load(self.out, "last", need="training")
        self._check_config(ck)
        self._check_progress(ck)
        if ck["world_size"] != self.world or len(ck["rng"]) != ck["world_size"]:
            raise CheckpointError(
                f"{ck['path']!r} was written by {ck['world_size']} process(es), this run has {self.world}: resume "
                f"with the same number of processes (torchrun --nproc_per_node {ck['world_size']}), or the run would "
                "not continue exactly"
            )
        checkpoint.load_model_state(self.model, ck, self.cfg.model)
        saved = {n for n in ck.get("plugins", {})}
        mine = set(self.stateful())
        if saved != mine:
            raise CheckpointError(
                f"checkpoint {ck['path']!r} holds state of plugins {sorted(saved)}, this run has {sorted(mine)}"
            )
        try:
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            self._reschedule()
            for n, state in ck["plugins"].items():
                self.enabled.plugin(n).load_state_dict(state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {ck['path']!r} does not match this run: {e}") from None
        self._check_optimizer_state(ck["path"])
        checkpoint.set_rng_state(ck["rng"][self.rank])
        progress = Progress(
            start_epoch=int(ck["epoch"]) + 1, best_acc=float(ck["best_acc"]), best_epoch=int(ck["best_epoch"])
        )
        ema, scaler = self.runtime.ema, self.runtime.scaler
        if (ema is not None) != bool(ck.get("ema")):
            raise CheckpointError(
                f"{ck['path']!r} was trained {'with' if ck.get('ema') else 'without'} --ema; this "
                f"run is {'with' if ema is not None else 'without'}"
            )
        try:
            if scaler.is_enabled():
                scaler.load_state_dict(ck.get("scaler") or {})
            if ema is not None:
                ema.load_state_dict(ck["ema"])
                progress.best_ema_acc, progress.best_ema_epoch = float(ck["best_ema_acc"]), int(ck["best_ema_epoch"])
            if self.class_stats is not None and ck.get("class_stats"):  # older checkpoints: none saved
                self.class_stats.load_state_dict(ck["class_stats"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ck['path']!r} does not match this run: {e}") from None
        try:
            progress.records = metrics.from_jsonl(ck["metrics"])
        except ValueError as e:
            raise CheckpointError(f"{ck['path']!r} is damaged: its metrics record is not JSON ({e})") from None
        progress.cost = ck.get("cost") or []  # checkpoints written before costs were counted: none
        if not (isinstance(progress.cost, list) and all(isinstance(c, dict) for c in progress.cost)):
            raise CheckpointError(f"{ck['path']!r} is damaged: its cost record is not one object per process")
        records = progress.records
        if len(records) != progress.start_epoch or not all(isinstance(r, dict) for r in records):
            raise CheckpointError(
                f"{ck['path']!r} is damaged: its metrics record does not hold one object per epoch "
                f"({len(records)} entries for {progress.start_epoch} epochs)"
            )
        if self.rank == 0 and progress.best_epoch == int(ck["epoch"]):
            checkpoint.repair_best(self.out)  # a kill between last.pt and best.pt
        if self.rank == 0 and ema is not None and progress.best_ema_epoch == int(ck["epoch"]):
            checkpoint.repair_best(self.out, ema=True)
        self.log(f"resumed from {ck['path']} after epoch {progress.start_epoch}")
        if progress.start_epoch == self.cfg.epochs:  # finished, or killed before its final evaluation
            self.log(
                f"all {self.cfg.epochs} epochs are trained: only the final evaluation runs; to train more, extend "
                f"the run: advplug train --resume {self.out} --epochs N (N > {self.cfg.epochs})"
            )
        return progress

    def _check_config(self, ck: dict[str, Any]) -> None:
        """``config.json`` (what ``--resume`` reads) must be the configuration ``last.pt`` was trained
        with: an edited ``eps`` would otherwise continue the run under other settings, silently.
        Settings that do not change the numbers may differ, and ``epochs`` (a run is extended by
        raising it, as ``advplug.testing.run_and_resume`` does)."""
        try:
            saved = json.loads(ck["config"])
        except ValueError as e:
            raise CheckpointError(f"{ck['path']!r} is damaged: its config is not JSON ({e})") from None
        mine = json.loads(json.dumps(self.cfg.to_json(), default=str))
        free = {"epochs", *NUMBERS_FREE}
        if saved.get("milestones") in [list(m) for m in self.earlier_milestones]:
            free.add("milestones")  # extended (--resume --epochs) after this checkpoint
        diff = [k for k in sorted(mine) if k not in free and k in saved and saved[k] != mine[k]]
        if diff:
            what = "; ".join(f"{k} {mine[k]!r} (last.pt: {saved[k]!r})" for k in diff[:3])
            raise CheckpointError(
                f"{str(self.out / 'config.json')!r} does not match the run's checkpoint "
                f"{ck['path']!r}: {what}: the run directory was altered; restore config.json or "
                "start a new run"
            )

    def _check_progress(self, ck: dict[str, Any]) -> None:
        """The epoch counters of ``last.pt`` describe a run this config can continue: a negative
        epoch would train extra epochs under old labels, one past ``epochs`` or a NaN best would
        end or select silently."""
        epoch, best, acc = ck["epoch"], ck["best_epoch"], float(ck["best_acc"])
        if not 0 <= epoch < self.cfg.epochs:
            raise CheckpointError(
                f"{ck['path']!r} is damaged or from another run: it is after epoch {epoch + 1}, "
                f"this run has epochs 1..{self.cfg.epochs}"
            )
        if not (-1 <= best <= epoch and math.isfinite(acc)):
            raise CheckpointError(
                f"{ck['path']!r} is damaged: its best epoch {best + 1} / accuracy {acc} do not fit epoch {epoch + 1}"
            )

    def _check_optimizer_state(self, path: str) -> None:
        """SGD's ``load_state_dict`` checks neither shapes nor values: a momentum buffer of another
        shape failed mid-step with a traceback, a NaN one became a "NaN loss" blamed on training."""
        for i, prm in enumerate(p for g in self.opt.param_groups for p in g["params"]):
            for k, v in self.opt.state.get(prm, {}).items():
                if isinstance(v, Tensor) and v.dim() > 0 and (v.shape != prm.shape or not torch.isfinite(v).all()):
                    what = (
                        "not finite"
                        if v.shape == prm.shape
                        else (f"of shape {tuple(v.shape)}, expected {tuple(prm.shape)}")
                    )
                    raise CheckpointError(
                        f"checkpoint {path!r} is damaged: the optimizer's {k} of parameter {i} is {what}"
                    )

    def _reschedule(self) -> None:
        """The config's milestones replace the checkpoint's (an extension may move them); a drop now at or before
        the epochs trained that the checkpoint had not applied is applied at once."""
        last = self.sched.last_epoch
        applied = sum(c for m, c in self.sched.milestones.items() if m <= last)
        self.sched.milestones = Counter(self.cfg.milestones)
        due = sum(c for m, c in self.sched.milestones.items() if m <= last)
        if due > applied:
            for g in self.opt.param_groups:
                g["lr"] *= self.sched.gamma ** (due - applied)
            self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]


# -- extending a run (--resume RUN --epochs N) ---------------------------------------------------------------------
def extend(cfg: TrainConfig, out: Path, epochs: int, done: int) -> tuple[TrainConfig, dict[str, Any]]:
    """``cfg`` (a run's config, ``done`` epochs trained) extended to ``epochs``, and the ``config.json`` entry
    recording it (``extended_from``). The schedule: ``config.extended_milestones``."""
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        raise OptionError(f"--epochs must be a whole number, got {epochs!r}")
    if epochs <= done:
        raise OptionError(
            f"--epochs {epochs}: {str(out)!r} has trained {done} epochs; to extend it give more than {done}"
            + (f" (or drop --epochs to resume it to its {cfg.epochs})" if done < cfg.epochs else "")
        )
    fractions, how = milestone_fractions(read_run_config(out, CheckpointError), cfg)
    milestones = extended_milestones(cfg.milestones, fractions, epochs, done)
    if fractions is None:
        rule = "explicit milestones kept" + how
    else:
        shares = ", ".join(f"{f:g}" for f in fractions)
        rule = (
            f"milestones at fractions {shares} of the run{how}: drops passed after {done} epochs kept, the others "
            f"at their fractions of {epochs} epochs"
        )
    new = dataclasses.replace(cfg, epochs=epochs, milestones=milestones).resolved(recorded=True)
    record = {
        "epochs_before": cfg.epochs,
        "epochs": epochs,
        "completed": done,
        "milestones_before": list(cfg.milestones),
        "milestones": list(milestones),
        "milestones_derived_from": list(fractions) if fractions is not None else None,
        "rule": rule,
    }
    return new, record


def milestone_fractions(raw: dict[str, Any], cfg: TrainConfig) -> tuple[tuple[float, ...] | None, str]:
    """(the fractions of the run a run's milestones were derived from, ``None`` when given explicitly; how that is
    known): from ``config.json``'s ``milestones_derived_from``, or, for a run that does not record it, inferred (the
    milestones equal the data set's default drops for its epochs)."""
    if "milestones_derived_from" in raw:
        f = raw["milestones_derived_from"]
        if f is not None and not (isinstance(f, list) and all(isinstance(x, (int, float)) for x in f)):
            raise CheckpointError(f"{str(cfg.out)!r}: config.json's milestones_derived_from is damaged: {f!r}")
        return (tuple(float(x) for x in f) if f is not None else None), ""
    fractions = tuple(data_defaults(cfg.data)["milestone_fractions"])
    derived = tuple(cfg.milestones) == milestones_for(cfg.epochs, fractions)
    return (fractions if derived else None), " (inferred: they equal the default drops)" if derived else ""


def extension_line(record: dict[str, Any]) -> str:
    """The log line of an extension."""
    r = record
    return (
        f"{'extended' if r['epochs'] > r['epochs_before'] else 'shortened'} from {r['epochs_before']} to "
        f"{r['epochs']} epochs after {r['completed']} trained: learning-rate "
        f"milestones {r['milestones'] or 'none'} (were {r['milestones_before'] or 'none'}; {r['rule']})"
    )


def extensions(out: Path) -> list[dict[str, Any]]:
    """``config.json``'s record of a run's earlier extensions (malformed entries are left out: ``--resume``'s
    config check then reports the mismatch)."""
    entries = read_run_config(out, CheckpointError).get("extended_from") or []
    ok = isinstance(entries, list)
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("milestones_before"), list)] if ok else []
