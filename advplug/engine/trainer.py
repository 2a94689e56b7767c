"""The training loop: the only module that calls ``pm.hook.*``."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from advplug.attacks import make_attack, resolve_attack_start
from advplug.config import NUMBERS_FREE, RECORD_ONLY, TrainConfig, read_run_config
from advplug.context import NATURAL, FeatureTap, StepContext, TrainContext, Variant
from advplug.data import (
    DataBundle,
    auto_model,
    batches,
    check_data_import,
    hold_out,
    load_dataset,
)
from advplug.data.device import device_batches
from advplug.engine import distributed
from advplug.engine.ema import EMA
from advplug.errors import (
    CheckpointError,
    Interrupted,
    NonFiniteLossError,
    OptionError,
    PluginError,
)
from advplug.evaluate import evaluate, gather_tensors
from advplug.models import build_model
from advplug.plugins import Enabled, declarations, enable, reads_attack_stats
from advplug.run import checkpoint
from advplug.run import directory as rundir
from advplug.run.dump import SampleDump
from advplug.run.metrics import MetricsWriter, results_table
from advplug.signals import probabilistic_margin
from advplug.weights import combine_weights, merge_variants, summary

KNOWN_REQUIREMENTS = {"validation"}
SPLIT_SEED = 1234  # fixes the held-out selection split (and SPLIT_SEED + 1 the plugins' validation split)
INERT_ESS, INERT_EPOCHS = 0.995, 3  # weights this uniform for this many epochs: the method is effectively off


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise OptionError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise OptionError(f"--device {name}: this machine has no usable CUDA GPU (use --device cpu)")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


class Trainer:
    """Adversarial training with plugins. ``Trainer(cfg).fit()`` runs, checkpoints and evaluates.

    ``resume=True``: ``cfg.out``'s ``last.pt`` is continued exactly (model, optimizer, scheduler,
    per-process RNG states, plugin states, data order, metrics). A new run refuses a directory
    that holds a run unless ``overwrite=True`` (which deletes the old run's files first); the
    run directory is locked while the trainer lives (``close()``, called at the end of ``fit``).
    """

    def __init__(self, cfg: TrainConfig, *, data: DataBundle | None = None, resume: bool = False,
                 overwrite: bool = False, log: Callable[[str], None] = print) -> None:
        self.rank, self.world, local = distributed.init()
        self.cfg = cfg.resolved()
        self.log = log if self.rank == 0 else (lambda s: None)
        self.device = pick_device(self.cfg.device, local)
        if self.cfg.out is None:
            self.cfg.out = str(distributed.broadcast_object(
                rundir.default_dir(self.cfg.plugins, self.cfg.objective, self.cfg.seed) if self.rank == 0 else None))
        self.out = Path(self.cfg.out)
        self.lock: rundir.RunLock | None = None
        self.metrics: MetricsWriter | None = None
        # plugins and options are checked before the run directory is touched
        self.enabled: Enabled = enable(list(self.cfg.plugins), self.cfg.objective, self.cfg.plugin_options)
        if self.rank == 0:
            rundir.prepare(self.out, resume=resume, overwrite=overwrite)
            self.lock = rundir.RunLock(self.out).acquire()
        try:
            self._setup(data, resume, local)
        except BaseException:
            self.close()
            raise

    def _setup(self, data: DataBundle | None, resume: bool, local: int) -> None:
        self.log(f"run directory: {self.out}")
        self.pm = self.enabled.pm
        reqs: set[str] = set().union(*[r for r in self.pm.hook.requirements() if r])
        if reqs - KNOWN_REQUIREMENTS:
            raise PluginError(f"unknown requirement(s) {', '.join(sorted(reqs - KNOWN_REQUIREMENTS))}")

        torch.manual_seed(self.cfg.seed)
        self.data = training_data(self.cfg, data, "validation" in reqs)
        if self.cfg.model == "auto":  # your own data: the model follows the input shape (data.auto_model)
            self.cfg.model = auto_model(self.data.input_shape)
        # The config comes from the user (command line, a config file they passed, or Python), or on
        # --resume from a run directory whose imported model the CLI had the user repeat.
        self.model = build_model(self.cfg.model, self.data.num_classes, self.data.input_shape,
                                 allow_import=True).to(self.device)
        if self.cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.tap = FeatureTap(self.model)
        self._weight_impls: list[Any] | None = None  # set at the first step (after any late registration)
        self.weight_faults = torch.zeros(1, dtype=torch.bool, device=self.device)
        self._setup_speed(local)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                   weight_decay=self.cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, list(self.cfg.milestones), gamma=self.cfg.lr_gamma)
        self.cfg.attack_start, start_by = resolve_attack_start(self.cfg.attack_start, self.cfg.objective, self.enabled.items())
        self.attack = self.make_attack("pgd")
        self.attack.track = reads_attack_stats(self.enabled)
        self.loader = device_batches(self.data.train, self.data.augment, self.cfg.data_path, self.cfg.batch_size,
                                     self.device, self.cfg.seed, self.rank, self.world) or batches(
            self.data.train, self.cfg.batch_size, True, self.device, self.cfg.seed, self.rank, self.world, self.cfg.workers)
        x_test, y_test = gather_tensors(self.data.test, None, self.device)
        self.test = (x_test, y_test)
        n = self.cfg.n_eval
        self.test_sub = (x_test[:n], y_test[:n]) if n else self.test
        # Model selection: per-epoch clean / PGD accuracy on the held-out selection split (or, only
        # when asked with --selection test, on the first --n-eval test samples), "best" by PGD.
        if self.cfg.selection == "validation":
            sx, sy = self.data.selection
            self.select_data, self.select_prefix = (sx.to(self.device), sy.to(self.device)), "val"
        else:
            self.select_data, self.select_prefix = self.test_sub, "test"
        self.start_epoch, self.best_acc, self.best_epoch = 0, -1.0, -1
        self.best_ema_acc, self.best_ema_epoch = -1.0, -1
        self.records: list[dict[str, Any]] = []
        self.inert_streak = 0

        ctx = TrainContext(
            model=self.model, config=self.cfg, num_train=self.data.num_train, num_classes=self.data.num_classes,
            input_shape=self.data.input_shape, device=self.device, epochs=self.cfg.epochs,
            milestones=self.cfg.milestones, objective=self.cfg.objective, make_attack=self.make_attack,
            log=self.log, validation=self._validation(), train_data=self.data.train, rank=self.rank,
            world_size=self.world, loss_fn=self._loss)
        cfg = self.cfg
        self.log(f"advplug: {cfg.data} ({self.data.num_train} train, {len(self.test[1])} test), model {cfg.model}, "
                 f"objective {cfg.objective}, plugins {', '.join(cfg.plugins) or 'none'}, eps {cfg.eps:.4g}, "
                 f"PGD-{cfg.steps} step {cfg.alpha:.4g}, attack start {cfg.attack_start} ({start_by}), attack BN mode {cfg.attack_bn}, device {self.device}"
                 + f", best chosen by PGD-{cfg.eval_steps} on {self._selection_label()}"
                 + (f", {len(self.data.validation[1])} validation samples held out for plugins" if self.data.validation is not None else ""))
        self.pm.hook.on_train_start(ctx=ctx)
        if resume:
            self._resume()
        if self.rank == 0:
            if not resume:
                rundir.write_json(self.out / "config.json", self.config_record())
            self.metrics = MetricsWriter(self.out, self.cfg.tensorboard, self.records)
        self.weight_dump = SampleDump(self.out, "weights") if self.cfg.dump_weights and self.rank == 0 else None

    def _setup_speed(self, local: int) -> None:
        """--precision, --compile, --ema and DDP: the modules the step and the attacks run."""
        cfg = self.cfg
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        net: nn.Module = self.model
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=[local] if self.device.type == "cuda" else None)
        twice = [n for n, d in declarations(self.enabled).items() if "loss" in d.needs]
        if cfg.compile and twice:  # torch.compile has no double backward: the meta-gradient needs it
            self.log(f"--compile: the step's forward runs uncompiled because {', '.join(twice)} differentiates "
                     "through the loss twice (no double backward under torch.compile); the attacks are compiled")
        self.net = torch.compile(net, backend=cfg.compile) if cfg.compile and not twice else net
        self.attack_model = torch.compile(self.model, backend=cfg.compile) if cfg.compile else self.model
        self.ema: EMA | None = None
        if cfg.ema is not None:
            shadow = build_model(cfg.model, self.data.num_classes, self.data.input_shape, allow_import=True).to(self.device)
            if cfg.channels_last:
                shadow = shadow.to(memory_format=torch.channels_last)
            self.ema = EMA(self.model, shadow, cfg.ema)

    def autocast(self) -> Any:
        """The low-precision context of the training attack and the step's forward passes."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _selection_label(self) -> str:
        n = len(self.select_data[1])
        if self.cfg.selection == "validation":
            return f"{n} held-out training samples (split seed {SPLIT_SEED})"
        return f"the first {n} TEST samples (--selection test: not a held-out choice)"

    def close(self) -> None:
        """Release the run directory (lock, TensorBoard writer). Idempotent."""
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- set-up helpers ---------------------------------------------------------------------
    def make_attack(self, name: str, **overrides: Any):
        """A torchattacks attack on the (unwrapped) model under the run's budget and BN mode."""
        kw = dict(eps=self.cfg.eps, alpha=self.cfg.alpha, steps=self.cfg.steps, bn=self.cfg.attack_bn, start=self.cfg.attack_start,
                  num_classes=self.data.num_classes, seed=self.cfg.seed)
        kw.update(overrides)
        return make_attack(name, self.attack_model, **kw)

    def _loss(self, ctx: StepContext, variants: list[Variant], weights: Any) -> Tensor:
        """The run's training loss (loss owner plus wrappers) for given weights: for meta-learning plugins."""
        return self.pm.hook.combine_loss(ctx=ctx, variants=variants, weights=weights)

    def _validation(self) -> tuple[Tensor, Tensor] | None:
        if self.data.validation is None:
            return None
        vx, vy = self.data.validation
        return vx.to(self.device), vy.to(self.device)

    def config_record(self) -> dict[str, Any]:
        """The fully resolved config, with every enabled plugin's resolved options."""
        import dataclasses

        rec = self.cfg.to_json()
        rec["resolved_plugin_options"] = {
            name: dataclasses.asdict(p.options) for name, p in self.enabled.items()
            if dataclasses.is_dataclass(getattr(p, "options", None))}
        rec["num_train"] = self.data.num_train
        rec["num_selection"] = len(self.select_data[1])
        rec["num_validation"] = len(self.data.validation[1]) if self.data.validation is not None else 0
        rec["split_seed"] = SPLIT_SEED
        rec["world_size"] = self.world
        return rec

    # -- checkpoints ------------------------------------------------------------------------
    def _payload(self, epoch: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "model_name": self.cfg.model,
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "epoch": epoch, "rng": rng, "world_size": self.world,
            "plugins": {n: p.state_dict() for n, p in self.enabled.items() if hasattr(p, "state_dict")},
            "best_acc": self.best_acc, "best_epoch": self.best_epoch, "selection": self.cfg.selection,
            "config": json.dumps(self.cfg.to_json()),
            "num_classes": self.data.num_classes, "input_shape": list(self.data.input_shape),
            "metrics": "".join(json.dumps(rundir.json_safe(r), allow_nan=False) + "\n" for r in self.records),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "best_ema_acc": self.best_ema_acc, "best_ema_epoch": self.best_ema_epoch,
        }

    def _check_resumed_config(self, ck: dict[str, Any]) -> None:
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
        diff = [k for k in sorted(mine) if k not in free and k in saved and saved[k] != mine[k]]
        if diff:
            what = "; ".join(f"{k} {mine[k]!r} (last.pt: {saved[k]!r})" for k in diff[:3])
            raise CheckpointError(f"{str(self.out / 'config.json')!r} does not match the run's checkpoint {ck['path']!r}: "
                                  f"{what}: the run directory was altered; restore config.json or start a new run")

    def _check_progress(self, ck: dict[str, Any]) -> None:
        """The epoch counters of ``last.pt`` describe a run this config can continue: a negative
        epoch would train extra epochs under old labels, one past ``epochs`` or a NaN best would
        end or select silently."""
        import math

        epoch, best, acc = ck["epoch"], ck["best_epoch"], float(ck["best_acc"])
        if not 0 <= epoch < self.cfg.epochs:
            raise CheckpointError(f"{ck['path']!r} is damaged or from another run: it is after epoch {epoch + 1}, "
                                  f"this run has epochs 1..{self.cfg.epochs}")
        if not (-1 <= best <= epoch and math.isfinite(acc)):
            raise CheckpointError(f"{ck['path']!r} is damaged: its best epoch {best + 1} / accuracy {acc} do not fit "
                                  f"epoch {epoch + 1}")

    def _check_optimizer_state(self, path: str) -> None:
        """SGD's ``load_state_dict`` checks neither shapes nor values: a momentum buffer of another
        shape failed mid-step with a traceback, a NaN one became a "NaN loss" blamed on training."""
        for i, prm in enumerate(p for g in self.opt.param_groups for p in g["params"]):
            for k, v in self.opt.state.get(prm, {}).items():
                if isinstance(v, Tensor) and v.dim() > 0 and (v.shape != prm.shape or not torch.isfinite(v).all()):
                    raise CheckpointError(f"checkpoint {path!r} is damaged: the optimizer's {k} of parameter {i} is "
                                          f"{'not finite' if v.shape == prm.shape else f'of shape {tuple(v.shape)}, expected {tuple(prm.shape)}'}")

    def _resume(self) -> None:
        ck = checkpoint.load(self.out, "last", need="training")
        self._check_resumed_config(ck)
        self._check_progress(ck)
        if ck["world_size"] != self.world or len(ck["rng"]) != ck["world_size"]:
            raise CheckpointError(
                f"{ck['path']!r} was written by {ck['world_size']} process(es), this run has {self.world}: resume with "
                f"the same number of processes (torchrun --nproc_per_node {ck['world_size']}), or the run would not continue exactly")
        checkpoint.load_model_state(self.model, ck, self.cfg.model)
        saved = {n for n in ck.get("plugins", {})}
        mine = {n for n, p in self.enabled.items() if hasattr(p, "state_dict")}
        if saved != mine:
            raise CheckpointError(f"checkpoint {ck['path']!r} holds state of plugins {sorted(saved)}, this run has {sorted(mine)}")
        try:
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            for n, state in ck["plugins"].items():
                self.enabled.plugin(n).load_state_dict(state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {ck['path']!r} does not match this run: {e}") from None
        self._check_optimizer_state(ck["path"])
        checkpoint.set_rng_state(ck["rng"][self.rank])
        self.start_epoch = int(ck["epoch"]) + 1
        self.best_acc, self.best_epoch = float(ck["best_acc"]), int(ck["best_epoch"])
        if (self.ema is not None) != bool(ck.get("ema")):
            raise CheckpointError(f"{ck['path']!r} was trained {'with' if ck.get('ema') else 'without'} --ema; this run "
                                  f"is {'with' if self.ema is not None else 'without'}")
        try:
            self.scaler.load_state_dict(ck.get("scaler") or {}) if self.scaler.is_enabled() else None
            if self.ema is not None:
                self.ema.load_state_dict(ck["ema"])
                self.best_ema_acc, self.best_ema_epoch = float(ck["best_ema_acc"]), int(ck["best_ema_epoch"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ck['path']!r} does not match this run: {e}") from None
        try:
            self.records = [json.loads(line) for line in ck["metrics"].splitlines() if line.strip()]
        except ValueError as e:
            raise CheckpointError(f"{ck['path']!r} is damaged: its metrics record is not JSON ({e})") from None
        if len(self.records) != self.start_epoch or not all(isinstance(r, dict) for r in self.records):
            raise CheckpointError(f"{ck['path']!r} is damaged: its metrics record does not hold one object per epoch "
                                  f"({len(self.records)} entries for {self.start_epoch} epochs)")
        if self.rank == 0 and self.best_epoch == int(ck["epoch"]):
            checkpoint.repair_best(self.out)  # a kill between last.pt and best.pt
        if self.rank == 0 and self.ema is not None and self.best_ema_epoch == int(ck["epoch"]):
            checkpoint.repair_best(self.out, ema=True)
        self.log(f"resumed from {ck['path']} after epoch {self.start_epoch}")

    # -- the step ---------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int, global_step: int) -> tuple[Tensor, StepContext, Any]:
        """One training step; returns (detached loss, context, combined weights)."""
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = StepContext(model=self.net, x=x, y=y, index=index, epoch=epoch, step=global_step,
                          num_classes=self.data.num_classes, config=self.cfg, lr=self.opt.param_groups[0]["lr"],
                          tap=self.tap, reduce_mean=distributed.global_row_mean if self.world > 1 else None,
                          autocast=self.autocast)
        plugin_attacks, objective_attack = self._attack_callers()
        with self.autocast():  # the training attacks in the run's precision
            variants = merge_variants(plugin_attacks(ctx=ctx))
            if not variants and objective_attack is not None:  # plugins' variants replace the objective's attack
                variants = merge_variants([objective_attack(ctx=ctx)])
            if not variants:
                x_adv = self.attack(x, y)
                variants = [Variant("pgd", x_adv, self.attack.stats())]
        ctx.variants = variants
        ctx.anchor_name = self.enabled.composition.anchor if self.enabled.composition else None
        with contextlib.ExitStack() as perturbed:  # perturb_weights: loss and backward at w + v, then w restored
            managers = self.pm.hook.perturb_weights(ctx=ctx, variants=variants)
            if managers and any(ctx.has_logits(v) for v in (NATURAL, *variants)):
                raise PluginError("perturb_weights: a forward pass was cached before the weights were perturbed "
                                  "(ctx.logits in generate_adversaries?); the loss would use the unperturbed weights")
            for manager in managers:
                perturbed.enter_context(manager)
            weights = combine_weights(self._plugin_weights(ctx, variants), len(variants), ctx.batch_size, ctx.batch_mean)
            if weights is not None and weights.adv is not None:
                self.weight_faults[-1] |= weights.adv.amax() <= 0  # a batch that trains on nothing
            loss = self.pm.hook.combine_loss(ctx=ctx, variants=variants, weights=weights)
            if loss is None:
                raise PluginError("no plugin returned a training loss (combine_loss)")
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # fp16: scaled; otherwise the plain backward
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        loss = loss.detach()
        self.pm.hook.on_batch_end(ctx=ctx, loss=loss)
        self.tap.last = None
        return loss, ctx, weights

    def _plugin_weights(self, ctx: StepContext, variants: list[Variant]) -> list[Any]:
        """Every plugin's ``compute_weights`` (as pluggy would call them), each checked on the device
        for negative or non-finite values, so that a bad plugin is named at the next periodic check
        (no host sync in the step)."""
        if self._weight_impls is None:
            self._weight_impls = list(reversed(self.pm.hook.compute_weights.get_hookimpls()))
            self.weight_faults = torch.zeros(len(self._weight_impls) + 1, dtype=torch.bool, device=self.device)
        args = {"ctx": ctx, "variants": variants}
        out = []
        for i, impl in enumerate(self._weight_impls):
            r = impl.function(*[args[a] for a in impl.argnames])
            if r is not None:
                for t in (r.adv, r.nat, getattr(r, "local", None), getattr(r, "local_nat", None)):
                    if t is not None:
                        self.weight_faults[i] |= ~(torch.isfinite(t) & (t >= 0)).all()
            out.append(r)
        return out

    def _attack_callers(self) -> tuple[Any, Any]:
        """(the plugins' ``generate_adversaries``, the objective's own or ``None``)."""
        if getattr(self, "_attack_pair", None) is None:
            objective = self.pm.get_plugin(self.enabled.objective)
            self._attack_pair = (self.pm.subset_hook_caller("generate_adversaries", [objective]),
                                 getattr(objective, "generate_adversaries", None))
        return self._attack_pair

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        self.loader.set_epoch(epoch)
        self.net.train()
        n_steps = len(self.loader)
        losses = torch.zeros(n_steps, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        weights_seen: list[Tensor] = []
        it = self.loader
        bar = None
        if self.cfg.progress and self.rank == 0:
            from tqdm import tqdm

            it = bar = tqdm(self.loader, total=n_steps, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False)
        t0 = time.perf_counter()
        for i, (x, y, idx) in enumerate(it):
            loss, ctx, w = self.step(x, y, idx, epoch, epoch * n_steps + i)
            losses[i] = loss
            first = ctx.variants[0]
            if ctx.has_logits(first):
                correct += (ctx.logits(first).detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if w is not None:
                weights_seen.append((w.adv[0] if w.adv is not None else w.nat).float())
                if self.weight_dump is not None:
                    self._dump_weights(ctx, w)
            if bar is not None and (i + 1) % 20 == 0:  # one host sync every 20 steps
                self._check_finite(losses[: i + 1], epoch)
                bar.set_postfix(loss=f"{losses[max(0, i - 19): i + 1].mean().item():.3f}")
        self._check_finite(losses, epoch)
        stats = distributed.all_sum(torch.stack([losses.sum(), correct.float(), torch.tensor(float(seen), device=self.device),
                                                 torch.tensor(float(n_steps), device=self.device)]))
        rec: dict[str, Any] = {
            "epoch": epoch + 1,  # 1-based, as the console, dump file names and TensorBoard count
            "lr": self.opt.param_groups[0]["lr"],
            "train_loss": (stats[0] / stats[3]).item(), "train_acc": (stats[1] / stats[2]).item(),
        }
        self.epoch_weights = torch.cat(weights_seen) if weights_seen else None
        if self.epoch_weights is not None:
            rec["weights"] = summary(self.epoch_weights)
        rec["seconds"] = time.perf_counter() - t0
        return rec

    def _dump_weights(self, ctx: StepContext, w: Any) -> None:
        """Per-sample combined weights and the first variant's probabilistic margin (kept on the device)."""
        p = ctx.probs(ctx.variants[0])
        cols = {"index": ctx.index, "label": ctx.y, "pred": p.argmax(1), "margin": probabilistic_margin(p, ctx.y)}
        if w.adv is not None:
            adv = w.adv if w.adv.dim() == 2 else w.adv.expand(len(ctx.variants), -1)
            cols.update({f"weight_{v.name}": adv[i] for i, v in enumerate(ctx.variants)})
        if w.nat is not None:
            cols["weight_natural"] = w.nat
        self.weight_dump.add(**cols)

    def _check_finite(self, losses: Tensor, epoch: int) -> None:
        """The periodic host check: plugins' weights first (a NaN weight makes a NaN loss, and the
        plugin is the one to name), then the loss."""
        last = self.out / "last.pt"
        keep = f"; the last good checkpoint is {last}" if last.exists() else "; no checkpoint was written yet"
        if bool(self.weight_faults.any()):
            bad = [impl.plugin_name for impl, f in zip(self._weight_impls, self.weight_faults.tolist()) if f]
            if bad:
                raise PluginError(f"plugin {bad[0]!r} returned negative or non-finite weights in epoch {epoch + 1} "
                                  f"(weights must be finite and >= 0): stopped{keep}")
            raise PluginError(f"the combined weights of a whole batch were zero in epoch {epoch + 1}: the step trained on "
                              f"nothing (plugins {', '.join(i.plugin_name for i in self._weight_impls)}): stopped{keep}")
        bad = ~torch.isfinite(losses)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise NonFiniteLossError(f"training loss is {losses[i].item()} at epoch {epoch + 1}, step {i + 1}: stopped{keep}")

    # -- the run ----------------------------------------------------------------------------
    def fit(self) -> dict[str, dict[str, float]]:
        """Train the remaining epochs, then evaluate best and last on the test split."""
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                self._epoch(epoch)
            distributed.barrier()
            results = self.final_eval()
            distributed.shutdown()
            return results
        except KeyboardInterrupt:
            last = self.out / "last.pt"
            done = f"the last checkpoint is {last} (epoch {epoch})" if epoch > 0 and last.exists() else "no checkpoint was written yet"
            raise Interrupted(f"interrupted in epoch {epoch + 1}; {done}; continue with: advplug train --resume {self.out}") from None
        finally:
            self.close()

    def _epoch(self, epoch: int) -> None:
        """One epoch, then its records, written so that a kill at any point can be resumed exactly:
        ``last.pt`` (which carries the metrics so far) first, then ``best.pt``, then the logs."""
        cfg = self.cfg
        rec = self.train_epoch(epoch)
        self.sched.step()
        key = f"{self.select_prefix}_pgd_acc"
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            res = evaluate(self.model, *self.select_data, ["natural", f"pgd{cfg.eval_steps}"], eps=cfg.eps,
                           num_classes=self.data.num_classes, seed=cfg.seed)
            rec[f"{self.select_prefix}_clean_acc"], rec[key] = res["Natural"], res[f"PGD-{cfg.eval_steps}"]
            if self.ema is not None:
                res = evaluate(self.ema.model, *self.select_data, ["natural", f"pgd{cfg.eval_steps}"], eps=cfg.eps,
                               num_classes=self.data.num_classes, seed=cfg.seed)
                rec[f"ema_{self.select_prefix}_clean_acc"], rec[f"ema_{key}"] = res["Natural"], res[f"PGD-{cfg.eval_steps}"]
        self._check_inert(rec)
        for impl_result, name in self._epoch_end_hooks(epoch, rec):
            rec[name] = impl_result
        is_best = rec.get(key, -1.0) > self.best_acc
        if is_best:
            self.best_acc, self.best_epoch = rec[key], epoch
        is_best_ema = rec.get(f"ema_{key}", -1.0) > self.best_ema_acc
        if is_best_ema:
            self.best_ema_acc, self.best_ema_epoch = rec[f"ema_{key}"], epoch
        self.records.append(rec)
        rng = distributed.all_gather_object(checkpoint.rng_state())  # every process's stream
        if self.rank != 0:
            return
        payload = self._payload(epoch, rng)
        rundir.fault_point("before-last", epoch)
        checkpoint.save(self.out / "last.pt", payload)
        rundir.fault_point("after-last", epoch)
        if is_best:
            checkpoint.save(self.out / "best.pt", payload)
        if is_best_ema:
            checkpoint.save(self.out / "best-ema.pt", {**payload, "model": self.ema.model.state_dict()})
        rundir.fault_point("after-best", epoch)
        self.metrics.write(rec, self.epoch_weights)
        rundir.fault_point("after-metrics", epoch)
        if self.weight_dump is not None:
            self.weight_dump.write(epoch)
        msg = (f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {rec['train_loss']:.4f}  train_acc {rec['train_acc']:.3f}  "
               f"lr {rec['lr']:.4g}  {rec['seconds']:.1f}s")
        if key in rec:
            msg += f"  {self.select_prefix} clean {rec[f'{self.select_prefix}_clean_acc']:.3f}  pgd {rec[key]:.3f}"
        if "weights" in rec:
            msg += f"  w[{rec['weights']['min']:.2f}, {rec['weights']['max']:.2f}] ess {rec['weights']['ess']:.3f}"
        self.log(msg)
        for w in rec.get("warnings", []):
            self.log(f"warning: {w}")

    def _check_inert(self, rec: dict[str, Any]) -> None:
        """Warn when a reweighting method's weights stay nearly uniform after its burn-in."""
        ess = rec.get("weights", {}).get("ess")
        self.inert_streak = self.inert_streak + 1 if ess is not None and ess > INERT_ESS else 0
        if self.inert_streak == INERT_EPOCHS:
            who = [i.plugin_name for i in self._weight_impls or []]
            hints = [f"{n}: {getattr(self.enabled.plugin(n), 'strength_hint', 'see its options in `advplug plugins`')}" for n in who]
            rec["warnings"] = [f"weights of {', '.join(who) or 'the plugins'} have been nearly uniform for "
                               f"{INERT_EPOCHS} epochs (effective sample size {ess:.4f} > {INERT_ESS}): the "
                               f"reweighting is effectively off ({'; '.join(hints)})"]

    def _epoch_end_hooks(self, epoch: int, rec: dict[str, Any]) -> list[tuple[Any, str]]:
        out = []
        for impl in reversed(self.pm.hook.on_epoch_end.get_hookimpls()):
            r = impl.function(*[{"epoch": epoch, "metrics": dict(rec)}[a] for a in impl.argnames])
            if r is not None:
                out.append((r, impl.plugin_name))
        return out

    def _final_eval_model(self, model: nn.Module) -> dict[str, float]:
        """The final attacks in fp32; after low-precision training, the robust ones also under the
        run's autocast ("PGD-20 (bf16 eval)"), so that a gap (gradient masking) shows."""
        cfg = self.cfg
        kw = dict(eps=cfg.eps, num_classes=self.data.num_classes, seed=cfg.seed, progress=cfg.progress)
        res = evaluate(model, *self.test, cfg.final_attacks, **kw)
        robust = [a for a in cfg.final_attacks if a != "natural"]
        if self.amp_dtype is not None and robust:
            with self.autocast():
                low = evaluate(model, *self.test, robust, **kw)
            res.update({f"{k} ({cfg.precision} eval)": v for k, v in low.items()})
        return res

    def final_eval(self) -> dict[str, dict[str, float]]:
        """Final accuracies on the whole test split: last and best checkpoints (best as chosen on
        the selection split)."""
        if self.rank != 0:
            return {}
        cfg = self.cfg
        results = {f"last (epoch {cfg.epochs})": self._final_eval_model(self.model)}
        tracks = [("", self.best_epoch, False)] + ([("-ema", self.best_ema_epoch, True)] if self.ema is not None else [])
        for suffix, best_epoch, ema in tracks:
            if ema:
                results[f"last-ema (epoch {cfg.epochs})"] = self._final_eval_model(self.ema.model)
            if 0 <= best_epoch != cfg.epochs - 1:  # best is not the last epoch: its own checkpoint
                model = build_model(cfg.model, self.data.num_classes, self.data.input_shape, allow_import=True).to(self.device)
                checkpoint.load_model_state(model, checkpoint.load_best(self.out, ema=ema), cfg.model)
                results[f"best{suffix} (epoch {best_epoch + 1})"] = self._final_eval_model(model)
        rundir.write_json(self.out / "results.json", results)
        self.log(results_table(results, f"test accuracy (%), {len(self.test[1])} samples, eps {cfg.eps:.4g}; "
                                        f"best chosen on {self._selection_label()}"))
        self.log(f"run directory: {self.out}")
        return results


def training_data(cfg: TrainConfig, data: DataBundle | None = None, validation: bool | None = None,
                  log: Callable[[str], None] = print) -> DataBundle:
    """The run's data as the trainer numbers it: loaded (unless given), with the model-selection
    split held out (unless ``--selection test``), then, disjoint from it, the plugins' validation
    split when a plugin requires one (``validation=None``: ask the config's plugins)."""
    if validation is None:
        pm = enable(list(cfg.plugins), cfg.objective, cfg.plugin_options).pm
        validation = "validation" in set().union(*[r for r in pm.hook.requirements() if r])
    # cfg comes from the user (or from resume_config, which had a module: data source repeated)
    data = data if data is not None else load_dataset(cfg.data, cfg.data_root, cfg.download, image_size=cfg.image_size,
                                                      test_fraction=cfg.test_fraction, allow_import=True)
    if cfg.selection == "validation" and data.selection is None:
        data = hold_out(data, cfg.selection_size, seed=SPLIT_SEED, role="selection")
    if validation and data.validation is None:
        data = hold_out(data, cfg.val_size, seed=SPLIT_SEED + 1, role="validation")
    return data


def resume_config(run_dir: str | Path, model: str | None = None, data: str | None = None) -> TrainConfig:
    """The saved configuration of a run directory. A model given as ``module:callable`` is code:
    it is imported only if the user repeats it (``model``), never because the file says so."""
    d = read_run_config(run_dir, CheckpointError)
    for k in RECORD_ONLY:
        d.pop(k, None)
    try:
        cfg = TrainConfig.from_json(d)
    except TypeError as e:
        raise CheckpointError(f"{str(Path(run_dir) / 'config.json')!r} is damaged: {e}") from None
    check_model_import(cfg.model, model)
    check_data_import(cfg.data, data)
    cfg.out = str(run_dir)
    return cfg


def check_model_import(saved: Any, given: str | None) -> None:
    """Refuse a saved ``module:callable`` model unless the user named the same one."""
    if isinstance(saved, str) and ":" in saved and given != saved:
        raise OptionError(f"this run's model {saved!r} is code to import; advplug imports code only when you "
                          f"name it: add --model {saved}" + (f" (you gave {given!r})" if given else ""))
    if given is not None and given != saved:
        raise OptionError(f"--model {given}: this run was trained with model {saved!r}")
