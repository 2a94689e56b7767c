"""Extending a finished or interrupted run with ``--resume RUN --epochs N`` (CLI) or ``train(resume=RUN, epochs=N)``
(Python): explicit milestones are kept, milestones derived from fractions of the run are recomputed from the new
length where not yet passed, the extension is recorded in ``config.json`` and the final evaluation runs again."""

import json

import pytest
import torch
from click.testing import CliRunner

from advplug.engine.inputs import resume_config
from advplug.engine.trainer import Trainer
from advplug.errors import OptionError
from advplug.run import checkpoint
from advplug.run import directory as rundir
from advplug.testing import digits_subset, tiny_config
from advplug.tools import api
from advplug.tools.cli import cli

DATA = digits_subset(n_train=128, n_test=32)
FAST = dict(steps=2, eval_steps=2, final_attacks=("natural",))


def quiet(_):
    pass


def fit(out, **kw):
    return Trainer(tiny_config(str(out), **{**FAST, **kw}), data=DATA, log=quiet).fit()


def extend(out, epochs, log=quiet):
    return Trainer(resume_config(out), data=DATA, resume=True, epochs=epochs, log=log).fit()


def epochs_in_metrics(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_extended_finished_run_equals_a_straight_run(tmp_path, one_thread):
    fit(tmp_path / "straight", epochs=3, milestones=(1,))
    fit(tmp_path / "run", epochs=2, milestones=(1,))
    lines: list[str] = []
    results = extend(tmp_path / "run", 3, log=lines.append)
    a, b = checkpoint.load(tmp_path / "straight")["model"], checkpoint.load(tmp_path / "run")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert epochs_in_metrics(tmp_path / "run") == [1, 2, 3]
    assert "last (epoch 3)" in results
    final = json.loads((tmp_path / "run" / "results.json").read_text())["entries"]
    assert {(e["checkpoint"], e["epoch"]) for e in final.values()} == {("last", 3)}  # evaluated again at the new end
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["epochs"] == 3 and cfg["milestones"] == [1]
    (ext,) = cfg["extended_from"]
    assert ext["epochs_before"] == 2 and ext["epochs"] == 3 and ext["completed"] == 2
    assert ext["milestones_before"] == [1] and ext["milestones"] == [1] and "kept" in ext["rule"]
    assert any("extended from 2 to 3 epochs" in line and "kept" in line for line in lines), lines


def test_derived_milestones_recomputed_where_not_yet_passed(tmp_path, one_thread, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("ADVPLUG_FAULT", "after-metrics@0")  # interrupted after its first epoch
    with pytest.raises(rundir.InjectedFault):
        fit(out, epochs=3, milestones=None)  # digits: drops at 60 % and 85 % of 3 epochs, i.e. (1, 2)
    monkeypatch.delenv("ADVPLUG_FAULT")
    assert json.loads((out / "config.json").read_text())["milestones"] == [1, 2]
    extend(out, 5)
    cfg = json.loads((out / "config.json").read_text())
    # 1 (60 %) was passed: kept; 2 (85 %) was not: 85 % of 5 epochs is 4
    assert cfg["epochs"] == 5 and cfg["milestones"] == [1, 4]
    (ext,) = cfg["extended_from"]
    assert ext["completed"] == 1 and ext["milestones_before"] == [1, 2] and "fractions" in ext["rule"]
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.05, 0.005, 0.005, 0.005, 0.0005])
    # an extended run resumes again after a later interruption without complaint
    extend(out, 6)
    assert epochs_in_metrics(out) == [1, 2, 3, 4, 5, 6]


def test_interrupted_extension_resumes_plainly(tmp_path, one_thread, monkeypatch):
    out = tmp_path / "run"
    fit(out, epochs=2, milestones=None)
    monkeypatch.setenv("ADVPLUG_FAULT", "before-last@2")  # the extension stops before its first checkpoint
    with pytest.raises(rundir.InjectedFault):
        extend(out, 4)
    monkeypatch.delenv("ADVPLUG_FAULT")
    Trainer(resume_config(out), data=DATA, resume=True, log=quiet).fit()  # config.json already says 4 epochs
    assert epochs_in_metrics(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("epochs", [1, 2])
def test_extension_to_no_more_epochs_than_done_is_refused(tmp_path, one_thread, epochs):
    fit(tmp_path, epochs=2)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(OptionError, match=r"--epochs \d: .* has trained 2 epochs") as e:
        extend(tmp_path, epochs)
    assert "\n" not in str(e.value)
    assert (tmp_path / "config.json").read_text() == before


def test_plain_resume_of_a_finished_run_says_how_to_extend(tmp_path, one_thread):
    fit(tmp_path, epochs=1)
    lines: list[str] = []
    Trainer(resume_config(tmp_path), data=DATA, resume=True, log=lines.append).fit()  # the final evaluation again
    assert any("only the final evaluation runs" in line and "--epochs N (N > 1)" in line for line in lines), lines


def test_cli_and_api_extend_and_still_refuse_other_changes(tmp_path, one_thread):
    out, settings = str(tmp_path / "run"), tmp_path / "fast.toml"
    settings.write_text('steps = 1\neval_steps = 1\nbatch_size = 512\nfinal_attacks = ["natural"]\nprogress = false\n')
    res = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out", out, "--config", str(settings)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["train", "--resume", out, "--epochs", "2", "--eps", "0.1"])
    assert res.exit_code == 2 and "drop --eps" in res.stderr, res.stderr
    res = CliRunner().invoke(cli, ["train", "--resume", out, "--epochs", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "extended from 1 to 2 epochs" in res.output
    result = api.train(resume=out, epochs=3, log=None)
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]
    assert [e["epochs"] for e in result.config["extended_from"]] == [2, 3]
    with pytest.raises(OptionError, match="resume"):
        api.train(resume=out, epochs=4, eps=0.1, log=None)


def lrs_of(out):
    return [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("planned, done, epochs", [(10, 2, 3), (10, 2, 4), (1, 1, 2)])
def test_a_drop_moved_onto_trained_epochs_is_applied_at_once(tmp_path, one_thread, monkeypatch, planned, done, epochs):
    """The recomputed schedule gives every epoch the learning rate a fresh run of the new length gives it: a drop
    whose new place is already trained is applied at the next epoch, never lost (nor two merged into one)."""
    fit(tmp_path / "fresh", epochs=epochs, milestones=None)
    out = tmp_path / "run"
    if done < planned:
        monkeypatch.setenv("ADVPLUG_FAULT", f"after-metrics@{done - 1}")
        with pytest.raises(rundir.InjectedFault):
            fit(out, epochs=planned, milestones=None)
        monkeypatch.delenv("ADVPLUG_FAULT")
    else:
        fit(out, epochs=planned, milestones=None)
    extend(out, epochs)
    fresh, run = lrs_of(tmp_path / "fresh"), lrs_of(out)
    assert run[done:] == pytest.approx(fresh[done:]), (run, fresh)


def test_repeated_milestones_are_refused(tmp_path):
    with pytest.raises(OptionError, match="more than once"):
        tiny_config(str(tmp_path / "r"), epochs=3, milestones=(1, 1)).resolved()
