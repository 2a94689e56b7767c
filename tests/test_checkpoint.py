"""Checkpoints: atomic writes, weights_only loading, CRC and schema checks, one-line errors for
damaged, foreign or hostile files, and the best/last consistency rule."""

import errno
import os
import zipfile

import pytest
import torch

from advplug.errors import CheckpointError
from advplug.models import build_model
from advplug.run import checkpoint


def small_ckpt(epoch=0, **extra):
    m = build_model("digits-cnn", 10, (1, 8, 8))
    return {
        "model": m.state_dict(),
        "model_name": "digits-cnn",
        "epoch": epoch,
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "config": "{}",
        **extra,
    }


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
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        checkpoint.load(tmp_path / "bad.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an advplug checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_zero_byte_file_is_one_clear_line(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")  # the typical crash artefact
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        checkpoint.load(tmp_path)


def test_truncated_file(tmp_path):
    checkpoint.save(tmp_path / "c.pt", small_ckpt())
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(tmp_path / "c.pt")


def test_flipped_bit_in_a_weight_tensor_is_caught_by_the_crc(tmp_path):
    checkpoint.save(tmp_path / "c.pt", small_ckpt())
    p = tmp_path / "c.pt"
    with zipfile.ZipFile(p) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    b = bytearray(p.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    b[start + info.file_size // 2] ^= 0x10
    p.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="checksum of its entry .* does not match"):
        checkpoint.load(p)


@pytest.mark.parametrize(
    "change,pattern",
    [
        (lambda ck: ck.pop("rng"), "has no 'rng' entry"),
        (lambda ck: ck.update(epoch="3"), "'epoch' entry is a str, expected int"),
        (lambda ck: ck.update(epoch=True), "'epoch' entry is a bool, expected int"),
        (lambda ck: ck.update(plugins={"mail": [1, 2]}), "state of plugin 'mail' is a list, expected dict"),
        (lambda ck: ck.update(metrics=None), "'metrics' entry is a NoneType"),
        (lambda ck: ck.update(num_classes=-1), "its number of classes -1 is not in 2..100000"),
        (lambda ck: ck.update(num_classes=10**12), "its number of classes 1000000000000 is not in"),
        (lambda ck: ck.update(input_shape=[1, 8, "x"]), "its input shape \\[1, 8, 'x'\\] is not a list of sizes"),
        (lambda ck: ck.update(input_shape=[1, -8, 8]), "is not a list of sizes"),
        (lambda ck: ck.update(input_shape=[]), "is not a list of sizes"),
    ],
)
def test_damaged_training_checkpoint_entries(tmp_path, change, pattern):
    ck = small_ckpt(
        optimizer={},
        scheduler={},
        rng=[checkpoint.rng_state()],
        world_size=1,
        plugins={},
        best_acc=0.5,
        best_epoch=0,
        metrics="",
    )
    checkpoint.save(tmp_path / "last.pt", ck)
    checkpoint.load(tmp_path, need="training")  # intact: fine
    change(ck)
    checkpoint.save(tmp_path / "last.pt", ck)
    with pytest.raises(CheckpointError, match=pattern):
        checkpoint.load(tmp_path, need="training")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused_without_torchs_advice(tmp_path):
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_path / "evil.pt")
    msg = str(e.value)
    assert "refuses to load" in msg and "weights_only=False" not in msg and "\n" not in msg


def test_disk_full_leaves_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    checkpoint.save(tmp_path / "last.pt", small_ckpt(epoch=0))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"no space left on device writing .*last.pt. \(the previous checkpoint"):
        checkpoint.save(tmp_path / "last.pt", small_ckpt(epoch=1))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"] and checkpoint.load(tmp_path, need="eval")["epoch"] == 0


def test_checkpoint_of_another_model(tmp_path):
    m = build_model("fc1", 10, (1, 8, 8))
    checkpoint.save(tmp_path / "c.pt", {"model": m.state_dict(), "model_name": "fc1"})
    with pytest.raises(CheckpointError, match="written for model 'fc1' and does not fit model 'digits-cnn'"):
        checkpoint.load_model_state(
            build_model("digits-cnn", 10, (1, 8, 8)), checkpoint.load(tmp_path / "c.pt"), "digits-cnn"
        )


def test_non_finite_weights_are_refused(tmp_path):
    """No run saves NaN/Inf weights (training stops on a NaN loss): such a file would evaluate to
    chance-level numbers that look like results."""
    m = build_model("fc1", 10, (1, 8, 8))
    state = m.state_dict()
    checkpoint.load_model_state(m, {"model": state, "path": "c.pt"}, "fc1")
    bad = {k: v * float("nan") if i == 0 else v for i, (k, v) in enumerate(state.items())}
    with pytest.raises(CheckpointError, match="is damaged: its weight .* holds NaN or Inf"):
        checkpoint.load_model_state(m, {"model": bad, "path": "c.pt"}, "fc1")


def test_best_follows_the_record_in_last(tmp_path):
    """last.pt is written before best.pt: a kill between them leaves best.pt older than the
    recorded best, which is then last.pt itself; repair_best makes the files agree."""
    checkpoint.save(tmp_path / "best.pt", small_ckpt(epoch=1))
    checkpoint.save(tmp_path / "last.pt", small_ckpt(epoch=2, best_epoch=1))
    assert checkpoint.load_best(tmp_path)["epoch"] == 1
    checkpoint.save(tmp_path / "last.pt", small_ckpt(epoch=3, best_epoch=3))  # killed before best.pt
    assert checkpoint.load_best(tmp_path)["epoch"] == 3
    assert checkpoint.repair_best(tmp_path) and checkpoint.load(tmp_path, "best", need="eval")["epoch"] == 3
    assert not checkpoint.repair_best(tmp_path)
    checkpoint.save(tmp_path / "last.pt", small_ckpt(epoch=5, best_epoch=4))  # best.pt lost or altered
    with pytest.raises(CheckpointError, match="does not hold the recorded best epoch 5"):
        checkpoint.load_best(tmp_path)


def test_a_best_checkpoint_from_another_run_is_refused(tmp_path):
    """best.pt is matched to last.pt by the metrics record both carry (per-epoch timings make it
    unique), not only by its epoch number: a best.pt copied from another run is an error."""
    import shutil

    from advplug.engine.trainer import Trainer
    from advplug.testing import digits_subset, tiny_config

    for name in ("a", "b"):
        Trainer(tiny_config(str(tmp_path / name), epochs=1), data=digits_subset(64, 16), log=lambda s: None).fit()
    assert checkpoint.load_best(tmp_path / "a")["epoch"] == 0
    shutil.copy(tmp_path / "b" / "best.pt", tmp_path / "a" / "best.pt")
    with pytest.raises(CheckpointError, match="best.pt' is not from the run of .*the run directory was altered"):
        checkpoint.load_best(tmp_path / "a")
