"""A user's model factory that fails is reported in one line, whatever its exception's text holds."""

import sys

import pytest

from advplug.errors import OptionError
from advplug.models import build_model


def test_a_factory_raising_a_multi_line_error_gives_one_line(tmp_path, monkeypatch):
    (tmp_path / "badmodels.py").write_text(
        "def net(num_classes, input_shape):\n"
        "    raise ValueError('\\n  weights file not found: w.pt\\nsecond line of detail\\n')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "badmodels", raising=False)
    with pytest.raises(OptionError) as err:
        build_model("badmodels:net", 10, (1, 8, 8), allow_import=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert "ValueError: weights file not found: w.pt" in msg
    assert "second line" not in msg
