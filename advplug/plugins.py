"""Plugin discovery (entry-point group ``advplug``), loading of the named plugins, and checks.

Only the plugins named with ``--plugin`` are imported and registered; each run or test gets a
fresh ``pluggy.PluginManager`` (no module-global state).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from pluggy import HookCaller

from advplug import hookspecs
from advplug.composition import Composition, check_composition
from advplug.context import Declaration
from advplug.errors import CompositionError, OptionError, PluginError, did_you_mean
from advplug.options import build_options, describe, flag_name

GROUP = "advplug"

# The plugins shipped with advplug (the packages under plugins/ and the example under examples/): names that
# ``advplug new-plugin`` refuses even when they are not installed. tests/test_plugin_names.py checks it against the
# repository.
SHIPPED_PLUGINS = ("awp", "bat", "bilaw", "fat", "gairat", "lrat", "mail", "meow", "wmmr", "focal", "dafa", "cfa")


@functools.lru_cache(maxsize=1)
def _entry_points() -> tuple[EntryPoint, ...]:
    return tuple(entry_points(group=GROUP))  # reads every distribution's metadata: once per process


def installed() -> dict[str, EntryPoint]:
    """Installed plugins by name, without importing them."""
    return {ep.name: ep for ep in _entry_points()}


def duplicates() -> dict[str, list[tuple[str, str]]]:
    """Entry-point names that several installed distributions register: name -> their (distribution, version)."""
    by_name: dict[str, set[tuple[str, str]]] = {}
    for ep in _entry_points():
        dist = (ep.dist.name, ep.dist.version) if ep.dist is not None else ("?", "?")
        by_name.setdefault(ep.name, set()).add(dist)
    return {n: sorted(d) for n, d in by_name.items() if len(d) > 1}


def duplicate_message(name: str, dists: list[tuple[str, str]]) -> str:
    listed = " and ".join(f"{d} {v}" for d, v in dists)
    shipped = f"advplug-{name}" if name in SHIPPED_PLUGINS else None
    others = [d for d, _ in dists if d.lower().replace("_", "-") != shipped]  # suggest keeping the shipped one
    return (
        f"plugin {name!r} is registered by {len(dists)} distributions ({listed}); keep one of them "
        f"(e.g. pip uninstall {(others or [dists[-1][0]])[-1]})"
    )


def builtin_objectives() -> dict[str, type]:
    from advplug.objectives import OBJECTIVES

    return dict(OBJECTIVES)


def load_class(name: str) -> type:
    """Import the plugin class registered as ``name``; clear errors for unknown or broken ones."""
    eps = installed()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise PluginError(f'unknown plugin "{name}" ({did_you_mean(name, eps)}installed: {known})')
    dups = duplicates()
    if name in dups:
        raise PluginError(duplicate_message(name, dups[name]))
    try:
        return eps[name].load()
    except Exception as e:  # the plugin's own import error, whatever it is
        raise PluginError(f'Error importing plugin "{name}": {type(e).__name__}: {e}') from e


def options_class(cls: type) -> type | None:
    opts = getattr(cls, "Options", None)
    return opts if opts is not None and dataclasses.is_dataclass(opts) else None


def instantiate(cls: type, name: str, values: dict[str, Any]) -> Any:
    ocls = options_class(cls)
    options = build_options(ocls, name, values)
    return cls(options) if ocls is not None else cls()


def register(pm: pluggy.PluginManager, name: str, plugin: Any) -> None:
    """Register with a one-line error for a hook whose signature does not fit its spec."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise PluginError(f'plugin "{name}" does not fit the hook contract: ' + "; ".join(lines[1:] or lines)) from None


def check_hooks(name: str, cls: type) -> None:
    """Check a plugin class's hook signatures against the specs, as ``enable`` would (default options)."""
    pm = get_plugin_manager()
    register(pm, name, instantiate(cls, name, {}))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f'plugin "{name}": {e}') from None


def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


KNOWN_REQUIREMENTS = frozenset({"validation"})


@dataclass(frozen=True)
class Enabled:
    """The plugins of one run and what the core derives from them, computed once in ``enable``: names in order,
    the objective's name, the union of their ``requirements``, whether one may read ``Variant.stats``, and the
    checked ``composition`` (which carries the declarations and the loss owner)."""

    pm: pluggy.PluginManager
    names: list[str]
    objective: str
    requirements: frozenset[str] = frozenset()
    reads_attack_stats: bool = True
    composition: Composition | None = None  # None only while ``enable`` builds it

    @property
    def declarations(self) -> dict[str, Declaration]:
        """Each plugin's ``declare`` result (objective first), as checked at start-up."""
        return self.composition.declarations

    def plugin(self, name: str) -> Any:
        return self.pm.get_plugin(name)

    def items(self) -> list[tuple[str, Any]]:
        return [(n, self.pm.get_plugin(n)) for n in [self.objective, *self.names]]


def per_plugin(pm: pluggy.PluginManager, hook: str) -> list[tuple[str, HookCaller]]:
    """Per plugin implementing ``hook`` (wrappers aside), in pluggy's call order: a caller of that plugin's
    implementation inside every wrapper of the hook (``pm.subset_hook_caller``). The core calls a collected hook
    this way when it must know whose result is whose (fault flags, ``metrics[name]``); wrappers wrap each call."""
    impls = [i for i in reversed(getattr(pm.hook, hook).get_hookimpls()) if not (i.wrapper or i.hookwrapper)]
    return [(i.plugin_name, pm.subset_hook_caller(hook, [j.plugin for j in impls if j is not i])) for i in impls]


def split_options(names: list[str], objective: str, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Route ``{"mail-gamma": "10"}``-style keys to their plugin; options for plugins that are
    not enabled are an error, not ignored."""
    targets = sorted({objective, *names}, key=len, reverse=True)
    every = sorted(set(installed()) | set(builtin_objectives()), key=len, reverse=True)
    routed: dict[str, dict[str, Any]] = {n: {} for n in {objective, *names}}
    for key, value in values.items():
        key = key.replace("_", "-")
        # the entry-point name is the option prefix, with "_" written "-" (--my-method-gamma for my_method)
        owner = next((t for t in targets if key.startswith(t.replace("_", "-") + "-")), None)
        if owner is None:
            other = next((t for t in every if key.startswith(t.replace("_", "-") + "-")), None)
            if other is not None:
                how = f"--objective {other}" if other in builtin_objectives() else f"--plugin {other}"
                raise OptionError(f"option --{key} is for {other!r}, which is not enabled (add {how})")
            raise OptionError(f"no such option: --{key}")
        routed[owner][key[len(owner) + 1 :]] = value
    return routed


def enable(names: list[str], objective: str = "at", options: dict[str, Any] | None = None) -> Enabled:
    """Load, instantiate and register the objective and the named plugins, then check them."""
    objectives = builtin_objectives()
    if objective not in objectives:
        hint = did_you_mean(objective, objectives)
        raise OptionError(f"unknown objective {objective!r} ({hint}choose from {', '.join(objectives)})")
    if len(set(names)) != len(names):
        raise PluginError(f"plugin named twice: {', '.join(n for n in names if names.count(n) > 1)}")
    for n in names:
        if n in objectives:
            raise PluginError(f'"{n}" is an objective, not a plugin: use --objective {n}')
    routed = split_options(names, objective, options or {})
    pm = get_plugin_manager()
    register(pm, objective, instantiate(objectives[objective], objective, routed[objective]))
    for n in names:
        cls = load_class(n)
        register(pm, n, instantiate(cls, n, routed[n]))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {e.plugin!r}: {e}") from None
    enabled = Enabled(pm, list(names), objective)
    owners = loss_owners(enabled)
    requested: set[str] = set().union(*[r for r in pm.hook.requirements() if r])
    gens = {i.plugin_name for i in pm.hook.generate_adversaries.get_hookimpls()}
    undeclared: set[str] = set()
    decls = _declarations(enabled, undeclared)
    composition = check_composition(
        decls, objective, owners[0] if owners else None, requested, sorted(gens & undeclared)
    )
    if requested - KNOWN_REQUIREMENTS:
        raise PluginError(f"unknown requirement(s) {', '.join(sorted(requested - KNOWN_REQUIREMENTS))}")
    return dataclasses.replace(
        enabled,
        requirements=frozenset(requested),
        composition=composition,
        reads_attack_stats=_reads_attack_stats(enabled, decls),
    )


# The built-in objectives' declarations (they implement no ``declare``): the views they make and
# whether their loss weighs a natural term.
OBJECTIVE_DECLARATIONS = {
    "at": Declaration(meaning="weighted CE over the variants"),
    "trades": Declaration(
        variants={"tpgd": ("kappa", "p_true_lps")},
        provides=frozenset({"natural-term"}),
        reads=frozenset({"eps", "alpha"}),  # its KL attack applies ctx.budget
        meaning="natural CE + beta KL(p(x) || p(x'))",
    ),
    "mart": Declaration(meaning="BCE(x') + beta KL (1 - p_y(x))"),
}


def _declarations(enabled: Enabled, undeclared: set[str] | None = None) -> dict[str, Declaration]:
    """Each enabled plugin's ``declare`` result (objective first). A plugin without one (no ``declare``, or it
    returned ``None``; added to ``undeclared``) is a global weigher reading ``ctx.anchor`` if it implements
    ``compute_weights``."""
    pm = enabled.pm
    declare = dict(per_plugin(pm, "declare"))
    weighers = {i.plugin_name for i in pm.hook.compute_weights.get_hookimpls()}
    out: dict[str, Declaration] = {}
    for name in (enabled.objective, *enabled.names):
        results = declare[name](objective=enabled.objective) if name in declare else []
        d = results[0] if results else None
        if d is None:
            d = OBJECTIVE_DECLARATIONS.get(name) if name == enabled.objective else None
        if d is None:
            d = Declaration(weights="global" if name in weighers else None)
            if undeclared is not None:
                undeclared.add(name)
        if not isinstance(d, Declaration):
            raise PluginError(f"plugin {name!r}: declare() must return an advplug.Declaration, got {type(d).__name__}")
        out[name] = d
    return out


def _reads_attack_stats(enabled: Enabled, decls: dict[str, Declaration]) -> bool:
    """Whether some enabled plugin may read ``Variant.stats`` (kappa, p_true_lps): one that
    declares a ``stat:`` need, or one without ``declare`` (its needs are unknown). When none does,
    the core's PGD skips that bookkeeping (a few small tensor ops per attack iteration)."""
    declared = {i.plugin_name for i in enabled.pm.hook.declare.get_hookimpls()}
    return any(n != enabled.objective and n not in declared for n, _ in enabled.items()) or any(
        need.startswith("stat:") for d in decls.values() for need in d.needs
    )


def owns_loss(plugin: Any, objective: str) -> bool:
    """Whether ``plugin``'s ``combine_loss`` owns the loss for ``objective`` (``hookspecs.OwnsLoss``)."""
    if isinstance(plugin, hookspecs.OwnsLoss):
        return bool(plugin.owns_loss(objective))
    impl = getattr(plugin, "combine_loss", None)
    opts = getattr(impl, "advplug_impl", None)
    return impl is not None and opts is not None and not opts.get("wrapper") and not opts.get("hookwrapper")


def loss_owners(enabled: Enabled) -> list[str]:
    """Who owns ``combine_loss``; the trylast ``at`` objective yields to any other owner."""
    owners = [n for n, p in enabled.items() if owns_loss(p, enabled.objective)]
    if len(owners) > 1 and "at" in owners:
        owners.remove("at")
    if len(owners) > 1:
        raise CompositionError(
            f"plugins {' and '.join(repr(o) for o in owners)} both own the training loss "
            f"(combine_loss); enable only one of them",
            "two loss owners",
        )
    return owners


def pair_table(names: list[str] | None = None, objectives: tuple[str, ...] = ("at", "trades", "mart")) -> str:
    """Markdown: for every pair of ``names`` (default: every installed plugin) and each objective,
    what the combination means (``global(view) x local[v]``) or the start-up error."""
    names = sorted(names if names is not None else installed())
    rows = ["| pair | " + " | ".join(f"`{o}`" for o in objectives) + " |", "| --- |" + " --- |" * len(objectives)]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            cells = []
            for o in objectives:
                try:
                    cells.append(enable([a, b], o).composition.cell())
                except (PluginError, OptionError) as e:
                    cells.append("error: " + (e.short if isinstance(e, CompositionError) else str(e)))
            rows.append(f"| {a} + {b} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def hook_order(pm: pluggy.PluginManager) -> dict[str, list[dict[str, Any]]]:
    """Per hook, the implementations in the order pluggy calls them."""
    out = {}
    for spec in hookspecs.SPEC_NAMES:
        impls = getattr(pm.hook, spec).get_hookimpls()
        out[spec] = [
            {
                "plugin": i.plugin_name,
                "wrapper": bool(i.wrapper or i.hookwrapper),
                "tryfirst": i.tryfirst,
                "trylast": i.trylast,
            }
            for i in reversed(impls)
        ]
    return out


def describe_plugin(name: str, cls: type, version: str | None) -> dict[str, Any]:
    hooks = [s for s in hookspecs.SPEC_NAMES if getattr(getattr(cls, s, None), "advplug_impl", None) is not None]
    doc = (cls.__doc__ or "").strip().splitlines()
    return {
        "name": name,
        "version": version,
        "summary": doc[0] if doc else "",
        "hooks": hooks,
        "options": [dict(o, flag=flag_name(name, o["name"])) for o in describe(options_class(cls))],
    }


def list_plugins() -> tuple[list[dict[str, Any]], list[str]]:
    """Describe every installed plugin (imports each); returns (descriptions, errors). A name that several
    distributions register is left out (see ``duplicates``)."""
    out, errors = [], []
    dups = duplicates()
    for name, ep in sorted(installed().items()):
        if name in dups:
            continue
        try:
            cls = load_class(name)
            check_hooks(name, cls)
        except (PluginError, OptionError) as e:
            errors.append(str(e))
            continue
        version = ep.dist.version if ep.dist is not None else None
        out.append(describe_plugin(name, cls, version))
    return out, errors
