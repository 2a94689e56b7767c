"""`advplug new-plugin NAME`: the package installs, shows up in `advplug plugins`, passes its own
generated test and imports only advplug's public surface. Installed with pip --target into a
temporary directory put on PYTHONPATH, so the shared environment never sees the generated plugin."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from advplug.errors import OptionError
from advplug.tools.cli import cli
from advplug.tools.template import names, new_plugin

PUBLIC = {"advplug", "advplug.signals"}
TEST_HELPERS = {"advplug.testing"}


def test_names():
    n = names("my_method")
    assert (n["prefix"], n["dist"], n["module"], n["cls"]) == (
        "my-method",
        "advplug-my-method",
        "advplug_my_method",
        "MyMethodWeights",
    )
    for bad in ("My", "1x", "a b", "x-", "class"):
        with pytest.raises(OptionError):
            names(bad)


@pytest.mark.slow
def test_generated_package_installs_lists_and_passes_its_test(tmp_path):
    r = CliRunner().invoke(cli, ["new-plugin", "my_method", "--dest", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    pkg = tmp_path / "advplug-my-method"
    assert (pkg / "pyproject.toml").is_file() and (pkg / "src" / "advplug_my_method" / "__init__.py").is_file()
    again = CliRunner().invoke(cli, ["new-plugin", "my_method", "--dest", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(pkg),
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "advplug", "plugins", "--json"], env=env, check=True, capture_output=True, text=True
    ).stdout
    plugin = [p for p in json.loads(out)["plugins"] if p["name"] == "my_method"]
    assert plugin and {o["flag"] for o in plugin[0]["options"]} == {
        "--my-method-gamma",
        "--my-method-burn-in",
        "--my-method-normalise",
    }
    test = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
        env=env,
        cwd=pkg,
        capture_output=True,
        text=True,
    )
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-2000:]


def _advplug_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return {m for m in found if m == "advplug" or m.startswith("advplug.")}


def test_generated_code_imports_only_the_public_surface(tmp_path):
    pkg = new_plugin("my-method", tmp_path)
    assert _advplug_imports(pkg / "src" / "advplug_my_method" / "__init__.py") <= PUBLIC
    assert _advplug_imports(pkg / "tests" / "test_my_method.py") <= PUBLIC | TEST_HELPERS
