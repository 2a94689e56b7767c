"""The run store under real faults: a full file system (or a file-size limit) while a checkpoint is
written is one line, exit 2, the previous checkpoint intact and no temp file left; a second writer
refused at the lock never touches the running one's files; a checkpoint that cannot be read for lack
of permission says so; `--which best-ema` on a run without EMA says the run has none."""

from __future__ import annotations

import errno
import io
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from advplug.config import TrainConfig
from advplug.engine.trainer import Trainer
from advplug.errors import CheckpointError, RunDirError
from advplug.run import checkpoint
from advplug.run import directory as rundir
from advplug.tools.cli import cli

FAST = dict(steps=1, eval_steps=1, n_eval=16, batch_size=16, progress=False, selection_size=8, model="digits-cnn")
FAST_ARGS = ["--steps", "1", "--eval-steps", "1", "--n-eval", "16", "--batch-size", "16", "--no-progress"]
FAST_ARGS += ["--selection-size", "8", "--model", "digits-cnn", "--device", "cpu"]


def tiny_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (40, 6, 6), dtype=np.uint8),
        y_train=np.arange(40) % 3,
        x_test=rng.integers(0, 256, (12, 6, 6), dtype=np.uint8),
        y_test=np.arange(12) % 3,
    )
    return path


def stopped_after_epoch_1(out: Path, npz: Path, monkeypatch, **kw) -> None:
    """A two-epoch run on tiny npz data, killed after its first epoch (``--resume`` continues it)."""
    monkeypatch.setenv("ADVPLUG_FAULT", "after-metrics@0")
    cfg = TrainConfig(data=f"npz:{npz}", epochs=2, out=str(out), device="cpu", **{**FAST, **kw})
    with pytest.raises(rundir.InjectedFault):
        Trainer(cfg, log=lambda s: None).fit()
    monkeypatch.delenv("ADVPLUG_FAULT")


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tmp" in p.name)


def assert_previous_checkpoint_intact(out: Path) -> None:
    ck = checkpoint.load(out, need="training")
    assert ck["epoch"] == 0 and temps(out) == []  # the first epoch (0-based)


# -- a full file system ------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A real 4 MiB tmpfs (needs root and a mount namespace that allows it; skipped otherwise)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> None:
    """Fill the file system until ``leave`` bytes are free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    assert free - leave > 0


def test_disk_full_while_writing_a_checkpoint(tmp_path, small_fs, monkeypatch):
    out = small_fs / "run"
    stopped_after_epoch_1(out, tiny_npz(tmp_path / "d.npz"), monkeypatch)
    fill(small_fs, 64 * 1024)  # the small files fit, a checkpoint (760 KB) does not
    res = CliRunner().invoke(cli, ["train", "--resume", str(out), "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 2, res.output
    line = one_line(res.stderr)
    assert f"no space left on device writing {str(out / 'last.pt')!r} (the previous checkpoint is intact)" in line
    assert_previous_checkpoint_intact(out)
    # the text files of the run store say the same
    with pytest.raises(rundir.RunDirError, match="no space left on device writing .*results.json"):
        rundir.write_bytes(out / "results.json", b"x" * 200_000)
    assert temps(out) == []


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel's EFBIG instead of a kill


@pytest.mark.slow
def test_file_size_limit_while_writing_a_checkpoint(tmp_path, monkeypatch):
    """Where no small file system can be mounted: a real EFBIG from the kernel (RLIMIT_FSIZE)."""
    out = tmp_path / "run"
    stopped_after_epoch_1(out, tiny_npz(tmp_path / "d.npz"), monkeypatch)
    res = subprocess.run(
        [sys.executable, "-m", "advplug", "train", "--resume", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    line = one_line(res.stderr)
    assert f"cannot write checkpoint {str(out / 'last.pt')!r}: file too large" in line, line
    assert "the previous checkpoint is intact" in line
    assert_previous_checkpoint_intact(out)


# -- a second writer ---------------------------------------------------------------------------
def paused_writer(args: list[str], point: str) -> subprocess.Popen:
    """``advplug ARGS`` in a subprocess, stopped (SIGSTOP) in the middle of writing ``point``'s
    file: its temp file written, not yet renamed."""
    env = {**os.environ, "ADVPLUG_FAULT": f"mid-write@{point}", "ADVPLUG_FAULT_STOP": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "advplug", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), p.communicate()
    return p


def refused(args: list[str], pattern: str) -> None:
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 2, res.output
    assert pattern in one_line(res.stderr)


@pytest.mark.slow
def test_a_refused_second_writer_leaves_the_running_one_intact(tmp_path, monkeypatch):
    npz = tiny_npz(tmp_path / "d.npz")
    # a new run, stopped while it writes config.json (the directory holds only .lock and the temp file)
    new = tmp_path / "new"
    p = paused_writer(["train", "--data", f"npz:{npz}", "--epochs", "1", *FAST_ARGS, "--out", str(new)], "config.json")
    try:
        tmp = temps(new)
        assert tmp == [f".config.json.tmp{p.pid}"], sorted(os.listdir(new))
        refused(["train", "--data", f"npz:{npz}", "--epochs", "1", *FAST_ARGS, "--out", str(new)], "in use by another")
        refused(
            ["train", "--data", f"npz:{npz}", "--epochs", "1", *FAST_ARGS, "--out", str(new), "--overwrite"], "in use"
        )
        refused(["train", "--resume", str(new)], "in use by another")  # before "holds no checkpoint"
        assert temps(new) == tmp
    finally:
        os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert checkpoint.load(new, need="training")["epoch"] == 0 and temps(new) == []

    # a resumed run, stopped while it writes last.pt of its second epoch
    out = tmp_path / "run"
    stopped_after_epoch_1(out, npz, monkeypatch)
    p = paused_writer(["train", "--resume", str(out), "--no-progress"], "last.pt")
    try:
        tmp = temps(out)
        assert tmp == [f".last.pt.tmp{p.pid}"]
        refused(["train", "--resume", str(out)], "in use by another advplug process")
        refused(["train", "--data", f"npz:{npz}", *FAST_ARGS, "--out", str(out)], "in use")  # before "holds a run"
        assert temps(out) == tmp
    finally:
        os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert checkpoint.load(out, need="training")["epoch"] == 1 and temps(out) == []


@pytest.mark.parametrize("files, kw", [(["config.json"], {"resume": True}), (["config.json", "last.pt"], {})])
def test_a_locked_directory_is_refused_as_in_use_before_any_other_check(tmp_path, files, kw):
    for f in files:
        (tmp_path / f).write_text("")
    with rundir.RunLock(tmp_path):
        with pytest.raises(RunDirError, match=r"in use by another advplug process \(pid \d+\)"):
            rundir.prepare(tmp_path, **kw)
        assert sorted(os.listdir(tmp_path)) == sorted([*files, ".lock"])


# -- misleading messages -----------------------------------------------------------------------
def test_an_unreadable_checkpoint_says_permission_denied(tmp_path, monkeypatch):
    """chmod 000 denies every user but root; as root, opening the file is made to fail as it does for them."""
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"model": {"w": torch.zeros(3)}, "model_name": "x"})
    path.chmod(0)
    if os.geteuid() == 0:
        real = io.open

        def deny(file, *a, **k):
            if isinstance(file, (str, os.PathLike)) and Path(file) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real(file, *a, **k)

        monkeypatch.setattr(io, "open", deny)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert f"cannot read {str(path)!r}: permission denied" in str(e.value)
    assert "corrupt" not in str(e.value)


def test_best_ema_of_a_run_without_ema(tmp_path, monkeypatch):
    out = tmp_path / "run"
    stopped_after_epoch_1(out, tiny_npz(tmp_path / "d.npz"), monkeypatch)
    for which in ("best-ema", "last-ema"):
        res = CliRunner().invoke(cli, ["eval", str(out), "--which", which, "--attack", "natural"])
        assert res.exit_code == 2, res.output
        line = one_line(res.stderr)
        assert "has no EMA model" in line and "--ema" in line and "altered" not in line, line
