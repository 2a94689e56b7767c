"""Run directories a researcher can trust: one run per directory, nothing lost under faults,
no code imported because a run file names it, one-line errors for bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from advplug.engine.inputs import resume_config
from advplug.engine.trainer import Trainer
from advplug.errors import CheckpointError, OptionError, RunDirError
from advplug.run import checkpoint
from advplug.run import directory as rundir
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


# -- one run per directory ------------------------------------------------------------------
def test_an_existing_run_is_refused_and_overwrite_removes_all_its_files(tmp_path):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    (out / "report").mkdir()
    (out / "report" / "old.png").write_bytes(b"x")
    (out / "eval.json").write_text("{}")
    before = (out / "last.pt").read_bytes()
    with pytest.raises(
        RunDirError,
        match=r"already holds a run: continue it with `advplug train --resume .*`, or replace it with --overwrite",
    ):
        train(out, epochs=1, seed=1)
    assert (out / "last.pt").read_bytes() == before  # untouched
    Trainer(tiny_config(str(out), epochs=1, seed=1), data=digits_subset(128, 32), overwrite=True, log=quiet).fit()
    assert not (out / "report").exists() and not (out / "eval.json").exists()
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_default_directory_is_unique_per_run_and_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = []
    for seed in (0, 0, 1):
        t = Trainer(
            tiny_config(None, epochs=1, seed=seed, plugins=("mail",), plugin_options={"mail-burn-in": 0}),
            data=digits_subset(128, 32),
            log=logs.append,
        )
        t.fit()
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["mail-at-seed0", "mail-at-seed0-2", "mail-at-seed1"]
    assert logs[0] == "run directory: runs/mail-at-seed0" and logs[-1] == "run directory: runs/mail-at-seed1"


def test_cli_refuses_a_run_directory_with_resume_and_overwrite_in_the_message(tmp_path):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    res = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out", str(out)])
    one_line_error(res, "already holds a run")
    assert "--resume" in res.stderr and "--overwrite" in res.stderr


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda p: p.write_text("x"), "is a file, not a directory"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "is not empty and holds no advplug run"),
    ],
)
def test_out_that_is_a_file_or_someone_elses_directory(tmp_path, make, pattern):
    out = tmp_path / "out"
    make(out)
    one_line_error(CliRunner().invoke(cli, ["train", "--epochs", "1", "--out", str(out)]), pattern)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    one_line_error(CliRunner().invoke(cli, ["train", "--epochs", "1", "--out", str(ro / "run")]), "cannot write to")


def test_read_only_directory_as_root(tmp_path, monkeypatch):
    """Root ignores permissions, so the write probe is made to fail as on a read-only mount."""
    real = Path.write_bytes

    def refuse(self, data):
        if self.name.startswith(".write-test"):
            raise OSError(30, "Read-only file system")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(RunDirError, match="cannot write to .*: Read-only file system"):
        rundir.prepare(tmp_path / "run")


def test_a_second_writer_is_refused_while_a_run_holds_the_directory(tmp_path):
    out = tmp_path / "run"
    t = train(out, epochs=1)
    with pytest.raises(RunDirError, match=r"is in use by another advplug process \(pid \d+\)"):
        rundir.RunLock(out).acquire()
    # a second process too (flock is per open file, held by the kernel until the first process lets go)
    code = f"from advplug.run.directory import RunLock; RunLock({str(out)!r}).acquire()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0 and "in use by another advplug process" in res.stderr
    res = CliRunner().invoke(cli, ["eval", str(out), "--which", "last", "--attack", "natural"])
    one_line_error(res, "in use by another advplug process")
    t.fit()  # releases the lock
    rundir.RunLock(out).acquire().release()


def test_symlinks_in_a_run_directory_are_never_followed(tmp_path):
    """A planted symlink (the lock, a temp name, a report or dump file, a subdirectory) never makes
    advplug write or delete outside the run directory; a symlinked run directory is kept on --overwrite."""
    from advplug.run.dump import SampleDump
    from advplug.tools.report import report

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    real = tmp_path / "storage"
    out = tmp_path / "run"
    out.symlink_to(real, target_is_directory=True)  # runs/x -> the user's storage: allowed
    real.mkdir()
    train(out, epochs=1).fit()
    (out / "link").symlink_to(victim, target_is_directory=True)
    Trainer(tiny_config(str(out), epochs=1), data=digits_subset(128, 32), overwrite=True, log=quiet).fit()
    assert out.is_symlink() and (real / "last.pt").is_file() and not (out / "link").exists()
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]

    (out / ".lock").unlink()
    (out / ".lock").symlink_to(victim / "keep.txt")
    with pytest.raises(RunDirError, match="symbolic link"):
        rundir.RunLock(out).acquire()
    (out / ".lock").unlink()
    pid = os.getpid()
    (out / f".metrics.jsonl.tmp{pid}").symlink_to(victim / "new.txt")  # dangling: would be created
    rundir.write_text(out / "metrics.jsonl", (out / "metrics.jsonl").read_text())
    (out / f".last.pt.tmp{pid}").symlink_to(victim / "keep.txt")
    checkpoint.save(
        out / "last.pt", {k: v for k, v in checkpoint.load(out).items() if k not in ("path", "format", "version")}
    )
    (out / "report").mkdir()
    (out / "report" / "accuracy.png").symlink_to(victim / "keep.txt")
    report(out)  # the PNGs are written as files, replacing the link
    assert not (out / "report" / "accuracy.png").is_symlink()
    (out / "dumps").mkdir()
    (out / "dumps" / "weights-epoch001.npz").symlink_to(victim / "keep.txt")
    dump = SampleDump(out, "weights")
    dump.add(index=torch.arange(3))
    dump.write(0)
    assert not (out / "dumps" / "weights-epoch001.npz").is_symlink()
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"] and (victim / "keep.txt").read_text() == "precious"
    checkpoint.load(out)
    (out / "report2").symlink_to(victim, target_is_directory=True)
    with pytest.raises(RunDirError, match="symbolic link"):
        rundir.subdir(out, "report2")


# -- crash consistency: a kill at each point of the epoch end, then --resume ----------------
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
    assert json.loads((out / "results.json").read_text()) == json.loads((uninterrupted / "results.json").read_text())


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


# -- no code from run files -------------------------------------------------------------------
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


# -- bad input: one line, exit 2 ---------------------------------------------------------------
@pytest.mark.parametrize(
    "toml,pattern",
    [
        ('epochs = "three"', "epochs must be a whole number, got 'three'"),
        ("epochs = 1.5", "epochs must be a whole number, got 1.5"),
        ('eps = "big"', "eps must be a number, got 'big'"),
        ("milestones = 5", "milestones must be a list of whole epochs, got 5"),
        ('plugins = "mail"', "plugins must be a list of names, got 'mail'"),
        ('tensorboard = "yes"', "tensorboard must be true or false"),
        ("lr = inf", "lr must be a finite number, got inf"),
        ("selection_size = inf", "selection-size must be a finite number, got inf"),
        ("weight_decay = 1e400", "weight-decay must be a finite number, got inf"),
        ("seed = 99999999999999999999999", "--seed must be in 0..4294967295"),
    ],
)
def test_wrong_types_in_a_config_file(tmp_path, toml, pattern):
    f = tmp_path / "c.toml"
    f.write_text(toml + "\n")
    one_line_error(CliRunner().invoke(cli, ["train", "--config", str(f), "--out", str(tmp_path / "r")]), pattern)


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("c.json", b"[1]", "expected a table of settings, got list"),
        ("c.json", b'"x"', "expected a table of settings, got str"),
        ("c.json", b'{"plugin_options": [1]}', "plugin_options must be a table"),
        ("c.toml", b"\xcc\xff\x00", "cannot be parsed: 'utf-8' codec can't decode"),
    ],
)
def test_a_config_file_that_is_not_a_table_of_settings(tmp_path, name, content, pattern):
    f = tmp_path / name
    f.write_bytes(content)
    one_line_error(CliRunner().invoke(cli, ["train", "--config", str(f), "--out", str(tmp_path / "r")]), pattern)


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["train", "--eps", "2"], "--eps must be < 1 (inputs are in [0, 1]"),
        (["train", "--alpha", "3"], "--alpha (attack step size) must be <= 1"),
        (["train", "--model", "builtins:dict"], "--model builtins:dict returned a dict, not a torch.nn.Module"),
        (["train", "--device", "nonsense"], "--device 'nonsense' is not a device"),
        (["train", "--selection-size", "inf"], "selection-size must be a finite number, got inf"),
        (["train", "--seed", "-1"], "--seed must be in 0..4294967295"),
    ],
)
def test_bad_values(tmp_path, args, pattern):
    one_line_error(CliRunner().invoke(cli, [*args, "--epochs", "1", "--out", str(tmp_path / "r")]), pattern)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu(tmp_path):
    one_line_error(
        CliRunner().invoke(cli, ["train", "--device", "cuda", "--out", str(tmp_path / "r")]),
        "this machine has no usable CUDA GPU",
    )


def test_eval_bad_eps_and_mismatched_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    one_line_error(CliRunner().invoke(cli, ["eval", str(out), "--eps", "-1"]), "--eps must be in (0, 1)")
    ck = checkpoint.load(out, need="training")
    ck["num_classes"] = 7
    checkpoint.save(tmp_path / "odd.pt", {k: v for k, v in ck.items() if k not in ("path", "format", "version")})
    one_line_error(
        CliRunner().invoke(cli, ["eval", str(tmp_path / "odd.pt"), "--attack", "natural"]), "does not fit model"
    )


def test_zero_byte_and_damaged_checkpoints_on_resume(tmp_path):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(b"")
    one_line_error(CliRunner().invoke(cli, ["train", "--resume", str(out)]), "is empty (0 bytes)")
    ck = checkpoint._read  # the real loader, on a checkpoint with a missing key
    (out / "last.pt").write_bytes(good)
    raw = checkpoint.load(out, need="training")
    del raw["rng"]
    checkpoint.save(out / "last.pt", {k: v for k, v in raw.items() if k not in ("path", "format", "version")})
    one_line_error(CliRunner().invoke(cli, ["train", "--resume", str(out)]), "has no 'rng' entry")
    assert ck is not None


def test_resume_refuses_a_config_json_edited_after_the_checkpoint(tmp_path):
    """--resume reads config.json; one that no longer matches last.pt would continue the run under
    other settings, silently. Raising epochs (extending the run) and the device stay allowed."""
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "eps": 0.3, "epochs": 2}))
    res = CliRunner().invoke(cli, ["train", "--resume", str(out)])
    one_line_error(res, "config.json' does not match the run's checkpoint")
    assert "eps 0.3 (last.pt: 0.2)" in res.stderr
    (out / "config.json").write_text(json.dumps({**saved, "epochs": 2, "device": "cpu"}))
    Trainer(resume_config(out), data=digits_subset(128, 32), resume=True, log=quiet).fit()
    assert checkpoint.load(out)["epoch"] == 1


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(epoch=-3), "it is after epoch -2, this run has epochs 1..2"),  # would train epochs -2..0 unlabelled
        (dict(epoch=10**9), "it is after epoch 1000000001"),  # would end at once as if finished
        (dict(best_acc=float("nan")), "accuracy nan do not fit"),  # no epoch would ever be "best"
        (dict(best_epoch=-5), "best epoch -4"),
        (dict(metrics="[1]\n"), "does not hold one object per epoch"),
        (dict(metrics=""), "(0 entries for 1 epochs)"),
    ],
)
def test_resume_refuses_damaged_epoch_counters(tmp_path, change, pattern):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "epochs": 2}))
    ck = checkpoint.load(out, need="training")
    checkpoint.save(
        out / "last.pt", {**{k: v for k, v in ck.items() if k not in ("path", "format", "version")}, **change}
    )
    with pytest.raises(CheckpointError, match=re.escape(pattern)):
        Trainer(resume_config(out), data=digits_subset(128, 32), resume=True, log=quiet)


@pytest.mark.parametrize(
    "damage,pattern",
    [
        (lambda b: torch.zeros(3), "momentum_buffer of parameter 0 is of shape (3,), expected"),
        (lambda b: b * float("nan"), "momentum_buffer of parameter 0 is not finite"),
    ],
)
def test_resume_refuses_a_damaged_optimizer_state(tmp_path, damage, pattern):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "epochs": 2}))
    ck = checkpoint.load(out, need="training")
    state = ck["optimizer"]["state"][0]
    state["momentum_buffer"] = damage(state["momentum_buffer"])
    checkpoint.save(out / "last.pt", {k: v for k, v in ck.items() if k not in ("path", "format", "version")})
    with pytest.raises(CheckpointError, match=re.escape(pattern)):
        Trainer(resume_config(out), data=digits_subset(128, 32), resume=True, log=quiet)


def test_resume_with_another_world_size_is_refused(tmp_path):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    raw = checkpoint.load(out, need="training")
    raw["world_size"], raw["rng"] = 2, raw["rng"] * 2
    checkpoint.save(out / "last.pt", {k: v for k, v in raw.items() if k not in ("path", "format", "version")})
    with pytest.raises(
        CheckpointError, match=r"written by 2 process\(es\), this run has 1: resume with the same number"
    ):
        Trainer(resume_config(out), data=digits_subset(128, 32), resume=True, log=quiet)


@pytest.mark.parametrize(
    "kind,pattern",
    [
        ("nan", "plugin 'bad' returned negative or non-finite weights in epoch 1"),
        ("negative", "plugin 'bad' returned negative or non-finite weights in epoch 1"),
        ("zero", "the combined weights of a whole batch were zero in epoch 1"),
    ],
)
def test_bad_weights_name_the_plugin_not_the_loss(tmp_path, monkeypatch, kind, pattern):
    from advplug.errors import PluginError
    from advplug.testing import BadWeights, installed_plugins

    monkeypatch.setattr(BadWeights, "kind", kind)
    with installed_plugins(bad="advplug.testing:BadWeights"):
        with pytest.raises(PluginError, match=pattern):
            train(tmp_path / "run", plugins=("bad",), epochs=1).fit()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_plugin_with_a_wrong_hook_signature(tmp_path):
    from advplug.testing import installed_plugins

    with installed_plugins(wrongsig="advplug.testing:WrongSignature"):
        res = CliRunner().invoke(cli, ["plugins"])
        assert res.exit_code == 0 and 'plugin "wrongsig" does not fit the hook contract' in res.stderr
        assert "  wrongsig " not in res.output  # not listed as fine
        one_line_error(
            CliRunner().invoke(cli, ["train", "--plugin", "wrongsig", "--out", str(tmp_path / "r")]),
            "{'batch'} are declared in the hookimpl but can not be found in the hookspec",
        )


def test_metrics_are_strict_json_even_with_an_infinite_plugin_value(tmp_path):
    """GAIRAT records lambda = inf before its schedule starts: metrics.jsonl stays strict JSON."""

    def strict(s):
        return json.loads(s, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    train(tmp_path / "run", plugins=("gairat",), epochs=2).fit()
    recs = [strict(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and "gairat" in recs[0]
