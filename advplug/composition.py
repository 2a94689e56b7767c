"""The start-up check of a set of plugins: their declarations (views, stats, weights, needs) are
checked as a whole, and the combination's meaning is described (``advplug hooks``, the pair table)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from advplug.context import ANCHOR, BUDGET_FIELDS, NATURAL, Declaration
from advplug.errors import CompositionError

CORE = "the core"
CORE_VIEWS = {"pgd": ("kappa", "p_true_lps")}  # the core's PGD-K when no plugin generates variants
CORE_NEEDS = {"natural", "features", "loss", "validation"}
REGULARISED = ("trades", "mart")  # the losses with a strength Budget.beta sets per sample
ATTACK_BUDGET = ("eps", "alpha")  # the Budget fields an attack applies (Declaration.reads of a variant's maker)


@dataclass
class Composition:
    """The checked meaning of a set of plugins: the views of each step and who makes them, the
    anchor, which plugin weighs globally (and from which view) and which locally."""

    objective: str
    owner: str | None
    views: dict[str, tuple[str, ...]] | None  # None: an undeclared plugin generates variants
    makers: dict[str, str]
    anchor: str | None
    local: str | None
    globals: list[str]
    reads: dict[str, str]
    declarations: dict[str, Declaration]

    def describe(self) -> list[str]:
        """How the weights of these plugins combine, in a few lines (``advplug hooks``)."""
        d = self.declarations
        if self.views is None:
            lines = ["views: declared by no one (an undeclared plugin generates variants)"]
        else:
            by = sorted({self.makers[v] for v in self.views})
            lines = [
                f"views: {', '.join(self.views)} (made by {', '.join(by)})"
                + (
                    f"; anchor {self.anchor}" + (f" ({self.local}'s x*)" if self.local and d[self.local].anchor else "")
                    if self.anchor
                    else ""
                )
            ]
        for n in self.globals:
            lines.append(
                f"{n}: global, one weight per instance from view {self.reads[n]!r}"
                + (f": {d[n].meaning}" if d[n].meaning else "")
            )
        if self.local:
            lines.append(
                f"{self.local}: local, one weight per variant inside the pair"
                + (f": {d[self.local].meaning}" if d[self.local].meaning else "")
            )
        lines.append(f"loss: {self.owner or 'none'}")
        lines.append("combined: " + self.formula())
        sets = [f"{n} sets {', '.join(sorted(d.sets))}" for n, d in self.declarations.items() if d.sets]
        if sets:
            lines.append("per-sample budget (attack_budget): " + "; ".join(sets))
        averaging = [n for n, d in self.declarations.items() if "averaging" in d.provides]
        if averaging:
            lines.append(f"averaged model: {averaging[0]} (average_weights, once per epoch, in --ema's slot)")
        return lines

    def cell(self) -> str:
        """The pair's meaning in a few words (the pair table, docs/pairs.md)."""
        parts = [f"{n}({self.reads[n]})" for n in self.globals] + ([f"{self.local}[v]"] if self.local else [])
        out = " x ".join(parts) if parts else "no weights"
        nat = [n for n in self.globals if self.declarations[n].natural_weights]
        if nat:
            out += f", {'/'.join(nat)} on the natural term"
        if self.owner and self.owner != self.objective:
            out += f"; loss {self.owner}"
        return out

    def formula(self) -> str:
        if not self.globals and not self.local:
            return "no weights (all ones)"
        g = " x ".join(f"{n}[b]" for n in self.globals)
        if len(self.globals) > 1:
            g = f"({g}, rescaled to the product of their batch means)"
        parts = [p for p in (g, f"{self.local}[v, b]" if self.local else "") if p]
        out = "w[v, b] = " + " x ".join(parts)
        if self.local and self.globals:
            out += f"; {self.local}'s floor and normalisation hold on its part, each global's on its own"
        nat = [n for n in self.globals if self.declarations[n].natural_weights]
        if nat:
            out += f"; natural term: {' x '.join(n + '_nat[b]' for n in nat)}"
        return out


def _fail(a: str, b: str, problem: str, short: str = "") -> CompositionError:
    """One line naming both plugins and the missing piece; ``short`` for the pair table, docs/pairs.md."""
    pair = f"{a!r} with {b!r}" if a != b else repr(a)
    return CompositionError(f"{pair}: {problem}", short or problem)


def check_composition(
    declarations: dict[str, Declaration],
    objective: str,
    owner: str | None,
    requested: set[str] = frozenset(),
    undeclared_generators: Iterable[str] = (),
) -> Composition:
    """Check the plugins' declared needs against what the others (and the core) provide.

    ``declarations``: by plugin name, the objective first. Raises ``PluginError`` with one line
    naming both plugins and the missing piece; returns the composition's meaning otherwise.
    Pure: no plugin is called.
    """
    undeclared = list(undeclared_generators)
    check_budget(declarations, objective, owner)
    check_budget_reads(declarations, objective, undeclared)
    check_averaging(declarations)
    views: dict[str, tuple[str, ...]] | None = {}
    makers: dict[str, str] = {}
    replaced = any(d.variants for n, d in declarations.items() if n != objective)
    for n, d in declarations.items():
        if replaced and n == objective:
            continue  # plugins' variants replace the objective's own attack (trainer.step)
        for v, stats in d.variants.items():
            if v in views:
                raise _fail(makers[v], n, f"both generate a variant named {v!r}", "same variant name")
            views[v], makers[v] = tuple(stats), n
    if undeclared:
        views = None
    elif not views:
        views, makers = dict(CORE_VIEWS), {v: CORE for v in CORE_VIEWS}
    else:
        views = dict(sorted(views.items()))

    locals_ = [n for n, d in declarations.items() if d.weights == "local"]
    if len(locals_) > 1:
        raise _fail(
            locals_[0],
            locals_[1],
            "both return local weights (one weight per variant inside the pair); "
            "only one method may distribute weight inside the pair",
            "two local weightings",
        )
    local = locals_[0] if locals_ else None
    globals_ = [n for n, d in declarations.items() if d.weights == "global"]

    if local and declarations[local].own_scale:
        for n in globals_:
            if declarations[n].own_scale:
                raise _fail(
                    n,
                    local,
                    f"both set the loss scale: {n}'s weights are not mean 1 and {local} normalises its "
                    f"own (e.g. LRAT's Eq. 15); choose a mean-1 setting of {n}",
                    "both set the loss scale",
                )
    anchor = declarations[local].anchor if local else None
    if views is not None:
        if anchor is not None and anchor != NATURAL and anchor not in views:
            raise _fail(
                local, local, f"declares the anchor {anchor!r}, which is not a view of this run ({', '.join(views)})"
            )
        if anchor is None:
            anchor = min(views)  # the only variant, or the first by name

    def describe_view(v: str) -> str:
        if v == NATURAL:
            return "the natural input"
        if local and v == anchor and declarations[local].anchor == v:
            return f"{local}'s x* {v!r}"
        return f"{makers[v]}'s variant {v!r}" if makers[v] != CORE else f"the core's PGD variant {v!r}"

    reads: dict[str, str] = {}
    for n, d in declarations.items():
        v = anchor if d.view == ANCHOR else d.view
        if d.weights == "global":
            reads[n] = v if v is not None else ANCHOR
        for need in sorted(d.needs):
            if need.startswith("stat:"):
                key = need[len("stat:") :]
                if views is None:
                    continue  # an undeclared generator: checked by the plugin at the first step
                if v != NATURAL and v not in views:
                    raise _fail(
                        n,
                        local or owner or n,
                        f"{n} reads the view {v!r}, which this run does not make (views: natural, {', '.join(views)})",
                    )
                have = () if v == NATURAL else views[v]
                if key not in have:
                    maker = makers.get(v, CORE) if v != NATURAL else CORE
                    other = local if (local and v == anchor) else (maker if maker != CORE else owner or n)
                    recording = [w for w, s in views.items() if key in s]
                    hint = (
                        f"views that record it: {', '.join(recording)}"
                        if recording
                        else "no view of this run records it"
                    )
                    raise _fail(
                        n,
                        other,
                        f"{n} needs {key!r} on the view it reads, {describe_view(v)}, which does not "
                        f"record it ({hint})",
                        f"no {key} on {v}",
                    )
            elif need == "validation":
                if "validation" not in requested:
                    raise _fail(n, n, "needs a validation split but does not ask for it in requirements()")
            elif need == "loss":
                if local is not None and local != n:
                    raise _fail(
                        n,
                        local,
                        f"{n} learns its weights through the run's loss as a function of its own "
                        f"weights, but {local}'s local weights are part of that loss and are not "
                        f"known when {n} computes; not supported",
                        "meta-gradient beside local weights",
                    )
            elif need not in CORE_NEEDS:
                raise _fail(
                    n, n, f"declares an unknown need {need!r} (known: {', '.join(sorted(CORE_NEEDS))}, stat:KEY)"
                )
        if d.weights == "global" and views is not None and v != NATURAL and v not in views:
            raise _fail(
                n,
                local or n,
                f"{n} reads the view {v!r}, which this run does not make (views: natural, {', '.join(views)})",
            )
        if d.natural_weights and owner is not None:
            if "natural-term" not in declarations.get(owner, Declaration()).provides:
                raise _fail(
                    n, owner, f"{n} weighs the natural term, but the loss of {owner!r} has none", "no natural term"
                )
    return Composition(
        objective=objective,
        owner=owner,
        views=views,
        makers=makers,
        anchor=anchor,
        local=local,
        globals=globals_,
        reads=reads,
        declarations=dict(declarations),
    )


def check_budget(declarations: dict[str, Declaration], objective: str, owner: str | None) -> None:
    """``Declaration.sets``: known quantities, each set by one plugin at most, and ``beta`` only under a loss that
    reads it (TRADES', MART's regulariser)."""
    setter: dict[str, str] = {}
    for n, d in declarations.items():
        for q in sorted(d.sets, key=lambda q: (q not in BUDGET_FIELDS, q)):
            if q not in BUDGET_FIELDS:
                raise _fail(
                    n, n, f"declares that it sets {q!r}, not a per-sample quantity (sets: {', '.join(BUDGET_FIELDS)})"
                )
            if q in setter:
                raise _fail(
                    setter[q], n, f"both set {q} per sample (attack_budget); only one plugin may", f"both set {q}"
                )
            setter[q] = n
        unknown = sorted(d.reads - set(BUDGET_FIELDS))
        if unknown:
            raise _fail(
                n,
                n,
                f"declares that it reads {unknown[0]!r}, not a per-sample quantity (reads: {', '.join(BUDGET_FIELDS)})",
            )
    reads_beta = owner is not None and "beta" in declarations.get(owner, Declaration()).reads
    if "beta" in setter and owner not in REGULARISED and not reads_beta:
        n = setter["beta"]
        if owner in (None, objective):
            raise _fail(
                n,
                n,
                f"{n} sets beta, the per-sample strength of the objective's regulariser, but objective {objective!r} "
                "has no regulariser: use --objective trades or --objective mart",
                f"no beta under {objective}",
            )
        raise _fail(
            n,
            owner,
            f"{n} sets beta, the per-sample strength of TRADES' / MART's regulariser, but the loss is {owner}'s, "
            f"which does not read it ({owner} does not declare reads={{'beta'}})",
            "beta with another loss",
        )


def check_budget_reads(declarations: dict[str, Declaration], objective: str, undeclared: list[str]) -> None:
    """A per-sample ``eps`` / ``alpha`` must reach every attack that makes the run's variants: each generator declares
    it in ``Declaration.reads``; an undeclared generator may ignore it. The objective's own attack counts only when no
    plugin's variants replace it (``check_composition``); ``beta`` is the loss's (``check_budget``)."""
    setter = {q: n for n, d in declarations.items() for q in d.sets if q in ATTACK_BUDGET}
    replaced = any(d.variants for n, d in declarations.items() if n != objective)
    for q in (q for q in ATTACK_BUDGET if q in setter):
        s = setter[q]
        if undeclared:
            g = undeclared[0]
            raise _fail(
                s,
                g,
                f"{s} sets the per-sample {q}, but {g} generates variants and declares nothing, so its attacks may "
                f"ignore it (if its attack applies ctx.budget.{q}, say so with declare(objective) returning "
                f"Declaration(variants={{name: stats}}, reads={{{q!r}}}))",
                f"undeclared {g} beside per-sample {q}",
            )
        for g, d in declarations.items():
            if d.variants and not (replaced and g == objective) and q not in d.reads:
                raise _fail(
                    s,
                    g,
                    f"{s} sets the per-sample {q}, but {g}'s attacks ignore it ({g} does not declare reads={{{q!r}}})",
                    f"{g}'s attacks ignore {q}",
                )


def check_averaging(declarations: dict[str, Declaration]) -> None:
    """At most one plugin keeps the averaged model (``provides={"averaging"}``, hook ``average_weights``)."""
    averagers = [n for n, d in declarations.items() if "averaging" in d.provides]
    if len(averagers) > 1:
        raise _fail(
            averagers[0],
            averagers[1],
            "both keep the run's averaged model (average_weights); only one plugin may",
            "two weight averagings",
        )
