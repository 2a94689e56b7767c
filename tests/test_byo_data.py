"""Your own data (folder:, npz:, module:), its one-line errors, the import rule for
module: data, the schedule that follows --epochs, strict JSON from `advplug plugins --json`."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from advplug.config import TrainConfig, milestones_for
from advplug.data import load_dataset
from advplug.errors import DataError
from advplug.tools.cli import cli

FAST = [
    "--steps",
    "1",
    "--eval-steps",
    "1",
    "--n-eval",
    "16",
    "--batch-size",
    "16",
    "--no-progress",
    "--selection-size",
    "8",
    "--model",
    "digits-cnn",
]


def _png(path: Path, value: int, size=(6, 6), mode="L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def make_folder(root: Path, classes=("cat", "dog"), per_class=12, split=True, mode="L") -> Path:
    for k, c in enumerate(classes):
        for i in range(per_class):
            part = ("train" if i < per_class - 3 else "test") if split else ""
            _png(root / part / c / f"{i}.png", 40 + 150 * k + i, mode=mode)
    return root


def make_npz(path: Path, n=40, k=3, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (n, 6, 6), dtype=np.uint8),
        y_train=np.arange(n) % k,
        x_test=rng.integers(0, 256, (12, 6, 6), dtype=np.uint8),
        y_test=np.arange(12) % k,
    )
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def run(args, expect=0):
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == expect, r.output
    return r


def error_line(r) -> str:
    """The error: exactly one line on stderr, no traceback."""
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


# -- the schedule ------------------------------------------------------------------------------
def test_milestones_are_fractions_of_the_run():
    assert TrainConfig(data="cifar10").resolved().milestones == (60, 90)  # the papers' 120-epoch schedule
    assert TrainConfig(data="digits").resolved().milestones == (12, 17)
    assert TrainConfig(data="cifar10", epochs=40).resolved().milestones == (20, 30)
    assert TrainConfig(epochs=3).resolved().milestones == (1, 2)
    assert TrainConfig(epochs=2).resolved().milestones == (1,)
    assert TrainConfig(epochs=1).resolved().milestones == ()
    assert TrainConfig(epochs=3, milestones=(2,)).resolved().milestones == (2,)  # explicit wins
    assert milestones_for(10, (0.5, 0.55)) == (5,)  # a drop counted once


@pytest.mark.parametrize("plugin", ["mail", "gairat"])
def test_burn_in_follows_epochs(tmp_path, plugin):
    # `--plugin mail --epochs 3` stopped with "--mail-burn-in 12 is not before the last epoch"
    npz = make_npz(tmp_path / "d.npz")
    run(
        [
            "train",
            "--plugin",
            plugin,
            "--epochs",
            "2",
            "--data",
            f"npz:{npz}",
            "--out",
            str(tmp_path / "r"),
            *FAST,
            "--steps",
            "2",
        ]
    )
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["milestones"] == [1]


# -- plugins --json ----------------------------------------------------------------------------
def test_plugins_json_is_strict():
    out = run(["plugins", "--json"]).output

    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")

    doc = json.loads(out, parse_constant=refuse)
    gairat = [p for p in doc["plugins"] if p["name"] == "gairat"]
    if gairat:
        lam = [o for o in gairat[0]["options"] if o["name"] == "lambda_max"][0]
        assert lam["default"] == "inf"


# -- sources -----------------------------------------------------------------------------------
def test_folder_train_test(tmp_path):
    b = load_dataset(f"folder:{make_folder(tmp_path / 'imgs')}")
    assert b.num_classes == 2 and b.input_shape == (1, 6, 6)
    assert b.num_train == 18 and len(b.test[1]) == 6
    assert 0 <= float(b.train[0].min()) and float(b.train[0].max()) <= 1
    assert b.train[1].tolist() == [0] * 9 + [1] * 9  # classes in sorted folder order


def test_folder_single_split_is_seeded_and_stratified(tmp_path):
    root = make_folder(tmp_path / "imgs", split=False, mode="RGB", per_class=10)
    a, b = load_dataset(f"folder:{root}"), load_dataset(f"folder:{root}")
    assert a.input_shape == (3, 6, 6)
    assert torch.equal(a.test[0], b.test[0]) and a.test[1].tolist() == [0, 0, 1, 1]
    assert a.num_train == 16


def test_folder_resize_only_when_asked(tmp_path):
    root = make_folder(tmp_path / "imgs")
    _png(root / "train" / "cat" / "big.png", 9, size=(10, 8))
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        load_dataset(f"folder:{root}")
    assert load_dataset(f"folder:{root}", image_size=5).input_shape == (1, 5, 5)


def test_npz(tmp_path):
    b = load_dataset(f"npz:{make_npz(tmp_path / 'd.npz')}")
    assert b.num_classes == 3 and b.input_shape == (1, 6, 6) and b.train[0].dtype == torch.float32
    channels_last = make_npz(
        tmp_path / "c.npz",
        x_train=np.random.rand(40, 5, 5, 3).astype(np.float32),
        x_test=np.random.rand(12, 5, 5, 3).astype(np.float32),
    )
    assert load_dataset(f"npz:{channels_last}").input_shape == (3, 5, 5)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(y_train=np.zeros(40, dtype=int)), "one class only"),
        (dict(y_test=np.full(12, 7)), "out of range"),
        (dict(y_train=np.arange(40) % 3 - 1), "negative labels"),
        (dict(x_train=np.full((40, 6, 6), 2.0)), r"in \[0, 1\]"),
        (dict(x_train=np.full((40, 6, 6), np.nan)), "NaN"),
        (dict(x_test=np.zeros((12, 7, 7), np.uint8)), "train images are"),
        (dict(y_train=np.arange(39) % 3), "39 labels for 40 images"),
        (dict(x_train=np.array([[1], "a"], dtype=object)), "cannot be read as plain arrays"),
        (dict(x_train=np.array([[1], "a"], dtype=object)), "it holds pickled objects, which advplug never loads"),
        (dict(x_train=np.full((40, 6, 6), "a")), "images must be uint8 .* got <U1"),
        (dict(y_train=np.array(["a", "b", "c", "d"] * 10)), "labels must be integers 0..K-1, got <U1"),
        (dict(y_train=np.where(np.arange(40) % 3 == 2, 2**40, np.arange(40) % 3)), "K at most 100000"),
        (dict(x_train=np.zeros((40, 1, 0, 6), np.float32)), "hold no pixels"),
    ],
)
def test_npz_errors(tmp_path, override, message):
    p = make_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError, match=message):
        load_dataset(f"npz:{p}")


def test_folder_errors_one_line(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    r = run(["train", "--data", f"folder:{tmp_path / 'empty'}", "--out", str(tmp_path / "r1")], expect=2)
    assert "no images found" in error_line(r)
    one = tmp_path / "one"
    for i in range(3):
        _png(one / "cat" / f"{i}.png", i)
    r = run(["train", "--data", f"folder:{one}", "--out", str(tmp_path / "r2")], expect=2)
    assert "one class only" in error_line(r)
    r = run(["train", "--data", f"npz:{tmp_path / 'missing.npz'}", "--out", str(tmp_path / "r3")], expect=2)
    assert "no such file" in r.output
    assert not (tmp_path / "r1").exists() or not (tmp_path / "r1" / "last.pt").exists()
    cut = make_folder(tmp_path / "cut", per_class=4)  # a truncated image: its header reads, its pixels do not
    png = cut / "train" / "cat" / "0.png"
    from PIL import Image

    Image.effect_noise((32, 32), 64).save(png)
    png.write_bytes(png.read_bytes()[:200])
    with pytest.raises(DataError, match="0.png is not a readable image"):
        load_dataset(f"folder:{cut}", image_size=6)
    _png(png, 1, size=(64, 64))  # a decompression bomb, as PIL's pixel limit sees it (lowered here)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        with pytest.raises(DataError, match="0.png is not a readable image .*decompression bomb"):
            load_dataset(f"folder:{cut}", image_size=6)


def test_train_eval_on_folder(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=16)
    out = tmp_path / "run"
    run(["train", "--data", f"folder:{root}", "--epochs", "1", "--out", str(out), *FAST])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == f"folder:{root}" and cfg["num_selection"] == 8  # the selection split still held out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val_pgd_acc" in metrics[0]
    run(["eval", str(out), "--attack", "natural"])


@pytest.mark.slow
def test_auto_model_follows_the_input_shape(tmp_path):
    npz = make_npz(
        tmp_path / "d.npz",
        x_train=np.random.rand(40, 3, 20, 20).astype(np.float32),
        x_test=np.random.rand(12, 3, 20, 20).astype(np.float32),
    )
    out = tmp_path / "run"
    args = [a for a in FAST if a not in ("--model", "digits-cnn")]
    run(["train", "--data", f"npz:{npz}", "--epochs", "1", "--out", str(out), *args])
    assert json.loads((out / "config.json").read_text())["model"] == "small-cnn"


# -- module: data is code, imported only when the user names it ---------------------------------
MODULE = """
import pathlib
import numpy as np
pathlib.Path({marker!r}).write_text("imported")
def data():
    rng = np.random.default_rng(0)
    return ((rng.random((32, 1, 6, 6), dtype=np.float32), np.arange(32) % 2),
            (rng.random((8, 1, 6, 6), dtype=np.float32), np.arange(8) % 2))
"""


@pytest.mark.slow
def test_module_data_and_the_import_rule(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    (tmp_path / "my_data_i15.py").write_text(textwrap.dedent(MODULE.format(marker=str(marker))))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "module:my_data_i15:data"
    out = tmp_path / "run"
    run(["train", "--data", spec, "--epochs", "1", "--out", str(out), *FAST])
    assert marker.exists()
    marker.unlink()
    sys.modules.pop("my_data_i15", None)
    # a run directory naming module: data never imports it by itself
    for args in (["train", "--resume", str(out)], ["eval", str(out), "--attack", "natural"]):
        r = run(args, expect=2)
        line = error_line(r)
        assert "imports code only when you name it" in line and f"--data {spec}" in line
        assert not marker.exists()
    # a hostile run directory: config.json edited to name other code
    cfg = json.loads((out / "config.json").read_text())
    evil = tmp_path / "evil_i15.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('evil')\ndef data(): pass\n")
    cfg["data"] = "module:evil_i15:data"
    (out / "config.json").write_text(json.dumps(cfg))
    r = run(["train", "--resume", str(out)], expect=2)
    assert "module:evil_i15:data" in r.output and not marker.exists()
    r = run(["report", str(out)])
    assert not marker.exists()
    # repeating it is how the user vouches for it
    r = run(["eval", str(out), "--attack", "natural", "--data", spec])
    assert marker.exists()


# -- the Python API ------------------------------------------------------------------------------
def test_python_api_in_memory(tmp_path):
    import advplug.tools.api as ap
    from advplug.errors import OptionError, RunDirError

    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 1, 6, 6, generator=g)
    y = torch.arange(48) % 3
    data = ((x[:40], y[:40]), (x[40:], y[40:]))
    out = tmp_path / "run"
    res = ap.train(
        data=data,
        out=out,
        epochs=2,
        steps=1,
        eval_steps=1,
        batch_size=16,
        selection_size=8,
        final_attacks=("natural",),
        log=None,
    )
    assert res.run_dir == out and res.config["data"] == "python" and res.config["model"] == "digits-cnn"
    assert res.config["milestones"] == [1] and len(res.metrics) == 2 and "val_pgd_acc" in res.metrics[0]
    assert any(k.startswith("last") for k in res.results)
    assert res.model("last")(x[:2]).shape == (2, 3)
    with pytest.raises(RunDirError):  # the CLI's guarantees: one run per directory
        ap.train(data=data, out=out, epochs=1, log=None)
    with pytest.raises(OptionError, match="in memory|from Python"):
        ap.train(resume=out, log=None)
    acc = ap.evaluate(out, ["natural"], which="last", test=data[1])
    assert set(acc) == {"Natural"}
    with pytest.raises(DataError):  # bad data: the same one-line errors
        ap.train(data=((x[:40], torch.zeros(40)), data[1]), out=tmp_path / "bad", log=None)


# -- the command line ----------------------------------------------------------------------------
def test_train_help_groups_defaults_and_plugin_options():
    out = run(["train", "--help"]).output
    for group in ("Data:", "Model:", "Attack (training):", "Optimisation:", "Output and run:"):
        assert group in out
    assert "[default: per data set: digits 20" in out and "50 % and 75 %" in out
    assert "advplug train --plugin NAME --help" in out
    mail = run(["train", "--plugin", "mail", "--help"]).output
    assert "Options of plugin 'mail'" in mail and "--mail-burn-in INT | NONE" in mail and "[default: batch]" in mail


# -- display fixes ---------------------------------------------------------------------------------
def test_eval_reuses_best_when_it_is_last_and_compare_says_all(tmp_path):
    from advplug.tools.compare import compare

    npz = make_npz(tmp_path / "d.npz")
    a, b = tmp_path / "a", tmp_path / "b"
    for out, seed in ((a, "0"), (b, "1")):
        run(["train", "--data", f"npz:{npz}", "--epochs", "1", "--out", str(out), "--seed", seed, *FAST])
    r = run(["eval", str(a), "--attack", "natural", "--which", "both"])
    assert "last is best (both epoch 1): its results are reused" in r.output
    rec = json.loads((a / "eval.json").read_text())
    assert rec  # both checkpoints recorded
    text, warnings = compare([str(a), str(b)])  # eval.json on the whole test set vs a training run's results
    assert not any("test samples" in w for w in warnings), warnings
    one_csv, _ = compare([str(b)], "csv")
    rows = one_csv.splitlines()[1:]
    assert rows and all(row.split(",")[6] == "" for row in rows)  # one run: no std
    one_json, _ = compare([str(b)], "json")
    assert all("std" not in v for v in json.loads(one_json)[0]["results"].values())
