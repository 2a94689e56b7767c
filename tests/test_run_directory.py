"""One run per directory: a directory that holds a run is refused unless the run is resumed or
overwritten, the default directory is unique per run, a run directory is locked against a second
writer, and planted symbolic links never make advplug write or delete outside it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from advplug.engine.trainer import Trainer
from advplug.errors import RunDirError
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


@pytest.mark.slow
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
