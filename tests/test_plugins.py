"""Plugin discovery, loading, options and the errors around them."""

import pytest

from advplug import OptionError, PluginError
from advplug.plugins import enable, hook_order, installed, loss_owners
from advplug.testing import installed_plugins


def test_meow_is_discovered_through_the_entry_point_group():
    assert "meow" in installed()


def test_unknown_plugin_lists_installed_ones():
    with pytest.raises(PluginError, match=r'unknown plugin "nope" \(installed: .*meow'):
        enable(["nope"])


def test_import_failure_is_reported_with_the_plugin_name():
    with installed_plugins(broken="advplug_no_such_module:Thing"):
        with pytest.raises(PluginError, match='Error importing plugin "broken": ModuleNotFoundError'):
            enable(["broken"])


def test_only_named_plugins_are_loaded():
    with installed_plugins(broken="advplug_no_such_module:Thing"):
        en = enable(["meow"])  # the broken one is installed but never imported
    assert en.names == ["meow"] and en.plugin("meow") is not None


def test_misspelt_hook_is_rejected():
    with installed_plugins(misspelt="advplug.testing:Misspelt"):
        with pytest.raises(PluginError, match="compute_weight"):
            enable(["misspelt"])


def test_plugin_options_are_routed_converted_and_validated():
    en = enable(["meow"], "at", {"meow-temperature": "5", "meow-select": "all"})
    assert en.plugin("meow").options.temperature == 5.0
    with pytest.raises(OptionError, match="--meow-temperature: must be > 0.0"):
        enable(["meow"], "at", {"meow-temperature": "0"})
    with pytest.raises(OptionError, match="--meow-select: 'some' is not one of wrong, all"):
        enable(["meow"], "at", {"meow-select": "some"})
    with pytest.raises(OptionError, match="expected float"):
        enable(["meow"], "at", {"meow-temperature": "warm"})
    with pytest.raises(OptionError, match="unknown option --meow-temp"):
        enable(["meow"], "at", {"meow-temp": "1"})


def test_options_for_a_plugin_that_is_not_enabled_are_an_error():
    with pytest.raises(OptionError, match="--meow-temperature is for 'meow', which is not enabled"):
        enable([], "at", {"meow-temperature": "5"})
    with pytest.raises(OptionError, match="add --objective trades"):
        enable([], "at", {"trades-beta": "5"})
    with pytest.raises(OptionError, match="no such option"):
        enable([], "at", {"frobnicate": "5"})


def test_unknown_objective_and_objective_given_as_plugin():
    with pytest.raises(OptionError, match="unknown objective 'xent'"):
        enable([], "xent")
    with pytest.raises(PluginError, match="use --objective trades"):
        enable(["trades"])


def test_two_loss_owners_are_an_error_naming_both():
    with installed_plugins(owner="advplug.testing:SecondOwner"):
        with pytest.raises(PluginError, match="'trades' and 'owner' both own the training loss"):
            enable(["owner"], "trades")
        en = enable(["owner"], "at")  # at is trylast: it yields to another owner
        assert loss_owners(en) == ["owner"]


def test_meow_owns_the_loss_with_at_and_yields_to_trades():
    assert loss_owners(enable(["meow"], "at")) == ["meow"]
    assert loss_owners(enable(["meow"], "trades")) == ["trades"]


def test_hook_order_lists_wrappers_and_trylast():
    with installed_plugins(nan="advplug.testing:NaNLoss"):
        order = hook_order(enable(["nan"], "at").pm)["combine_loss"]
    assert order[0] == {"plugin": "nan", "wrapper": True, "tryfirst": False, "trylast": False}
    assert order[-1]["plugin"] == "at" and order[-1]["trylast"]


def test_third_party_example_plugin_is_installed_and_combines():
    assert "focal" in installed()  # examples/advplug-focal, installed by the README's test command
    en = enable(["focal", "meow"], "at", {"focal-gamma": "1.5"})
    assert en.plugin("focal").options.gamma == 1.5
    assert [i["plugin"] for i in hook_order(en.pm)["compute_weights"]] == ["meow", "focal"]
