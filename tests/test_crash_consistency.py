"""Nothing lost under a kill: a fault at each point of the epoch end (or a hard kill of the process),
then --resume, reproduces the uninterrupted run; Ctrl-C names the last checkpoint and the resume
command."""

import json
import os
import subprocess
import sys

import pytest
import torch

from advplug.engine.inputs import resume_config
from advplug.engine.trainer import Trainer
from advplug.run import checkpoint
from advplug.run import directory as rundir
from advplug.testing import digits_subset, tiny_config


def quiet(_):
    pass


def train(out, **kw):
    return Trainer(tiny_config(str(out), **kw), data=digits_subset(128, 32), log=quiet)


def _records(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("seconds")
    return recs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    Trainer(
        tiny_config(str(out), epochs=3, milestones=(2,), selection="validation"), data=digits_subset(160, 32), log=quiet
    ).fit()
    return out


@pytest.mark.parametrize("point", ["before-last", "after-last", "after-best", "after-metrics"])
@pytest.mark.slow
def test_kill_at_each_point_then_resume_reproduces_the_run(tmp_path, monkeypatch, uninterrupted, point):
    out = tmp_path / "run"
    cfg = tiny_config(str(out), epochs=3, milestones=(2,), selection="validation")
    monkeypatch.setenv("ADVPLUG_FAULT", f"{point}@1")
    with pytest.raises(rundir.InjectedFault):
        Trainer(cfg, data=digits_subset(160, 32), log=quiet).fit()
    monkeypatch.delenv("ADVPLUG_FAULT")
    (out / ".last.pt.tmp99999").write_bytes(b"\0" * 1024)  # what a kill inside torch.save leaves
    Trainer(resume_config(out), data=digits_subset(160, 32), resume=True, log=quiet).fit()
    assert not list(out.glob(".*.tmp*"))
    full, part = checkpoint.load(uninterrupted, need="training"), checkpoint.load(out, need="training")
    assert all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])
    assert _records(out) == _records(uninterrupted)
    assert checkpoint.load_best(out)["epoch"] == part["best_epoch"] == full["best_epoch"]
    best = checkpoint.load(out, "best", need="eval")
    assert best["epoch"] == part["best_epoch"]
    assert _reproducible(out / "results.json") == _reproducible(uninterrupted / "results.json")


def _reproducible(path) -> dict:
    """A results file without what the machine measures (wall time, peak memory): the entries and the pass counts,
    which a resumed run must reproduce."""
    res = json.loads(path.read_text())
    for measured in ("train_seconds", "peak_memory_bytes"):
        res["cost"].pop(measured)
    return res


@pytest.mark.slow
def test_hard_kill_in_a_subprocess_keeps_metrics_and_best_consistent(tmp_path):
    """os._exit at the worst point (checkpoint written, metrics not): the epoch is in the checkpoint
    and comes back on resume; best.pt agrees with the record."""
    out = tmp_path / "run"
    code = (
        "from advplug.testing import tiny_config, digits_subset\nfrom advplug.engine.trainer import Trainer\n"
        f"Trainer(tiny_config({str(out)!r}, epochs=3, milestones=(2,)), data=digits_subset(160, 32), "
        "log=lambda s: None).fit()\n"
    )
    env = {**os.environ, "ADVPLUG_FAULT": "after-last@1", "ADVPLUG_FAULT_EXIT": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 137, res.stderr[-2000:]
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    ck = checkpoint.load(out, need="training")
    assert ck["epoch"] == 1 and checkpoint.load_best(out)["epoch"] == ck["best_epoch"]
    t = Trainer(resume_config(out), data=digits_subset(160, 32), resume=True, log=quiet)
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    t.close()


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(tmp_path, monkeypatch):
    out = tmp_path / "run"
    t = train(out, epochs=3)
    real = t.train_epoch

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(epoch)

    monkeypatch.setattr(t, "train_epoch", interrupt)
    with pytest.raises(
        Exception,
        match=rf"interrupted in epoch 2; the last checkpoint is {out}/last.pt \(epoch 1\); "
        rf"continue with: advplug train --resume {out}",
    ):
        t.fit()
    rundir.RunLock(out).acquire().release()  # released
