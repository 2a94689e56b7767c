"""The ``advplug`` command line (click)."""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any

import click

from advplug import __version__
from advplug.config import (
    ATTACK_BN_MODES,
    ATTACK_STARTS,
    COMPILE_BACKENDS,
    DATA_PATHS,
    PRECISIONS,
    SELECTIONS,
    build_config,
    load_config_file,
)
from advplug.errors import AdvplugError, Interrupted, OptionError, did_you_mean
from advplug.tools.sweep.launchers import LAUNCHERS


class _Group(click.Group):
    """Turns advplug's own errors into one line on stderr and an exit status chosen by their type:
    130 for ``Interrupted`` (Ctrl-C, as shells report it), 2 for any other."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdvplugError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(130 if isinstance(e, Interrupted) else 2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="advplug")
def cli() -> None:
    """advplug: adversarial training with instance-reweighting plugins."""


def parse_extra(args: list[str]) -> dict[str, str]:
    """``--mail-gamma 10`` / ``--mail-gamma=10`` pairs from click's leftover arguments: the one
    parser of plugin options. They cannot be click options: which exist depends on ``--plugin`` and
    on the ``--config`` file's plugins, and an option of a plugin that is not enabled must reach
    ``plugins.enable`` to be refused with its message (``add --plugin mail``)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) < 3:
            raise OptionError(f"unexpected argument {a!r}")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise OptionError(f"option {a} needs a value")
            k, v = a[2:], args[i + 1]
            i += 2
        out[k] = v
    return out


def check_extra(ctx: click.Context, extra: dict[str, str]) -> None:
    """A leftover ``--key`` under no plugin's or objective's prefix is click's "No such option", with its did-you-mean
    over the command's options and every installed plugin's; the others go on to ``plugins.enable``."""
    from advplug.plugins import builtin_objectives, installed

    prefixes = tuple(n.replace("_", "-") + "-" for n in {*installed(), *builtin_objectives()})
    for key in extra:
        if not key.replace("_", "-").startswith(prefixes):
            raise click.NoSuchOption("--" + key, possibilities=_closest_flag(ctx, "--" + key), ctx=ctx)


def _closest_flag(ctx: click.Context, flag: str) -> list[str]:
    """The one closest option among the command's own and the installed plugins' and objectives'."""
    from advplug.objectives import OBJECTIVES
    from advplug.plugins import describe_plugin, list_plugins

    static = [o for p in ctx.command.get_params(ctx) for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    found, _ = list_plugins()  # imports every installed plugin: only on this error's path
    found += [describe_plugin(n, c, __version__) for n, c in OBJECTIVES.items()]
    return difflib.get_close_matches(flag, static + [o["flag"] for p in found for o in p["options"]], n=1)


def _csv_ints(s: str | None) -> tuple[int, ...] | None:
    if s is None:
        return None
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise OptionError(f"--milestones: expected comma-separated epochs, got {s!r}") from None


# `advplug train --help`: the options in groups, each with its default; with --plugin NAME also
# that plugin's options (the same information as `advplug plugins`).
TRAIN_GROUPS: dict[str, tuple[str, ...]] = {
    "Method": ("plugins", "objective"),
    "Data": ("data", "data_root", "download", "image_size", "test_fraction", "workers", "data_path"),
    "Model": ("model",),
    "Attack (training)": ("eps", "alpha", "steps", "attack_bn", "attack_start"),
    "Optimisation": (
        "epochs",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "milestones",
        "lr_gamma",
        "seed",
        "precision",
        "channels_last",
        "compile",
        "ema",
    ),
    "Evaluation and model selection": ("eval_every", "eval_steps", "n_eval", "selection", "selection_size", "val_size"),
    "Output and run": (
        "out",
        "overwrite",
        "resume",
        "config_file",
        "device",
        "tensorboard",
        "dump_weights",
        "no_progress",
    ),
}


def _default_text(name: str) -> str | None:
    """The default of a train option as the user gets it: the config's, or per data set."""
    import dataclasses as dc

    from advplug.config import CUSTOM_DEFAULTS, DATA_DEFAULTS, TrainConfig

    if name == "milestones":
        d, c = DATA_DEFAULTS["digits"]["milestone_fractions"], DATA_DEFAULTS["cifar10"]["milestone_fractions"]
        pct = lambda fs: " and ".join(f"{round(100 * f)} %" for f in fs)  # noqa: E731
        return f"at {pct(c)} of --epochs on cifar10/svhn and your own data, {pct(d)} on digits"
    if name in DATA_DEFAULTS["digits"]:
        per = {k: DATA_DEFAULTS[k][name] for k in ("digits", "mnist", "cifar10")}
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        return (
            "per data set: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in per.items())
            + f", own data {fmt(CUSTOM_DEFAULTS[name])}"
        )
    fields = {f.name: f for f in dc.fields(TrainConfig)}
    v = fields[name].default if name in fields else None
    if v is not dc.MISSING and v is not None and v is not False and v != ():
        return str(v)
    return None


class _TrainCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --help is eager: note the --plugin values first (click's own parser, a dry pass), to list
        # their options in the help
        opts, _, _ = self.make_parser(ctx).parse_args(args=list(args))
        ctx.meta["help_plugins"] = list(opts.get("plugins") or [])
        return super().parse_args(ctx, args)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        by_name = {p.name: p for p in self.get_params(ctx)}
        seen = set()
        for group, names in TRAIN_GROUPS.items():
            rows = []
            for n in names:
                p = by_name.get(n)
                if p is None:
                    continue
                seen.add(n)
                rec = p.get_help_record(ctx)
                if rec is None:
                    continue
                d = _default_text(n)
                rows.append((rec[0], rec[1] + (f"  [default: {d}]" if d and "default" not in rec[1] else "")))
            if rows:
                with formatter.section(group):
                    formatter.write_dl(rows)
        rest = [p.get_help_record(ctx) for n, p in by_name.items() if n not in seen]
        rest = [r for r in rest if r is not None]
        if rest:
            with formatter.section("Other"):
                formatter.write_dl(rest)
        self._plugin_help(ctx, formatter)

    def _plugin_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from advplug.objectives import OBJECTIVES
        from advplug.plugins import describe_plugin, duplicate_message, duplicates, list_plugins

        names = ctx.meta.get("help_plugins") or []
        if not names:
            formatter.write_paragraph()
            formatter.write_text("Plugin options: `advplug train --plugin NAME --help` (or `advplug plugins`).")
            return
        found, _ = list_plugins()
        known = {p["name"]: p for p in found}
        known.update({n: describe_plugin(n, c, __version__) for n, c in OBJECTIVES.items()})
        dups = duplicates()
        for n in names:
            p = known.get(n)
            if p is None and n in dups:
                formatter.write_paragraph()
                formatter.write_text(f"--plugin {n}: {duplicate_message(n, dups[n])}")
                continue
            if p is None:
                formatter.write_paragraph()
                hint = did_you_mean(n, known)
                formatter.write_text(f"--plugin {n}: not installed ({hint}installed: {', '.join(sorted(known))})")
                continue
            rows = []
            for o in p["options"]:
                extra = f" Choices: {', '.join(map(str, o['choices']))}." if o.get("choices") else ""
                bounds = "".join(f" {k} {o[k]}" for k in ("min", "max", "gt") if k in o)
                rows.append(
                    (
                        f"{o['flag']} {o['type'].upper()}",
                        f"{o['help']}{extra}{' (' + bounds.strip() + ')' if bounds else ''}  [default: {o['default']}]",
                    )
                )
            title = f"Options of plugin {n!r}" + (f" ({p['summary']})" if p["summary"] else "")
            with formatter.section(title):
                formatter.write_dl(rows or [("(none)", "")])


@cli.command(cls=_TrainCommand, context_settings=dict(ignore_unknown_options=True, allow_extra_args=True))
@click.option("--plugin", "plugins", multiple=True, help="Enable a plugin (repeatable). See `advplug plugins`.")
@click.option("--objective", default=None, help="Loss owner: at (default), trades or mart.")
@click.option(
    "--data",
    default=None,
    help="digits (embedded, default), mnist, fashion-mnist, cifar10, cifar100, svhn; "
    "or your own: folder:PATH (ImageFolder layout, PATH/train and PATH/test or one folder split by "
    "--test-fraction), npz:PATH (x_train, y_train, x_test, y_test), module:pkg.mod:callable "
    "(returns (train, test)).",
)
@click.option("--image-size", type=int, default=None, help="Resize your own images to SIZE x SIZE (only when given).")
@click.option(
    "--test-fraction",
    type=float,
    default=None,
    help="folder: without train/ and test/: the test share, stratified, fixed seed (default 0.2).",
)
@click.option("--data-root", default=None, help="Where torchvision data sets live.")
@click.option("--download", is_flag=True, default=None, help="Download the data set (needs a network).")
@click.option("--model", default=None, help="Model name or module:callable (default per data set).")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None, help="Initial learning rate (SGD).")
@click.option("--momentum", type=float, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option(
    "--milestones",
    default=None,
    help="Epochs at which the learning rate is multiplied by --lr-gamma, "
    "e.g. 60,90 (0-based epoch indices: 60 = after 60 epochs).",
)
@click.option("--lr-gamma", type=float, default=None)
@click.option("--eps", type=float, default=None, help="Linf budget (inputs in [0, 1]).")
@click.option("--alpha", type=float, default=None, help="PGD step size.")
@click.option("--steps", type=int, default=None, help="PGD steps of the training attack.")
@click.option(
    "--attack-bn",
    type=click.Choice(ATTACK_BN_MODES),
    default=None,
    help="BatchNorm mode while generating training attacks (default eval).",
)
@click.option(
    "--attack-start",
    type=click.Choice(ATTACK_STARTS),
    default=None,
    help="Start of the training attack: uniform in the eps-ball, normal = x + 0.001 N(0,1) unclamped "
    "(TRADES/MART/MAIL code), normal-clamped (torchattacks TPGD), none (default: the objective's).",
)
@click.option("--seed", type=int, default=None)
@click.option("--eval-every", type=int, default=None, help="Evaluate clean and PGD accuracy every N epochs.")
@click.option("--eval-steps", type=int, default=None, help="PGD steps of the per-epoch evaluation.")
@click.option("--n-eval", type=int, default=None, help="Test samples for the per-epoch evaluation.")
@click.option(
    "--val-size",
    type=float,
    default=None,
    help="Plugins' own validation split (fraction or count; default min(1000, 10%)), disjoint from the "
    "selection split.",
)
@click.option(
    "--selection",
    type=click.Choice(SELECTIONS),
    default=None,
    help="Where the 'best' checkpoint is chosen: a held-out split of the training set (default) or, "
    "explicitly, the test set (as some papers' tables were made; labelled in results and compare).",
)
@click.option(
    "--selection-size",
    type=float,
    default=None,
    help="Size of the held-out selection split (fraction or count; default min(1000, 10%)).",
)
@click.option(
    "--out",
    default=None,
    help="Run directory (default runs/<plugins>-<objective>-seed<S>, unique). "
    "One run per directory: an existing run is never overwritten silently.",
)
@click.option("--overwrite", is_flag=True, default=False, help="Delete the run already in --out first (all its files).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--tensorboard", is_flag=True, default=None, help="Also log to TensorBoard (RUN_DIR/tensorboard).")
@click.option(
    "--dump-weights",
    is_flag=True,
    default=None,
    help="Write per-sample weights and margins each epoch (RUN_DIR/dumps/weights-epochNNN.npz) for `advplug report`.",
)
@click.option("--no-progress", is_flag=True, default=False, help="No progress bars.")
@click.option("--workers", type=int, default=None, help="DataLoader workers (torchvision data sets).")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Autocast precision of the training attack and step (fp16 with a gradient scaler); weights, "
    "margins and the final evaluation stay fp32 (a low-precision robust accuracy is recorded beside).",
)
@click.option("--channels-last", is_flag=True, default=None, help="Model and batches in channels_last memory format.")
@click.option(
    "--compile",
    "compile",
    type=click.Choice(COMPILE_BACKENDS),
    default=None,
    help="torch.compile the model used by the step and the attack, with this backend.",
)
@click.option(
    "--ema",
    type=float,
    default=None,
    help="Keep an EMA of the weights with this decay (e.g. 0.999, warm-up min(decay, (1+t)/(10+t))); "
    "checkpointed, evaluated beside the raw model.",
)
@click.option(
    "--data-path",
    type=click.Choice(DATA_PATHS),
    default=None,
    help="device: the whole training set on the device, augmentation per batch there; loader: a "
    "DataLoader; auto: device when the set fits (in-memory tensors, or CIFAR/SVHN/MNIST-sized).",
)
@click.option("--config", "config_file", default=None, help="JSON or TOML file with the same settings.")
@click.option(
    "--resume",
    default=None,
    help="Continue the run in this directory from its last checkpoint; with --epochs N, extend a finished or "
    "interrupted run to N epochs (explicit milestones kept, drops derived from --epochs moved where not passed).",
)
@click.pass_context
def train(
    ctx: click.Context,
    plugins: tuple[str, ...],
    config_file: str | None,
    resume: str | None,
    no_progress: bool,
    milestones: str | None,
    overwrite: bool,
    **kw: Any,
) -> None:
    """Adversarial training; plugin options as --<plugin>-<option> VALUE.

    \b
    advplug train --plugin mail --epochs 30
    advplug train --data folder:./my-images --image-size 32 --plugin gairat
    advplug train --plugin mail --help      # MAIL's options too
    """
    from advplug.engine.inputs import resume_config
    from advplug.engine.trainer import Trainer

    extra = parse_extra(ctx.args)
    check_extra(ctx, extra)
    if resume:
        model = kw.pop("model")  # allowed: repeating an imported model is how the user vouches for it
        data = kw.pop("data")  # the same for a module: data source
        epochs = kw.pop("epochs")  # extends a finished or interrupted run
        given = [k for k, v in kw.items() if v is not None] + (["plugin"] if plugins else []) + list(extra)
        if given or config_file or milestones or overwrite:
            drop = ", ".join("--" + g.replace("_", "-") for g in given) or "--config/--milestones/--overwrite"
            raise OptionError(f"--resume continues the saved configuration (--epochs N extends it); drop {drop}")
        cfg = build_config(resume_config(resume, model, data), {"progress": not no_progress})
        Trainer(cfg, resume=True, epochs=epochs).fit()
        return
    from_file = load_config_file(config_file) if config_file else None  # its errors before those of --milestones
    options = {k: v for k, v in kw.items() if v is not None}
    if plugins:
        options["plugins"] = tuple(plugins)
    if milestones is not None:
        options["milestones"] = _csv_ints(milestones)
    cfg = build_config(from_file, {**options, "plugin_options": extra, "progress": not no_progress})
    Trainer(cfg, overwrite=overwrite).fit()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins: version, hooks, options with defaults."""
    from advplug.objectives import OBJECTIVES
    from advplug.plugins import describe_plugin, duplicate_message, duplicates, list_plugins
    from advplug.run.directory import json_safe

    found, errors = list_plugins()
    objectives = [describe_plugin(n, c, __version__) for n, c in OBJECTIVES.items()]
    dups = duplicates()
    if as_json:
        both = {n: [{"distribution": d, "version": v} for d, v in ds] for n, ds in dups.items()}
        doc = json_safe({"plugins": found, "objectives": objectives, "errors": errors, "duplicates": both})
        click.echo(json.dumps(doc, indent=2, allow_nan=False))
        return
    if not found and not dups:
        click.echo("no plugins installed (pip install plugins/advplug-<name>)")
    for section, items in (("plugins (--plugin NAME)", found), ("objectives (--objective NAME)", objectives)):
        click.echo(f"{section}:")
        for p in items:
            click.echo(f"  {p['name']} {p['version'] or ''}  {p['summary']}")
            click.echo(f"    hooks: {', '.join(p['hooks']) or '-'}")
            for o in p["options"]:
                extra = f" {list(o['choices'])}" if o.get("choices") else ""
                click.echo(f"    {o['flag']} ({o['type']}, default {o['default']}){extra}: {o['help']}")
    if dups:
        click.echo("registered by several distributions (--plugin NAME refused until one is uninstalled):")
        for n, ds in sorted(dups.items()):
            click.echo(f"  {n}  " + ", ".join(f"{d} {v}" for d, v in ds))
    for e in errors:
        click.echo(f"! {e}", err=True)
    for n, ds in sorted(dups.items()):
        click.echo(f"warning: {duplicate_message(n, ds)}", err=True)


@cli.command(cls=_TrainCommand, context_settings=dict(ignore_unknown_options=True, allow_extra_args=True))
@click.option("--plugin", "plugins", multiple=True, help="Enabled plugins, as for train.")
@click.option("--objective", default="at")
@click.option(
    "--pairs", is_flag=True, help="Print docs/pairs.md's table: every pair of installed plugins under each objective."
)
@click.pass_context
def hooks(ctx: click.Context, plugins: tuple[str, ...], objective: str, pairs: bool) -> None:
    """Show, per hook, which implementations run for these plugins and in what order, and how
    their weights combine. Plugin options as for train:

    \b
    advplug hooks --plugin lrat --lrat-floor saa
    """
    from advplug.plugins import enable, hook_order, loss_owners, pair_table

    extra = parse_extra(ctx.args)
    check_extra(ctx, extra)
    if pairs:
        if plugins or extra:
            raise OptionError("--pairs shows every pair with default options; drop --plugin and plugin options")
        click.echo(pair_table())
        return
    en = enable(list(plugins), objective, extra)
    owners = loss_owners(en)
    for spec, impls in hook_order(en.pm).items():
        click.echo(f"{spec}:")
        if not impls:
            default = {"generate_adversaries": "  (core: PGD-K, torchattacks)"}.get(spec, "  -")
            click.echo(default)
        for i in impls:
            tags = [
                t for t, on in (("wrapper", i["wrapper"]), ("tryfirst", i["tryfirst"]), ("trylast", i["trylast"])) if on
            ]
            if spec == "combine_loss" and not i["wrapper"]:
                tags.append("owns the loss" if i["plugin"] in owners else "yields")
            click.echo(f"  {i['plugin']}" + (f"  [{', '.join(tags)}]" if tags else ""))
    click.echo("weights:")
    for line in en.composition.describe():
        click.echo(f"  {line}")


@cli.command(name="eval")
@click.argument("target")
@click.option("--attack", "attacks", multiple=True, help="natural, fgsm, pgdK, cw / cwK, apgd-ce, aa (repeatable).")
@click.option(
    "--suite",
    type=click.Choice(["paper", "robustbench"]),
    default=None,
    help="paper: natural, PGD-20, PGD-100, CW-Linf margin, APGD-CE, AutoAttack (on --n-eval-aa samples); "
    "robustbench: AutoAttack on the first 10,000 test points at the data set's standard eps, saved chunk by chunk "
    "(an interrupted run continues; default --which best).",
)
@click.option(
    "--which",
    type=click.Choice(["best", "last", "both", "best-ema", "last-ema", "all"]),
    default=None,
    help="Checkpoint(s) of a run directory (default: both with --suite paper, else best); -ema: the EMA weights "
    "of a run trained with --ema; all: best, last and, if present, both EMA ones.",
)
@click.option("--backend", type=click.Choice(["torchattacks", "art"]), default="torchattacks")
@click.option("--eps", type=float, default=None, help="Default: the run's eps.")
@click.option("--alpha", type=float, default=None, help="PGD/CW step (default eps/4).")
@click.option(
    "--n-eval", type=click.IntRange(min=1), default=None, help="Evaluate on the first N test samples (default all)."
)
@click.option(
    "--n-eval-aa",
    type=click.IntRange(min=1),
    default=1000,
    help="AutoAttack on the first N test samples (the papers' practice).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default=None)
@click.option("--data-root", default=None)
@click.option(
    "--model",
    default=None,
    help="Repeat a run's module:callable model to allow importing it "
    "(advplug never imports code because a run file names it).",
)
@click.option("--data", default=None, help="Repeat a run's module:pkg.mod:callable data to allow importing it.")
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="--suite robustbench: points attacked between two saves.",
)
@click.option("--progress", is_flag=True, help="--suite robustbench: a progress bar over the points (else lines).")
def eval_cmd(
    target: str,
    attacks: tuple[str, ...],
    suite: str | None,
    which: str | None,
    backend: str,
    eps: float | None,
    alpha: float | None,
    n_eval: int | None,
    n_eval_aa: int,
    batch_size: int,
    device: str | None,
    data_root: str | None,
    model: str | None,
    data: str | None,
    chunk_size: int = 500,
    progress: bool = False,
) -> None:
    """Evaluate a checkpoint (or a run directory's best / last) under attacks.

    For a run directory the results are added to RUN_DIR/eval.json (read by `advplug compare`),
    one entry per checkpoint, attack and settings: re-running the same evaluation replaces only
    its own entries. Results are reproducible (seeded random starts).
    """
    from pathlib import Path

    from advplug.run import results
    from advplug.run.directory import RunLock
    from advplug.tools.evaluation import SUITES, evaluate_checkpoints

    if suite and attacks:
        raise OptionError("--suite and --attack exclude each other")
    if suite == "robustbench":
        rb = dict(chunk_size=chunk_size, batch_size=batch_size, device=device, data_root=data_root, model=model)
        _eval_robustbench(target, which or "best", backend, {**rb, "data": data, "progress": progress})
        return
    specs = SUITES[suite] if suite else (attacks or ("natural", "pgd20", "cw20"))
    is_run = Path(target).is_dir()
    which = which or ("both" if suite else "best")
    has_ema = is_run and (Path(target) / "best-ema.pt").is_file()
    groups = {"both": ["best", "last"], "all": ["best", "last"] + (["best-ema", "last-ema"] if has_ema else [])}
    whiches = groups.get(which, [which]) if is_run else [None]
    lock = RunLock(Path(target)).acquire() if is_run else None  # fail now, not after minutes of attacks
    try:
        if is_run:  # a damaged eval.json too: found now, not when the results are to be merged into it
            results.read_evals(Path(target) / "eval.json")
        entries = evaluate_checkpoints(
            target,
            whiches,
            specs,
            backend=backend,
            eps=eps,
            alpha=alpha,
            n_eval=n_eval,
            n_eval_aa=n_eval_aa,
            batch_size=batch_size,
            device=device,
            data_root=data_root,
            model=model,
            progress=True,
            log=click.echo,
            data=data,
        )
        if is_run:
            out = Path(target) / "eval.json"
            click.echo(f"saved {out} ({len(results.merge_evals(out, entries))} entries)")
    finally:
        if lock is not None:
            lock.release()


def _eval_robustbench(target: str, which: str, backend: str, kw: dict[str, Any]) -> None:
    """``eval --suite robustbench``: its attack, points and eps are the leaderboard's; options that would change them
    are refused."""
    from advplug.tools.robustbench import robustbench_eval

    src = click.get_current_context().get_parameter_source
    given = [f"--{n.replace('_', '-')}" for n in ("eps", "alpha", "n_eval", "n_eval_aa") if src(n).name != "DEFAULT"]
    if backend != "torchattacks":
        given.append(f"--backend {backend}")
    if given:
        raise OptionError(
            f"--suite robustbench attacks at the leaderboard's eps and points with torchattacks' AutoAttack: "
            f"drop {', '.join(given)}"
        )
    has_ema = (Path(target) / "best-ema.pt").is_file()
    groups = {"both": ["best", "last"], "all": ["best", "last"] + (["best-ema", "last-ema"] if has_ema else [])}
    entries = robustbench_eval(target, groups.get(which, [which]), log=click.echo, **kw)
    click.echo(f"saved {Path(target) / 'eval.json'} ({len(entries)} entries added)")


@cli.command(name="export")
@click.argument("run_dir")
@click.option("--format", "fmt", default="robustbench", show_default=True, help="robustbench (the one format).")
@click.option("--out", required=True, help="Directory for <name>.pt and <name>.json (created if missing).")
@click.option(
    "--which",
    type=click.Choice(["best", "last", "best-ema", "last-ema"]),
    default="best",
    show_default=True,
    help="The checkpoint to export.",
)
@click.option("--name", default=None, help="The model's name, and the files' (default <run dir name>-<which>).")
@click.option("--title", default=None, help="The JSON's name field, RobustBench's paper title (default: --name).")
@click.option("--link", default="", help="The paper's link (model-info JSON).")
@click.option("--authors", default="", help="The paper's authors (model-info JSON).")
@click.option("--venue", default="", help="Where the paper appeared, e.g. 'ICLR 2021' (model-info JSON).")
@click.option(
    "--allow-partial",
    is_flag=True,
    help="Give the AutoAttack accuracy even when it is not the leaderboard's (fewer test points, another eps, best "
    "chosen on the test set); the footnote says so.",
)
@click.option("--overwrite", is_flag=True, help="Replace <name>.pt and <name>.json if they exist.")
@click.option("--model", default=None, help="Repeat a run's module:callable model to allow importing it.")
def export_cmd(run_dir: str, fmt: str, out: str, which: str, name: str | None, title: str | None, **kw: Any) -> None:
    """Export a run's checkpoint as RobustBench's model zoo loads a model: OUT/<name>.pt ({"state_dict": ...}) and
    OUT/<name>.json (its model-info fields, from the run's results; `advplug eval RUN --suite robustbench` measures
    the leaderboard's AutoAttack number)."""
    from advplug.tools.robustbench import export

    export(run_dir, out, fmt=fmt, which=which, name=name, title=title, log=click.echo, **kw)


def _table_file(output: str, fmt: str) -> Path:
    """``--output`` as a file to write, checked before any work: not a directory, in one that exists."""
    path = Path(output)
    suffix = {"markdown": "md", "csv": "csv", "json": "json"}[fmt]
    if path.is_dir():
        raise OptionError(f"--output {output!r} is a directory: give a file, e.g. {path / f'compare.{suffix}'}")
    if not path.parent.is_dir():
        raise OptionError(f"--output {output!r}: the directory {str(path.parent)!r} does not exist")
    return path


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv", "json"]), default="markdown")
@click.option(
    "--output", "-o", default=None, help="Write the table to this file as well (a file; replaced if it exists)."
)
@click.option(
    "--reported",
    "reported_file",
    default=None,
    help="A file of the papers' numbers ([[reported]] entries, or a sweep file with them): each beside our mean "
    "± std, the difference, and the settings in which the runs differ from the paper's.",
)
@click.option(
    "--cost",
    is_flag=True,
    help="Add what training cost, per method (mean over runs): wall time (s), forward and backward passes of the "
    "model (millions; attack iterations included, held-out evaluation not), peak memory (MiB; GPU: allocated, CPU: "
    "RSS), device.",
)
def compare(
    run_dirs: tuple[str, ...], fmt: str, output: str | None, reported_file: str | None = None, cost: bool = False
) -> None:
    """The papers' table: one row per method (plugins + objective + options), attacks x best/last,
    mean ± std over seeds. Runs with differing settings are flagged; a cell from fewer runs than
    its row says how many, (n=1/2). A run's eval.json and results.json are merged (eval.json's
    entry replaces the same evaluation in results.json). Beside each mean, (worst: class k, a): the
    worst-class accuracy a, the mean over runs of each run's lowest per-class accuracy, and k, the
    class lowest in most runs (a tie: the one with the lowest mean accuracy over the runs)."""
    from advplug.tools.compare import compare as make_table

    table = _table_file(output, fmt) if output else None
    if cost and reported_file is not None:
        raise OptionError("--cost and --reported make two different tables: run compare once with each")
    if reported_file is None:
        text, warnings = make_table(list(run_dirs), fmt, cost)
    else:
        text, warnings = _beside_reported(list(run_dirs), fmt, reported_file)
    click.echo(text)
    for w in warnings:
        click.echo(f"warning: settings differ: {w}", err=True)
    if table is not None:
        try:
            table.write_text(text + "\n")
        except OSError as e:
            raise OptionError(f"cannot write --output {output!r}: {e.strerror or e}") from None


def _beside_reported(run_dirs: list[str], fmt: str, reported_file: str) -> tuple[str, list[str]]:
    """``compare --reported FILE``: compare's table and the papers' numbers beside ours."""
    from advplug.tools import reported
    from advplug.tools.sweep.spec import load_reported

    entries, labels = load_reported(reported_file)
    return reported.beside(run_dirs, fmt, entries, reported.by_label(labels, entries), methods_seen=labels is None)


@cli.command()
@click.argument("run_dir")
@click.option(
    "--data",
    default=None,
    help="Repeat a run's module:pkg.mod:callable data to allow importing it (extremes.png shows training images).",
)
def report(run_dir: str, data: str | None) -> None:
    """Write figures of a run, each as PNG and PDF: accuracy per epoch, weights per epoch, weight
    against signal, the training images with the highest and lowest weights (train with --dump-weights)."""
    from advplug.tools.report import report as make_report

    for p in make_report(run_dir, data=data, log=click.echo):
        click.echo(str(p))


@cli.command()
@click.argument("sweep_file")
@click.option("--dry-run", is_flag=True, help="Print the points (name, state, settings); run nothing.")
@click.option(
    "--report",
    "report_only",
    is_flag=True,
    help="Print the progress and the compare table of the finished points; run nothing.",
)
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default="local",
    help="local: --jobs runs at once on this machine; ray: each run a Ray task (pip install 'advplug[ray]'); "
    "slurm: each run a SLURM job through submitit, the file's [slurm] table its parameters "
    "(pip install 'advplug[slurm]').",
)
@click.option(
    "--jobs", type=click.IntRange(min=1), default=None, help="local: runs at once (default: the file's jobs, else 1)."
)
@click.option(
    "--gpu-ids", default=None, help="local: GPUs to spread the runs over, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES per run)."
)
@click.option(
    "--address", default=None, help="ray: the cluster's address (default: RAY_ADDRESS, else a local instance)."
)
@click.option(
    "--cpus", type=float, default=None, help="ray/slurm: CPUs per run (default: the file's resources, else 1)."
)
@click.option(
    "--gpus", type=float, default=None, help="ray/slurm: GPUs per run (default: the file's resources, else 0)."
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=None,
    help="Extra attempts per failed point (default: the file's, else 2).",
)
@click.option("--out", default=None, help="The sweep directory (default: the file's out, else sweeps/<file stem>).")
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv", "json"]), default="markdown")
@click.option("--no-progress", is_flag=True, default=False)
def sweep(
    sweep_file: str,
    dry_run: bool,
    report_only: bool,
    launcher: str,
    jobs: int | None,
    gpu_ids: str | None,
    address: str | None,
    cpus: float | None,
    gpus: float | None,
    retries: int | None,
    out: str | None,
    fmt: str,
    no_progress: bool,
) -> None:
    """Run a grid of training runs (methods x seeds x settings) from SWEEP_FILE, one run
    directory per point; re-running skips finished points and resumes interrupted ones."""
    from advplug.tools import sweep as sw

    s = sw.load_sweep(sweep_file, out)
    if dry_run:
        click.echo("\n".join(sw.dry_run(s)))
        return
    if not report_only:
        ids = [g.strip() for g in gpu_ids.split(",") if g.strip()] if gpu_ids else None
        runner = sw.make_launcher(launcher, jobs or (len(ids) if ids else s.jobs), address, cpus, gpus, ids, s)
        sw.run_sweep(s, runner, retries=retries, progress=not no_progress, log=click.echo)
    where = sw.tally(s)
    text, warnings = sw.report(s, fmt)
    click.echo(text)
    for w in warnings:
        click.echo(f"warning: settings differ: {w}", err=True)
    click.echo("\n".join(where.lines()))
    if not report_only and text and text != sw.NOTHING_FINISHED:
        table = s.out / {"markdown": "table.md", "csv": "table.csv", "json": "table.json"}[fmt]
        table.write_text(text + "\n")
        click.echo(f"table: {table}")
    if not report_only and (where.counts["failed"] or where.counts["conflict"]):
        sys.exit(1)


@cli.command(name="new-plugin")
@click.argument("name")
@click.option("--dest", default=".", show_default=True, help="Directory to write advplug-NAME/ into.")
def new_plugin(name: str, dest: str) -> None:
    """Write a plugin package advplug-NAME/ (pyproject with the entry point, src/ layout, a working
    compute_weights with options, a test). Then: pip install -e advplug-NAME; advplug plugins;
    python -m pytest advplug-NAME/tests."""
    from advplug.tools.template import names
    from advplug.tools.template import new_plugin as write

    root = write(name, dest)
    n = names(name)
    click.echo(
        f"wrote {root}/ (distribution {n['dist']}, import {n['module']}, entry point {n['name']} = "
        f"{n['module']}:{n['cls']}, options --{n['prefix']}-*)"
    )
    click.echo(f"next: pip install -e {root} && advplug plugins && python -m pytest {root}/tests")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
