"""Checkpoints: atomic writes, weights_only loading, clear errors for corrupt or foreign files."""
import os

import pytest
import torch

from advplug import checkpoint
from advplug.errors import CheckpointError
from advplug.models import build_model


def test_round_trip_and_no_temp_file_left(tmp_path):
    m = build_model("digits-cnn", 10, (1, 8, 8))
    checkpoint.save(tmp_path / "last.pt", {"model": m.state_dict(), "model_name": "digits-cnn", "epoch": 0})
    assert os.listdir(tmp_path) == ["last.pt"]
    ck = checkpoint.load(tmp_path)  # a run directory resolves to last.pt
    m2 = build_model("digits-cnn", 10, (1, 8, 8))
    checkpoint.load_model_state(m2, ck, "digits-cnn")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nothing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or not an advplug checkpoint"):
        checkpoint.load(tmp_path / "bad.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an advplug checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"format": checkpoint.FORMAT, "version": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="corrupt or not an advplug checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")


def test_checkpoint_of_another_model(tmp_path):
    m = build_model("fc1", 10, (1, 8, 8))
    checkpoint.save(tmp_path / "c.pt", {"model": m.state_dict(), "model_name": "fc1"})
    with pytest.raises(CheckpointError, match="written for model 'fc1' and does not fit model 'digits-cnn'"):
        checkpoint.load_model_state(build_model("digits-cnn", 10, (1, 8, 8)), checkpoint.load(tmp_path / "c.pt"), "digits-cnn")
