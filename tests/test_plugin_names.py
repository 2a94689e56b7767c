"""Plugin names: `new-plugin` refuses taken names, a name registered by two distributions is reported (never one
picked silently), mistyped plugins, options and attacks get a did-you-mean, `hooks` takes plugin options."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from advplug import plugins
from advplug.attack_names import parse_eval_attack
from advplug.errors import OptionError, PluginError
from advplug.plugins import enable
from advplug.tools.cli import cli

REPO = Path(__file__).resolve().parents[1]
TARGET = "advplug.testing:ConstantWeights"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_line_error(res, *patterns: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for p in patterns:
        assert p in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    """``add(dist, **entry_points)``: a distribution installed on sys.path (a ``*.dist-info`` folder), no pip."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def add(dist: str, **eps: str) -> None:
        info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text("[advplug]\n" + "".join(f"{n} = {v}\n" for n, v in eps.items()))
        plugins._entry_points.cache_clear()

    yield add
    plugins._entry_points.cache_clear()


def test_shipped_names_are_the_packages_of_the_repo():
    shipped = {p.name.removeprefix("advplug-") for p in (REPO / "plugins").glob("advplug-*")}
    examples = {p.name.removeprefix("advplug-") for p in (REPO / "examples").glob("advplug-*")}
    assert set(plugins.SHIPPED_PLUGINS) == shipped | examples


@pytest.mark.parametrize(
    "name,why",
    [
        ("mail", "shipped with advplug"),
        ("focal", "shipped with advplug"),
        ("trades", "built-in objective"),
        ("at", "built-in objective"),
    ],
)
def test_new_plugin_refuses_shipped_names_and_objectives(tmp_path, name, why):
    one_line_error(run("new-plugin", name, "--dest", str(tmp_path)), repr(name), why)
    assert not any(tmp_path.iterdir())


def test_new_plugin_refuses_installed_entry_points_and_distributions(tmp_path, fake_dists):
    fake_dists("somebody-else", theirs=TARGET)
    fake_dists("advplug-taken")  # a distribution of that name, whatever it registers
    dest = tmp_path / "out"
    dest.mkdir()
    one_line_error(run("new-plugin", "theirs", "--dest", str(dest)), "'theirs'", "installed", "somebody-else")
    one_line_error(run("new-plugin", "taken", "--dest", str(dest)), "advplug-taken", "installed distribution")
    # the option prefix is the same with '-' or '_': my_thing and my-thing would share --my-thing-*
    fake_dists("their-dist", **{"my-thing": TARGET})
    one_line_error(run("new-plugin", "my_thing", "--dest", str(dest)), "'my-thing'")
    assert not any(dest.iterdir())


def test_new_plugin_into_a_file_is_one_line(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    one_line_error(run("new-plugin", "fresh", "--dest", str(f)), "--dest", "not a directory")
    one_line_error(run("new-plugin", "fresh", "--dest", str(f / "below")), "--dest", "not a directory")


def test_a_name_of_two_distributions_is_reported_not_picked(tmp_path, fake_dists):
    fake_dists("advplug-dup-one", dup=TARGET)
    fake_dists("advplug-dup-two", dup=TARGET)
    with pytest.raises(PluginError, match=r"'dup'.*advplug-dup-one.*advplug-dup-two.*pip uninstall"):
        enable(["dup"])
    listing = run("plugins")
    assert listing.exit_code == 0, listing.output
    warning = [x for x in listing.stderr.splitlines() if "dup" in x]
    assert warning and "warning" in warning[0] and "advplug-dup-one" in warning[0] and "advplug-dup-two" in warning[0]
    assert "dup" in listing.stdout and "advplug-dup-two" in listing.stdout
    doc = run("plugins", "--json")
    assert '"advplug-dup-one"' in doc.stdout and '"duplicates"' in doc.stdout
    one_line_error(
        run("train", "--plugin", "dup", "--out", str(tmp_path / "r")), "advplug-dup-one", "advplug-dup-two", "pip"
    )
    assert not (tmp_path / "r").exists()
    assert "registered by 2 distributions" in run("train", "--plugin", "dup", "--help").stdout


def test_mistyped_plugin_gets_the_closest_name(tmp_path):
    one_line_error(run("train", "--plugin", "mial", "--out", str(tmp_path / "r")), "did you mean mail?", "installed:")
    one_line_error(run("train", "--objective", "trade", "--out", str(tmp_path / "r")), "did you mean trades?")
    one_line_error(run("hooks", "--plugin", "gairta"), "did you mean gairat?")


@pytest.mark.parametrize(
    "args,hint",
    [
        (["train", "--epoch", "3"], "--epochs"),
        (["train", "--attack-bm", "train"], "--attack-bn"),
        (["train", "--mial-gamma", "2"], "--mail-gamma"),
        (["hooks", "--objectiv", "trades"], "--objective"),
    ],
)
def test_mistyped_option_gets_the_closest_name(tmp_path, args, hint):
    """click's own "No such option ... Did you mean" (its wording differs between click versions)."""
    res = run(*args, *(["--out", str(tmp_path / "r")] if args[0] == "train" else []))
    assert res.exit_code == 2 and "No such option" in res.stderr, res.output
    assert "Did you mean" in res.stderr and hint in res.stderr.split("Did you mean")[1], res.stderr
    assert "Traceback" not in res.output


def test_mistyped_plugin_option_gets_the_closest_name(tmp_path):
    one_line_error(
        run("train", "--plugin", "mail", "--mail-gama", "2", "--out", str(tmp_path / "r")),
        "--mail-gama",
        "did you mean --mail-gamma?",
    )
    one_line_error(run("hooks", "--plugin", "lrat", "--lrat-flor", "saa"), "did you mean --lrat-floor?")


def test_mistyped_attack_gets_the_closest_name():
    with pytest.raises(OptionError, match=r"did you mean pgd20\?"):
        parse_eval_attack("pgd-20")
    with pytest.raises(OptionError, match=r"did you mean apgd-ce\?"):
        parse_eval_attack("apgd")


def test_hooks_takes_plugin_options():
    default = run("hooks", "--plugin", "lrat")
    saa = run("hooks", "--plugin", "lrat", "--lrat-floor", "saa")
    assert default.exit_code == 0 and saa.exit_code == 0, saa.output
    assert "x* = pgd" in default.output and "x* = saa" in saa.output
    one_line_error(run("hooks", "--plugin", "lrat", "--lrat-floor", "bogus"), "--lrat-floor")
    one_line_error(run("hooks", "--plugin", "lrat", "--mail-gamma", "2"), "add --plugin mail")


@pytest.mark.parametrize("impostor", ["advplug-fake", "zz-fake"])  # sorted before and after the shipped one
def test_a_shipped_name_taken_by_another_distribution_suggests_uninstalling_the_other(impostor):
    msg = plugins.duplicate_message("mail", sorted([(impostor, "0.1.0"), ("advplug-mail", "0.1.0")]))
    assert f"pip uninstall {impostor})" in msg and "uninstall advplug-mail" not in msg, msg


def test_a_shipped_name_taken_by_an_installed_impostor_suggests_uninstalling_it(fake_dists):
    if "mail" not in plugins.installed():
        pytest.skip("advplug-mail is not installed")
    fake_dists("advplug-fake", mail=TARGET)
    with pytest.raises(PluginError, match=r"pip uninstall advplug-fake\)"):
        enable(["mail"])
