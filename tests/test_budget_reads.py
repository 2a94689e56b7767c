"""A per-sample budget (``Declaration.sets``) beside an attack that ignores it is refused at start-up: every plugin
whose variants the run trains on must declare that its attack honours ``ctx.budget`` (``Declaration.reads``), and an
undeclared generator is refused beside a setter; the built-in attacks and FAT's read it."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from advplug import Declaration, Variant, hookimpl
from advplug.composition import check_composition
from advplug.errors import CompositionError
from advplug.plugins import enable
from advplug.testing import installed_plugins
from advplug.tools.cli import cli

HERE = __name__


def ignores(setter: str, q: str, gen: str) -> str:
    """The line expected when ``gen``'s attack ignores the ``q`` that ``setter`` sets."""
    return (
        f"{setter!r} with {gen!r}: {setter} sets the per-sample {q}, but {gen}'s attacks ignore it "
        f"({gen} does not declare reads={{{q!r}}})"
    )


@pytest.mark.parametrize(
    "plugins,objective,options,setter,q,gen",
    [
        (["cfa", "lrat"], "at", {}, "cfa", "eps", "lrat"),
        (["lrat", "cfa"], "at", {}, "cfa", "eps", "lrat"),
        (["dafa", "lrat"], "at", {}, "dafa", "eps", "lrat"),
        (["cfa", "wmmr"], "at", {}, "cfa", "eps", "wmmr"),
        (["cfa", "wmmr"], "trades", {}, "cfa", "eps", "wmmr"),
        (["dafa", "wmmr"], "trades", {}, "dafa", "eps", "wmmr"),
    ],
)
def test_a_budget_beside_an_attack_that_ignores_it_is_refused_naming_both(plugins, objective, options, setter, q, gen):
    with pytest.raises(CompositionError) as e:
        enable(plugins, objective, options)
    assert str(e.value) == ignores(setter, q, gen)
    assert e.value.short == f"{gen}'s attacks ignore {q}"


@pytest.mark.parametrize(
    "plugins,objective,options",
    [
        (["cfa", "fat"], "at", {}),
        (["cfa", "fat"], "trades", {}),
        (["dafa", "fat"], "at", {}),
        (["dafa"], "trades", {}),
        (["cfa"], "at", {}),
        (["cfa"], "trades", {}),
        (["cfa"], "mart", {}),
        (["cfa", "wmmr"], "at", {"wmmr-attack": "plain"}),  # the core's PGD makes the variant
        (["dafa"], "at", {"dafa-at-attack": "code"}),  # its own scaled attack, no budget set through the hook
        (["cfa", "gairat"], "at", {}),
    ],
)
def test_attacks_that_read_the_budget_are_accepted(plugins, objective, options):
    enable(plugins, objective, options)


def test_fat_and_the_trades_attack_declare_that_they_read_eps_and_alpha():
    d = enable(["fat"], "trades").declarations
    assert d["fat"].reads == {"eps", "alpha"} and d["trades"].reads == {"eps", "alpha"}


def test_dafa_code_attack_sets_no_budget_and_is_refused_beside_a_setter():
    assert enable(["dafa"], "at", {"dafa-at-attack": "code"}).declarations["dafa"].sets == frozenset()
    with pytest.raises(
        CompositionError, match=r"^'s' with 'dafa': s sets the per-sample eps, but dafa's attacks ignore it"
    ):
        check_composition(
            {
                "at": Declaration(),
                "dafa": enable(["dafa"], "at", {"dafa-at-attack": "code"}).declarations["dafa"],
                "s": Declaration(sets=frozenset({"eps"})),
            },
            "at",
            "at",
        )


# -- the rule, on declarations --------------------------------------------------------------------------------------
def gen(*reads: str) -> Declaration:
    return Declaration(variants={"g": ()}, reads=frozenset(reads))


def test_each_quantity_set_must_be_read_by_every_generator():
    setter = Declaration(sets=frozenset({"eps", "alpha"}))
    check_composition({"at": Declaration(), "s": setter, "g": gen("eps", "alpha")}, "at", "at")
    with pytest.raises(CompositionError, match=r"s sets the per-sample alpha, but g's attacks ignore it .*'alpha'"):
        check_composition({"at": Declaration(), "s": setter, "g": gen("eps")}, "at", "at")
    with pytest.raises(CompositionError, match="g2's attacks ignore it"):  # every generator, not only the first
        check_composition(
            {"at": Declaration(), "s": setter, "g": gen("eps", "alpha"), "g2": Declaration(variants={"h": ()})},
            "at",
            "at",
        )
    # a generator without a budget setter, and beta alone (the loss reads it, not the attack), need no reads
    check_composition({"at": Declaration(), "g": gen()}, "at", "at")
    check_composition(
        {"trades": Declaration(), "s": Declaration(sets=frozenset({"beta"})), "g": gen()}, "trades", "trades"
    )


def test_the_replaced_objective_attack_is_not_asked_and_a_kept_one_is():
    trades = Declaration(variants={"tpgd": ()})  # without reads
    setter = Declaration(sets=frozenset({"eps"}))
    check_composition({"trades": trades, "s": setter, "g": gen("eps")}, "trades", "trades")
    with pytest.raises(CompositionError, match="trades's attacks ignore it"):
        check_composition({"trades": trades, "s": setter}, "trades", "trades")


def test_a_plugin_that_sets_and_generates_must_read_too():
    with pytest.raises(CompositionError, match=r"^'s': s sets the per-sample eps, but s's attacks ignore it"):
        check_composition(
            {"at": Declaration(), "s": Declaration(variants={"v": ()}, sets=frozenset({"eps"}))}, "at", "at"
        )


def test_an_unknown_quantity_read_is_refused():
    with pytest.raises(CompositionError, match=r"'g': declares that it reads 'gamma'.*eps, alpha, beta"):
        check_composition({"at": Declaration(), "g": gen("gamma")}, "at", "at")


def test_beta_read_by_a_plugin_loss_is_accepted():
    setter = Declaration(sets=frozenset({"beta"}))
    check_composition(
        {"trades": Declaration(), "s": setter, "own": Declaration(reads=frozenset({"beta"}))}, "trades", "own"
    )
    with pytest.raises(CompositionError, match="does not read it"):
        check_composition({"trades": Declaration(), "s": setter, "own": Declaration()}, "trades", "own")


# -- undeclared generators ------------------------------------------------------------------------------------------
class ToyGen:
    """Makes its own variant and declares nothing."""

    @hookimpl
    def generate_adversaries(self, ctx):
        return [Variant("toy", ctx.x.clone())]


class ToyGenNone(ToyGen):
    """Implements ``declare`` but returns ``None``."""

    @hookimpl
    def declare(self, objective):
        return None


class ToyGenReads(ToyGen):
    """Declares its variant and that its attack honours eps."""

    @hookimpl
    def declare(self, objective):
        return Declaration(variants={"toy": ()}, reads=frozenset({"eps"}))


TOYS = {"toygen": f"{HERE}:ToyGen", "toygennone": f"{HERE}:ToyGenNone", "toygenreads": f"{HERE}:ToyGenReads"}


@pytest.mark.parametrize("toy", ["toygen", "toygennone"])
def test_an_undeclared_generator_beside_a_budget_setter_is_refused(toy):
    with installed_plugins(**TOYS):
        enable([toy], "at")  # alone: no budget, nothing to ignore
        with pytest.raises(CompositionError) as e:
            enable(["cfa", toy], "at")
    msg = str(e.value)
    assert msg.startswith(f"'cfa' with '{toy}': cfa sets the per-sample eps, but {toy} generates variants")
    assert "declare(objective) returning Declaration(variants=" in msg and "reads={'eps'}" in msg
    assert "\n" not in msg


def test_a_declared_generator_that_reads_the_budget_is_accepted():
    with installed_plugins(**TOYS):
        enable(["cfa", "toygenreads"], "at")
        with pytest.raises(CompositionError, match="toygenreads's attacks ignore it"):
            enable(["dafa", "toygenreads"], "at")  # dafa sets alpha too


def test_the_cli_refuses_it_in_one_line_with_exit_2(tmp_path):
    res = CliRunner().invoke(
        cli, ["train", "--plugin", "cfa", "--plugin", "lrat", "--epochs", "1", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines == ["error: " + ignores("cfa", "eps", "lrat")]
