"""The training loop: the run's set-up (delegated to the engine's modules), the epochs, the per-epoch model selection
and records, and the final evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advplug.config import TrainConfig, data_defaults
from advplug.context import ClassStats, FeatureTap
from advplug.data import DataBundle
from advplug.devices import pick_device
from advplug.engine import distributed
from advplug.engine.cost import CostMeter, counted_modules, run_cost
from advplug.engine.epoch import train_epoch
from advplug.engine.final_eval import final_eval
from advplug.engine.inputs import (
    config_record,
    feature_readers,
    final_config,
    run_dir,
    run_header,
    selection_metrics,
    selection_split,
    train_batches,
    train_context,
    training_data,
)
from advplug.engine.records import InertWatch, epoch_lines, write_epoch
from advplug.engine.resume import Checkpointing, Progress, extend, extension_line, extensions
from advplug.engine.runtime import Runtime, averaging_plugin
from advplug.engine.step import Step
from advplug.errors import Interrupted, OptionError
from advplug.evaluate import gather_tensors
from advplug.models import build_model
from advplug.plugins import enable, per_plugin
from advplug.run import checkpoint
from advplug.run import directory as rundir
from advplug.run.dump import SampleDump
from advplug.run.metrics import MetricsWriter


class Trainer:
    """Adversarial training with plugins. ``Trainer(cfg).fit()`` runs, checkpoints and evaluates.

    ``resume=True``: ``cfg.out``'s ``last.pt`` is continued exactly (model, optimizer, scheduler,
    per-process RNG states, plugin states, data order, metrics); with ``epochs``, a finished or
    interrupted run is extended to that many epochs (``resume.extend``: the schedule's rule,
    recorded in ``config.json``'s ``extended_from``). A new run refuses a directory
    that holds a run unless ``overwrite=True`` (which deletes the old run's files first); the
    run directory is locked while the trainer lives (``close()``, called at the end of ``fit``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        data: DataBundle | None = None,
        resume: bool = False,
        overwrite: bool = False,
        epochs: int | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if epochs is not None and not resume:
            raise OptionError("epochs= extends a resumed run (resume=True); a new run sets epochs in its config")
        self.rank, self.world, local = distributed.init()
        resolved = cfg.resolved(recorded=resume)  # a resumed run's milestones are read as it recorded them
        self.log = log if self.rank == 0 else (lambda s: None)
        self.device = pick_device(resolved.device, local)
        out = run_dir(resolved, self.rank)
        self.out = Path(out)
        self.lock: rundir.RunLock | None = None
        self.metrics: MetricsWriter | None = None
        self.cost: CostMeter | None = None
        # plugins and options are checked before the run directory is touched
        self.enabled = enable(list(resolved.plugins), resolved.objective, resolved.plugin_options)
        self.pm = self.enabled.pm
        self.averaged_by = averaging_plugin(self.enabled, resolved.ema)  # a plugin's average_weights, or None
        if self.rank == 0:
            self.lock = rundir.prepare(self.out, resume=resume, overwrite=overwrite)
        try:
            self._setup(resolved, out, data, resume, local, epochs, cfg.milestones is None)
        except BaseException:
            self.close()
            raise

    def _setup(
        self,
        resolved: TrainConfig,
        out: str,
        data: DataBundle | None,
        resume: bool,
        local: int,
        epochs: int | None,
        derived_milestones: bool,
    ) -> None:
        self.log(f"run directory: {self.out}")
        fractions = data_defaults(resolved.data)["milestone_fractions"] if derived_milestones else None
        last, extended_from = None, []
        if resume:
            last, extended_from = checkpoint.load(self.out, "last", need="training"), extensions(self.out)
        if epochs is not None:  # --resume RUN --epochs N
            resolved, extension = extend(resolved, self.out, epochs, int(last["epoch"]) + 1)
            fractions, extended_from = extension["milestones_derived_from"], [*extended_from, extension]
            self.log(extension_line(extension))
        torch.manual_seed(resolved.seed)
        self.data = training_data(resolved, data, "validation" in self.enabled.requirements)
        # The final config, made once (nothing changes it afterwards). It comes from the user (command line, a config
        # file they passed, or Python), or on --resume from a run directory whose imported model the CLI had the user
        # repeat.
        self.cfg, start_by = final_config(resolved, out, self.data.input_shape, self.enabled)
        cfg = self.cfg
        self.model = self._new_model()
        self.tap = FeatureTap(self.model, feature_readers(self.enabled))
        self.runtime = Runtime(
            cfg,
            self.model,
            device=self.device,
            world=self.world,
            local=local,
            num_classes=self.data.num_classes,
            declarations=self.enabled.declarations,
            new_model=self._new_model,
            log=self.log,
            averaged_by=self.averaged_by,
        )
        self.class_stats = ClassStats(self.data.num_classes, self.device)
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, list(cfg.milestones), gamma=cfg.lr_gamma)
        self.attack = self.runtime.make_attack("pgd")
        self.attack.track = self.enabled.reads_attack_stats
        self.loader = train_batches(cfg, self.data, self.device, self.rank, self.world)
        x_test, y_test = gather_tensors(self.data.test, None, self.device)
        self.test = (x_test, y_test)
        self.select_data, self.select_prefix, self.selection_label = selection_split(
            cfg, self.data, self.test, self.device
        )
        self.progress = Progress()
        self.inert = InertWatch()
        self.step = Step(
            cfg,
            self.enabled,
            self.runtime,
            opt=self.opt,
            tap=self.tap,
            attack=self.attack,
            num_classes=self.data.num_classes,
            world=self.world,
            out=self.out,
            class_stats=self.class_stats,
        )
        self.checkpoints = Checkpointing(
            cfg,
            self.out,
            self.model,
            self.opt,
            self.sched,
            self.runtime,
            self.enabled,
            self.data.num_classes,
            self.data.input_shape,
            self.rank,
            self.world,
            self.log,
            earlier_milestones=tuple(tuple(e["milestones_before"]) for e in extended_from),
            class_stats=self.class_stats,
        )
        self.cost = CostMeter(counted_modules(self.model, self.runtime), self.device)  # the model's passes from here
        ctx = train_context(
            cfg, self.data, self.model, self.runtime, self.step.loss, self.rank, self.world, self.log, self.class_stats
        )
        self.log(run_header(cfg, self.data, len(self.test[1]), self.device, start_by, self.selection_label))
        self.pm.hook.on_train_start(ctx=ctx)
        if resume:
            self.progress = self.checkpoints.restore(last)
            self.cost.restore(self.progress.cost, self.rank, self.progress.start_epoch)
        if self.rank == 0:
            if not resume or epochs is not None:  # a new run, or an extended one (after its checks)
                n_select = len(self.select_data[1])
                record = config_record(cfg, self.enabled, self.data, n_select, self.world, fractions, extended_from)
                rundir.write_json(self.out / "config.json", record)
            self.metrics = MetricsWriter(self.out, cfg.tensorboard, self.progress.records)
        self.weight_dump = SampleDump(self.out, "weights") if cfg.dump_weights and self.rank == 0 else None

    def _new_model(self) -> nn.Module:
        """A freshly initialised model of the run on its device (the trained one, EMA's shadow)."""
        model = build_model(self.cfg.model, self.data.num_classes, self.data.input_shape, allow_import=True).to(
            self.device
        )
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    @property
    def net(self) -> nn.Module:
        """The module the step's forward passes run (DDP, compiled)."""
        return self.runtime.net

    @property
    def attack_model(self) -> nn.Module:
        """The module the attacks run (compiled)."""
        return self.runtime.attack_model

    def close(self) -> None:
        """Release the run directory (lock, TensorBoard writer) and the model (the cost's hooks). Idempotent."""
        if self.cost is not None:
            self.cost.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- the run ----------------------------------------------------------------------------
    def fit(self) -> dict[str, dict[str, float]]:
        """Train the remaining epochs, then evaluate best and last on the test split."""
        epoch = self.progress.start_epoch
        try:
            for epoch in range(self.progress.start_epoch, self.cfg.epochs):
                self._epoch(epoch)
            distributed.barrier()
            results = self.final_eval()
            distributed.shutdown()
            return results
        except KeyboardInterrupt:
            last = self.out / "last.pt"
            done = (
                f"the last checkpoint is {last} (epoch {epoch})"
                if epoch > 0 and last.exists()
                else "no checkpoint was written yet"
            )
            raise Interrupted(
                f"interrupted in epoch {epoch + 1}; {done}; continue with: advplug train --resume {self.out}"
            ) from None
        finally:
            self.close()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data (``engine.epoch``); returns the epoch's record."""
        rec, self.epoch_weights = train_epoch(
            self.step,
            self.loader,
            epoch,
            self.cfg.epochs,
            bar=self.cfg.progress and self.rank == 0,
            dump=self.weight_dump,
        )
        return rec

    def _epoch(self, epoch: int) -> None:
        """One epoch, then its records, written so that a kill at any point can be resumed exactly:
        ``last.pt`` (which carries the metrics so far) first, then ``best.pt``, then the logs."""
        cfg, progress, ema, prefix = self.cfg, self.progress, self.runtime.ema, self.select_prefix
        rec = self.train_epoch(epoch)
        self.sched.step()
        key = f"{prefix}_pgd_acc"
        evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if evaluated:
            rec.update(self._selection_metrics(self.model, "", epoch))
        if self.averaged_by is not None:  # a plugin's average (average_weights), after the model's evaluation
            d = self.pm.hook.average_weights(epoch=epoch, metrics=dict(rec))
            if d is not None:
                self.runtime.average(d)
        if evaluated and ema is not None and ema.steps > 0:  # a plugin's average before its first update: none yet
            rec.update(self._selection_metrics(ema.model, "ema_", epoch))
        self.inert.check(rec, [(n, self.enabled.plugin(n)) for n in self.step.weighers])
        self._epoch_end_hooks(epoch, rec)
        is_best = rec.get(key, -1.0) > progress.best_acc
        if is_best:
            progress.best_acc, progress.best_epoch = rec[key], epoch
        is_best_ema = rec.get(f"ema_{key}", -1.0) > progress.best_ema_acc
        if is_best_ema:
            progress.best_ema_acc, progress.best_ema_epoch = rec[f"ema_{key}"], epoch
        progress.records.append(rec)
        rng = distributed.all_gather_object(checkpoint.rng_state())  # every process's stream
        progress.cost = distributed.all_gather_object(self.cost.state())  # every process's counts
        if self.rank != 0:
            return
        payload = self.checkpoints.payload(epoch, rng, progress)
        write_epoch(
            self.out,
            epoch,
            payload,
            best=is_best,
            best_ema=ema.model if is_best_ema else None,
            metrics=self.metrics,
            rec=rec,
            weights=self.epoch_weights,
            dump=self.weight_dump,
        )
        for line in epoch_lines(rec, epoch, cfg.epochs, prefix):
            self.log(line)

    def _selection_metrics(self, model: nn.Module, tag: str, epoch: int) -> dict[str, Any]:
        """``model``'s numbers on the selection split (``tag``: ``""`` or ``"ema_"``); the model's per-class
        accuracies go to ``class_stats``."""
        per_class: dict[str, dict[str, list[float | None]]] = {}
        cfg, (_, y) = self.cfg, self.select_data
        with self.cost.evaluating():  # counted apart from training
            rec = selection_metrics(
                [(model, tag)], self.select_data, self.select_prefix, cfg, self.data.num_classes, per_class
            )
        if tag == "":
            pc = per_class[tag]
            self.class_stats.set_validation(epoch, y, pc["natural"], pc[f"pgd{cfg.eval_steps}"])
        return rec

    def _epoch_end_hooks(self, epoch: int, rec: dict[str, Any]) -> None:
        """``on_epoch_end``, one plugin at a time (``plugins.per_plugin``: wrappers wrap each call), each given a copy
        of the record; each plugin's result is then recorded under its name."""
        results = [(name, call(epoch=epoch, metrics=dict(rec))) for name, call in per_plugin(self.pm, "on_epoch_end")]
        for name, result in results:
            if result:
                rec[name] = result[-1]

    def final_eval(self) -> dict[str, dict[str, float]]:
        """Final accuracies on the whole test split (``engine.final_eval``) and the training's cost; rank 0 only."""
        self.cost.close()  # the training's passes are counted; the final evaluation's are not
        if self.rank != 0:
            return {}
        return final_eval(
            self.cfg,
            self.out,
            self.test,
            model=self.model,
            ema=self.runtime.ema if self.runtime.ema is not None and self.runtime.ema.steps > 0 else None,
            progress=self.progress,
            data=self.data,
            device=self.device,
            low_precision=self.runtime.autocast if self.runtime.amp_dtype is not None else None,
            selection_label=self.selection_label,
            log=self.log,
            cost=self.training_cost(),
        )

    def training_cost(self) -> dict[str, Any]:
        """``results.json``'s ``cost`` (``engine.cost.run_cost``): every process's counts at the last epoch, and the
        wall time of the epochs trained (their records' ``seconds``, summed over resumes)."""
        seconds = sum(float(r.get("seconds", 0.0)) for r in self.progress.records)
        return run_cost(self.progress.cost or [self.cost.state()], seconds, self.device)
