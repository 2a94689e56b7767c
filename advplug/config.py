"""The run configuration: one dataclass, with the papers' defaults per data set."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advplug.errors import AdvplugError, OptionError, did_you_mean
from advplug.source_names import SOURCES, is_custom, normalise_source

# Defaults per data set where the papers differ. CIFAR/SVHN: GAIRAT/MAIL settings (eps 8/255,
# step 2/255, PGD-10, 120 epochs, lr 0.1 dropped at 50 % and 75 % of the run, i.e. 60 and 90);
# SVHN step 1/255 (Rice et al.); MNIST: Madry et al. (eps 0.3, step 0.01, PGD-40). Digits: tuned
# so that a one-minute CPU run gives a clearly robust model.
#
# The learning-rate drops are FRACTIONS of the run (``milestone_fractions``), so that they, and
# the burn-ins that default to the first drop (MAIL, GAIRAT), follow ``--epochs``: at the default
# epochs they are exactly the papers' epochs; explicit ``--milestones`` win.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(
        model="digits-cnn",
        eps=0.2,
        alpha=0.05,
        steps=10,
        epochs=20,
        batch_size=64,
        lr=0.05,
        milestone_fractions=(0.6, 0.85),
        weight_decay=5e-4,
        eval_steps=10,
    ),
    "mnist": dict(
        model="small-cnn",
        eps=0.3,
        alpha=0.01,
        steps=40,
        epochs=100,
        batch_size=128,
        lr=0.01,
        milestone_fractions=(0.55, 0.75, 0.9),
        weight_decay=5e-4,
        eval_steps=20,
    ),
    "fashion-mnist": dict(
        model="small-cnn",
        eps=0.1,
        alpha=0.01,
        steps=40,
        epochs=100,
        batch_size=128,
        lr=0.01,
        milestone_fractions=(0.55, 0.75, 0.9),
        weight_decay=5e-4,
        eval_steps=20,
    ),
    "cifar10": dict(
        model="preactresnet18",
        eps=8 / 255,
        alpha=2 / 255,
        steps=10,
        epochs=120,
        batch_size=128,
        lr=0.1,
        milestone_fractions=(0.5, 0.75),
        weight_decay=5e-4,
        eval_steps=20,
    ),
    "cifar100": dict(
        model="preactresnet18",
        eps=8 / 255,
        alpha=2 / 255,
        steps=10,
        epochs=120,
        batch_size=128,
        lr=0.1,
        milestone_fractions=(0.5, 0.75),
        weight_decay=5e-4,
        eval_steps=20,
    ),
    "svhn": dict(
        model="preactresnet18",
        eps=8 / 255,
        alpha=1 / 255,
        steps=10,
        epochs=80,
        batch_size=128,
        lr=0.01,
        milestone_fractions=(0.5, 0.75),
        weight_decay=5e-4,
        eval_steps=20,
    ),
}
# Your own data (``folder:``, ``npz:``, ``module:``): the CIFAR settings; the model is chosen from
# the input shape once the data is loaded ("auto", see ``models.auto_model``).
CUSTOM_DEFAULTS: dict[str, Any] = dict(
    model="auto",
    eps=8 / 255,
    alpha=2 / 255,
    steps=10,
    epochs=30,
    batch_size=128,
    lr=0.1,
    milestone_fractions=(0.5, 0.75),
    weight_decay=5e-4,
    eval_steps=20,
)


def data_defaults(data: str) -> dict[str, Any]:
    """The defaults of a built-in data set or of a ``folder:``/``npz:``/``module:`` source."""
    if data in DATA_DEFAULTS:
        return DATA_DEFAULTS[data]
    if is_custom(data):
        return CUSTOM_DEFAULTS
    raise OptionError(f"unknown data set {data!r} (choose from {', '.join(DATA_DEFAULTS)}, or {', '.join(SOURCES)})")


def milestones_for(epochs: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Learning-rate drops at ``fractions`` of ``epochs`` (0-based epoch indices, as ``MultiStepLR``
    counts): floor(f * epochs), keeping only drops that happen (1 <= m < epochs), once each.
    ``milestones_for(120, (0.5, 0.75)) == (60, 90)``; ``milestones_for(2, (0.5, 0.75)) == (1,)``."""
    out: list[int] = []
    for f in fractions:
        m = int(math.floor(f * epochs + 1e-9))
        if 1 <= m < epochs and m not in out:
            out.append(m)
    return tuple(out)


def extended_milestones(
    milestones: tuple[int, ...], fractions: tuple[float, ...] | None, epochs: int, done: int
) -> tuple[int, ...]:
    """The learning-rate drops of a run extended to ``epochs`` after ``done`` epochs (``--resume --epochs``).
    Explicit milestones (``fractions=None``) are kept (those that still fit in ``epochs``). Drops derived from
    ``fractions`` of the run (one drop per fraction, in order): those already passed (``<= done``) are kept, the
    remaining fractions are placed on the new length (floor(f * epochs), at the earliest ``done``: applied at once,
    twice if two fall there). ``extended_milestones((1, 2), (0.6, 0.85), 5, done=1) == (1, 4)``;
    ``extended_milestones((6, 8), (0.6, 0.85), 3, done=2) == (2, 2)``, as a fresh 3-epoch run's (1, 2) by then."""
    if fractions is None:
        return tuple(m for m in milestones if m < epochs)
    passed = [m for m in milestones if m <= done]
    # a drop whose place on the new length is already trained is applied at once (placed at ``done``; the
    # resume applies drops at ``<= done`` it has not yet applied), so the schedule matches a fresh run's
    ahead = [max(done, m) for m in milestones_for(epochs, tuple(fractions[len(passed) :]))]
    return tuple(sorted([*passed, *ahead]))


SELECTIONS = ("validation", "test")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
DATA_PATHS = ("auto", "device", "loader")
ATTACK_BN_MODES = ("eval", "train")
# Random start of the training attack (``attacks.random_start``); None in the config: the objective's.
ATTACK_STARTS = ("uniform", "normal", "normal-clamped", "none")


@dataclass
class TrainConfig:
    data: str = "digits"  # a built-in name, or folder:PATH, npz:PATH, module:pkg.mod:callable
    data_root: str = "./data"
    image_size: int | None = None  # folder:/npz:/module: resize images to SIZE x SIZE (only when asked)
    test_fraction: float = 0.2  # folder: without train/ and test/: the test share, split by a fixed seed
    download: bool = False
    model: str | None = None
    objective: str = "at"
    plugins: tuple[str, ...] = ()
    plugin_options: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    milestones: tuple[int, ...] | None = None
    lr_gamma: float = 0.1
    eps: float | None = None
    alpha: float | None = None
    steps: int | None = None
    attack_bn: str = "eval"
    attack_start: str | None = None  # None: the objective's official start (attacks.OBJECTIVE_START)
    seed: int = 0
    eval_every: int = 1
    eval_steps: int | None = None
    n_eval: int | None = 1000
    final_attacks: tuple[str, ...] = ("natural", "pgd20", "cw20")
    val_size: float | None = None  # plugins' own validation split; default min(1000, 10% of what is left)
    selection: str = "validation"  # where "best" is chosen: a held-out split of training data, or "test" (explicit)
    selection_size: float | None = None  # default: min(1000, 10% of the training set)
    out: str | None = None  # default: runs/<plugins>-<objective>-seed<S>, made unique
    device: str | None = None
    progress: bool = True
    tensorboard: bool = False
    dump_weights: bool = False
    workers: int = 4
    # GPU scale: autocast precision of the training attack and step, memory format,
    # torch.compile backend, EMA decay of the weights, and where batches are made.
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None
    ema: float | None = None
    data_path: str = "auto"

    def resolved(self, *, recorded: bool = False) -> TrainConfig:
        """Fill the ``None`` fields from the data set's defaults and validate everything. ``recorded``: the
        settings of a run that exists (its ``config.json``), read as they were: a milestone past its end, which
        older versions accepted, is no error there."""
        cfg = dataclasses.replace(self)
        check_types(cfg)
        cfg.data = normalise_source(cfg.data)
        d = dict(data_defaults(cfg.data))
        fractions = d.pop("milestone_fractions")
        cfg = dataclasses.replace(cfg, **{k: v for k, v in d.items() if getattr(cfg, k) is None})
        if cfg.milestones is None:
            cfg.milestones = milestones_for(cfg.epochs, fractions) if cfg.epochs >= 1 else ()
        cfg.milestones = tuple(int(m) for m in cfg.milestones)
        cfg.plugins = tuple(cfg.plugins)
        cfg.final_attacks = tuple(cfg.final_attacks)
        cfg.validate()
        if not recorded:
            cfg.check_milestones()
        return cfg

    def check_milestones(self) -> None:
        """A learning-rate drop at epoch index ``m >= epochs`` never happens (``MultiStepLR`` counts 0-based
        epochs): an error naming it, not a run that silently keeps its initial rate."""
        repeated = sorted({m for m in self.milestones if self.milestones.count(m) > 1})
        if repeated:
            raise OptionError(
                f"--milestones {', '.join(map(str, repeated))} given more than once: each would drop the learning "
                "rate again (for a larger drop use --lr-gamma)"
            )
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            are = "is" if len(late) == 1 else "are"
            raise OptionError(
                f"--milestones {', '.join(map(str, late))} {are} at or past --epochs {self.epochs}: the learning rate "
                f"would never drop there (milestones are 0-based epoch indices, so at most {self.epochs - 1} here)"
            )

    def validate(self) -> None:
        checks = [
            (self.eps > 0, f"--eps must be > 0, got {self.eps}"),
            (self.eps < 1, f"--eps must be < 1 (inputs are in [0, 1]; 8/255 = 0.0314 is CIFAR's), got {self.eps}"),
            (self.alpha > 0, f"--alpha (attack step size) must be > 0, got {self.alpha}"),
            (self.alpha <= 1, f"--alpha (attack step size) must be <= 1 (inputs are in [0, 1]), got {self.alpha}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (
                0 <= self.seed < 2**32,
                f"--seed must be in 0..{2**32 - 1} (numpy's and torch's seed range), got {self.seed}",
            ),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 < self.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], got {self.lr_gamma}"),
            (all(0 < m for m in self.milestones), f"--milestones must be positive epochs, got {self.milestones}"),
            (list(self.milestones) == sorted(self.milestones), f"--milestones must increase, got {self.milestones}"),
            (
                self.attack_bn in ATTACK_BN_MODES,
                f"--attack-bn must be {' or '.join(ATTACK_BN_MODES)}, got {self.attack_bn!r}",
            ),
            (self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}"),
            (self.eval_steps >= 1, f"--eval-steps must be >= 1, got {self.eval_steps}"),
            (self.n_eval is None or self.n_eval >= 1, f"--n-eval must be >= 1, got {self.n_eval}"),
            (self.val_size is None or 0 < self.val_size, f"--val-size must be > 0, got {self.val_size}"),
            (
                self.selection in SELECTIONS,
                f"--selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}",
            ),
            (
                self.selection_size is None or 0 < self.selection_size,
                f"--selection-size must be > 0, got {self.selection_size}",
            ),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.image_size is None or self.image_size >= 1, f"--image-size must be >= 1, got {self.image_size}"),
            (0 < self.test_fraction < 1, f"--test-fraction must be in (0, 1), got {self.test_fraction}"),
            (
                self.precision in PRECISIONS,
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
            ),
            (
                self.compile is None or self.compile in COMPILE_BACKENDS,
                f"--compile must be one of {', '.join(COMPILE_BACKENDS)}, got {self.compile!r}",
            ),
            (self.ema is None or 0 < self.ema < 1, f"--ema (decay) must be in (0, 1), e.g. 0.999, got {self.ema}"),
            (
                self.data_path in DATA_PATHS,
                f"--data-path must be one of {', '.join(DATA_PATHS)}, got {self.data_path!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise OptionError(msg)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise OptionError(f"config has unknown keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        d.setdefault("selection", "test")  # runs from before held-out selection chose "best" on the test set
        for k in ("plugins", "milestones", "final_attacks"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


# Field types, checked before anything else so that a config file's ``epochs = "three"`` or
# ``plugins = "mail"`` is one clear error, not a crash (or a plugin per letter) later.
_INT = ("image_size", "epochs", "batch_size", "steps", "seed", "eval_every", "eval_steps", "n_eval", "workers")
_FLOAT = (
    "test_fraction",
    "lr",
    "momentum",
    "weight_decay",
    "lr_gamma",
    "eps",
    "alpha",
    "val_size",
    "selection_size",
    "ema",
)
_STR = (
    "data",
    "data_root",
    "model",
    "objective",
    "attack_bn",
    "attack_start",
    "out",
    "device",
    "selection",
    "precision",
    "compile",
    "data_path",
)
_BOOL = ("download", "progress", "tensorboard", "dump_weights", "channels_last")
_STR_LIST = ("plugins", "final_attacks")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_types(cfg: TrainConfig) -> None:
    """Raise ``OptionError`` for a field of the wrong type; lists become tuples, ints floats."""

    def bad(name: str, want: str, v: Any) -> OptionError:
        return OptionError(f"{name.replace('_', '-')} must be {want}, got {v!r}")

    for name in _INT:
        v = getattr(cfg, name)
        if v is not None and not _is_int(v):
            raise bad(name, "a whole number", v)
    for name in _FLOAT:
        v = getattr(cfg, name)
        if v is not None:
            if not (_is_int(v) or isinstance(v, float)):
                raise bad(name, "a number", v)
            try:
                v = float(v)
            except OverflowError:  # an integer beyond float range
                v = math.inf
            if not math.isfinite(v):  # inf would pass the range checks (--lr inf) or crash later (--selection-size inf)
                raise bad(name, "a finite number", v)
            setattr(cfg, name, v)
    for name in _STR:
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, str):
            raise bad(name, "a string", v)
    for name in _BOOL:
        if not isinstance(getattr(cfg, name), bool):
            raise bad(name, "true or false", getattr(cfg, name))
    for name in _STR_LIST:
        v = getattr(cfg, name)
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise bad(name, "a list of names", v)
        setattr(cfg, name, tuple(v))
    m = cfg.milestones
    if m is not None:
        if not isinstance(m, (list, tuple)) or not all(_is_int(x) for x in m):
            raise bad("milestones", "a list of whole epochs", m)
        cfg.milestones = tuple(m)
    if not isinstance(cfg.plugin_options, dict):
        raise bad("plugin_options", "a table of option = value", cfg.plugin_options)


FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def table_entries(
    table: Mapping[str, Any], own: Collection[str] = (), flat_options: bool = False
) -> Iterator[tuple[str, str, Any]]:
    """The entries of a config or sweep file's table as ``(kind, name, value)``, in file order: the
    one place that says what a key means. Kinds: ``"own"`` (a key in ``own``, left to the caller),
    ``"setting"`` (a ``TrainConfig`` field, written with ``-`` or ``_``), ``"plugin_options"`` (the
    ``[plugin_options]`` table, as it is), ``"option"`` (one plugin option: ``[mail] gamma = 10`` is
    ``mail-gamma``; with ``flat_options`` also ``"mail-gamma" = 10``) or ``"unknown"`` (as written)."""
    for k, v in table.items():
        key = k.replace("-", "_")
        if key in own:
            yield "own", key, v
        elif key == "plugin_options":
            yield "plugin_options", key, v
        elif key in FIELDS:
            yield "setting", key, v
        elif isinstance(v, dict):  # [mail] gamma = 10
            for option, value in v.items():
                yield "option", f"{k}-{option}", value
        elif flat_options and "-" in k:  # "mail-gamma" = 10
            yield "option", k, v
        else:
            yield "unknown", k, v


def read_settings_file(path: str | Path, what: str = "config", default: str = "json") -> Any:
    """The parsed content of a JSON (``.json``) or TOML (``.toml``) file; another suffix is read as
    ``default``. One-line errors for a missing, unreadable or unparsable file, and for YAML (not read:
    the message names the formats that are)."""
    p = Path(path)
    if p.is_dir():
        raise OptionError(f"{what} file {str(p)!r} is a directory")
    if not p.is_file():
        raise OptionError(f"{what} file {str(p)!r} not found")
    if p.suffix.lower() in (".yaml", ".yml"):
        raise OptionError(
            f"{what} file {str(p)!r}: {what} files are JSON or TOML (got YAML?): write it as {p.stem}.toml "
            "(key = value) or .json"
        )
    toml = p.suffix == ".toml" or (p.suffix != ".json" and default == "toml")
    try:
        text = p.read_text()  # inside the try: a binary file is a UnicodeDecodeError, a ValueError
        if toml:
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except OSError as e:  # permission denied, a directory, an I/O error
        raise OptionError(f"{what} file {str(p)!r} cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        read_as = (
            "" if p.suffix in (".json", ".toml") else f" (read as {'TOML' if toml else 'JSON'}: name it .toml or .json)"
        )
        raise OptionError(f"{what} file {str(p)!r} cannot be parsed: {e}{read_as}") from None


def run_config_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's own ``config.json`` used as a config file: the settings the run used, without what it recorded
    about itself (``RECORD_ONLY`` and any key that is not a setting), its run directory (``out``: a new run gets
    its own) and the learning-rate milestones when they are the schedule the run derived from its epochs (so that
    another ``--epochs`` moves them; an extended run's are kept: they are the schedule it ran)."""
    out = {k: v for k, v in raw.items() if k in FIELDS and k != "out"}
    if raw.get("extended_from"):
        return out
    if "milestones_derived_from" in raw:  # recorded: fractions of the run, or null for explicit milestones
        if raw["milestones_derived_from"] is not None:
            out.pop("milestones", None)
        return out
    data, epochs, milestones = out.get("data"), out.get("epochs"), out.get("milestones")
    if isinstance(data, str) and _is_int(epochs) and isinstance(milestones, list):  # older runs: compare
        try:
            fractions = data_defaults(normalise_source(data))["milestone_fractions"]
        except AdvplugError:
            return out  # resolving reports the bad data name
        if milestones == list(milestones_for(epochs, fractions)):
            del out["milestones"]
    return out


def is_run_config(raw: dict[str, Any]) -> bool:
    """A ``config.json`` the trainer wrote (it carries record-only keys such as ``num_train``)."""
    return any(k in raw for k in RECORD_ONLY)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML file with run settings; plugin options under ``[plugin_options]`` as
    ``"mail-gamma" = 10`` or nested ``[mail] gamma = 10`` tables. A run's own ``config.json`` is
    accepted too (``run_config_settings``)."""
    p = Path(path)
    raw = read_settings_file(p)
    if not isinstance(raw, dict):
        raise OptionError(f"config file {str(p)!r}: expected a table of settings, got {type(raw).__name__}")
    if is_run_config(raw):
        raw = run_config_settings(raw)
    if any(k.replace("-", "_") == "plugin_options" and not isinstance(v or {}, dict) for k, v in raw.items()):
        raise OptionError(f'config file {str(p)!r}: plugin_options must be a table of "plugin-option" = value')
    out: dict[str, Any] = {}
    table: dict[str, Any] = {}  # [plugin_options] first, plugins' own tables over it
    popts: dict[str, Any] = {}
    for kind, key, v in table_entries(raw):
        if kind == "setting":
            out[key] = v
        elif kind == "plugin_options":
            table.update(v or {})
        elif kind == "option":
            popts[key] = v
        else:
            hint = did_you_mean(str(key), (f.name for f in dataclasses.fields(TrainConfig)))
            raise OptionError(
                f"config file {str(p)!r}: unknown setting {key!r}" + (f" ({hint.strip()})" if hint else "")
            )
    popts = {**table, **popts}
    if popts:
        out["plugin_options"] = popts
    return out


# A source of settings: a config file, a TrainConfig, a table of its fields (plugin options under
# ``plugin_options``), or None (nothing).
SettingsSource = Mapping[str, Any] | TrainConfig | str | os.PathLike | None


def merge_settings(*layers: SettingsSource) -> dict[str, Any]:
    """``TrainConfig`` keyword arguments from ``layers``, each over the ones before it; plugin
    options merge option by option (``plugin_options`` only when there are some)."""
    out: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, TrainConfig):
            layer = layer.to_json()
        elif isinstance(layer, (str, os.PathLike)):
            layer = load_config_file(layer)
        layer = dict(layer)
        options.update(layer.pop("plugin_options", None) or {})
        out.update(layer)
    if options:
        out["plugin_options"] = options
    return out


def build_config(*layers: SettingsSource) -> TrainConfig:
    """The one way to a run's ``TrainConfig`` (``advplug train``, ``advplug.tools.api.train``, a
    sweep point): ``layers`` merged by :func:`merge_settings`. Not yet resolved: ``resolved()``
    fills the data set's defaults and validates."""
    settings = merge_settings(*layers)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in settings if k not in known)
    if unknown:
        hint = did_you_mean(unknown[0], known)
        raise OptionError(f"unknown setting {unknown[0]!r}" + (f" ({hint.strip()})" if hint else ""))
    return TrainConfig(**settings)


RECORD_ONLY = (
    "resolved_plugin_options",
    "num_train",
    "world_size",
    "num_selection",
    "num_validation",
    "split_seed",
    "milestones_derived_from",  # the fractions of the run the milestones came from; null: given explicitly
    "extended_from",  # one entry per --resume --epochs: epochs and milestones before and after, and the rule
)
# Settings that do not change a run's numbers (where and how it runs, what else it writes).
NUMBERS_FREE = ("progress", "device", "workers", "data_root", "download", "tensorboard", "dump_weights", "out")


def read_run_config(run_dir: str | Path, error: type[Exception] = OptionError) -> dict[str, Any]:
    """``RUN_DIR/config.json`` as written by the trainer (with its record-only keys)."""
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise error(f"{str(run_dir)!r} is not a run directory (no config.json)")
    try:
        d = json.loads(p.read_text())
    except ValueError as e:
        raise error(f"{str(p)!r} is corrupt: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{str(p)!r} is damaged: expected a JSON object of settings, got {type(d).__name__}")
    check_run_config(d, str(p), error)
    return d


def check_run_config(d: dict[str, Any], name: str, error: type[Exception] = OptionError) -> None:
    """A run's saved settings hold the types and values ``advplug train`` accepts (a hand-edited
    ``config.json`` with ``eps = "x"``, ``NaN`` or ``plugins = "mail"`` is one clear error, not a
    crash or a silently wrong table). Keys this advplug does not know are left to the caller."""
    try:
        TrainConfig(**{k: v for k, v in d.items() if k in FIELDS}).resolved(recorded=True)
    except AdvplugError as e:
        raise error(f"{name!r} is damaged: {e}") from None
    nulls = [k for k in (*DATA_DEFAULTS["digits"], "milestones") if k in d and d[k] is None]
    if nulls:  # the trainer records these resolved: a null hides what the run used
        raise error(f"{name!r} is damaged: {', '.join(nulls)} {'is' if len(nulls) == 1 else 'are'} null")
