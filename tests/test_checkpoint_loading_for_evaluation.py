"""One way to load a checkpoint for evaluation: ``advplug eval``, ``eval --suite robustbench`` and ``export`` read a
checkpoint by the same names, rebuild its model and take its data set's test points alike, and refuse a checkpoint
they cannot evaluate with the same line."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from advplug.data import load_digits_tensors
from advplug.engine.trainer import Trainer
from advplug.errors import CheckpointError
from advplug.models import build_model
from advplug.run import checkpoint
from advplug.testing import digits_subset, tiny_config
from advplug.tools.cli import cli
from advplug.tools.eval_inputs import checkpoint_model, checkpoint_test_set, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def _write_npz(path, side=8):
    (xt, yt), (xs, ys) = load_digits_tensors()
    crop = (slice(None), slice(None), slice(0, side), slice(0, side))
    np.savez(
        path,
        x_train=xt[:128][crop].numpy(),
        y_train=yt[:128].numpy(),
        x_test=xs[:40][crop].numpy(),
        y_test=ys[:40].numpy(),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny two-epoch run with EMA weights on 128 + 40 digits saved as an npz file (a test set of known size)."""
    root = tmp_path_factory.mktemp("load")
    _write_npz(root / "digits.npz")
    cfg = tiny_config(str(root / "run"), data=f"npz:{root / 'digits.npz'}", ema=0.9, n_eval=16)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg, log=lambda s: None).fit()
    finally:
        torch.set_num_threads(n)
    return root


@pytest.fixture
def run_dir(trained, tmp_path):
    """A copy of the run that a test may damage."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run"


def error_line(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def _refusals(run_dir, tmp_path, export=True):
    """The error lines of ``eval``, ``eval --suite robustbench`` and (``export``) ``export`` of the run's last
    checkpoint."""
    lines = {
        error_line("eval", run_dir, "--which", "last", "--attack", "natural"),
        error_line("eval", run_dir, "--which", "last", "--suite", "robustbench"),
    }
    if export:
        lines.add(error_line("export", run_dir, "--which", "last", "--out", tmp_path / "zoo"))
    return lines


# -- the checkpoint by name ------------------------------------------------------------------------------------------
def test_names_read_the_recorded_best_the_last_and_their_ema_weights(trained):
    run = trained / "run"
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    best = load_checkpoint(run, "best")
    assert best["epoch"] == last.get("best_epoch", last["epoch"]) and best["path"] == str(run / "best.pt")
    best_ema = load_checkpoint(run, "best-ema")
    assert best_ema["epoch"] == last.get("best_ema_epoch", last["epoch"]) and best_ema["path"] == str(
        run / "best-ema.pt"
    )
    assert load_checkpoint(run, "last")["model"].keys() == last["model"].keys()
    for k, v in load_checkpoint(run, "last-ema")["model"].items():
        assert torch.equal(v, last["ema"]["model"][k])
    assert any(not torch.equal(v, last["model"][k]) for k, v in load_checkpoint(run, "last-ema")["model"].items())
    assert load_checkpoint(run / "best.pt", None)["path"] == str(run / "best.pt")  # a checkpoint file


# -- the model and the test points -----------------------------------------------------------------------------------
def test_the_model_has_the_checkpoints_weights_in_eval_mode(trained):
    ck = load_checkpoint(trained / "run", "last")
    cfg, net = checkpoint_model(ck, None)
    assert cfg.model == "digits-cnn" and not net.training
    ref = build_model("digits-cnn", 10, (1, 8, 8))
    ref.load_state_dict(torch.load(trained / "run" / "last.pt", weights_only=True)["model"])
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x), ref.eval()(x))


@pytest.mark.parametrize("n,want", [(16, 16), (None, 40), (1000, 40)])
def test_the_test_points_are_the_first_n_of_the_data_sets_test_set(trained, n, want):
    ck = load_checkpoint(trained / "run", "last")
    cfg, _ = checkpoint_model(ck, None)
    x, y, total = checkpoint_test_set(cfg, ck, None, n, torch.device("cpu"))
    _, (xs, ys) = load_digits_tensors()
    assert total == 40 and torch.equal(y, ys[:want]) and torch.allclose(x, xs[:want], atol=1 / 255)


# -- refusals, the same line from every command ----------------------------------------------------------------------
def test_a_data_set_that_does_not_fit_the_checkpoint_is_refused_alike(run_dir, tmp_path):
    """The run's data set changed since training (here: its images cropped to 6x6)."""
    _write_npz(tmp_path / "cropped.npz", side=6)
    ck = checkpoint.load(run_dir, need="training")
    ck["config"] = json.dumps({**json.loads(ck["config"]), "data": f"npz:{tmp_path / 'cropped.npz'}"})
    checkpoint.save(run_dir / "last.pt", {k: v for k, v in ck.items() if k not in ("path", "format", "version")})
    lines = _refusals(run_dir, tmp_path, export=False)  # export reads no test points
    assert len(lines) == 1, lines
    line = lines.pop()
    assert "was trained for 10 classes of shape (1, 8, 8), but its data set" in line
    assert "has 10 classes of shape (1, 6, 6)" in line


def test_a_model_that_cannot_be_built_is_refused_alike(tmp_path):
    """A damaged input shape that asks for more memory than there is address space (1 EiB): one line naming the
    classes and shape, and the cause's first line."""
    run = tmp_path / "run"
    Trainer(tiny_config(str(run), epochs=1, model="fc1"), data=digits_subset(64, 16), log=lambda s: None).fit()
    ck = checkpoint.load(run, need="training")
    ck["input_shape"] = [1 << 16] * 3
    checkpoint.save(run / "last.pt", {k: v for k, v in ck.items() if k not in ("path", "format", "version")})
    lines = _refusals(run, tmp_path)
    assert len(lines) == 1, lines
    line = lines.pop()
    assert (
        f"{str(run / 'last.pt')!r}: model 'fc1' cannot be built for 10 classes of shape (65536, 65536, 65536)" in line
    )
    assert "can't allocate memory" in line
    with pytest.raises(CheckpointError, match="cannot be built"):
        checkpoint_model(load_checkpoint(run, "last"), None)
