"""End to end on a slice of digits: train, evaluate, resume exactly, and the run's files."""

import json

import pytest

from advplug.engine.trainer import Trainer
from advplug.errors import NonFiniteLossError
from advplug.run import checkpoint
from advplug.testing import digits_subset, installed_plugins, run_and_resume, same_tensors, tiny_config


def quiet(_):
    pass


def test_train_writes_run_directory(tmp_path):
    results = Trainer(tiny_config(str(tmp_path), selection="validation"), data=digits_subset(), log=quiet).fit()
    assert set(results["last (epoch 2)"]) == {"Natural", "PGD-5"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["epoch"] for r in recs] == [1, 2]  # 1-based, as the console
    for key in ("epoch", "lr", "train_loss", "train_acc", "val_clean_acc", "val_pgd_acc", "seconds"):
        assert key in recs[0]
    assert recs[1]["lr"] == pytest.approx(0.005)  # milestone at epoch 1, gamma 0.1
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["eps"] == pytest.approx(0.2) and cfg["attack_bn"] == "eval"
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,")
    ck = checkpoint.load(tmp_path, "last")
    assert ck["epoch"] == 1 and "rng" in ck and "optimizer" in ck


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    full, part = run_and_resume(tmp_path, digits_subset(), milestones=(2,))
    assert same_tensors(full["model"], part["model"], atol=1e-6)
    assert same_tensors(full["optimizer"]["state"][0], part["optimizer"]["state"][0], atol=1e-6)
    recs = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in recs] == [1, 2, 3]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with installed_plugins(nan="advplug.testing:NaNLoss"):
        cfg = tiny_config(str(tmp_path), plugins=("nan",), epochs=3)
        with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, step 4"):
            Trainer(cfg, data=digits_subset(), log=quiet).fit()
    assert not (tmp_path / "last.pt").exists()


def test_meow_end_to_end_with_resume_state(tmp_path):
    cfg = tiny_config(str(tmp_path), plugins=("meow",))
    Trainer(cfg, data=digits_subset(), log=quiet).fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "weights" in recs[0] and set(recs[0]["weights"]) == {"mean", "std", "min", "max", "ess"}
    assert recs[0]["meow"]["codes"] >= 10
    state = checkpoint.load(tmp_path)["plugins"]["meow"]
    assert state["initialized"] and state["codebook"].shape[0] == recs[0]["meow"]["codes"]


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_torchrun(tmp_path):
    """torchrun with 2 gloo processes: sharded batches, all-reduced weight normalisation, rank-0 outputs."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "advplug",
        "train",
        "--plugin",
        "mail",
        "--mail-burn-in",
        "0",
        "--epochs",
        "1",
        "--steps",
        "3",
        "--no-progress",
        "--device",
        "cpu",
        "--n-eval",
        "64",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert "weights" in rec and (out / "results.json").is_file()
