"""Bad input from a new user's first hour: one line and exit 2 (or a clear exception from Python), never a
traceback or a silently wrong run. A learning-rate milestone the run never reaches; unreadable, YAML or run-made
config files; a sweep whose out is a file; eval's batch size; the Python API's attack names and test images of
another shape; npz files that are not npz archives; a folder holding only train/; ART's AutoAttack without
``multiprocess`` and its run time."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from click.testing import CliRunner

import advplug.tools.api as ap
from advplug.config import DATA_DEFAULTS, TrainConfig, build_config, load_config_file, read_run_config
from advplug.data import load_dataset
from advplug.engine.trainer import Trainer
from advplug.errors import AdvplugError, DataError, OptionError
from advplug.evaluate import evaluate
from advplug.testing import digits_subset, tiny_config
from advplug.tools import sweep as sw
from advplug.tools.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(res, pattern):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].lower().startswith("error: ") and pattern in lines[0], res.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-epoch run on a digits slice (milestones derived from the epochs: (1,))."""
    out = tmp_path_factory.mktemp("run") / "run"
    Trainer(tiny_config(str(out), epochs=2, milestones=None), data=digits_subset(64, 16), log=lambda s: None).fit()
    return out


# -- the schedule ------------------------------------------------------------------------------
def test_a_milestone_at_or_past_the_last_epoch_is_an_error(tmp_path):
    with pytest.raises(OptionError, match=r"--milestones 50 is at or past --epochs 2"):
        TrainConfig(epochs=2, milestones=(50,)).resolved()
    with pytest.raises(OptionError, match=r"--milestones 2, 3 are at or past --epochs 2"):
        TrainConfig(epochs=2, milestones=(1, 2, 3)).resolved()
    one_line_error(run("train", "--milestones", "50", "--epochs", "2", "--out", tmp_path / "r"), "--milestones 50")
    with pytest.raises(OptionError, match="--milestones 50"):
        ap.train(epochs=2, milestones=[50], out=tmp_path / "api", log=None)
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'out = "{tmp_path / "sw"}"\n[base]\nepochs = 2\nmilestones = [50]\n')
    with pytest.raises(OptionError, match="point at-seed0: --milestones 50 is at or past --epochs 2"):
        sw.load_sweep(sweep)


def test_the_default_schedules_never_trip_it():
    for data in [*DATA_DEFAULTS, "npz:x.npz"]:
        for epochs in range(1, 301):
            assert all(m < epochs for m in TrainConfig(data=data, epochs=epochs).resolved().milestones)


def test_a_recorded_run_with_an_unreached_milestone_is_still_read(tmp_path):
    """Runs made before the check keep their config.json readable (compare, report, eval)."""
    rec = {**TrainConfig(epochs=1).resolved().to_json(), "milestones": [1], "num_train": 10}
    (tmp_path / "config.json").write_text(json.dumps(rec))
    assert read_run_config(tmp_path)["milestones"] == [1]


# -- config and sweep files ----------------------------------------------------------------------
def test_an_unreadable_config_or_sweep_file(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text("epochs = 1\n")
    real = Path.read_text

    def denied(self, *a, **k):
        if Path(self) == f:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    one_line_error(run("train", "--config", f, "--out", tmp_path / "r"), "cannot be read (Permission denied)")
    one_line_error(run("sweep", f), "cannot be read (Permission denied)")
    one_line_error(run("train", "--config", tmp_path, "--out", tmp_path / "r"), "is a directory")


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_a_yaml_config_says_which_formats_are_read(tmp_path, suffix):
    f = tmp_path / f"c{suffix}"
    f.write_text("epochs: 2\nplugins: [mail]\n")
    one_line_error(run("train", "--config", f, "--out", tmp_path / "r"), "config files are JSON or TOML")
    one_line_error(run("sweep", f), "sweep files are JSON or TOML")


def test_a_runs_own_config_json_is_accepted(trained, tmp_path):
    """The natural thing to try: the run's settings, without its record-only keys and its directory; the
    schedule the run derived from its epochs follows a new --epochs."""
    path = trained / "config.json"
    saved = json.loads(path.read_text())
    cfg = build_config(path)
    assert cfg.out is None and cfg.eps == saved["eps"] and cfg.steps == saved["steps"] and cfg.seed == saved["seed"]
    assert build_config(path, {"epochs": 5}).resolved().milestones == (3, 4)
    assert build_config(path).resolved().milestones == tuple(saved["milestones"]) == (1,)
    explicit, older = tmp_path / "explicit.json", tmp_path / "older.json"
    explicit.write_text(json.dumps({**saved, "milestones_derived_from": None}))  # given with --milestones: kept
    assert build_config(explicit, {"epochs": 5}).resolved().milestones == (1,)
    older.write_text(json.dumps({k: v for k, v in saved.items() if k != "milestones_derived_from"}))
    assert build_config(older, {"epochs": 5}).resolved().milestones == (3, 4)  # the digits schedule: derived
    # parsed (the error is --eps's, not "unknown setting 'num_train'")
    one_line_error(run("train", "--config", path, "--eps", "2", "--out", tmp_path / "r"), "--eps must be < 1")
    assert load_config_file(path)["final_attacks"] == saved["final_attacks"]


def test_a_sweep_whose_out_is_a_file(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    f = tmp_path / "s.toml"
    f.write_text(f'out = "{taken}"\n[base]\nepochs = 1\n')
    one_line_error(run("sweep", f, "--dry-run"), "is a file, not a directory")
    one_line_error(run("sweep", f), "is a file, not a directory")
    assert taken.read_text() == "x"


# -- eval and the Python API -------------------------------------------------------------------
def test_eval_batch_size_must_be_positive(trained):
    res = run("eval", trained, "--attack", "natural", "--batch-size", "0")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "Invalid value for '--batch-size'" in res.output


def test_api_evaluate_takes_one_attack_as_a_string(trained):
    assert set(ap.evaluate(trained, "pgd5", n_eval=32)) == {"PGD-5"}


def test_api_evaluate_names_both_shapes(trained):
    x, y = torch.rand(8, 1, 16, 16), torch.zeros(8, dtype=torch.long)
    with pytest.raises(AdvplugError, match=r"\(1, 16, 16\).*\(1, 8, 8\)"):
        ap.evaluate(trained, ["natural"], test=(x, y))
    with pytest.raises(AdvplugError, match="label 12.*10 classes"):
        ap.evaluate(trained, ["natural"], test=(torch.rand(8, 1, 8, 8), torch.full((8,), 12)))


# -- data files ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        (np.random.default_rng(0).bytes(1000), "not a valid npz/zip file"),
        (b"", "not a valid npz/zip file (it is empty)"),
        (b"\x80\x04\x95...pickled", "a Python pickle, which advplug never loads"),
        (b"\x93NUMPY\x01\x00", "one .npy array, not an .npz archive"),
    ],
    ids=["random-bytes", "empty", "pickle", "npy"],
)
def test_an_npz_that_is_not_an_npz_archive(tmp_path, content, message):
    p = tmp_path / "d.npz"
    p.write_bytes(content)
    with pytest.raises(DataError, match=f"not a valid npz|{message}") as e:
        load_dataset(f"npz:{p}")
    assert message in str(e.value) and "holds pickled objects" not in str(e.value)


def test_a_real_npy_file_named_npz(tmp_path):
    p = tmp_path / "d.npz"
    with open(p, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match="one .npy array, not an .npz archive"):
        load_dataset(f"npz:{p}")


def test_a_folder_holding_only_train(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("L", (4, 4)).save(tmp_path / "train" / c / "0.png")
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path}")
    assert "one class only" not in str(e.value)
    assert "has train/ but no test/" in str(e.value) and "class folders" in str(e.value)


# -- ART's AutoAttack ----------------------------------------------------------------------------
def test_multiprocess_is_a_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "multiprocess" for d in deps)


def test_art_autoattack_without_multiprocess_is_one_line(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "multiprocess", None)  # import multiprocess -> ImportError
    one_line_error(
        run("eval", trained, "--attack", "natural", "--attack", "aa", "--backend", "art"), "pip install multiprocess"
    )
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(OptionError, match="pip install multiprocess"):
        evaluate(net, torch.rand(4, 1, 8, 8), torch.zeros(4).long(), ["aa"], eps=0.1, backend="art")


def test_art_autoattack_warns_with_an_estimate_and_shows_progress(trained, monkeypatch):
    import art.attacks.evasion as evasion

    monkeypatch.setitem(sys.modules, "multiprocess", types.ModuleType("multiprocess"))
    seen = {}

    def generate(self, x, y=None, **kw):
        seen["verbose"] = [getattr(a, "verbose", None) for a in self.attacks]
        return x

    monkeypatch.setattr(evasion.AutoAttack, "generate", generate)
    lines = []
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(40, 1, 8, 8), torch.zeros(40).long()
    evaluate(net, x, y, ["aa"], eps=0.1, backend="art", progress=True, log=lines.append)
    (warning,) = [s for s in lines if "ART's AutoAttack" in s]
    assert "40 images" in warning and "min" in warning and "torchattacks" in warning
    assert any(v is True for v in seen["verbose"])
    res = run("eval", trained, "--attack", "aa", "--backend", "art", "--n-eval-aa", "16")
    assert res.exit_code == 0 and "ART's AutoAttack (its defaults: APGD-CE" in res.output, res.output


def test_a_mistyped_setting_gets_the_closest_name(tmp_path):
    from advplug.errors import OptionError
    from advplug.tools import api

    with pytest.raises(OptionError, match=r"unknown setting 'epoch' \(did you mean epochs\?\)"):
        api.train(epoch=1)
    bad = tmp_path / "c.json"
    bad.write_text('{"epoch": 1}')
    r = CliRunner().invoke(cli, ["train", "--config", str(bad)])
    assert r.exit_code == 2 and "did you mean epochs?" in r.output
