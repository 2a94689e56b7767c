"""What a run is made of before it trains, from its config: the data with its held-out splits, the final config
(output directory, model, attack start resolved once), the selection split, a resumed run's config, and the record
of all this (``config.json``, the run header); the run directory, the training batches, and the per-epoch
evaluation on the selection split."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advplug.attacks import resolve_attack_start
from advplug.config import RECORD_ONLY, TrainConfig, read_run_config
from advplug.context import ClassStats, TrainContext
from advplug.data import DataBundle, batches, check_data_import, hold_out, load_dataset
from advplug.data.device import device_batches
from advplug.engine import distributed
from advplug.errors import CheckpointError
from advplug.evaluate import evaluate, worst_class
from advplug.models import auto_model, check_model_import
from advplug.plugins import Enabled, enable
from advplug.run.directory import default_dir, refuse_if_in_use

SPLIT_SEED = 1234  # fixes the held-out selection split (and SPLIT_SEED + 1 the plugins' validation split)


def training_data(cfg: TrainConfig, data: DataBundle | None = None, validation: bool | None = None) -> DataBundle:
    """The run's data as the trainer numbers it: loaded (unless given), with the model-selection
    split held out (unless ``--selection test``), then, disjoint from it, the plugins' validation
    split when a plugin requires one (``validation=None``: ask the config's plugins)."""
    if validation is None:
        validation = "validation" in enable(list(cfg.plugins), cfg.objective, cfg.plugin_options).requirements
    # cfg comes from the user (or from resume_config, which had a module: data source repeated)
    data = (
        data
        if data is not None
        else load_dataset(
            cfg.data,
            cfg.data_root,
            cfg.download,
            image_size=cfg.image_size,
            test_fraction=cfg.test_fraction,
            allow_import=True,
        )
    )
    if cfg.selection == "validation" and data.selection is None:
        data = hold_out(data, cfg.selection_size, seed=SPLIT_SEED, role="selection")
    if validation and data.validation is None:
        data = hold_out(data, cfg.val_size, seed=SPLIT_SEED + 1, role="validation")
    return data


def final_config(cfg: TrainConfig, out: str, input_shape: tuple[int, ...], enabled: Enabled) -> tuple[TrainConfig, str]:
    """(the run's final config, who chose the attack start): ``cfg`` (resolved) with the output directory, the model
    (``auto``: from the input shape, ``models.auto_model``) and the training attack's random start filled in."""
    start, start_by = resolve_attack_start(cfg.attack_start, cfg.objective, enabled.items())
    model = auto_model(input_shape) if cfg.model == "auto" else cfg.model
    return dataclasses.replace(cfg, out=out, model=model, attack_start=start), start_by


def selection_split(
    cfg: TrainConfig, data: DataBundle, test: tuple[Tensor, Tensor], device: torch.device
) -> tuple[tuple[Tensor, Tensor], str, str]:
    """(the model-selection samples, their metrics prefix, a description): per-epoch clean / PGD accuracy on the
    held-out selection split, or, only when asked with ``--selection test``, on the first ``--n-eval`` test samples."""
    if cfg.selection == "validation":
        sx, sy = data.selection
        return (sx.to(device), sy.to(device)), "val", f"{len(sy)} held-out training samples (split seed {SPLIT_SEED})"
    n = cfg.n_eval
    sub = (test[0][:n], test[1][:n]) if n else test
    return sub, "test", f"the first {len(sub[1])} TEST samples (--selection test: not a held-out choice)"


def config_record(
    cfg: TrainConfig,
    enabled: Enabled,
    data: DataBundle,
    num_selection: int,
    world: int,
    milestone_fractions: tuple[float, ...] | None = None,
    extended_from: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``config.json``: the final config, with every enabled plugin's resolved options, the data's numbers, the
    fractions of the run the milestones were derived from (``None``: given explicitly) and the run's extensions."""
    rec = cfg.to_json()
    rec["resolved_plugin_options"] = {
        name: dataclasses.asdict(p.options)
        for name, p in enabled.items()
        if dataclasses.is_dataclass(getattr(p, "options", None))
    }
    rec["num_train"] = data.num_train
    rec["num_selection"] = num_selection
    rec["num_validation"] = len(data.validation[1]) if data.validation is not None else 0
    rec["split_seed"] = SPLIT_SEED
    rec["world_size"] = world
    rec["milestones_derived_from"] = list(milestone_fractions) if milestone_fractions is not None else None
    if extended_from:
        rec["extended_from"] = extended_from
    return rec


def run_header(
    cfg: TrainConfig, data: DataBundle, n_test: int, device: torch.device, start_by: str, selection: str
) -> str:
    """The run's one-line description, logged before it trains."""
    return (
        f"advplug: {cfg.data} ({data.num_train} train, {n_test} test, {data.num_classes} classes), "
        f"model {cfg.model}, "
        f"objective {cfg.objective}, plugins {', '.join(cfg.plugins) or 'none'}, eps {cfg.eps:.4g}, "
        f"PGD-{cfg.steps} step {cfg.alpha:.4g}, attack start {cfg.attack_start} ({start_by}), "
        f"attack BN mode {cfg.attack_bn}, device {device}"
        + f", best chosen by PGD-{cfg.eval_steps} on {selection}"
        + (
            f", {len(data.validation[1])} validation samples held out for plugins"
            if data.validation is not None
            else ""
        )
    )


def resume_config(run_dir: str | Path, model: str | None = None, data: str | None = None) -> TrainConfig:
    """The saved configuration of a run directory. A model given as ``module:callable`` is code:
    it is imported only if the user repeats it (``model``), never because the file says so."""
    refuse_if_in_use(Path(run_dir))  # a live writer's half-written files are no reason to refuse
    d = read_run_config(run_dir, CheckpointError)
    for k in RECORD_ONLY:
        d.pop(k, None)
    try:
        cfg = TrainConfig.from_json(d)
    except TypeError as e:
        raise CheckpointError(f"{str(Path(run_dir) / 'config.json')!r} is damaged: {e}") from None
    check_model_import(cfg.model, model)
    check_data_import(cfg.data, data)
    return dataclasses.replace(cfg, out=str(run_dir))


def feature_readers(enabled: Enabled) -> list[str] | None:
    """The plugins that declare they read penultimate features (``FeatureTap``'s ``needed_by``), or ``None`` when an
    enabled plugin declares nothing (its needs are unknown: features are tapped where the model exposes them)."""
    declared = {i.plugin_name for i in enabled.pm.hook.declare.get_hookimpls()}
    if any(n not in declared for n in enabled.names):
        return None
    return [n for n, d in enabled.declarations.items() if "features" in d.needs]


def run_dir(cfg: TrainConfig, rank: int) -> str:
    """The run directory: ``--out``, else a new ``runs/<plugins>-<objective>-seed<S>`` chosen by rank 0 for all."""
    if cfg.out is not None:
        return cfg.out
    return str(distributed.broadcast_object(default_dir(cfg.plugins, cfg.objective, cfg.seed) if rank == 0 else None))


def train_batches(cfg: TrainConfig, data: DataBundle, device: torch.device, rank: int, world: int) -> Any:
    """The training batches: on the device when the set fits there (``--data-path``), else a loader."""
    return device_batches(
        data.train, data.augment, cfg.data_path, cfg.batch_size, device, cfg.seed, rank, world
    ) or batches(data.train, cfg.batch_size, True, device, cfg.seed, rank, world, cfg.workers)


def selection_metrics(
    models: list[tuple[nn.Module, str]],
    data: tuple[Tensor, Tensor],
    prefix: str,
    cfg: TrainConfig,
    num_classes: int,
    per_class: dict[str, dict[str, list[float | None]]] | None = None,
) -> dict[str, float | int]:
    """Clean and PGD accuracy of each ``(model, tag)`` on the selection split: ``{tag}{prefix}_clean_acc`` and
    ``{tag}{prefix}_pgd_acc``, "best" being chosen by the latter, and the class with the lowest PGD accuracy,
    ``{tag}{prefix}_pgd_worst_class_acc`` / ``{tag}{prefix}_pgd_worst_class`` (``evaluate.worst_class``).
    ``per_class``: filled per tag with ``evaluate``'s per-class accuracies (``{"natural": [K], "pgdN": [K]}``)."""
    rec: dict[str, float | int] = {}
    pgd = f"pgd{cfg.eval_steps}"
    for model, tag in models:
        pc: dict[str, list[float | None]] = {}
        res = evaluate(
            model, *data, ["natural", pgd], eps=cfg.eps, num_classes=num_classes, seed=cfg.seed, per_class=pc
        )
        rec[f"{tag}{prefix}_clean_acc"], rec[f"{tag}{prefix}_pgd_acc"] = res["natural"], res[pgd]
        worst = worst_class(pc[pgd])
        if worst is not None:
            rec[f"{tag}{prefix}_pgd_worst_class_acc"], rec[f"{tag}{prefix}_pgd_worst_class"] = worst[1], worst[0]
        if per_class is not None:
            per_class[tag] = pc
    return rec


def train_context(
    cfg: TrainConfig,
    data: DataBundle,
    model: nn.Module,
    runtime: Any,
    loss_fn: Any,
    rank: int,
    world: int,
    log: Any,
    class_stats: ClassStats | None = None,
) -> TrainContext:
    """What ``on_train_start`` receives (the validation split moved to the run's device, the run's ``ClassStats``)."""
    val, device = data.validation, runtime.device
    return TrainContext(
        model=model,
        config=cfg,
        num_train=data.num_train,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        device=device,
        epochs=cfg.epochs,
        milestones=cfg.milestones,
        objective=cfg.objective,
        make_attack=runtime.make_attack,
        log=log,
        validation=(val[0].to(device), val[1].to(device)) if val is not None else None,
        train_data=data.train,
        rank=rank,
        world_size=world,
        loss_fn=loss_fn,
        class_stats=class_stats,
    )
