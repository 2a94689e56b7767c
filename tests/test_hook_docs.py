"""Every hook spec is documented as a contract (in its docstring and in the README)."""

import inspect
from pathlib import Path

import pytest

from advplug import hookspecs

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SPECS = [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "advplug_spec")]


def test_spec_names_list_is_complete():
    assert sorted(SPECS) == sorted(hookspecs.SPEC_NAMES)


@pytest.mark.parametrize("name", SPECS)
def test_spec_docstring_is_a_contract(name):
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc and "**Combining**" in doc, f"{name}: say how results of several plugins combine"
    for arg in inspect.signature(getattr(hookspecs, name)).parameters:
        assert f":param {arg}:" in doc, f"{name}: document argument {arg}"


@pytest.mark.parametrize("name", SPECS)
def test_readme_documents_every_hook(name):
    assert f"`{name}`" in README
