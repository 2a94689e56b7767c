"""Class labels are 0..K-1 with a training sample in every class: a stray label (12 in a 10-class set) or a
class left out is a one-line error naming the missing classes, never a silently bigger model; the check sees
the whole training set (before the held-out splits); the run header says how many classes the model has."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import TensorDataset

from advplug.config import TrainConfig
from advplug.data import as_bundle, load_dataset, load_digits_tensors
from advplug.data.files import load_folder
from advplug.engine.inputs import run_header, training_data
from advplug.errors import DataError
from advplug.tools.cli import cli


def digits_npz(path, y_train=None, y_test=None):
    (xt, yt), (xe, ye) = load_digits_tensors()
    np.savez(
        path,
        x_train=xt.numpy(),
        y_train=yt.numpy() if y_train is None else y_train,
        x_test=xe.numpy(),
        y_test=ye.numpy() if y_test is None else y_test,
    )
    return path


def test_a_stray_label_is_an_error_naming_the_missing_classes(tmp_path):
    y = load_digits_tensors()[0][1].numpy().copy()
    y[5] = 12
    npz = digits_npz(tmp_path / "stray.npz", y_train=y)
    with pytest.raises(DataError) as e:
        load_dataset(f"npz:{npz}")
    assert "classes 10, 11 have no training sample (labels must be 0..K-1; label 12 appears 1 time)" in str(e.value)
    res = CliRunner().invoke(cli, ["train", "--data", f"npz:{npz}", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "classes 10, 11 have no training sample" in lines[0]


def test_a_class_left_out_is_named():
    (xt, yt), test = load_digits_tensors()
    keep = yt != 3
    with pytest.raises(DataError, match=r"class 3 has no training sample \(labels must be 0..K-1"):
        as_bundle(((xt[keep], yt[keep]), test), "mine")
    x = torch.rand(6, 1, 4, 4)
    with pytest.raises(DataError, match="class 1 has no training sample"):  # torch Datasets too
        as_bundle((TensorDataset(x, torch.tensor([0, 2, 0, 2, 0, 2])), TensorDataset(x, torch.zeros(6).long())))


def test_test_labels_outside_the_training_classes_are_an_error(tmp_path):
    y = load_digits_tensors()[1][1].numpy().copy()
    y[0] = 10
    with pytest.raises(DataError, match="y_test has label 10, out of range for 10 classes"):
        load_dataset(f"npz:{digits_npz(tmp_path / 't.npz', y_test=y)}")


def test_an_empty_class_folder_is_named(tmp_path):
    from PIL import Image

    for c, n in (("cat", 4), ("dog", 0), ("emu", 4)):
        for part in ("train", "test"):
            (tmp_path / part / c).mkdir(parents=True)
            for i in range(n if part == "train" else 1):
                Image.new("L", (4, 4), 30 * i).save(tmp_path / part / c / f"{i}.png")
    with pytest.raises(DataError, match=r"class 1 \('dog'\) has no training sample"):
        load_folder(str(tmp_path))


def test_the_check_sees_the_whole_training_set_before_the_splits():
    """A class with a single training sample is valid data, wherever the held-out splits put that sample."""
    (xt, yt), test = load_digits_tensors()
    keep = torch.ones(len(yt), dtype=torch.bool)
    nines = (yt == 9).nonzero().squeeze(1)
    keep[nines[1:]] = False
    data = as_bundle(((xt[keep], yt[keep]), test), "mine")
    for size in (0.5, 0.9):
        cfg = TrainConfig(selection_size=size).resolved()
        assert training_data(cfg, data, validation=True).num_classes == 10


def test_no_built_in_data_set_trips_the_check():
    assert load_dataset("digits").num_classes == 10
    (xt, yt), (xe, ye) = load_digits_tensors()
    assert as_bundle(((xt, yt), (xe, ye)), "digits arrays").num_classes == 10


def test_the_run_header_says_how_many_classes():
    data = as_bundle((load_digits_tensors()[0], load_digits_tensors()[1]), "d")
    cfg = TrainConfig().resolved()
    header = run_header(cfg, data, 360, torch.device("cpu"), "at default", "the test set")
    assert "10 classes" in header
