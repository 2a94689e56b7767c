"""``advplug sweep``: expansion and stable names, point states from the run directories, the
coordinator's retries and failure isolation (a fake launcher, in-process), and real sweeps on
digits: a 2x2 grid with the local launcher killed and re-run, a run that dies after its first
checkpoint resumed by the re-run (through the SLURM launcher's submitit code, debug executor),
and the same 2x2 grid on a local Ray instance."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from advplug.run import directory as rundir
from advplug.tools import sweep as sw
from advplug.tools.cli import cli

# Tiny runs: one or two epochs of PGD-1 on digits, natural accuracy only at the end.
TINY = """
[base]
epochs = {epochs}
steps = 1
eval_steps = 1
n_eval = 16
batch_size = 256
final_attacks = ["natural"]
selection = "test"
"""
GRID_2X2 = (
    TINY
    + """
[grid]
seed = [0, 1]

[[method]]

[[method]]
plugins = ["mail"]
"mail-burn-in" = 0
"""
)


def write(tmp_path, text, epochs=1, name="s.toml", **top):
    head = "".join(f"{k} = {json.dumps(v)}\n" for k, v in {"out": str(tmp_path / "out"), **top}.items())
    p = tmp_path / name
    p.write_text(head + text.replace("{epochs}", str(epochs)))
    return p


# -- expansion and names --------------------------------------------------------------------
def test_grid_expands_seed_first_with_stable_names(tmp_path):
    s = sw.load_sweep(write(tmp_path, GRID_2X2))
    assert [p.name for p in s.points] == ["at-seed0", "mail-at-df253e-seed0", "at-seed1", "mail-at-df253e-seed1"]
    assert s.points[1].settings["plugin_options"] == {"mail-burn-in": 0} and s.points[1].settings["plugins"] == ["mail"]
    # adding a method and a seed renames no existing point
    more = (
        GRID_2X2.replace("seed = [0, 1]", "seed = [0, 1, 2]") + '\n[[method]]\nname = "trades"\nobjective = "trades"\n'
    )
    names = [p.name for p in sw.load_sweep(write(tmp_path, more, name="t.toml")).points]
    assert {p.name for p in s.points} < set(names) and "trades-seed2" in names and len(names) == 9


def test_data_axis_and_plugin_tables_and_one_table_per_data_set(tmp_path):
    text = (
        TINY
        + """
[grid]
data = ["digits", "cifar10"]
"mail-gamma" = [5, 10]

[[method]]
plugins = ["mail"]
[method.mail]
burn-in = 0
"""
    )
    s = sw.load_sweep(write(tmp_path, text))
    names = [p.name for p in s.points]
    assert len(set(names)) == 4 and sum("cifar10" in n for n in names) == 2
    assert all(p.settings["plugin_options"]["mail-burn-in"] == 0 for p in s.points)
    assert {p.axes["data"] for p in s.points} == {"digits", "cifar10"}
    assert {p.settings["plugin_options"]["mail-gamma"] for p in s.points} == {5, 10}


@pytest.mark.parametrize(
    "text, message",
    [
        (TINY + "[grid]\nseed = 3\n", "must be a non-empty list"),
        (TINY + "[[method]]\nfoo = 1\n", "unknown setting 'foo'"),
        (TINY + "[[method]]\nout = 'x'\n", "the sweep sets it"),
        (TINY + "[[method]]\nplugins = ['nosuchplugin']\n", "nosuchplugin"),
        (TINY + "[[method]]\nname = 'a'\n[[method]]\nname = 'a'\n", "both named 'a-seed0'"),
        (TINY + "[[method]]\nepochs = 'two'\n", "epochs must be a whole number"),
    ],
)
def test_bad_sweep_files_are_one_line_errors(tmp_path, text, message):
    res = CliRunner().invoke(cli, ["sweep", str(write(tmp_path, text)), "--dry-run"])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_a_sweep_out_that_is_not_a_path(tmp_path):
    res = CliRunner().invoke(cli, ["sweep", str(write(tmp_path, TINY, out=5)), "--dry-run"])
    assert res.exit_code == 2 and "out must be a directory path (a string), got 5" in res.output, res.output


def test_dry_run_lists_points_and_their_state(tmp_path):
    res = CliRunner().invoke(cli, ["sweep", str(write(tmp_path, GRID_2X2)), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "(4 points)" in lines[0] and lines[1].startswith("at-seed0  [new run]")
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    "example", sorted((Path(__file__).parents[1] / "examples" / "sweeps").glob("*.toml")), ids=lambda p: p.stem
)
def test_example_sweeps_expand(example):
    s = sw.load_sweep(example)
    seeds = {p.settings["seed"] for p in s.points}
    assert seeds == {0, 1, 2} and all(p.settings["data"] == "cifar10" for p in s.points) and len(s.points) >= 15


@pytest.mark.parametrize(
    "launcher, module, message", [("ray", "ray", sw.RAY_MISSING), ("slurm", "submitit", sw.SUBMITIT_MISSING)]
)
def test_a_launcher_without_its_engine_is_one_line(tmp_path, monkeypatch, launcher, module, message):
    monkeypatch.setitem(sys.modules, module, None)
    res = CliRunner().invoke(cli, ["sweep", str(write(tmp_path, GRID_2X2)), "--launcher", launcher, "--no-progress"])
    assert res.exit_code == 2 and res.output.strip() == "error: " + message


# -- point states -----------------------------------------------------------------------------
def test_point_state_follows_the_run_directory(tmp_path):
    s = sw.load_sweep(write(tmp_path, GRID_2X2))
    p = s.points[0]
    run = s.dir(p)
    assert sw.state(p, run)[0] == "new"
    run.mkdir(parents=True)
    from advplug.config import TrainConfig

    rundir.write_json(run / "config.json", TrainConfig(**p.settings).resolved().to_json())
    assert sw.state(p, run)[0] == "overwrite"  # a run without checkpoint
    (run / "last.pt").write_bytes(b"x")
    assert sw.state(p, run)[0] == "resume"
    assert sw.train_args(s, p, "resume")[:3] == ["train", "--resume", str(run)]
    with rundir.RunLock(run):  # another process writes to it: reported, not duplicated
        kind, detail = sw.state(p, run)
    assert kind == "busy" and "in use" in detail
    rundir.write_json(run / "config.json", {**json.loads((run / "config.json").read_text()), "epochs": 7})
    kind, detail = sw.state(p, run)
    assert kind == "conflict" and "epochs 7 (sweep: 1)" in detail
    (run / "results.json").write_text("{}")
    kind, detail = sw.state(p, run)  # finished under other settings: never tabulated as this point
    assert kind == "conflict" and "finished run" in detail and "epochs 7 (sweep: 1)" in detail
    rundir.write_json(run / "config.json", {**json.loads((run / "config.json").read_text()), "epochs": 1})
    assert sw.state(p, run)[0] == "done"
    other = s.dir(s.points[1])
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert sw.state(s.points[1], other)[0] == "conflict"


@pytest.mark.parametrize(
    "status",
    [
        "[1]",
        '{"points": [1]}',
        '{"points": {"at-seed0": 5}}',
        '{"points": {"at-seed0": {"attempts": "x", "status": [1]}}}',
    ],
)
def test_damaged_run_and_status_files_in_a_sweep(tmp_path, status):
    """A run directory with a damaged config.json is a conflict (never resumed or overwritten); a
    damaged sweep.json is ignored (the run directories are the truth): no traceback."""
    s = sw.load_sweep(write(tmp_path, GRID_2X2))
    p = s.points[0]
    run = s.dir(p)
    run.mkdir(parents=True)
    for text in ("[1]", "{not json"):
        (run / "config.json").write_text(text)
        kind, detail = sw.state(p, run)
        assert kind == "conflict" and "config.json is not" in detail
    (s.out / sw.STATUS_FILE).write_text(status)
    res = CliRunner().invoke(cli, ["sweep", str(s.path), "--report"])
    assert res.exit_code == 0 and "conflict" in res.output, res.output


def test_last_error_line(tmp_path):
    log = tmp_path / "x.log"
    log.write_text(
        "=== attempt 1\nerror: old\n=== attempt 2 (resume)\nTraceback (most recent call last):\n  File x\n"
        "RuntimeError: CUDA out of memory\n"
    )
    assert sw.last_error(log, 1) == "RuntimeError: CUDA out of memory"
    log.write_text("=== attempt 1\nepoch 1/2\n")
    assert sw.last_error(log, -9) == "killed by signal 9 (SIGKILL)"


# -- the coordinator, with a fake launcher ----------------------------------------------------
class FakeLauncher:
    """Finishes a point by writing results.json, or fails it (``fail``: name -> failures before success)."""

    name = "fake"
    capacity = 2

    def __init__(self, sweep, fail):
        self.sweep, self.fail, self.done, self.calls = sweep, dict(fail), [], []

    def submit(self, key, p, args, log, header):
        self.calls.append((key, args))
        log.parent.mkdir(parents=True, exist_ok=True)
        run = self.sweep.dir(p)
        if self.fail.get(key, 0) > 0:
            self.fail[key] -= 1
            prev = log.read_text() if log.exists() else ""
            log.write_text(prev + f"=== attempt {header}\nerror: boom {key}\n")
            self.done.append((key, 2))
        else:
            run.mkdir(parents=True, exist_ok=True)
            (run / "results.json").write_text("{}")
            self.done.append((key, 0))

    def wait(self, timeout):
        out, self.done = [(k, rc, None) for k, rc in self.done], []
        return out

    def stop(self):
        pass

    def close(self):
        pass


def test_retries_and_one_failure_never_stops_the_others(tmp_path):
    s = sw.load_sweep(write(tmp_path, GRID_2X2, retries=1))
    fake = FakeLauncher(s, {"at-seed0": 1, "at-seed1": 5})
    points = sw.run_sweep(s, fake, progress=False, log=lambda m: None)
    assert points["at-seed0"]["status"] == "done" and points["at-seed0"]["attempts"] == 2
    assert points["at-seed1"]["status"] == "failed" and points["at-seed1"]["attempts"] == 2
    assert points["at-seed1"]["last_error"] == "error: boom at-seed1"
    assert all(points[n]["status"] == "done" for n in ("mail-at-df253e-seed0", "mail-at-df253e-seed1"))
    saved = json.loads((s.out / "sweep.json").read_text())
    assert saved["counts"] == {"done": 3, "failed": 1} and saved["points"]["at-seed1"]["status"] == "failed"
    lines = sw.summary(s)
    assert lines[0].startswith("4 points: 3 done") and any(
        "failed" in x and "at-seed1" in x and "boom" in x for x in lines
    )
    # re-running launches only the failed point, which now gets its retries again
    fake2 = FakeLauncher(s, {})
    points = sw.run_sweep(s, fake2, progress=False, log=lambda m: None)
    assert [k for k, _ in fake2.calls] == ["at-seed1"] and points["at-seed1"]["status"] == "done"
    assert points["at-seed1"]["attempts"] == 3


def test_a_second_coordinator_on_the_same_sweep_is_refused(tmp_path):
    s = sw.load_sweep(write(tmp_path, GRID_2X2))
    s.out.mkdir(parents=True)
    with rundir.RunLock(s.out):
        res = CliRunner().invoke(cli, ["sweep", str(s.path), "--no-progress"])
    assert res.exit_code == 2 and "being run by another advplug process" in res.output


# -- real sweeps on digits ----------------------------------------------------------------
def _results(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in Path(out).glob("*/results.json")}


def _epochs(run):
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_local_2x2_killed_and_rerun_finishes_without_redoing_finished_points(tmp_path):
    f = write(tmp_path, GRID_2X2, epochs=2)
    out = tmp_path / "out"
    with open(tmp_path / "first.log", "w") as log:
        coord = subprocess.Popen(
            [sys.executable, "-m", "advplug", "sweep", str(f), "--jobs", "2", "--no-progress"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while not _results(out) and coord.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        coord.send_signal(signal.SIGKILL)  # the coordinator dies; its runs die with it (PDEATHSIG)
        coord.wait()
    before = _results(out)
    assert before, (tmp_path / "first.log").read_text()
    s = sw.load_sweep(f)
    deadline = time.monotonic() + 30  # the killed runs' locks are released by the kernel
    while any(sw.state(p, s.dir(p))[0] == "busy" for p in s.points) and time.monotonic() < deadline:
        time.sleep(0.2)
    res = CliRunner().invoke(cli, ["sweep", str(f), "--jobs", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    after = _results(out)
    assert set(after) == {p.name for p in s.points}
    assert all(after[n] == t for n, t in before.items())  # finished points were not run again
    assert all(_epochs(s.dir(p)) == [1, 2] for p in s.points)  # every run trained each epoch once
    status = json.loads((out / "sweep.json").read_text())
    assert status["counts"] == {"done": 4}
    assert "| AT | 2 |" in res.output and "±" in res.output and "4 points: 4 done" in res.output
    assert (out / "table.md").is_file()
    # a third time: nothing to do
    res = CliRunner().invoke(cli, ["sweep", str(f), "--no-progress"])
    assert res.exit_code == 0 and "4 finished, 0 to run" in res.output and _results(out) == after
    rep = CliRunner().invoke(cli, ["sweep", str(f), "--report"])
    assert rep.exit_code == 0 and "| mail mail-burn-in=0 | 2 |" in rep.output


@pytest.mark.slow
def test_a_run_that_dies_is_reported_then_resumed_from_its_checkpoint(tmp_path):
    """Local launcher first; the re-run goes through the SLURM launcher (submitit's in-process
    debug executor: the same submit/done/result code a cluster gets) when submitit is installed."""
    text = TINY + '\n[slurm]\ncluster = "debug"\ntimeout_min = 10\n'
    text += '\n[[method]]\nenv = { ADVPLUG_FAULT = "after-last@0", ADVPLUG_FAULT_EXIT = "1" }\n'
    f = write(tmp_path, text, epochs=2)
    res = CliRunner().invoke(cli, ["sweep", str(f), "--retries", "0", "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "failed      at-seed0 (1 attempt): exit status 137 (killed, e.g. out of memory)" in res.output
    run = tmp_path / "out" / "at-seed0"
    assert (run / "last.pt").is_file() and not (run / "results.json").exists()
    # the re-run resumes it (the fault is in epoch 0, which the resumed run does not repeat)
    try:
        import submitit  # noqa: F401

        launcher = ["--launcher", "slurm"]
    except ImportError:
        launcher = []
    res = CliRunner().invoke(cli, ["sweep", str(f), "--no-progress", *launcher])
    assert res.exit_code == 0, res.output
    assert "start at-seed0 (resume, attempt 1)" in res.output and _epochs(run) == [1, 2]
    assert "resumed from" in (tmp_path / "out" / "logs" / "at-seed0.log").read_text()
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]["at-seed0"]["attempts"] == 2


@pytest.mark.slow
def test_the_same_2x2_sweep_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'advplug[ray]')")
    s = sw.load_sweep(write(tmp_path, GRID_2X2))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        launcher = sw.make_launcher("ray", 1)
        points = sw.run_sweep(s, launcher, progress=False, log=lambda m: None)
    finally:
        ray.shutdown()
    assert {n: r["status"] for n, r in points.items()} == {p.name: "done" for p in s.points}
    text, _ = sw.report(s)
    assert "| AT | 2 |" in text and "| mail mail-burn-in=0 | 2 |" in text


def test_a_finished_run_under_other_settings_is_left_out_of_the_table(tmp_path):
    s = sw.load_sweep(write(tmp_path, GRID_2X2))
    p = s.points[0]
    run = s.dir(p)
    run.mkdir(parents=True)
    from advplug.config import TrainConfig

    rundir.write_json(run / "config.json", {**TrainConfig(**p.settings).resolved().to_json(), "eps": 0.3})
    (run / "results.json").write_text("{}")
    text, warnings = sw.report(s)
    assert text == "(no finished points yet)"
    assert len(warnings) == 1 and p.name in warnings[0] and "eps 0.3" in warnings[0]
