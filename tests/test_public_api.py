"""The plugin author's import surface (``advplug/__init__.py``): every public name resolves, the
README's "Writing a plugin" lists each one, and importing advplug loads none of the wings (the
engine, the run store, the data sources, the tools) until a name from them is used."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import advplug

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_public_name_resolves():
    for name in advplug.__all__:
        assert getattr(advplug, name) is not None, name
    assert set(advplug.__all__) <= set(dir(advplug))


def test_readme_lists_the_public_api():
    text = README.read_text()
    section = text[text.index("## Writing a plugin") :]
    section = section[: section.index("\n## ", 1)]
    listed = set(re.findall(r"`([A-Za-z_]+)", section))
    assert set(advplug.__all__) - {"__version__"} <= listed


@pytest.mark.slow
def test_importing_advplug_loads_no_wing():
    code = (
        "import sys, advplug, advplug.signals; "
        "print(sorted(m for m in sys.modules if m.split('.')[:2][-1] in ('engine', 'run', 'data', 'tools')"
        " and m.startswith('advplug.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
