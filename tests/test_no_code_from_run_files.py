"""No code imported because a run file names it: a config.json or checkpoint naming a model module
is refused on resume and eval (under ``python -m advplug`` from inside the run directory too),
and imported only when the user names it on the command line."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from advplug.engine.trainer import Trainer
from advplug.errors import OptionError
from advplug.run import checkpoint
from advplug.testing import digits_subset, tiny_config
from advplug.tools.cli import cli


def quiet(_):
    pass


def one_line_error(res, pattern, code=2):
    assert res.exit_code == code, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], res.stderr


def train(out, **kw):
    return Trainer(tiny_config(str(out), **kw), data=digits_subset(128, 32), log=quiet)


HOSTILE = """
from pathlib import Path
Path({marker!r}).write_text("code ran")
def make(num_classes, input_shape):
    import torch
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
"""


@pytest.fixture
def hostile_module(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    (tmp_path / "evilmod.py").write_text(HOSTILE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("evilmod", None)
    return marker


def test_a_run_directory_naming_code_is_not_imported_on_resume_or_eval(tmp_path, hostile_module):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model": "evilmod:make"}))
    res = CliRunner().invoke(cli, ["train", "--resume", str(out)])
    one_line_error(res, "advplug imports code only when you name it: add --model evilmod:make")
    # a checkpoint whose config names code
    ck = checkpoint.load(out, need="training")
    ck["config"] = json.dumps({**json.loads(ck["config"]), "model": "evilmod:make"})
    ck["model_name"] = "evilmod:make"
    checkpoint.save(out / "last.pt", {k: v for k, v in ck.items() if k not in ("path", "format", "version")})
    res = CliRunner().invoke(cli, ["eval", str(out / "last.pt"), "--attack", "natural"])
    one_line_error(res, "advplug imports code only when you name it: add --model evilmod:make")
    assert not hostile_module.exists()
    with pytest.raises(OptionError, match="imports code only when you name it"):
        from advplug.models import build_model

        build_model("evilmod:make", 10, (1, 8, 8))
    assert not hostile_module.exists()


@pytest.mark.slow
def test_python_m_advplug_does_not_import_from_a_run_directory(tmp_path):
    """``python -m advplug`` run from inside a hostile run directory: its config names code; the
    marker file must not appear."""
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    marker = tmp_path / "MARKER"
    (out / "evilmod.py").write_text(HOSTILE.format(marker=str(marker)))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model": "evilmod:make"}))
    ck = checkpoint.load(out, need="training")
    ck["config"] = json.dumps({**json.loads(ck["config"]), "model": "evilmod:make"})
    checkpoint.save(out / "last.pt", {k: v for k, v in ck.items() if k not in ("path", "format", "version")})
    for args in (["train", "--resume", "."], ["eval", ".", "--which", "last", "--attack", "natural"]):
        res = subprocess.run(
            [sys.executable, "-m", "advplug", *args], cwd=out, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 2 and "imports code only when you name it" in res.stderr, res.stderr[-1500:]
    assert not marker.exists()


def test_the_user_may_name_their_own_model_and_repeat_it_to_resume(tmp_path, hostile_module):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        [
            "train",
            "--model",
            "evilmod:make",
            "--epochs",
            "1",
            "--steps",
            "1",
            "--eval-steps",
            "1",
            "--n-eval",
            "32",
            "--no-progress",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert hostile_module.exists()  # named on the command line: imported, as asked
    one_line_error(
        CliRunner().invoke(cli, ["eval", str(out), "--which", "last", "--attack", "natural"]),
        "add --model evilmod:make",
    )
    res = CliRunner().invoke(
        cli, ["eval", str(out), "--which", "last", "--attack", "natural", "--model", "evilmod:make"]
    )
    assert res.exit_code == 0, res.output
